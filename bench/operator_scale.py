"""Benchmark: the operator's control plane with many members in one cluster.

For each member count N: a fresh test cluster (etcd, kube-apiserver,
kube-controller-manager, node agent), MinIO, and the single-cluster deployment with N
members (N namespaces, each with its store and signing-key Secrets and a Participant),
a Federation listing them and round 0's base published by the benchmark
(`spec.model.initialBase`). The real operator (`python -m tapestry_operator --role
both`, one `--namespace` per namespace, as the chart runs it) reconciles everything.

What is replaced: the training. Every Participant names a Kueue queue
(`compute.kueueQueue`) and no Kueue runs, so the operator creates each training Job
suspended and no trainer pod starts. Once every Job exists the benchmark uploads each
member's signed update (`publish_update`, the trainer's own call, with a small
synthetic delta in the base's shard layout) from its own process. The Accepted receipts
are the operator's own. Then the operator closes the round and creates the aggregator
Job, which the node agent runs (the real `tapestry aggregate`); the round must succeed
with every update merged.

Measured per N: seconds from applying the FederationRound to the plan, to the first and
the last training Job; seconds from the last upload to the aggregator Job; the
operator's peak RSS (VmHWM) and CPU seconds (utime+stime) per phase, and its reconcile
visits per resource and phase (its own Prometheus histogram), which say where the time
goes.

Usage: python bench/operator_scale.py --members 50 100 200
       python bench/operator_scale.py --quick          # 3 members, a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BEGAN = time.monotonic()
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from report import header, proc_cpu_s, proc_status_kib, write  # noqa: E402

from tapestry_operator.builders import aggregator_job_name, training_job_name  # noqa: E402
from tapestry_operator.coordinator import POLL  # noqa: E402
from tapestry_protocol.documents import ReceiptState  # noqa: E402
from tapestry_protocol.exchange import (  # noqa: E402
    publish_model,
    publish_update,
    read_close,
    read_model,
    read_plan,
    read_receipt,
    read_update,
)
from tapestry_protocol.layout import Layout  # noqa: E402
from tapestry_protocol.rejections import Rejected  # noqa: E402
from tapestry_protocol.shards import plan_shards  # noqa: E402
from tapestry_protocol.store import ObjectStore, open_store  # noqa: E402
from tests.kube.client import ApiError, KubeClient, Obj  # noqa: E402
from tests.kube.cluster import KubeCluster, ensure_binaries  # noqa: E402
from tests.kube.tapestry_env import (  # noqa: E402
    API,
    COORDINATOR_SECRET,
    SIGNING_SECRET,
    STORE_SECRET,
    Keys,
    OperatorProcess,
    install_crds,
    signing_secret,
    store_secret,
)
from tests.ports import free_port  # noqa: E402
from tests.s3servers import S3Server, start_minio  # noqa: E402

FEDERATION = "scale"
COORDINATOR_NS = "scale-coordinator"
QUEUE = "held"  # a Kueue queue nobody serves: the Jobs stay suspended
ROUND = f"{FEDERATION}-round-0"
TENSORS = 4  # the synthetic model: 4 fp32 tensors of 64 x 64 (64 KiB per update)
SHAPE = (64, 64)


def say(message: str) -> None:
    """A progress line, with the seconds since the benchmark started."""
    print(f"[{time.monotonic() - BEGAN:6.1f}s] {message}", flush=True)


def member_name(i: int) -> str:
    return f"m{i:03d}"


def member_ns(name: str) -> str:
    return f"scale-{name}"


class ProcStats:
    """The operator process's CPU seconds and memory, from /proc (Linux only)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def cpu_s(self) -> float:
        return float(proc_cpu_s(self.pid))

    def status_kib(self, key: str) -> int:
        return int(proc_status_kib(key, self.pid))

    def _sample(self) -> None:
        """VmRSS every 0.5 s, a check on VmHWM (which the kernel keeps itself)."""
        while not self._stop.wait(0.5):
            try:
                self.peak_rss_kib = max(self.peak_rss_kib, self.status_kib("VmRSS"))
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Seen:
    """When the benchmark first saw each object (watch events, monotonic clock)."""

    times: dict[str, float] = field(default_factory=dict)
    objects: dict[str, Obj] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, key: str, obj: Obj) -> None:
        with self.lock:
            self.times.setdefault(key, time.monotonic())
            self.objects[key] = obj

    def count(self, keys: set[str]) -> int:
        with self.lock:
            return len(keys & self.times.keys())


