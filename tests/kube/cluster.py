"""Launches a real Kubernetes control plane on 127.0.0.1 for the tests.

etcd + kube-apiserver + kube-controller-manager (built by
tests/testbin/build-kube.sh) with generated certificates, RBAC, and
service-account token issuance, plus the node agent (node_agent.py) that runs
pods as local processes. Every port is picked free at start.

Run `python -m tests.kube.cluster` from the repo root for an interactive
cluster; it prints the KUBECONFIG to use and runs until Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import yaml

from tests.certs import CertificateAuthority, CertPair, write_signing_key
from tests.kube.client import ApiError, KubeClient
from tests.kube.proc import die_with_parent
from tests.ports import free_port, free_ports
from tests.testbin.build import run_build

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_NAME = "tapestry-node"
SERVICE_CIDR = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


class ClusterError(RuntimeError):
    """The control plane could not be built or started; the message says why."""


def ensure_binaries(progress: TextIO | None = None) -> Path:
    """Builds (or finds) etcd/kube-apiserver/kube-controller-manager; returns their dir.

    build-kube.sh is idempotent and honours TAPESTRY_KUBE_ASSETS, so this is
    cheap once the binaries are cached. Its progress is copied to `progress`.
    """
    return run_build("build-kube.sh", progress=progress, error=ClusterError)


class Component:
    """One server process whose output goes to <log_dir>/<name>.log."""

    def __init__(
        self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*die_with_parent(), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            with self.log.open(errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ClusterError(
                f"{self.name} exited with {self.proc.returncode}; last lines of {self.log}:\n"
                + self.log_tail()
            )

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until(what: str, ready: Callable[[], bool], component: Component, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        component.check_alive()
        if time.monotonic() > deadline:
            raise ClusterError(
                f"timed out after {timeout:.0f}s waiting for {what}; last lines of "
                f"{component.log}:\n{component.log_tail()}"
            )
        time.sleep(0.2)


def _https_ok(url: str, ctx: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def write_kubeconfig(path: Path, server: str, ca: Path, user: CertPair) -> None:
    """A kubeconfig that names credential files, readable by kubectl and KubeClient."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "tapestry", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [
            {
                "name": "user",
                "user": {"client-certificate": str(user.cert), "client-key": str(user.key)},
            }
        ],
        "contexts": [{"name": "tapestry", "context": {"cluster": "tapestry", "user": "user"}}],
        "current-context": "tapestry",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


class ControlPlane:
    """etcd, kube-apiserver and kube-controller-manager, all on 127.0.0.1."""

    def __init__(self, bin_dir: Path, work_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.work_dir = work_dir
        self.pki = CertificateAuthority(work_dir / "pki")
        self.components: list[Component] = []
        self.server = ""
        self.admin_kubeconfig = work_dir / "admin.kubeconfig"
        p = self.pki
        self.admin = p.issue("admin", "tapestry-admin", orgs=("system:masters",), client=True)
        self.kubelet_serving = p.issue("kubelet", NODE_NAME, ips=("127.0.0.1",), server=True)
        self.sa_key = p.dir / "sa.key"
        self.sa_pub = p.dir / "sa.pub"
        write_signing_key(self.sa_key, self.sa_pub)

    def _start(
        self, name: str, make_argv: Callable[[], list[str]], ready: Callable[[], bool]
    ) -> Component:
        """Starts a component; retries when a just-picked free port got taken meanwhile."""
        for attempt in range(3):
            comp = Component(name, make_argv(), self.work_dir)
            try:
                wait_until(f"{name} to become ready", ready, comp, timeout=90)
            except ClusterError:
                comp.stop()
                if attempt < 2 and "address already in use" in comp.log_tail(200):
                    continue
                raise
            self.components.append(comp)
            return comp
        raise AssertionError("unreachable")

    def start(self) -> None:
        log_dir = self.work_dir
        etcd_port = 0

        def etcd_argv() -> list[str]:
            nonlocal etcd_port
            etcd_port, peer = free_ports(2)
            client_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer}"
            return [
                str(self.bin_dir / "etcd"),
                "--name=tapestry",
                f"--data-dir={log_dir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=tapestry={peer_url}",
                "--unsafe-no-fsync",  # throwaway data: skip fsync, much faster on CI disks
                "--log-level=warn",
            ]

        def etcd_ready() -> bool:
            try:
                url = f"http://127.0.0.1:{etcd_port}/health"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return b'"true"' in resp.read()
            except OSError:
                return False

        self._start("etcd", etcd_argv, etcd_ready)

        p = self.pki
        serving = p.issue(
            "apiserver",
            "kube-apiserver",
            ips=("127.0.0.1", "10.0.0.1"),
            dns=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            server=True,
        )
        kubelet_client = p.issue(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            orgs=("system:masters",),
            client=True,
        )
        admin_ctx = ssl.create_default_context(cafile=str(p.pair.cert))
        admin_ctx.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        api_port = 0

        def apiserver_argv() -> list[str]:
            nonlocal api_port
            api_port = free_port()
            return [
                str(self.bin_dir / "kube-apiserver"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--cert-dir={log_dir / 'apiserver-certs'}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={p.pair.cert}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={self.sa_pub}",
                f"--service-account-signing-key-file={self.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--kubelet-client-certificate={kubelet_client.cert}",
                f"--kubelet-client-key={kubelet_client.key}",
                f"--kubelet-certificate-authority={p.pair.cert}",
                "--kubelet-preferred-address-types=InternalIP",
                "--allow-privileged=true",
                # The `kubernetes` Service's endpoint would be 127.0.0.1, which
                # Endpoints validation rejects; pods reach the API through the
                # KUBERNETES_SERVICE_HOST the node agent sets instead.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=1",
            ]

        def apiserver_ready() -> bool:
            return _https_ok(f"https://127.0.0.1:{api_port}/readyz", admin_ctx)

        self._start("kube-apiserver", apiserver_argv, apiserver_ready)
        self.server = f"https://127.0.0.1:{api_port}"
        write_kubeconfig(self.admin_kubeconfig, self.server, p.pair.cert, self.admin)

        kcm_identity = p.issue("controller-manager", "system:kube-controller-manager", client=True)
        kcm_kubeconfig = self.work_dir / "controller-manager.kubeconfig"
        write_kubeconfig(kcm_kubeconfig, self.server, p.pair.cert, kcm_identity)
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        kcm_port = 0

        def kcm_argv() -> list[str]:
            nonlocal kcm_port
            kcm_port = free_port()
            return [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kcm_kubeconfig}",
                f"--authentication-kubeconfig={kcm_kubeconfig}",
                f"--authorization-kubeconfig={kcm_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={kcm_port}",
                f"--cert-dir={log_dir / 'controller-manager-certs'}",
                "--leader-elect=false",  # one instance; saves the lease acquisition wait
                # Pod IPs are loopback addresses (127.10.x.y), which Endpoints and
                # EndpointSlice validation reject: those controllers would only
                # retry and spam Warning events. Pod DNS comes from the node agent.
                "--controllers=*,-endpoints-controller,-endpointslice-controller,"
                "-endpointslice-mirroring-controller",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.sa_key}",
                f"--root-ca-file={p.pair.cert}",
                f"--cluster-signing-cert-file={p.pair.cert}",
                f"--cluster-signing-key-file={p.pair.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--profiling=false",
                "--v=1",
            ]

        def kcm_ready() -> bool:
            return _https_ok(f"https://127.0.0.1:{kcm_port}/healthz", insecure)

        self._start("kube-controller-manager", kcm_argv, kcm_ready)

    def client(self) -> KubeClient:
        return KubeClient.from_kubeconfig(self.admin_kubeconfig)

    def stop(self) -> None:
        for comp in reversed(self.components):
            comp.stop()
        self.components.clear()


