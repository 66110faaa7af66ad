"""A minimal kubelet that makes pods real on the test machine.

It registers one Node and keeps its Lease and Ready condition fresh, binds every
unscheduled Pod to that Node (there is no kube-scheduler), and runs each
container's command+args as a local process from this Python's virtualenv
(images are ignored). Each container gets a private mount namespace (unshare)
in which the pod's volumes are bind-mounted at their mount paths and a per-pod
/etc/hosts resolves pod and Service DNS names to the pods' own 127.10.x.y
addresses. Logs are served to `kubectl logs` through a kubelet-style HTTPS
endpoint. Run with `python -m tests.kube.node_agent` from the repo root.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.server
import json
import math
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from tests.kube.client import (
    STRATEGIC_PATCH,
    ApiError,
    Informer,
    KubeClient,
    Obj,
    now_rfc3339,
)
from tests.kube.proc import die_with_parent

HOST_IP = "127.0.0.1"
CLUSTER_DOMAIN = "cluster.local"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HEARTBEAT_S = 10.0
MAX_RESTART_BACKOFF_S = 10.0  # the real kubelet caps at 5 min; tests cannot wait that long
# What every container needs to see to run its command: this Python environment and
# the repository (its editable install), wherever the pod's volumes are mounted.
KEEP_VISIBLE = (Path(sys.prefix), Path(sys.base_prefix), Path(__file__).resolve().parents[2])

# Runs as the first program inside the container's fresh mount+UTS namespace:
# bind-mounts volumes and /etc/hosts, sets the hostname, then execs the
# container command. Python in isolated mode so the pod's env cannot break it.
# Every source (and every path the container needs to run: its Python environment,
# the repository) is opened before the first mount, and mounted through its
# /proc/<pid>/fd link: a volume mounted over a parent directory (an emptyDir at
# /tmp, say) would otherwise hide the sources under it. Needed paths so hidden are
# mounted back in place, as the image would provide them in a real container.
CONTAINER_INIT = r"""
import json, os, socket, subprocess, sys
spec = json.loads(sys.argv[1])
argv = sys.argv[2:]
created = open(spec["created_log"], "a")

def ensure(path, is_dir, log=True):
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    if not missing:
        return
    os.makedirs(path if is_dir else os.path.dirname(path), exist_ok=True)
    if not is_dir:
        open(path, "a").close()
    if log:
        created.writelines(m + "\n" for m in missing)
        created.flush()

def bind(fd, target):
    source = f"/proc/{os.getpid()}/fd/{fd}"
    subprocess.run([spec["mount"], "--no-canonicalize", "--bind", source, target], check=True)

sources = [os.open(m["source"], os.O_PATH) for m in spec["mounts"]]
keep = [(p, os.open(p, os.O_PATH)) for p in spec["keep"]]
for m, fd in zip(spec["mounts"], sources):
    ensure(m["target"], os.path.isdir(f"/proc/self/fd/{fd}"))
    bind(fd, m["target"])
    if m["read_only"]:
        subprocess.run([spec["mount"], "-o", "remount,bind,ro", m["target"]], check=True)
for path, fd in keep:
    here = os.stat(path) if os.path.exists(path) else None
    if here is None or (here.st_dev, here.st_ino) != (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
        ensure(path, True, log=False)  # inside the volume that hid it
        bind(fd, path)
if spec["hostname"]:
    socket.sethostname(spec["hostname"])
ensure(spec["workdir"], True)
created.close()
os.chdir(spec["workdir"])
try:
    os.execvp(argv[0], argv)
except OSError as err:
    print(f"tapestry node agent: cannot run {argv[0]!r}: {err}", file=sys.stderr)
    sys.exit(127)
"""


class PodConfigError(Exception):
    """The pod cannot start yet (missing Secret, ConfigMap, PVC, ...); retried."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# -- small Kubernetes semantics helpers ---------------------------------------------

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([a-zA-Z]*)$")
_SUFFIXES = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
}


def quantity(text: str | int) -> Decimal:
    """Parses a resource.Quantity such as 500m, 2Gi or 1.5."""
    m = _QUANTITY.match(str(text))
    if not m or m.group(2) not in _SUFFIXES:
        raise ValueError(f"unsupported quantity {text!r}")
    return Decimal(m.group(1)) * _SUFFIXES[m.group(2)]


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: defined refs expand, $$ escapes, others stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, text)


def pod_hostname(pod: Obj) -> tuple[str, str]:
    """(hostname, FQDN-or-empty) the way the kubelet derives them."""
    spec = pod["spec"]
    host: str = (spec.get("hostname") or pod["metadata"]["name"])[:63].rstrip("-.")
    sub = spec.get("subdomain")
    fqdn = f"{host}.{sub}.{pod['metadata']['namespace']}.svc.{CLUSTER_DOMAIN}" if sub else ""
    return host, fqdn


def selects(selector: dict[str, str] | None, pod: Obj) -> bool:
    labels = pod["metadata"].get("labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in (selector or {}).items())


def _decode(data: dict[str, str] | None) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (data or {}).items()}


def signal_exit_code(returncode: int) -> int:
    """Popen's -N for "killed by signal N" becomes the shell/runtime style 128+N."""
    return 128 - returncode if returncode < 0 else returncode