class Watch:
    """List, then watch one collection on a thread, recording what it sees in `seen`.

    Its own connection, so `close` ends the stream at once (an open watch would hold up
    the API server's shutdown)."""

    def __init__(self, client: KubeClient, path: str, seen: Seen) -> None:
        self.client, self.path, self.seen = client, path, seen
        self.conn: http.client.HTTPSConnection | None = None
        self.closed = threading.Event()
        for attempt in range(50):  # a just-installed CRD's storage may still be starting
            try:
                listing = client.get(path)
                break
            except ApiError as e:
                if e.status != 429 or attempt == 49:
                    raise
                time.sleep(0.2)
        for obj in listing["items"]:
            self._record(obj)
        self.thread = threading.Thread(
            target=self._run, args=(listing["metadata"]["resourceVersion"],), daemon=True
        )
        self.thread.start()

    def _record(self, obj: Obj) -> None:
        meta = obj["metadata"]
        self.seen.record(f"{meta['namespace']}/{meta['name']}", obj)

    def _run(self, resource_version: str) -> None:
        while not self.closed.is_set():
            params = {"watch": True, "resourceVersion": resource_version,
                      "allowWatchBookmarks": True, "timeoutSeconds": 300}  # fmt: skip
            self.conn = self.client._connect(330)
            try:
                self.conn.request("GET", self.client._url(self.path, params),
                                  headers=self.client._headers(None))  # fmt: skip
                resp = self.conn.getresponse()
                while line := resp.readline():
                    event = json.loads(line)
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        raise RuntimeError(f"watch of {self.path} failed: {obj}")
                    resource_version = obj["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._record(obj)
            except (OSError, http.client.HTTPException, ValueError):
                if not self.closed.is_set():
                    time.sleep(0.2)
            finally:
                self.conn.close()

    def close(self) -> None:
        self.closed.set()
        conn = self.conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)


def wait_until(
    what: str, done: Callable[[], bool], timeout: float, log: Path, every: float = 0.1
) -> float:
    """Poll `done` every `every` s; the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
        time.sleep(every)
    return time.monotonic()


def visits(port: int) -> dict[str, dict[str, float]]:
    """The operator's reconcile visits so far, per resource: how many and their seconds
    (its own `tapestry_operator_reconcile_duration_seconds` histogram)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        for suffix, key in (("_count", "visits"), ("_sum", "seconds")):
            name = f"tapestry_operator_reconcile_duration_seconds{suffix}" + "{"
            if line.startswith(name):
                labels, value = line[len(name) :].rsplit("} ", 1)
                resource = labels.split('tapestry_resource="', 1)[1].split('"', 1)[0]
                out.setdefault(resource, {})[key] = float(value)
    return out


def visits_between(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float | None]]:
    """Visits per resource in a phase, with the mean seconds of one."""
    out: dict[str, dict[str, float | None]] = {}
    for resource, row in after.items():
        count = row.get("visits", 0) - before.get(resource, {}).get("visits", 0)
        seconds = row.get("seconds", 0) - before.get(resource, {}).get("seconds", 0)
        out[resource] = {
            "visits": int(count),
            "meanSeconds": round(seconds / count, 3) if count else None,
        }
    return out


def publish_base(store: ObjectStore, keys: Keys) -> Any:
    """Round 0's base: a small synthetic fp32 model, as `tapestry base publish` does."""
    rng = np.random.default_rng(0)
    tensors = {f"w{i}": rng.standard_normal(SHAPE, dtype=np.float32) for i in range(TENSORS)}
    groups = plan_shards([(n, t.nbytes) for n, t in tensors.items()], 1 << 20)
    return publish_model(store, Layout(FEDERATION), 0, tensors, groups, keys.coordinator, model={})


