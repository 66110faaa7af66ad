"""The real Kueue controller manager, run against the test cluster.

`tests/testbin/build-kueue.sh` builds upstream's `sigs.k8s.io/kueue/cmd/kueue` from the
wrapper module `tests/testbin/kueue/` (pinned there) and copies the module's CRDs next
to it; `TAPESTRY_KUEUE_ASSETS=<dir>` uses a prebuilt one. `Kueue(...).start()` installs
the CRDs, writes a Configuration and runs the manager as a local process with the test
cluster's kubeconfig, every listener on a free 127.0.0.1 port; its output goes to
`<work_dir>/kueue.log`, whose tail every start or wait failure shows.

No Mutating/ValidatingWebhookConfiguration is registered, so the API server never calls
Kueue's webhooks: what the Job webhook would do (suspend a queued Job) the operator does
itself, so Kueue's part here is the admission, not the defaulting. Kueue starts only
with serving certificates: without its internal certificate management it insists on a
metrics certificate at a fixed path under /etc. So its own certificate rotator runs, as
in a real install: it fills a Secret in Kueue's namespace, which `start` copies into the
webhook certDir as the kubelet would mount it, and injects its CA into the conversion
webhooks of five CRDs; it needs those webhooks declared in the CRDs (the module's CRD
bases do not have them, its kustomize patches add them). They point at Kueue's webhook
server on 127.0.0.1, but the rotator's certificate names only the in-cluster Service, so
a request that needed a conversion (a v1beta1 object) would fail: everything here uses
v1beta2, the storage version, for which the API server never converts.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import yaml

from tests.kube.client import ApiError, KubeClient, Obj
from tests.kube.proc import die_with_parent
from tests.kube.tapestry_env import kubectl
from tests.ports import free_ports
from tests.testbin.build import run_build

REPO_ROOT = Path(__file__).resolve().parents[2]
API = "kueue.x-k8s.io/v1beta2"
NAMESPACE = "kueue-system"  # Kueue's own namespace (its certificate Secret lives there)
CERT_SECRET = "kueue-webhook-server-cert"  # the Configuration's default webhookSecretName
# The CRDs whose conversion webhook Kueue's certificate rotator injects its CA into
# (pkg/util/cert in the module); it is not ready until each has one.
CONVERTED = ("localqueues", "clusterqueues", "workloads", "cohorts", "multikueueclusters")
START_TIMEOUT_S = 180.0


class KueueError(RuntimeError):
    """Kueue could not be built or started; the message says why."""


def ensure_kueue(progress: TextIO | None = None) -> Path:
    """Builds (or finds) Kueue; returns the directory with `kueue` and `crds/`.

    build-kueue.sh is idempotent and honours TAPESTRY_KUEUE_ASSETS, so this is cheap
    once the binary is cached. Its progress is copied to `progress`."""
    return run_build(
        "build-kueue.sh",
        progress=progress,
        error=KueueError,
        hint="It needs Go >= 1.26 and the Go module proxy"
        " (or TAPESTRY_KUEUE_ASSETS=<dir with kueue and crds/>).",
    )


def crd_documents(crd_dir: Path, webhook_port: int) -> list[Obj]:
    """Kueue's CRDs, with the conversion webhook its rotator expects on CONVERTED."""
    docs = []
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["plural"] in CONVERTED:
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "conversionReviewVersions": ["v1"],
                    "clientConfig": {"url": f"https://127.0.0.1:{webhook_port}/convert"},
                },
            }
        docs.append(crd)
    return docs


