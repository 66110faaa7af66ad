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

import tapestry_telemetry as telemetry
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
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on this port at /metrics, 0 = off (default: "
        f"${telemetry.METRICS_PORT_ENV} or {telemetry.DEFAULT_METRICS_PORT}; the bind address "
        f"is $OTEL_EXPORTER_PROMETHEUS_HOST, default 0.0.0.0; off too when "
        f"${telemetry.METRICS_EXPORTER_ENV} is set without 'prometheus')",
    )
    p.add_argument("--log-format", choices=("json", "text"), default="json")
    p.add_argument("--verbose", action="store_true")
    return p


def _telemetry(metrics_port: int | None) -> bool:
    """Traces and metrics from the OTEL_* environment, and /metrics. A port that cannot
    be listened on is logged and the operator goes on without /metrics (observability
    never stops reconciliation); a malformed setting is a usage error (False)."""
    log = logging.getLogger(__name__)
    try:
        port = telemetry.metrics_port_from_env() if metrics_port is None else metrics_port
        if not 0 <= port <= 65535:
            raise ValueError(f"--metrics-port must be between 0 and 65535, got {port}")
        telemetry.metrics_exporters()  # OTEL_METRICS_EXPORTER: refused here, not ignored
    except ValueError as e:
        log.error("%s", e)
        return False
    try:
        telemetry.setup(telemetry.Service.OPERATOR, prometheus_port=port)
    except OSError as e:
        log.error("%s; going on without the Prometheus endpoint", e)
        telemetry.setup(telemetry.Service.OPERATOR)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    if not _telemetry(args.metrics_port):
        return 2
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

    try:
        kopf.run(
            registry=registry,
            standalone=True,  # one replica (Recreate): no peering objects needed
            clusterwide=not args.namespace,
            namespaces=args.namespace or (),
            liveness_endpoint=args.liveness or None,
        )
    finally:
        telemetry.shutdown()  # the last spans and metrics go out before the pod stops
    return 0


if __name__ == "__main__":
    sys.exit(main())