def manifests(
    names: list[str], keys: Keys, minio: S3Server, bucket: str, base: Any, poll: str
) -> tuple[list[Obj], list[Obj], Obj]:
    """Namespaces and Secrets, the Participants, and the Federation."""
    store = {
        "endpoint": minio.endpoint,
        "bucket": bucket,
        "credentialsSecret": {"name": STORE_SECRET},
    }
    setup: list[Obj] = []
    participants: list[Obj] = []
    for ns in [COORDINATOR_NS, *(member_ns(n) for n in names)]:
        labels = {"pod-security.kubernetes.io/enforce": "restricted"}
        setup.append({"apiVersion": "v1", "kind": "Namespace",
                      "metadata": {"name": ns, "labels": labels}})  # fmt: skip
        setup.append(store_secret(ns, minio))
    setup.append(signing_secret(COORDINATOR_NS, COORDINATOR_SECRET, keys.coordinator))
    for name in names:
        ns = member_ns(name)
        setup.append(signing_secret(ns, SIGNING_SECRET, keys.members[name]))
        participants.append({
            "apiVersion": API, "kind": "Participant",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "federation": FEDERATION, "store": store,
                "coordinatorPublicKey": keys.coordinator.public_key_text,
                "signingKeySecret": {"name": SIGNING_SECRET},
                "data": {"pvc": "tapestry-data"},
                "compute": {"kueueQueue": QUEUE},
                "pollInterval": poll,
            },
        })  # fmt: skip
    federation = {
        "apiVersion": API, "kind": "Federation",
        "metadata": {"name": FEDERATION, "namespace": COORDINATOR_NS},
        "spec": {
            "store": store,
            "signingKeySecret": {"name": COORDINATOR_SECRET},
            "model": {"preset": "tiny",
                      "initialBase": {"manifest": base.key, "sha256": base.sha256}},
            "aggregation": {"optimizer": "diloco"},
            "roundDefaults": {"innerSteps": 1, "batchSize": 1, "seqLen": 8,
                              "deadline": "30m", "quorum": 1},
            "members": [{"name": n, "publicKey": keys.members[n].public_key_text}
                        for n in names],
        },
    }  # fmt: skip
    return setup, participants, federation


def apply_all(client: KubeClient, docs: list[Obj], workers: int = 8) -> None:
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(client.apply, docs))


def upload(store: ObjectStore, keys: Keys, name: str) -> float:
    """One member's signed update, as the trainer's rank 0 uploads it; when it committed."""
    layout = Layout(FEDERATION)
    key = keys.coordinator.public_key_text
    plan = read_plan(store, layout, 0, key)
    base = read_model(store, layout, plan.document.base.manifest, key)
    rng = np.random.default_rng(int(name[1:]))
    delta = {
        n: (rng.standard_normal(SHAPE, dtype=np.float32) * 1e-3).astype(np.float32)
        for group in base.document.groups
        for n in group
    }
    publish_update(store, layout, plan, base, delta, keys.members[name], tokens=1024,
                   metrics={"trainLoss": 3.0})  # fmt: skip
    return time.monotonic()