# -- containers -----------------------------------------------------------------


@dataclass
class Container:
    """One container of a pod and the history the status reports."""

    spec: Obj
    init: bool
    log_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    termination_file: Path | None = None
    restart_count: int = 0
    started_at: str = ""
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    next_start: float = 0.0
    done: bool = False  # terminated and will not be restarted

    @property
    def name(self) -> str:
        name: str = self.spec["name"]
        return name

    def log_file(self, attempt: int | None = None) -> Path:
        return self.log_dir / f"{self.restart_count if attempt is None else attempt}.log"

    def latest_attempt(self) -> int:
        """The attempt whose log `kubectl logs` shows: the last one started."""
        if self.proc is None and self.restart_count and not self.log_file().exists():
            return self.restart_count - 1  # waiting in back-off
        return self.restart_count

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self, pod_uid: str) -> Obj:
        running = "running" in self.state
        return {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "containerID": f"tapestry://{pod_uid}/{self.name}/{self.restart_count}",
            "ready": running and not self.init,
            "started": running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }


class PodWorker(threading.Thread):
    """Runs one pod from admission to termination; owns its processes."""

    def __init__(self, agent: Agent, pod: Obj) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.dir = agent.state_dir / "pods" / self.uid
        self.hosts_file = self.dir / "hosts"
        self.deleting = threading.Event()
        self.finished = threading.Event()
        spec = pod["spec"]
        self.ip = HOST_IP if spec.get("hostNetwork") else agent.allocate_ip()
        self.start_time = now_rfc3339()
        self.phase = "Pending"
        self.volumes: dict[str, Path] = {}
        self.sandbox_ready = False  # volumes and hosts file exist
        self.conditions: dict[str, tuple[str, str, str]] = {}
        self.containers = [
            Container(c, True, self.dir / "logs" / c["name"])
            for c in spec.get("initContainers", [])
        ] + [Container(c, False, self.dir / "logs" / c["name"]) for c in spec["containers"]]
        for c in self.containers:
            c.log_dir.mkdir(parents=True, exist_ok=True)
        self._last_status: Obj = {}
        self._last_wait = ("", "")

    # -- API side ---------------------------------------------------------------

    def update(self, pod: Obj) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()
            if self.finished.is_set():  # nothing left to stop; just let it go
                self.agent.delete_pod(pod)

    def container(self, name: str) -> Container | None:
        return next((c for c in self.containers if c.name == name), None)

    def _condition(self, kind: str, status: bool, reason: str = "") -> Obj:
        value = "True" if status else "False"
        old = self.conditions.get(kind)
        when = old[1] if old and old[0] == value else now_rfc3339()
        self.conditions[kind] = (value, when, reason)
        cond = {"type": kind, "status": value, "lastTransitionTime": when, "lastProbeTime": None}
        if reason:
            cond["reason"] = reason
        return cond

    def report(self) -> None:
        """Patches the pod status if it changed since the last report."""
        main = [c for c in self.containers if not c.init]
        inits = [c for c in self.containers if c.init]
        initialized = all(c.done for c in inits)
        all_running = all("running" in c.state for c in main)
        terminal = self.phase in ("Succeeded", "Failed")
        ready = all_running and not terminal
        not_ready = "PodCompleted" if terminal else "ContainersNotReady"
        status = {
            "phase": self.phase,
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "conditions": [
                self._condition("PodReadyToStartContainers", self.sandbox_ready),
                self._condition("Initialized", initialized),
                self._condition("ContainersReady", ready, "" if ready else not_ready),
                self._condition("Ready", ready, "" if ready else not_ready),
                self._condition("PodScheduled", True),
            ],
            "containerStatuses": [c.status(self.uid) for c in main],
        }
        if inits:
            status["initContainerStatuses"] = [c.status(self.uid) for c in inits]
        if status == self._last_status:
            return
        try:
            self.agent.client.patch(
                f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}/status",
                {"metadata": {"uid": self.uid}, "status": status},
                STRATEGIC_PATCH,
            )
            self._last_status = status
        except ApiError as err:
            if err.status in (404, 409):  # pod gone or replaced under the same name
                self.deleting.set()
            else:
                self.agent.log(f"status update of {self.name} failed: {err}")

    # -- lifecycle --------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception as err:
            self.agent.log(f"{self.name} crashed: {err!r}")
            self.agent.event(self.pod, "Warning", "AgentError", repr(err))
            self._kill_all(0)
        finally:
            self.finished.set()

    def _stopping(self) -> bool:
        return self.deleting.is_set() or self.agent.stop.is_set()

    def _run(self) -> None:
        self.report()
        while not self._stopping():
            try:
                self.volumes = self.agent.volumes.prepare(self)
                break
            except PodConfigError as err:
                self._wait_all(err.reason, err.message)
                self.deleting.wait(2)
        self.agent.write_hosts(self)
        self.sandbox_ready = True
        self.agent.hosts_changed.set()
        restart = self.pod["spec"].get("restartPolicy", "Always")
        pending = [c for c in self.containers if c.init]
        while pending and not self._stopping():
            c = pending[0]
            if c.proc is None and time.monotonic() >= c.next_start:
                self._start(c)
            if c.proc is not None and c.proc.poll() is not None:
                code = self._reap(c)
                if code == 0:
                    c.done = True
                    pending.pop(0)
                elif restart == "Never":
                    c.done = True
                    self.phase = "Failed"
                    break
                else:
                    self._backoff(c)
            self.report()
            self.deleting.wait(0.2)
        if self.phase != "Failed":
            self._run_main(restart)
        self.report()
        if self._stopping():
            self._terminate()

    def _run_main(self, restart: str) -> None:
        main = [c for c in self.containers if not c.init]
        while not self._stopping():
            for c in main:
                if c.done:
                    continue
                if c.proc is None and time.monotonic() >= c.next_start:
                    self._start(c)
                elif c.proc is not None and c.proc.poll() is not None:
                    code = self._reap(c)
                    if restart == "Always" or (restart == "OnFailure" and code != 0):
                        self._backoff(c)
                    else:
                        c.done = True
            if any(c.running() for c in main):
                self.phase = "Running"
            if all(c.done for c in main):
                failed = any(c.state["terminated"]["exitCode"] != 0 for c in main)
                self.phase = "Failed" if failed else "Succeeded"
                return
            self.report()
            self.deleting.wait(0.2)

    def _wait_all(self, reason: str, message: str) -> None:
        if (reason, message) != self._last_wait:  # one event per distinct problem
            self._last_wait = (reason, message)
            self.agent.event(self.pod, "Warning", reason, message)
        for c in self.containers:
            if c.proc is None:
                c.state = {"waiting": {"reason": reason, "message": message}}
        self.report()

    def _backoff(self, c: Container) -> None:
        c.next_start = time.monotonic() + min(MAX_RESTART_BACKOFF_S, 2.0**c.restart_count)
        c.last_state = c.state
        c.restart_count += 1
        c.proc = None
        c.state = {"waiting": {"reason": "CrashLoopBackOff"}}

    def _start(self, c: Container) -> None:
        try:
            argv, env, mounts, workdir = self.agent.container_config(self, c.spec)
        except PodConfigError as err:
            self._wait_all(err.reason, err.message)
            c.next_start = time.monotonic() + 2
            return
        c.termination_file = self._termination_file(c)
        if c.termination_file is not None:
            mounts.append(
                {
                    "source": str(c.termination_file),
                    "target": c.spec["terminationMessagePath"],
                    "read_only": False,
                }
            )
        init_spec = {
            "mounts": mounts,
            "hostname": "" if self.pod["spec"].get("hostNetwork") else self.hostname,
            "workdir": workdir,
            "created_log": str(self.agent.created_log),
            "keep": [str(p) for p in dict.fromkeys(KEEP_VISIBLE)],
            "mount": shutil.which("mount") or "/bin/mount",
        }
        unshare = [shutil.which("unshare") or "unshare", "--mount", "--uts"]
        unshare += ["--propagation", "private"]
        if os.geteuid() != 0:  # an unprivileged user namespace may still allow bind mounts
            unshare[1:1] = ["--user", "--map-root-user"]
        cmd = [
            *die_with_parent(),
            *unshare,
            "--",
            sys.executable,
            "-I",
            "-S",
            "-c",
            CONTAINER_INIT,
            json.dumps(init_spec),
            *argv,
        ]
        with c.log_file().open("ab") as log:
            c.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, killed as one
            )
        c.started_at = now_rfc3339()
        c.state = {"running": {"startedAt": c.started_at}}
        self.agent.event(self.pod, "Normal", "Started", f"Started container {c.name}")

    def _termination_file(self, c: Container) -> Path | None:
        """A fresh host file bind-mounted at the container's terminationMessagePath, as
        the kubelet does; None for pods on the host network (nothing to mount into)."""
        if not c.spec.get("terminationMessagePath") or self.pod["spec"].get("hostNetwork"):
            return None
        path = c.log_dir / f"{c.restart_count}.termination"
        path.write_bytes(b"")
        return path

    def _termination_message(self, c: Container, code: int) -> str:
        """What the container wrote to its termination log (at most 4 KiB, like the
        kubelet), or with FallbackToLogsOnError the tail of its log when it failed."""
        text = ""
        if c.termination_file is not None and c.termination_file.exists():
            text = c.termination_file.read_bytes()[:4096].decode(errors="replace").strip()
        fallback = c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        if not text and fallback and code != 0 and c.log_file().exists():
            lines = c.log_file().read_bytes()[-2048:].decode(errors="replace").splitlines()
            text = "\n".join(lines[-80:]).strip()
        return text

    def _reap(self, c: Container) -> int:
        assert c.proc is not None
        code = signal_exit_code(c.proc.wait())
        terminated: Obj = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": c.started_at,
            "finishedAt": now_rfc3339(),
            "containerID": c.status(self.uid)["containerID"],
        }
        message = self._termination_message(c, code)
        if message:
            terminated["message"] = message
        c.state = {"terminated": terminated}
        return code

    def _kill_all(self, grace: float) -> None:
        """SIGTERM every container's process group, SIGKILL after `grace` seconds."""
        live = [c for c in self.containers if c.running()]
        for c in live:
            assert c.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.proc.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        deadline = time.monotonic() + grace
        for c in live:
            assert c.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.proc.pid, signal.SIGKILL)  # stragglers in the group, too
            c.proc.wait()
            self._reap(c)
            c.done = True

    def _terminate(self) -> None:
        """Honours a deletion: stop processes within the grace period, then delete grace 0."""
        meta = self.pod["metadata"]
        if self.deleting.is_set():
            grace = float(meta.get("deletionGracePeriodSeconds") or 0)
        else:
            grace = 2.0  # the agent is shutting down
        if self.agent.stop.is_set():
            grace = min(grace, 5.0)
        if any(c.running() for c in self.containers):
            self.agent.event(self.pod, "Normal", "Killing", "Stopping containers")
        self._kill_all(grace)
        for c in self.containers:
            if "terminated" not in c.state:
                c.state = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown"}}
        if self.phase not in ("Succeeded", "Failed"):
            main = [c for c in self.containers if not c.init]
            ok = all(c.state["terminated"]["exitCode"] == 0 for c in main)
            self.phase = "Succeeded" if ok else "Failed"
        self.report()
        if self.deleting.is_set():
            self.agent.delete_pod(self.pod)

    @property
    def hostname(self) -> str:
        return pod_hostname(self.pod)[0]