class KubeCluster:
    """The control plane plus one node agent: what the pytest fixtures hand out."""

    def __init__(self, bin_dir: Path, work_dir: Path | None = None) -> None:
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="tapestry-kube-"))
        self.control_plane = ControlPlane(bin_dir, self.work_dir)
        self.agent: Component | None = None
        self.startup_seconds = 0.0

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.admin_kubeconfig

    @property
    def server(self) -> str:
        return self.control_plane.server

    def client(self) -> KubeClient:
        return self.control_plane.client()

    def start(self) -> None:
        started = time.monotonic()
        try:
            self.control_plane.start()
            self._start_agent()
            self._wait_usable()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def _start_agent(self) -> None:
        cp = self.control_plane
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        self.agent = Component(
            "node-agent",
            [
                sys.executable,
                "-m",
                "tests.kube.node_agent",
                f"--kubeconfig={cp.admin_kubeconfig}",
                f"--node-name={NODE_NAME}",
                f"--state-dir={self.work_dir / 'node'}",
                f"--serving-cert={cp.kubelet_serving.cert}",
                f"--serving-key={cp.kubelet_serving.key}",
                f"--client-ca={cp.pki.pair.cert}",
            ],
            self.work_dir,
            env=env,
        )

    def _wait_usable(self) -> None:
        """Usable = node Ready and the default ServiceAccount minted (pods need it)."""
        client = self.client()
        assert self.agent is not None

        def node_ready() -> bool:
            try:
                node = client.get(f"/api/v1/nodes/{NODE_NAME}")
            except ApiError:
                return False
            conds = node.get("status", {}).get("conditions", [])
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

        def default_sa() -> bool:
            try:
                client.get("/api/v1/namespaces/default/serviceaccounts/default")
                return True
            except ApiError:
                return False

        wait_until("the node agent's Node to be Ready", node_ready, self.agent, 60)
        kcm = self.control_plane.components[-1]
        wait_until("the default ServiceAccount", default_sa, kcm, 60)

    def logs(self) -> dict[str, Path]:
        """Component name -> log file, for failure reports."""
        comps = [*self.control_plane.components, *([self.agent] if self.agent else [])]
        return {c.name: c.log for c in comps}

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop(timeout=30)
            self.agent = None
        self.control_plane.stop()

    def remove(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


def main() -> None:
    """Interactive cluster for poking at by hand."""
    cluster = KubeCluster(ensure_binaries(sys.stderr))
    cluster.start()
    print(f"cluster up in {cluster.startup_seconds:.1f}s; logs in {cluster.work_dir}")
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop:
        time.sleep(0.5)
    cluster.stop()
    cluster.remove()


if __name__ == "__main__":
    main()