def run_size(
    binaries: Path,
    minio_ready: Future[S3Server],
    members: int,
    poll: str,
    workdir: Path,
    timeout: float,
    idle: float,
) -> dict[str, Any]:
    """One member count on a fresh cluster; the figures of it, up to the round's result
    (the aggregator pod runs the real merge, which checks every update again)."""
    names = [member_name(i) for i in range(members)]
    keys = Keys.generate(names)
    cluster = KubeCluster(binaries, workdir / f"cluster-{members}")
    operator: OperatorProcess | None = None
    watches: list[Watch] = []
    stats: ProcStats | None = None
    row: dict[str, Any] = {"members": members}
    try:
        started = time.monotonic()
        cluster.start()
        minio = minio_ready.result()
        bucket = f"scale-{members}-{uuid.uuid4().hex[:6]}"
        store = open_store(minio.url_for(bucket), create=True)
        base = publish_base(store, keys)
        client = cluster.client()
        install_crds(cluster.kubeconfig)
        say(f"[{members}] CRDs installed")
        setup, participants, federation = manifests(names, keys, minio, bucket, base, poll)
        apply_all(client, [d for d in setup if d["kind"] == "Namespace"])
        apply_all(client, [d for d in setup if d["kind"] != "Namespace"])
        say(f"[{members}] cluster up in {cluster.startup_seconds:.1f} s, "
              f"{len(setup)} namespaces and Secrets applied")  # fmt: skip
        jobs, rounds = Seen(), Seen()
        watches.append(Watch(client, "/apis/batch/v1/jobs", jobs))
        rounds_path = f"/apis/{API}/namespaces/{COORDINATOR_NS}/federationrounds"
        watches.append(Watch(client, rounds_path, rounds))
        namespaces = [COORDINATOR_NS, *(member_ns(n) for n in names)]
        log = workdir / f"operator-{members}.log"
        port = free_port()  # its Prometheus endpoint, on by default in the chart too
        env = {"TAPESTRY_METRICS_PORT": str(port)}
        operator = OperatorProcess(cluster.kubeconfig, log, namespaces=namespaces, env=env)
        operator.start()
        assert operator.proc is not None
        stats = ProcStats(operator.proc.pid)
        apply_all(client, [federation, *participants])
        fed_path = f"/apis/{API}/namespaces/{COORDINATOR_NS}/federations/{FEDERATION}"

        def settled() -> bool:
            """The Federation is Ready and every Participant had its first visit."""
            conds = client.get(fed_path).get("status", {}).get("conditions", [])
            if not any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
                return False
            listed = client.get(f"/apis/{API}/participants")["items"]
            return sum(1 for p in listed if "observedGeneration" in p.get("status", {})) == len(
                names
            )

        t_settled = wait_until("the first visit of every object", settled, timeout, log, 1.0)
        cpu_idle_start, idle_start = stats.cpu_s(), time.monotonic()
        row["settleSeconds"] = round(t_settled - started, 1)
        say(f"[{members}] operator settled {t_settled - started:.1f} s after the start")

        # -- round applied: the plan, then every training Job ---------------------------
        time.sleep(idle)  # a stretch of idle polling, for the idle CPU rate
        cpu_idle = stats.cpu_s() - cpu_idle_start
        idle_s = time.monotonic() - idle_start
        training = {f"{member_ns(n)}/{training_job_name(n, 0)}" for n in names}
        cpu0, visits0 = stats.cpu_s(), visits(port)
        t0 = time.monotonic()
        client.apply({"apiVersion": API, "kind": "FederationRound",
                      "metadata": {"name": ROUND, "namespace": COORDINATOR_NS},
                      "spec": {"federation": FEDERATION, "round": 0}})  # fmt: skip
        round_key = f"{COORDINATOR_NS}/{ROUND}"

        def planned() -> bool:
            with rounds.lock:
                obj = rounds.objects.get(round_key, {})
            return bool(obj.get("status", {}).get("planSha256"))

        t_plan = wait_until("the plan", planned, timeout, log)
        t_jobs = wait_until(
            f"{members} training Jobs", lambda: jobs.count(training) == members, timeout, log
        )
        with jobs.lock:
            first_job = min(jobs.times[k] for k in training)
            suspended = sum(1 for k in training if jobs.objects[k]["spec"].get("suspend"))
        cpu_jobs = stats.cpu_s() - cpu0
        say(f"[{members}] plan after {t_plan - t0:.1f} s, all {members} Jobs after "
              f"{t_jobs - t0:.1f} s")  # fmt: skip
        layout = Layout(FEDERATION)
        plan = read_plan(store, layout, 0, keys.coordinator.public_key_text)
        accepted = 0
        for n in names:
            read_receipt(store, layout, plan, n, ReceiptState.ACCEPTED)  # the operator's
            accepted += 1

        # -- every update uploaded: the close and the aggregator Job --------------------
        cpu1, visits1 = stats.cpu_s(), visits(port)
        t_up0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            committed = list(pool.map(lambda n: upload(store, keys, n), names))
        t_last = max(committed)
        aggregator = f"{COORDINATOR_NS}/{aggregator_job_name(FEDERATION, 0)}"
        say(f"[{members}] {members} updates uploaded in {t_last - t_up0:.1f} s")
        t_agg = wait_until(
            "the aggregator Job", lambda: jobs.count({aggregator}) == 1, timeout, log
        )
        cpu_agg = stats.cpu_s() - cpu1
        say(f"[{members}] aggregator Job {t_agg - t_last:.1f} s after the last upload")

        close = read_close(store, layout, 0, keys.coordinator.public_key_text).document
        included = sorted(i.participant for i in close.included)
        verified = 0
        for n in names:  # each signed update verifies against the plan and the base
            try:
                read_update(store, layout, plan, base, n)
                verified += 1
            except Rejected as e:
                say(f"[{members}] {n}'s update does not verify: {e}")
        say(f"[{members}] closed ({close.trigger}) with {len(included)} updates included")

        def succeeded() -> bool:
            with rounds.lock:
                obj = rounds.objects.get(round_key, {})
            return obj.get("status", {}).get("phase") in ("Succeeded", "Failed")

        t_done = wait_until("the round's result", succeeded, timeout, log)
        with rounds.lock:
            status = rounds.objects[round_key]["status"]
        merged = sum(1 for m in status.get("members", []) if m.get("state") == "Merged")
        hwm = stats.status_kib("VmHWM")
        cpu_total, visits2 = stats.cpu_s(), visits(port)
        say(f"[{members}] round {status['phase']} with {merged} merged, "
            f"{t_done - t_agg:.1f} s after the aggregator Job")  # fmt: skip
        say(f"[{members}] operator peak RSS {hwm / 1024:.0f} MiB, {cpu_total:.1f} CPU s")
        row.update(
            trainingJobs=len(training),
            jobsSuspended=suspended,
            acceptedReceipts=accepted,
            planSeconds=round(t_plan - t0, 2),
            firstJobSeconds=round(first_job - t0, 2),
            allJobsSeconds=round(t_jobs - t0, 2),
            uploadSeconds=round(t_last - t_up0, 2),
            aggregatorJobObserved=True,
            aggregatorAfterLastUploadSeconds=round(t_agg - t_last, 2),
            closeTrigger=str(close.trigger),
            closeIncluded=len(included),
            closeIncludesEveryMember=included == names,
            updatesVerified=verified,
            resultAfterAggregatorJobSeconds=round(t_done - t_agg, 2),
            roundPhase=status["phase"],
            merged=merged,
            operator={
                "peakRssMiB": round(hwm / 1024, 1),
                "sampledPeakRssMiB": round(stats.peak_rss_kib / 1024, 1),
                "cpuSeconds": round(cpu_total, 2),
                "idleCpuPerSecond": round(cpu_idle / idle_s, 3) if idle else None,
                "cpuSecondsUntilAllJobs": round(cpu_jobs, 2),
                "cpuSecondsUploadsToAggregator": round(cpu_agg, 2),
                "visitsUntilAllJobs": visits_between(visits0, visits1),
                "visitsUploadsToResult": visits_between(visits1, visits2),
            },
        )
        return row
    finally:
        if stats is not None:
            stats.stop()
        if operator is not None:
            operator.kill()  # measured already: no need to wait for Kopf's graceful stop
        for w in watches:
            w.close()
        say(f"[{members}] operator stopped")
        cluster.stop()
        cluster.remove()
        say(f"[{members}] cluster stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--members", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--poll", default="5s", help="every Participant's pollInterval")
    parser.add_argument("--timeout", type=float, default=600.0, help="per phase, seconds")
    parser.add_argument("--quick", action="store_true", help="3 members, a smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/operator-scale.json")
    args = parser.parse_args()
    members = [3] if args.quick else args.members
    poll = "1s" if args.quick else args.poll
    binaries = ensure_binaries(sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="tapestry-operator-scale-"))
    rows = []
    with ThreadPoolExecutor(1) as background:  # MinIO starts while the cluster does
        minio_ready = background.submit(start_minio, workdir / "minio")
        try:
            for n in members:
                say(f"{n} members")
                timeout, idle = (60.0, 0.0) if args.quick else (args.timeout, 10.0)
                rows.append(run_size(binaries, minio_ready, n, poll, workdir, timeout, idle))
        finally:
            minio_ready.result().stop()
            shutil.rmtree(workdir, ignore_errors=True)
            say("MinIO stopped")
    report = header("operator-scale", args.quick, "operator_scale.py")
    report.update(
        setup={
            "mode": "single cluster, role both, one --namespace per namespace (as the chart)",
            "participantPollInterval": poll,
            "coordinatorPollSeconds": POLL.total_seconds(),
            "trainingJobs": f"created suspended (Participant compute.kueueQueue={QUEUE!r}, "
            "no Kueue running): no trainer pod runs",
            "updates": f"uploaded by the benchmark with publish_update, {TENSORS} fp32 tensors "
            f"of {SHAPE[0]}x{SHAPE[1]}, 8 threads, once every training Job exists",
            "aggregator": "the real aggregator Job, run by the node agent",
        },
        targets={
            "allJobsSeconds": 20.0,
            "aggregatorAfterLastUploadSeconds": 5.0 + POLL.total_seconds(),
            "peakRssMiB": 200.0,
        },
        sizes=rows,
    )
    write(args.out, report)


if __name__ == "__main__":
    main()
