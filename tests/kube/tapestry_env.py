"""Tapestry on a test cluster: CRDs, Secrets, data volumes, the operator process, and
the single-cluster example with real keys and the test store's endpoint.

Shared by the end-to-end tests and `make kube-demo`, so what the demo shows is what
the tests check.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tapestry_protocol.exchange import COORDINATOR
from tapestry_protocol.signing import SigningKey
from tapestry_telemetry.rounds import FINAL
from tests.kube.client import ApiError, KubeClient, Obj
from tests.kube.cluster import REPO_ROOT
from tests.kube.helpers import kubectl_binary
from tests.ports import free_port
from tests.s3servers import S3Server

CRDS = sorted((REPO_ROOT / "crds").glob("tapestry.dev_*.yaml"))
EXAMPLE = REPO_ROOT / "examples" / "single-cluster"
API = "tapestry.dev/v1alpha1"
STORE_SECRET = "tapestry-store"
SIGNING_SECRET = "tapestry-signing-key"
COORDINATOR_SECRET = "tapestry-coordinator-key"
DATA_PVC = "tapestry-data"


def load_yaml(paths: Iterable[Path]) -> list[Obj]:
    return [doc for p in paths for doc in yaml.safe_load_all(p.read_text()) if doc]


def kubectl(kubeconfig: Path, *args: str, input: str | None = None) -> str:
    result = subprocess.run(
        [kubectl_binary(), f"--kubeconfig={kubeconfig}", *args],
        input=input, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr or result.stdout}")
    return result.stdout


def install_crds(kubeconfig: Path) -> None:
    """Apply the CRDs from `crds/` and wait until the API server serves them."""
    for crd in CRDS:
        kubectl(kubeconfig, "apply", "--server-side", "-f", str(crd))
    names = [f"crd/{yaml.safe_load(p.read_text())['metadata']['name']}" for p in CRDS]
    kubectl(kubeconfig, "wait", "--for=condition=Established", "--timeout=60s", *names)


def secret(namespace: str, name: str, data: dict[str, bytes]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def store_secret(namespace: str, server: S3Server) -> Obj:
    """The store credentials as a Secret with accessKey/secretKey entries (MinIO naming)."""
    return secret(
        namespace,
        STORE_SECRET,
        {"accessKey": server.access_key.encode(), "secretKey": server.secret_key.encode()},
    )


def signing_secret(namespace: str, name: str, key: SigningKey) -> Obj:
    return secret(namespace, name, {"signing.key": key.private_pem()})


def data_volume(namespace: str, host_dir: Path) -> list[Obj]:
    """A PersistentVolume on the host directory and the PVC bound to it."""
    pv_name = f"{DATA_PVC}-{namespace}"
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv_name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": str(host_dir), "type": "Directory"},
                "claimRef": {"namespace": namespace, "name": DATA_PVC},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": DATA_PVC, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": pv_name,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    ]


@dataclass
class Keys:
    """Every party's signing key: the coordinator's and one per member."""

    coordinator: SigningKey
    members: dict[str, SigningKey]

    @classmethod
    def generate(cls, members: Iterable[str]) -> Keys:
        return cls(SigningKey.generate(COORDINATOR), {m: SigningKey.generate(m) for m in members})


def render_example(
    docs: list[Obj],
    keys: Keys,
    endpoint: str,
    *,
    bucket: str = "tapestry",
    suffix: str = "",
    overrides: dict[str, Any] | None = None,
) -> list[Obj]:
    """The example manifests with real public keys, the test store's endpoint and bucket,
    and `suffix` appended to every namespace (so tests do not share objects)."""
    out = []
    for doc in docs:
        doc = yaml.safe_load(yaml.safe_dump(doc))  # a deep copy, anchors resolved
        meta = doc["metadata"]
        if doc["kind"] == "Namespace":
            meta["name"] += suffix
        elif "namespace" in meta:
            meta["namespace"] += suffix
        spec = doc.get("spec", {})
        if "store" in spec:
            spec["store"]["bucket"] = bucket
        if doc["kind"] == "Federation":
            for member in spec["members"]:
                member["publicKey"] = keys.members[member["name"]].public_key_text
            spec["roundDefaults"].update(overrides or {})
        if doc["kind"] == "Participant":
            spec["coordinatorPublicKey"] = keys.coordinator.public_key_text
        if doc["kind"] in ("Federation", "Participant"):
            spec["store"]["endpoint"] = endpoint
        out.append(doc)
    return out


@dataclass
class OperatorProcess:
    """The operator as its own process, exactly as a user starts it."""

    kubeconfig: Path
    log: Path
    role: str = "both"
    namespaces: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    # Extra environment (e.g. OTEL_* settings). Unless it sets TAPESTRY_METRICS_PORT,
    # the Prometheus endpoint is off; when it does, it listens on 127.0.0.1.
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> OperatorProcess:
        args = [sys.executable, "-m", "tapestry_operator", "--role", self.role]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        args += ["--liveness", f"http://127.0.0.1:{free_port()}/healthz"]
        if "TAPESTRY_METRICS_PORT" not in self.env:
            args += ["--metrics-port", "0"]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        env.update({"OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1", **self.env})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, no graceful shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """SIGTERM and wait: the graceful shutdown Kubernetes would ask for."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def wait_for(
    client: KubeClient, path: str, done: Any, timeout: float, what: str, diagnose: Any = None
) -> Obj:
    """Poll an object until `done(obj)`; on timeout fail with its last state."""
    deadline = time.monotonic() + timeout
    last: Obj | None = None
    while time.monotonic() < deadline:
        try:
            last = client.get(path)
        except ApiError as err:
            if err.status != 404:
                raise
            last = None
        if last is not None and done(last):
            return last
        time.sleep(1.0)
    extra = diagnose() if diagnose else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n{last}\n{extra}")


def verdict_seen(number: int) -> Any:
    """A Participant predicate: it has recorded the round's final verdict on its own update.
    Its operator reads the result on its own poll, so this trails the round's Succeeded."""

    def seen(participant: Obj) -> bool:
        rows = participant.get("status", {}).get("rounds", [])
        return any(r["round"] == number and r["state"] in FINAL for r in rows)

    return seen