# -- volumes ----------------------------------------------------------------------


class Volumes:
    """Materialises a pod's volumes as host directories to bind-mount."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.client = agent.client

    def _get(self, kind: str, ns: str, name: str, optional: bool) -> Obj | None:
        try:
            return self.client.get(f"/api/v1/namespaces/{ns}/{kind}/{name}")
        except ApiError as err:
            if err.status != 404:
                raise
            if optional:
                return None
            singular = kind[:-1]
            raise PodConfigError(
                "CreateContainerConfigError", f'{singular} "{name}" not found'
            ) from err

    def config_data(self, kind: str, ns: str, name: str, optional: bool) -> dict[str, bytes]:
        """A Secret's or ConfigMap's keys as bytes ({} if optional and missing)."""
        obj = self._get(kind, ns, name, optional)
        if obj is None:
            return {}
        if kind == "secrets":
            return _decode(obj.get("data"))
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        return {**data, **_decode(obj.get("binaryData"))}

    @staticmethod
    def _write(dest: Path, files: dict[str, bytes], modes: dict[str, int], default: int) -> None:
        for rel, content in files.items():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            target.chmod(modes.get(rel, default))

    def _keys(self, src: Obj, data: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, int]]:
        """Applies `items` (key -> path, mode) the way secret/configMap volumes do."""
        items = src.get("items")
        if not items:
            return data, {}
        files, modes = {}, {}
        for item in items:
            if item["key"] not in data:
                if src.get("optional"):
                    continue
                raise PodConfigError("FailedMount", f"key {item['key']!r} not found")
            files[item["path"]] = data[item["key"]]
            if "mode" in item:
                modes[item["path"]] = item["mode"]
        return files, modes

    def _downward(self, worker: PodWorker, items: list[Obj]) -> dict[str, bytes]:
        files = {}
        for item in items:
            if "fieldRef" in item:
                value = self.agent.field_value(worker, item["fieldRef"]["fieldPath"])
            else:
                value = self.agent.resource_value(worker, item["resourceFieldRef"])
            files[item["path"]] = value.encode()
        return files

    def _token(self, worker: PodWorker, src: Obj) -> bytes:
        sa = worker.pod["spec"].get("serviceAccountName") or "default"
        audience = src.get("audience")
        req = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [audience] if audience else None,
                "expirationSeconds": src.get("expirationSeconds", 3600),
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": worker.pod_name,
                    "uid": worker.uid,
                },
            },
        }
        path = f"/api/v1/namespaces/{worker.namespace}/serviceaccounts/{sa}/token"
        try:
            token: str = self.client.create(path, req)["status"]["token"]
        except ApiError as err:
            raise PodConfigError("FailedMount", f"service account token: {err.message}") from err
        return token.encode()

    def _projected(self, worker: PodWorker, vol: Obj, dest: Path) -> None:
        ns = worker.namespace
        default = vol.get("defaultMode", 0o644)
        for src in vol.get("sources") or []:
            if "serviceAccountToken" in src:
                tok = src["serviceAccountToken"]
                self._write(dest, {tok["path"]: self._token(worker, tok)}, {}, default)
            elif "configMap" in src or "secret" in src:
                kind = "configMap" if "configMap" in src else "secret"
                ref = src[kind]
                api = "configmaps" if kind == "configMap" else "secrets"
                data = self.config_data(api, ns, ref["name"], ref.get("optional", False))
                self._write(dest, *self._keys(ref, data), default)
            elif "downwardAPI" in src:
                files = self._downward(worker, src["downwardAPI"].get("items") or [])
                self._write(dest, files, {}, default)
            else:
                raise PodConfigError("FailedMount", f"unsupported projected source {src}")

    def _claim(self, worker: PodWorker, claim_name: str) -> Path:
        """The local directory behind a PVC; provisions a hostPath PV if it is unbound."""
        ns = worker.namespace
        pvc = self._get("persistentvolumeclaims", ns, claim_name, optional=False)
        assert pvc is not None
        pv_name = pvc["spec"].get("volumeName")
        if pv_name:
            pv = self.client.get(f"/api/v1/persistentvolumes/{pv_name}")
            source = pv["spec"].get("hostPath") or pv["spec"].get("local")
            if not source:
                raise PodConfigError("FailedMount", f"PV {pv_name} is neither hostPath nor local")
            path = Path(source["path"])
            path.mkdir(parents=True, exist_ok=True)
            return path
        return self.agent.provision(pvc)

    def prepare(self, worker: PodWorker) -> dict[str, Path]:
        vols: dict[str, Path] = {}
        ns = worker.namespace
        for vol in worker.pod["spec"].get("volumes") or []:
            name = vol["name"]
            dest = worker.dir / "volumes" / name
            if "persistentVolumeClaim" in vol:
                vols[name] = self._claim(worker, vol["persistentVolumeClaim"]["claimName"])
                continue
            if "hostPath" in vol:
                path = Path(vol["hostPath"]["path"])
                if vol["hostPath"].get("type") in ("DirectoryOrCreate", "", None):
                    path.mkdir(parents=True, exist_ok=True)
                vols[name] = path
                continue
            dest.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in vol:
                pass
            elif "secret" in vol or "configMap" in vol:
                ref = vol.get("secret") or vol["configMap"]
                api = "secrets" if "secret" in vol else "configmaps"
                ref_name = ref.get("secretName") or ref.get("name")
                data = self.config_data(api, ns, ref_name, ref.get("optional", False))
                self._write(dest, *self._keys(ref, data), ref.get("defaultMode", 0o644))
            elif "downwardAPI" in vol:
                files = self._downward(worker, vol["downwardAPI"].get("items") or [])
                self._write(dest, files, {}, vol["downwardAPI"].get("defaultMode", 0o644))
            elif "projected" in vol:
                self._projected(worker, vol["projected"], dest)
            else:
                kinds = sorted(set(vol) - {"name"})
                raise PodConfigError("FailedMount", f"volume {name}: unsupported type {kinds}")
            vols[name] = dest
        return vols


# -- the agent ----------------------------------------------------------------------


class Agent:
    """Node registration, heartbeats, pod binding/dispatch, DNS and the log server."""

    def __init__(
        self,
        client: KubeClient,
        node_name: str,
        state_dir: Path,
        tls: ssl.SSLContext,
    ) -> None:
        self.client = client
        self.node_name = node_name
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.created_log = state_dir / "created-mountpoints"
        self.stop = threading.Event()
        self.hosts_changed = threading.Event()
        self.volumes = Volumes(self)
        self.workers: dict[str, PodWorker] = {}
        self._lock = threading.Lock()
        self._next_ip = 0
        self.api_port = client.port
        self.log_server = LogServer(self, tls)
        self.pods = Informer(client, "/api/v1/pods", self._on_pod, self.stop)
        self.services = Informer(
            client, "/api/v1/services", lambda *_: self.hosts_changed.set(), self.stop
        )

    @staticmethod
    def log(message: str) -> None:
        print(f"[node-agent {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def allocate_ip(self) -> str:
        """A fresh loopback address per pod; never reused within a session."""
        with self._lock:
            n = self._next_ip
            self._next_ip += 1
        return f"127.10.{n // 250}.{n % 250 + 2}"

    def event(self, pod: Obj, kind: str, reason: str, message: str) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}"},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": "kubelet", "host": self.node_name},
            "firstTimestamp": now_rfc3339(),
            "lastTimestamp": now_rfc3339(),
            "count": 1,
        }
        with contextlib.suppress(ApiError, OSError):
            self.client.create(f"/api/v1/namespaces/{meta['namespace']}/events", body)

    # -- node ---------------------------------------------------------------------

    def _node_status(self) -> Obj:
        mem_kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
        resources = {
            "cpu": str(os.cpu_count() or 1),
            "memory": f"{mem_kib}Ki",
            "pods": "110",
            "ephemeral-storage": "100Gi",
        }
        now = now_rfc3339()
        healthy = [
            ("MemoryPressure", "KubeletHasSufficientMemory"),
            ("DiskPressure", "KubeletHasNoDiskPressure"),
            ("PIDPressure", "KubeletHasSufficientPID"),
        ]
        conds = [
            {
                "type": t,
                "status": "False",
                "reason": r,
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
                "message": "tapestry node agent",
            }
            for t, r in healthy
        ]
        conds.append(
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
                "message": "tapestry node agent is posting ready status",
            }
        )
        uname = os.uname()
        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": conds,
            "addresses": [
                {"type": "InternalIP", "address": HOST_IP},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_server.port}},
            "nodeInfo": {
                "machineID": "tapestry",
                "systemUUID": "tapestry",
                "bootID": "tapestry",
                "kernelVersion": uname.release,
                "osImage": "tapestry test node",
                "containerRuntimeVersion": "tapestry://local-processes",
                "kubeletVersion": "v0.0.0-tapestry",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(
                    uname.machine, uname.machine
                ),
            },
        }

    def register(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
        }
        with contextlib.suppress(ApiError):
            self.client.create("/api/v1/nodes", node)
        self.client.patch(f"/api/v1/nodes/{self.node_name}/status", {"status": self._node_status()})
        self.log(f"registered node {self.node_name}; logs on {HOST_IP}:{self.log_server.port}")

    def _heartbeat_once(self) -> None:
        now_micro = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        lease_path = (
            f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        )
        try:
            self.client.patch(lease_path, {"spec": {"renewTime": now_micro}})
        except ApiError as err:
            if err.status != 404:
                raise
            self.client.create(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.node_name},
                    "spec": {
                        "holderIdentity": self.node_name,
                        "leaseDurationSeconds": 40,
                        "renewTime": now_micro,
                    },
                },
            )
        now = now_rfc3339()
        conds = [
            {"type": t, "lastHeartbeatTime": now}
            for t in ("MemoryPressure", "DiskPressure", "PIDPressure", "Ready")
        ]
        self.client.patch(
            f"/api/v1/nodes/{self.node_name}/status",
            {"status": {"conditions": conds}},
            STRATEGIC_PATCH,
        )

    def _heartbeat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self._heartbeat_once()
            except (ApiError, OSError) as err:
                self.log(f"heartbeat failed: {err}")

    # -- pods -----------------------------------------------------------------------

    def _on_pod(self, kind: str, pod: Obj) -> None:
        self.hosts_changed.set()
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        with self._lock:
            worker = self.workers.get(uid)
        if kind == "DELETED":
            if worker is not None:
                worker.deleting.set()
                threading.Thread(target=self._forget, args=(worker,), daemon=True).start()
            return
        if worker is not None:
            worker.update(pod)
            return
        node = spec.get("nodeName")
        if not node:
            if not meta.get("deletionTimestamp") and not spec.get("schedulingGates"):
                self._bind(pod)
            return
        if node != self.node_name:
            return
        phase = pod.get("status", {}).get("phase")
        if meta.get("deletionTimestamp"):
            self.delete_pod(pod)
        elif phase not in ("Succeeded", "Failed"):
            worker = PodWorker(self, pod)
            with self._lock:
                self.workers[uid] = worker
            worker.start()

    def _forget(self, worker: PodWorker) -> None:
        """After a pod object is gone: wait for its processes, drop its files."""
        worker.finished.wait()
        with self._lock:
            self.workers.pop(worker.uid, None)
        subprocess.run(["rm", "-rf", str(worker.dir)], check=False)

    def _bind(self, pod: Obj) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            self.client.create(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", body
            )
        except ApiError as err:
            if err.status not in (404, 409):
                self.log(f"binding {meta['namespace']}/{meta['name']} failed: {err}")

    def delete_pod(self, pod: Obj) -> None:
        meta = pod["metadata"]
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        try:
            self.client.delete(path, body)
        except ApiError as err:
            if err.status != 409:  # 409: a new pod took the name; ours is gone
                self.log(f"deleting {meta['namespace']}/{meta['name']} failed: {err}")

    def worker_by_name(self, namespace: str, name: str) -> PodWorker | None:
        with self._lock:
            found = [
                w for w in self.workers.values() if (w.namespace, w.pod_name) == (namespace, name)
            ]
        return max(found, key=lambda w: w.start_time, default=None)

    def provision(self, pvc: Obj) -> Path:
        """Binds an unbound PVC to a new hostPath PV under the state dir.

        Creating the PV pre-bound (claimRef) lets the controller-manager's PV
        binder mark both Bound, so charts see what a real provisioner gives.
        """
        meta = pvc["metadata"]
        pv_name = f"pvc-{meta['uid']}"
        path = self.state_dir / "volumes" / pv_name
        path.mkdir(parents=True, exist_ok=True)
        spec = pvc["spec"]
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "labels": {"tapestry.dev/provisioned-by": "node-agent"}},
            "spec": {
                "capacity": {
                    "storage": spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")
                },
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": spec.get("storageClassName") or "",
                "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        try:
            self.client.create("/api/v1/persistentvolumes", pv)
        except ApiError as err:
            if err.status != 409:
                raise PodConfigError("FailedMount", f"provisioning {pv_name}: {err}") from err
        return path

    # -- container environment ------------------------------------------------------

    def field_value(self, worker: PodWorker, path: str) -> str:
        """Resolves a downward-API fieldRef.fieldPath."""
        meta = worker.pod["metadata"]
        spec = worker.pod["spec"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            value: str = (meta.get(m.group(1)) or {}).get(m.group(2), "")
            return value
        if path in ("metadata.labels", "metadata.annotations"):
            items = sorted((meta.get(path.split(".")[1]) or {}).items())
            return "\n".join(f"{k}={json.dumps(v)}" for k, v in items)
        simple: dict[str, str] = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.node_name,
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.hostIP": HOST_IP,
            "status.hostIPs": HOST_IP,
            "status.podIP": worker.ip,
            "status.podIPs": worker.ip,
        }
        if path not in simple:
            raise PodConfigError("CreateContainerConfigError", f"unsupported fieldPath {path}")
        return simple[path]

    def resource_value(self, worker: PodWorker, ref: Obj) -> str:
        """Resolves a resourceFieldRef: the container's request/limit, else node capacity."""
        name = ref.get("containerName")
        spec: Obj = next(
            (c for c in worker.pod["spec"]["containers"] if not name or c["name"] == name), {}
        )
        kind, _, resource = ref["resource"].partition(".")
        res = spec.get("resources", {})
        raw = res.get(kind, {}).get(resource) or res.get("limits", {}).get(resource)
        if raw is None:
            raw = str(os.cpu_count() or 1) if resource == "cpu" else "1Ti"
        divisor = quantity(ref.get("divisor") or "1")
        return str(math.ceil(quantity(raw) / divisor))

    def container_config(
        self, worker: PodWorker, c: Obj
    ) -> tuple[list[str], dict[str, str], list[Obj], str]:
        """(argv, env, bind mounts, workdir) for one container start."""
        ns = worker.namespace
        env: dict[str, str] = {
            "PATH": f"{sys.prefix}/bin:{DEFAULT_PATH}",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "HOSTNAME": worker.hostname,
            "KUBERNETES_SERVICE_HOST": HOST_IP,
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.api_port),
            "KUBERNETES_PORT": f"tcp://{HOST_IP}:{self.api_port}",
        }
        for src in c.get("envFrom") or []:
            ref = src.get("configMapRef") or src.get("secretRef") or {}
            api = "configmaps" if "configMapRef" in src else "secrets"
            data = self.volumes.config_data(api, ns, ref["name"], ref.get("optional", False))
            for k, v in data.items():
                env[src.get("prefix", "") + k] = v.decode(errors="replace")
        for var in c.get("env") or []:
            env[var["name"]] = self._env_value(worker, c, var, env)
        argv = [expand(a, env) for a in (c.get("command") or []) + (c.get("args") or [])]
        if not c.get("command"):
            raise PodConfigError(
                "CreateContainerError",
                f"container {c['name']} has no command; the test node ignores images",
            )
        mounts = []
        for m in sorted(c.get("volumeMounts") or [], key=lambda m: m["mountPath"]):
            if m["name"] not in worker.volumes:
                raise PodConfigError("CreateContainerConfigError", f"no volume {m['name']}")
            source = worker.volumes[m["name"]]
            sub = m.get("subPath") or expand(m.get("subPathExpr", ""), env)
            if sub:
                source = source / sub
                if not source.exists():
                    source.mkdir(parents=True)
            mounts.append(
                {
                    "source": str(source),
                    "target": m["mountPath"],
                    "read_only": bool(m.get("readOnly")),
                }
            )
        if not worker.pod["spec"].get("hostNetwork"):
            mounts.append(
                {"source": str(worker.hosts_file), "target": "/etc/hosts", "read_only": False}
            )
        return argv, env, mounts, c.get("workingDir") or "/"

    def _env_value(self, worker: PodWorker, c: Obj, var: Obj, env: dict[str, str]) -> str:
        if "valueFrom" not in var:
            return expand(var.get("value", ""), env)
        src = var["valueFrom"]
        if "fieldRef" in src:
            return self.field_value(worker, src["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in src:
            return self.resource_value(
                worker, {"containerName": c["name"], **src["resourceFieldRef"]}
            )
        for key, api in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
            if key in src:
                ref = src[key]
                data = self.volumes.config_data(
                    api, worker.namespace, ref["name"], ref.get("optional", False)
                )
                if ref["key"] not in data and not ref.get("optional"):
                    raise PodConfigError(
                        "CreateContainerConfigError",
                        f"couldn't find key {ref['key']} in {api[:-1]} {ref['name']}",
                    )
                return data.get(ref["key"], b"").decode(errors="replace")
        raise PodConfigError("CreateContainerConfigError", f"unsupported valueFrom {src}")

    # -- DNS via /etc/hosts ------------------------------------------------------------

    def _dns_records(self) -> list[tuple[str, str, list[str]]]:
        """(namespace, ip, names) for Service and pod DNS names; short forms added per pod."""
        live = [
            p
            for p in self.pods.items()
            if p.get("status", {}).get("podIP")
            and p["status"].get("phase") not in ("Succeeded", "Failed")
            and not p["metadata"].get("deletionTimestamp")
        ]
        with self._lock:
            ips = {w.uid: w.ip for w in self.workers.values()}
        records = []
        for svc in self.services.items():
            ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
            selector = svc["spec"].get("selector")
            backends = sorted(
                (p for p in live if p["metadata"]["namespace"] == ns and selects(selector, p)),
                key=lambda p: str(p["metadata"]["name"]),
            )
            headless = svc["spec"].get("clusterIP") == "None"
            # No kube-proxy: a ClusterIP name resolves to its first backend pod
            # (reachable only when port == targetPort).
            for pod in backends if headless else backends[:1]:
                ip = ips.get(pod["metadata"]["uid"], pod["status"]["podIP"])
                records.append((ns, ip, [name]))
                host, _ = pod_hostname(pod)
                if headless and pod["spec"].get("subdomain") == name:
                    records.append((ns, ip, [f"{host}.{name}"]))
        return records

    def write_hosts(
        self, worker: PodWorker, records: list[tuple[str, str, list[str]]] | None = None
    ) -> None:
        """Writes a pod's hosts file in place (same inode, so the bind mount sees it)."""
        if records is None:
            records = self._dns_records()
        host, fqdn = pod_hostname(worker.pod)
        lines = [
            "# Kubernetes-managed hosts file (tapestry node agent).",
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
            f"{worker.ip}\t{fqdn + ' ' if fqdn else ''}{host}",
        ]
        for ns, ip, names in records:
            expanded: list[str] = []
            for name in names:
                full = f"{name}.{ns}"
                expanded += [f"{full}.svc.{CLUSTER_DOMAIN}", f"{full}.svc", full]
                if ns == worker.namespace:
                    expanded.append(name)
            lines.append(f"{ip}\t{' '.join(expanded)}")
        text = "\n".join(lines) + "\n"
        worker.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            current = worker.hosts_file.read_text()
        except FileNotFoundError:
            current = None
        if current != text:
            with worker.hosts_file.open("w") as f:
                f.write(text)

    def _dns_loop(self) -> None:
        while not self.stop.is_set():
            if not self.hosts_changed.wait(1):
                continue
            self.hosts_changed.clear()
            time.sleep(0.1)  # coalesce bursts of pod events
            records = self._dns_records()
            with self._lock:
                workers = [w for w in self.workers.values() if not w.finished.is_set()]
            for w in workers:
                if w.sandbox_ready:
                    self.write_hosts(w, records)

    # -- main loop ------------------------------------------------------------------

    def run(self) -> None:
        self.log_server.start()
        self.register()
        for target in (self._heartbeat, self._dns_loop, self.services.run, self.pods.run):
            threading.Thread(target=target, daemon=True, name=target.__name__).start()
        self.stop.wait()

    def shutdown(self) -> None:
        """Kills every pod's processes and removes the mount points pods created."""
        self.stop.set()
        with self._lock:
            workers = list(self.workers.values())
        for w in workers:
            w.finished.wait(15)
        self.log_server.shutdown()
        self._remove_created_mountpoints()

    def _remove_created_mountpoints(self) -> None:
        """Remove the host paths this agent created as mount points, unless another node
        agent runs on this host: removing a path that is a mount point in another mount
        namespace silently detaches that mount, so a running container of another test
        cluster would lose its volume."""
        if _other_agents_running():
            return
        try:
            paths = set(self.created_log.read_text().split())
        except FileNotFoundError:
            return
        for p in sorted(paths, key=lambda s: s.count("/"), reverse=True):
            path = Path(p)
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                elif path.is_file() and path.stat().st_size == 0:
                    path.unlink()


def _other_agents_running() -> bool:
    """Whether a node agent other than this process runs on this host."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"tests.kube.node_agent" in argv:
                return True
    return False


# -- kubelet log endpoint ------------------------------------------------------------


class LogServer(http.server.ThreadingHTTPServer):
    """HTTPS /containerLogs/<ns>/<pod>/<container>, as the API server expects of a kubelet.

    Only clients with a certificate from the cluster CA (the API server's
    kubelet-client cert) get in.
    """

    daemon_threads = True

    def __init__(self, agent: Agent, tls: ssl.SSLContext) -> None:
        super().__init__((HOST_IP, 0), LogHandler)
        self.agent = agent
        self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.port: int = self.server_address[1]

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, daemon=True, name="log-server").start()


class LogHandler(http.server.BaseHTTPRequestHandler):
    server: LogServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the API server polls often enough to drown the agent's log."""

    def _text(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/healthz":
            return self._text(200, "ok")
        parts = url.path.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "containerLogs":
            return self._text(404, f"not found: {url.path}")
        _, ns, pod, name = parts
        worker = self.server.agent.worker_by_name(ns, pod)
        container = worker.container(name) if worker else None
        if worker is None or container is None:
            return self._text(404, f"container {name} of pod {ns}/{pod} is not on this node")
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        latest = attempt = container.latest_attempt()
        if q.get("previous") == "true":
            if attempt == 0:
                return self._text(400, f"previous terminated container {name} not found")
            attempt -= 1
        path = container.log_file(attempt)
        follow = q.get("follow") == "true" and attempt == latest
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self._stream(path, container, attempt, follow, q)

    def _stream(
        self, path: Path, c: Container, attempt: int, follow: bool, q: dict[str, str]
    ) -> None:
        data = path.read_bytes() if path.exists() else b""
        if "tailLines" in q:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-int(q["tailLines"]) :]) if int(q["tailLines"]) else b""
        limit = int(q["limitBytes"]) if "limitBytes" in q else None
        sent = len(data[:limit])
        self.wfile.write(data[:limit])
        self.wfile.flush()
        offset = path.stat().st_size if path.exists() else 0
        while follow and (limit is None or sent < limit):
            alive = c.restart_count == attempt and (c.running() or c.proc is None)
            chunk = b""
            if path.exists():
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read(65536)
            if chunk:
                offset += len(chunk)
                chunk = chunk[: None if limit is None else limit - sent]
                sent += len(chunk)
                self.wfile.write(chunk)
                self.wfile.flush()
            elif not alive or self.server.agent.stop.is_set():
                return
            else:
                time.sleep(0.2)


def _tls(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", default="tapestry-node")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--serving-cert", required=True)
    parser.add_argument("--serving-key", required=True)
    parser.add_argument("--client-ca", required=True)
    args = parser.parse_args()
    agent = Agent(
        KubeClient.from_kubeconfig(args.kubeconfig),
        args.node_name,
        args.state_dir,
        _tls(args.serving_cert, args.serving_key, args.client_ca),
    )

    def on_signal(*_: object) -> None:
        agent.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.run()
    finally:
        agent.shutdown()
        agent.log("stopped")


if __name__ == "__main__":
    main()
