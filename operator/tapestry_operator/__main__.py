"""`python -m tapestry_operator`: run the operator against the current kubeconfig (or
in-cluster), in one role or both.

    python -m tapestry_operator --role both                # all namespaces
    python -m tapestry_operator --role participant -n de   # one namespace
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import kopf

from tapestry_operator.handlers import ROLES, configure, register
from tapestry_operator.kube import Kube


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log collectors parse without rules."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("k8s_obj", "namespace", "name"):
            if hasattr(record, key):
                entry[key] = str(getattr(record, key))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tapestry_operator", description=__doc__)
    p.add_argument(
        "--role",
        choices=ROLES,
        default=os.environ.get("TAPESTRY_ROLE", "both"),
        help="which resources to reconcile (default: $TAPESTRY_ROLE or both)",
    )
    p.add_argument(
        "-n", "--namespace", action="append", default=None,
        help="watch only this namespace (repeatable; default: all namespaces)",
    )  # fmt: skip
    p.add_argument(
        "--liveness",
        default=os.environ.get("TAPESTRY_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="liveness endpoint URL (default: %(default)s)",
    )
    p.add_argument("--log-format", choices=("json", "text"), default="json")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    registry = kopf.OperatorRegistry()
    kube = Kube()
    register(registry, args.role, kube)

    @kopf.on.startup(registry=registry)
    def _startup(settings: kopf.OperatorSettings, **_: object) -> None:
        configure(settings)

    @kopf.on.login(registry=registry)
    def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """The same credentials as the Kubernetes client: in-cluster or kubeconfig."""
        return kopf.login_via_client(**kwargs)

    kopf.run(
        registry=registry,
        standalone=True,  # one replica (Recreate): no peering objects needed
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
