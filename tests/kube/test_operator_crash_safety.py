"""Crash safety of the control plane: the operator SIGKILLed at every step of a round,
and the aggregator's pod killed at the end of its merge, still finish the round once.

One round of the single-cluster example (`tests.kube.deployment`) on the test control
plane and real MinIO. A watcher looks at the store and the cluster every 0.05-0.3 s; as
soon as it sees a step (the plan published, a receipt written, every training Job
running, the round closed, the aggregator Job running after its pod was killed, the
result written) and the operator process has been at work, it SIGKILLs that process and
starts a new one; the timeline it prints says what each kill left behind.

The coordinator reaches the store through a proxy that holds the aggregator's PUT of
the result, so the aggregator is stopped at a known point (next base and optimizer state
committed, result not): its pod is deleted with grace 0 there, and the Job controller's
retry merges again, finding its earlier writes in place.

Afterwards the round has Succeeded with every member Merged; each member ran exactly one
training Job and the coordinator one aggregator Job (one failed pod, one success), the
same objects from start to end (nothing deleted and made again); every member wrote its
Accepted receipt and no other; the status is complete and its phase never went back; no
reconcile failed; and the stored result is, byte for byte, what one uninterrupted merge
of the same closed round writes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tapestry_aggregator.merge import aggregate_round
from tapestry_operator import api
from tapestry_operator.builders import AGGREGATOR, TRAINER, aggregator_job_name
from tapestry_operator.config import FederationConfig
from tapestry_protocol.exchange import read_model, read_result
from tapestry_protocol.layout import Layout
from tapestry_protocol.store import ObjectStore, open_store
from tests.kube import deployment as shared
from tests.kube.client import Obj
from tests.kube.cluster import KubeCluster
from tests.kube.deployment import FEDERATION, MEMBERS, Deployment, Setup, merge
from tests.kube.tapestry_env import API
from tests.s3servers import FaultProxy, S3Server

pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.torch, pytest.mark.slow]

ROUND = 0
ROUND_NAME = "demo-round-0"
POLL_S = 0.3
STEP_TIMEOUT_S = 240.0
LOGGED_IN = "Initial authentication has finished."  # Kopf, once per operator process
SETTLE_S = 3.0  # from logging in to a first visit of every object, with room to spare
PHASES = ("Pending", "Training", "Aggregating", "Succeeded")  # the order a round goes
RESULT_PUT = f"/federations/{FEDERATION}/rounds/{ROUND:06d}/result.json".encode()


class HoldingProxy(FaultProxy):
    """A pass-through store proxy that holds every request whose request line is a PUT of
    `path` until `release()`, then drops it unsent: the writer waits for an answer that
    never comes, frozen just before that write, for as long as the test needs."""

    def __init__(self, target_endpoint: str, path: bytes) -> None:
        super().__init__(target_endpoint)
        self.path = path
        self.held = threading.Event()
        self.released = threading.Event()

    def release(self) -> None:
        self.released.set()

    def _pipe_up(
        self, client: socket.socket, upstream: socket.socket, swallow: threading.Event
    ) -> None:
        try:
            while data := client.recv(1 << 16):
                line = data.split(b"\r\n", 1)[0]
                if line.startswith(b"PUT ") and self.path in line and not self.released.is_set():
                    self.held.set()
                    self.released.wait()
                    client.close()  # the request never reaches the store
                    return
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            upstream.close()


@pytest.fixture
def proxy(minio_server: S3Server) -> Iterator[HoldingProxy]:
    held = HoldingProxy(minio_server.endpoint, RESULT_PUT)
    yield held
    held.release()
    held.close()


@pytest.fixture
def deployment(
    kube_cluster: KubeCluster, minio_server: S3Server, tmp_path: Path, proxy: HoldingProxy
) -> Iterator[Deployment]:
    """The example, with the coordinator (its operator and aggregator Jobs) reaching the
    store through `proxy` and the participants reaching it directly; round 0 is applied
    once that is so."""
    setup = Setup(bucket="crash", apply_round=False)
    with shared.deploy(kube_cluster, minio_server, tmp_path, setup) as d:
        for doc in d.docs:
            if doc["kind"] == "Federation":
                d.client.apply(merge(doc, {"spec": {"store": {"endpoint": proxy.endpoint}}}))
        for doc in d.docs:
            if doc["kind"] == "FederationRound":
                d.client.apply(doc)
        yield d


@dataclass
class Watcher:
    """Samples the round's status and Jobs while it waits, so that what happened between
    two kills (a phase going back, a Job made twice) cannot go unseen."""

    d: Deployment
    layout: Layout = field(default_factory=lambda: Layout(FEDERATION))
    started: float = field(default_factory=time.monotonic)
    phases: list[str] = field(default_factory=list)
    job_uids: dict[str, set[str]] = field(default_factory=dict)  # ns/name -> uids seen
    jobs: list[Obj] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    logins: int = 0  # the operator processes that have logged in, of those started
    seen_at: datetime = field(default_factory=lambda: datetime.now(UTC))  # the last step

    def note(self, text: str) -> None:
        self.timeline.append(f"{time.monotonic() - self.started:6.1f}s  {text}")

    def sample(self) -> None:
        body = self.d.client.get(self.d.round_path(ROUND_NAME))
        phase = body.get("status", {}).get("phase")
        if phase and (not self.phases or self.phases[-1] != phase):
            self.phases.append(phase)
            self.note(f"round phase {phase}")
        selector = f"{api.LABEL_FEDERATION}={FEDERATION},{api.LABEL_ROUND}={ROUND}"
        self.jobs = [
            j
            for j in self.d.client.get("/apis/batch/v1/jobs", labelSelector=selector)["items"]
            if j["metadata"]["namespace"].endswith(self.d.suffix)
        ]
        for job in self.jobs:
            meta = job["metadata"]
            self.job_uids.setdefault(f"{meta['namespace']}/{meta['name']}", set()).add(meta["uid"])

    def component_jobs(self, component: str) -> list[Obj]:
        return [j for j in self.jobs if j["metadata"]["labels"][api.LABEL_COMPONENT] == component]

    def until(
        self, what: str, seen: Callable[[], bool], poll: float = POLL_S,
        timeout: float = STEP_TIMEOUT_S,
    ) -> None:  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sample()
            if seen():
                self.seen_at = datetime.now(UTC)
                self.note(f"seen: {what}")
                return
            time.sleep(poll)
        raise AssertionError(
            f"timed out after {timeout:.0f}s waiting for {what}\n"
            + "\n".join(self.timeline)
            + "\n"
            + self.d.diagnose()
        )

    def store_state(self) -> str:
        """Where the round stands, in a few words: the store's documents, and for each
        member its receipt (R), its training Job (J) and its update (U)."""
        prefix = self.layout.round_prefix(ROUND)
        names = {i.key[len(prefix) :] for i in self.d.store.list(prefix)}
        flags = [n.removesuffix(".json") for n in ("plan.json", "close.json", "result.json")
                 if n in names]  # fmt: skip
        trainers = {
            j["metadata"]["labels"][api.LABEL_PARTICIPANT] for j in self.component_jobs(TRAINER)
        }
        members = []
        for m in MEMBERS:
            marks = "R" * (f"receipts/{m}/accepted.json" in names) + "J" * (m in trainers)
            marks += "U" * (f"updates/{m}/manifest.json" in names)
            members.append(f"{m}:{marks or '-'}")
        aggregators = self.component_jobs(AGGREGATOR)
        agg = "-"
        if aggregators:
            st = aggregators[0].get("status", {})
            agg = " ".join(f"{k}={st.get(k, 0)}" for k in ("active", "failed", "succeeded"))
        return f"store {'+'.join(flags) or '-'}; {' '.join(members)}; aggregator {agg}"

    def operator_up(self) -> None:
        """Wait until the current operator process is at work: logged in, and either the
        step was seen after that (it acted) or it has had time to visit every object. A
        kill then hits a working operator, not one still starting."""

        def logins() -> list[datetime]:
            lines = self.d.operator.log.read_text(errors="replace").splitlines()
            return [datetime.fromisoformat(json.loads(n)["time"]) for n in lines if LOGGED_IN in n]

        seen = self.seen_at
        self.until("the operator logged in", lambda: len(logins()) > self.logins, timeout=60)
        login = logins()[self.logins]
        self.logins += 1
        if seen < login:
            time.sleep(max(0.0, SETTLE_S - (datetime.now(UTC) - login).total_seconds()))

    def crash_operator(self, step: str) -> None:
        """SIGKILL the operator, note what it left behind, and start a new one."""
        self.operator_up()
        self.d.operator.kill()
        self.sample()
        self.note(f"SIGKILL operator after {step}: {self.store_state()}")
        self.d.operator.start()


def _active(job: Obj) -> bool:
    return int(job.get("status", {}).get("active") or 0) >= 1


def _running(job: Obj) -> bool:
    """Neither complete nor failed: what the operator sees as a running Job."""
    done = {"Complete", "Failed"}
    return not any(
        c["type"] in done and c["status"] == "True"
        for c in job.get("status", {}).get("conditions", [])
    )


def test_operator_and_aggregator_killed_at_every_step(
    deployment: Deployment, proxy: HoldingProxy, tmp_path: Path
) -> None:
    d = deployment
    w = Watcher(d)
    layout, store = w.layout, d.store
    key = d.coordinator_key
    receipts = layout.round_prefix(ROUND) + "receipts/"

    w.until("the plan", lambda: store.exists(layout.plan(ROUND)), poll=0.05)
    w.crash_operator("the plan")
    w.until("a receipt", lambda: any(True for _ in store.list(receipts)), poll=0.05)
    w.crash_operator("the first receipt")
    w.until(
        "every training Job running",
        lambda: (
            len(trainers := w.component_jobs(TRAINER)) == len(MEMBERS)
            and all(_active(j) for j in trainers)
        ),
    )
    w.crash_operator("the training Jobs started")
    w.until("the close record", lambda: store.exists(layout.close(ROUND)), poll=0.05)
    w.crash_operator("the close")
    kill_aggregator_mid_merge(d, proxy, w)
    w.until(
        "the aggregator Job retrying",
        lambda: any(_running(j) for j in w.component_jobs(AGGREGATOR)),
    )
    w.crash_operator("the aggregator's pod was killed, with its Job running")
    w.until("the result", lambda: store.exists(layout.result(ROUND)), poll=0.05)
    w.crash_operator("the result")
    w.until(
        "the round Succeeded",
        lambda: w.phases[-1:] == ["Succeeded"] and _members_merged(d),
    )
    print("\n".join(w.timeline))

    # The round, once: every member merged, its status whole.
    body = d.client.get(d.round_path(ROUND_NAME))
    status = body["status"]
    assert status["phase"] == "Succeeded", status
    assert status["observedGeneration"] == body["metadata"]["generation"], status
    assert status["progress"] == f"{len(MEMBERS)}/{len(MEMBERS)}", status
    assert [m["name"] for m in status["members"]] == sorted(MEMBERS), status
    assert all(m["state"] == "Merged" and m["weight"] > 0 for m in status["members"]), status
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True", "Reconciling": "False", "Stalled": "False",
    }  # fmt: skip
    ranks = [PHASES.index(p) for p in w.phases]
    assert ranks == sorted(ranks), f"the round's phase went back: {w.phases}"
    assert "reconcile failed" not in d.operator.log.read_text(), d.operator.tail(80)

    # One training Job per member, one aggregator Job; each the same object throughout.
    w.sample()
    trainers = w.component_jobs(TRAINER)
    assert sorted(j["metadata"]["labels"][api.LABEL_PARTICIPANT] for j in trainers) == sorted(
        MEMBERS
    ), [j["metadata"]["name"] for j in trainers]
    assert {j["metadata"]["namespace"] for j in trainers} == {d.ns(m) for m in MEMBERS}
    aggregators = w.component_jobs(AGGREGATOR)
    assert [j["metadata"]["name"] for j in aggregators] == [
        aggregator_job_name(FEDERATION, ROUND)
    ], aggregators
    assert all(len(uids) == 1 for uids in w.job_uids.values()), w.job_uids
    assert len(w.job_uids) == len(MEMBERS) + 1, w.job_uids
    for job in trainers:  # the operator's crashes cost no training attempt
        assert job["status"].get("succeeded") == 1 and not job["status"].get("failed"), job
    agg = aggregators[0]["status"]
    assert agg.get("succeeded") == 1 and agg.get("failed") == 1, agg  # the killed pod, retried

    # Each member answered once (Accepted, never Failed) and knows its verdict.
    names = sorted(i.key[len(receipts) :] for i in store.list(receipts))
    assert names == [f"{m}/accepted.json" for m in sorted(MEMBERS)], names
    for member in MEMBERS:
        participant = d.client.get(d.participant_path(member))["status"]
        rounds = {r["round"]: r for r in participant.get("rounds", [])}
        assert rounds[ROUND]["state"] == "Merged" and rounds[ROUND]["weight"] > 0, participant
        assert participant["observedGeneration"] >= 1, participant

    # The result verifies, and is what one uninterrupted merge of the closed round writes.
    result = read_result(store, layout, ROUND, key)
    assert result.document.next_base is not None
    assert sorted(a.participant for a in result.document.accepted) == sorted(MEMBERS)
    assert status["result"]["nextBase"]["sha256"] == result.document.next_base.sha256
    next_base = read_model(store, layout, result.document.next_base.manifest, key)
    assert next_base.sha256 == result.document.next_base.sha256
    replay = replay_merge(d, layout, tmp_path / "replay")
    assert replay.get(layout.result(ROUND)) == store.get(layout.result(ROUND))
    assert replay.get(layout.base_manifest(ROUND + 1)) == store.get(layout.base_manifest(ROUND + 1))


def kill_aggregator_mid_merge(d: Deployment, proxy: HoldingProxy, w: Watcher) -> None:
    """Kill the aggregator's pod at the end of its merge: the next base and optimizer
    state are committed, and the proxy holds its write of the result. Its pod is deleted
    with grace 0 (the process gets SIGKILL); once the Job counts the failure the proxy
    lets writes through, and the Job controller's retry merges again."""
    job = aggregator_job_name(FEDERATION, ROUND)
    pods_path = f"/api/v1/namespaces/{d.coordinator_ns}/pods"
    w.until("the aggregator writing the result", proxy.held.is_set, poll=0.05)
    stored = {
        "base": d.store.exists(w.layout.base_manifest(ROUND + 1)),
        "optimizer state": d.store.exists(w.layout.optimizer_manifest(ROUND + 1)),
        "result": d.store.exists(w.layout.result(ROUND)),
    }
    assert stored == {"base": True, "optimizer state": True, "result": False}, stored
    pods = d.client.get(pods_path, labelSelector=f"batch.kubernetes.io/job-name={job}")["items"]
    running = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
    assert len(running) == 1, [(p["metadata"]["name"], p.get("status")) for p in pods]
    name = running[0]["metadata"]["name"]
    d.client.delete(f"{pods_path}/{name}", {"gracePeriodSeconds": 0})
    w.note(f"deleted aggregator pod {name} with grace 0, its result unwritten")
    w.until(
        "the aggregator's failure counted",
        lambda: any(j.get("status", {}).get("failed") for j in w.component_jobs(AGGREGATOR)),
    )
    proxy.release()


def _members_merged(d: Deployment) -> bool:
    for member in MEMBERS:
        status: dict[str, Any] = d.client.get(d.participant_path(member)).get("status", {})
        rounds = {r["round"]: r for r in status.get("rounds", [])}
        if rounds.get(ROUND, {}).get("state") != "Merged":
            return False
    return True


def replay_merge(d: Deployment, layout: Layout, root: Path) -> ObjectStore:
    """The round's inputs (everything up to the close) copied into a fresh store, merged
    there once, in this process, with the strategy the Federation gives the Job."""
    replay = open_store(root, create=True)
    outputs = (layout.base_dir(ROUND + 1), layout.optimizer_dir(ROUND + 1), layout.result(ROUND))
    for info in d.store.list(layout.root):
        if not info.key.startswith(outputs):
            replay.put(info.key, d.store.get(info.key))
    fed = d.client.get(f"/apis/{API}/namespaces/{d.coordinator_ns}/federations/{FEDERATION}")
    strategy = FederationConfig.from_body(fed).strategy
    aggregate_round(replay, layout, ROUND, d.keys.coordinator, strategy)
    return replay