def configuration(work_dir: Path, health_port: int, metrics_port: int, webhook_port: int) -> Obj:
    """Kueue's Configuration: the batch/job integration only, jobs managed only when
    they name a queue, one instance (no leader election), no visibility API server."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "manageJobsWithoutQueueName": False,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {
            "host": "127.0.0.1",
            "port": webhook_port,
            "certDir": str(work_dir / "webhook-certs"),
        },
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": True},
        "integrations": {"frameworks": ["batch/job"]},
        # An aggregated API server on its own port: nothing here queries it.
        "featureGates": {"VisibilityOnDemand": False},
    }


class Kueue:
    """One Kueue controller manager process for a test cluster (admin kubeconfig)."""

    def __init__(self, assets: Path, kubeconfig: Path, work_dir: Path) -> None:
        self.assets = assets
        self.kubeconfig = kubeconfig
        self.work_dir = work_dir
        self.log = work_dir / "kueue.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Kueue:
        """Installs the CRDs and Kueue's namespace, starts the manager, and waits until
        it is ready (its readiness check passes once its webhook server serves)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        health, metrics, webhook = free_ports(3)
        self._install(webhook)
        config = self.work_dir / "kueue-config.yaml"
        config.write_text(yaml.safe_dump(configuration(self.work_dir, health, metrics, webhook)))
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*die_with_parent(), str(self.assets / "kueue"), f"--config={config}",
                 "--zap-log-level=2"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ok(f"http://127.0.0.1:{health}/readyz"):
            self._mount_certs()
            if self.proc.poll() is not None:
                raise KueueError(
                    f"kueue exited with {self.proc.returncode}; last lines of {self.log}:\n"
                    + self.tail()
                )
            if time.monotonic() > deadline:
                self.stop()
                raise KueueError(
                    f"kueue not ready after {START_TIMEOUT_S:.0f}s; last lines of {self.log}:\n"
                    + self.tail()
                )
            time.sleep(0.5)
        return self

    def _install(self, webhook_port: int) -> None:
        docs = crd_documents(self.assets / "crds", webhook_port)
        kubectl(
            self.kubeconfig, "apply", "--server-side", "--force-conflicts",
            "--field-manager=tapestry-tests", "-f", "-",
            input="\n".join(json.dumps(d) for d in docs),
        )  # fmt: skip
        names = [f"crd/{d['metadata']['name']}" for d in docs]
        kubectl(self.kubeconfig, "wait", "--for=condition=Established", "--timeout=60s", *names)
        client = KubeClient.from_kubeconfig(self.kubeconfig)
        client.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        # The rotator fills this Secret (Kueue's install manifests create it empty).
        meta = {"name": CERT_SECRET, "namespace": NAMESPACE}
        client.apply({"apiVersion": "v1", "kind": "Secret", "metadata": meta})

    def _mount_certs(self) -> None:
        """Copies the rotator's Secret into the webhook certDir once it is filled, as
        the kubelet does for the Secret volume of Kueue's Deployment: the rotator waits
        for the files before it reports ready."""
        cert_dir = self.work_dir / "webhook-certs"
        if (cert_dir / "tls.crt").exists():
            return
        client = KubeClient.from_kubeconfig(self.kubeconfig)
        data = client.get(f"/api/v1/namespaces/{NAMESPACE}/secrets/{CERT_SECRET}").get("data")
        if not data or not all(data.get(k) for k in ("tls.crt", "tls.key")):
            return
        cert_dir.mkdir(mode=0o700, exist_ok=True)
        for name in ("ca.crt", "tls.key", "tls.crt"):  # tls.crt last: the rotator looks for it
            if name in data:
                (cert_dir / name).write_bytes(base64.b64decode(data[name]))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def tail(self, lines: int = 25) -> str:
        try:
            with self.log.open(errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return ""


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def queue_objects(name: str, namespace: str, quota: dict[str, str], local_queue: str) -> list[Obj]:
    """A ResourceFlavor and a ClusterQueue `name` with `quota` (cpu, memory) in that
    flavor, open to every namespace, and the LocalQueue `local_queue` in `namespace`
    that submits to it."""
    return [
        {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": name}},
        {
            "apiVersion": API,
            "kind": "ClusterQueue",
            "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {},
                "resourceGroups": [
                    {
                        "coveredResources": sorted(quota),
                        "flavors": [
                            {
                                "name": name,
                                "resources": [
                                    {"name": r, "nominalQuota": q} for r, q in sorted(quota.items())
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": API,
            "kind": "LocalQueue",
            "metadata": {"name": local_queue, "namespace": namespace},
            "spec": {"clusterQueue": name},
        },
    ]


def workloads(client: KubeClient, namespace: str) -> list[Obj]:
    """The Workloads Kueue made in `namespace`."""
    try:
        listed = client.get(f"/apis/{API}/namespaces/{namespace}/workloads")
    except ApiError as err:
        if err.status == 404:
            return []
        raise
    return list(listed.get("items", []))


def condition(obj: Obj, kind: str) -> Obj:
    """The status condition of type `kind` ({} when there is none)."""
    for cond in obj.get("status", {}).get("conditions", []):
        if cond.get("type") == kind:
            return dict(cond)
    return {}


def delete_all(client: KubeClient, objects: Iterable[Obj]) -> None:
    """Deletes the objects (cluster-scoped ones outlive a test's namespaces)."""
    for obj in objects:
        try:
            client.delete(client.path_of(obj))
        except (ApiError, LookupError) as err:
            print(f"could not delete {obj['kind']} {obj['metadata']['name']}: {err}",
                  file=sys.stderr)  # fmt: skip
