"""The operator end to end on one cluster: the single-cluster example, applied with
kubectl-style server-side apply, trains two rounds on real MinIO.

Each participant's training Job runs torchrun with the tiny model on CPU in its own
namespace; the aggregator Job merges; the round reports Succeeded; the next base is in
the store and verifies; a second round trains from it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tapestry_protocol.exchange import read_model, read_plan, read_result
from tapestry_protocol.layout import Layout
from tapestry_protocol.store import ObjectStore, open_store
from tapestry_trainer.data import prepare_shards
from tests.e2e.texts import write_corpora
from tests.kube.client import KubeClient, Obj
from tests.kube.cluster import KubeCluster
from tests.kube.tapestry_env import (
    API,
    COORDINATOR_SECRET,
    EXAMPLE,
    SIGNING_SECRET,
    Keys,
    OperatorProcess,
    data_volume,
    install_crds,
    kubectl,
    load_yaml,
    render_example,
    signing_secret,
    store_secret,
    wait_for,
)
from tests.s3servers import S3Server

pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.torch, pytest.mark.slow]

MEMBERS = ("de", "es", "it")
CORPORA = {
    "de": ["json", "csv", "argparse"],
    "es": ["asyncio", "collections", "itertools"],
    "it": ["logging", "pathlib", "functools"],
}
FAST = {"innerSteps": 6, "batchSize": 4, "seqLen": 32, "warmupSteps": 1}


@dataclass
class Deployment:
    client: KubeClient
    kubeconfig: Path
    keys: Keys
    store: ObjectStore
    coordinator_ns: str
    suffix: str
    operator: OperatorProcess

    def ns(self, member: str) -> str:
        return f"tapestry-{member}{self.suffix}"

    def round_path(self, name: str) -> str:
        return f"/apis/{API}/namespaces/{self.coordinator_ns}/federationrounds/{name}"

    def diagnose(self) -> str:
        out = [f"operator log tail:\n{self.operator.tail(60)}"]
        for ns in [self.coordinator_ns, *(self.ns(m) for m in MEMBERS)]:
            try:
                out.append(kubectl(self.kubeconfig, "-n", ns, "get", "jobs,pods,tapestry"))
            except AssertionError as e:
                out.append(str(e))
        return "\n".join(out)

    def wait_round(self, name: str, phase: str, timeout: float = 420) -> Obj:
        return wait_for(
            self.client, self.round_path(name),
            lambda o: o.get("status", {}).get("phase") == phase,
            timeout, f"FederationRound {name} to be {phase}", self.diagnose,
        )  # fmt: skip


@pytest.fixture
def deployment(
    kube_cluster: KubeCluster, minio_server: S3Server, tmp_path: Path
) -> Iterator[Deployment]:
    client = kube_cluster.client()
    suffix = f"-{uuid.uuid4().hex[:6]}"
    bucket = f"single{suffix}"
    store = open_store(minio_server.url_for(bucket), create=True)
    keys = Keys.generate(MEMBERS)
    install_crds(kube_cluster.kubeconfig)
    docs = render_example(
        load_yaml(sorted(EXAMPLE.glob("*.yaml"))), keys, minio_server.endpoint,
        bucket=bucket, suffix=suffix, overrides=FAST,
    )  # fmt: skip
    namespaces = [d for d in docs if d["kind"] == "Namespace"]
    for doc in namespaces:
        client.apply(doc)
    coordinator_ns = f"tapestry-coordinator{suffix}"
    corpora = write_corpora(tmp_path / "corpora", CORPORA)
    client.apply(store_secret(coordinator_ns, minio_server))
    client.apply(signing_secret(coordinator_ns, COORDINATOR_SECRET, keys.coordinator))
    for member in MEMBERS:
        ns = f"tapestry-{member}{suffix}"
        shards = tmp_path / "data" / member
        prepare_shards([corpora / member], shards, val_fraction=0.1)
        client.apply(store_secret(ns, minio_server))
        client.apply(signing_secret(ns, SIGNING_SECRET, keys.members[member]))
        for obj in data_volume(ns, shards):
            client.apply(obj)
    operator = OperatorProcess(kube_cluster.kubeconfig, tmp_path / "operator.log").start()
    try:
        for doc in docs:
            if doc["kind"] != "Namespace":
                client.apply(doc)
        yield Deployment(
            client, kube_cluster.kubeconfig, keys, store, coordinator_ns, suffix, operator
        )
    finally:
        operator.stop()


def test_two_rounds_on_one_cluster(deployment: Deployment) -> None:
    d = deployment
    done = d.wait_round("demo-round-0", "Succeeded")
    status = done["status"]
    assert status["progress"] == "3/3"
    assert {m["name"]: m["state"] for m in status["members"]} == dict.fromkeys(MEMBERS, "Merged")
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True", "Reconciling": "False", "Stalled": "False",
    }  # fmt: skip
    assert status["observedGeneration"] == done["metadata"]["generation"]
    layout = Layout("demo")
    key = d.keys.coordinator.public_key_text
    result = read_result(d.store, layout, 0, key).document
    assert result.next_base is not None
    assert status["result"]["nextBase"]["sha256"] == result.next_base.sha256
    next_base = read_model(d.store, layout, result.next_base.manifest, key)
    assert next_base.sha256 == result.next_base.sha256
    table = kubectl(d.kubeconfig, "-n", d.coordinator_ns, "get", "federationrounds")
    header = table.splitlines()[0].split()
    assert header[:5] == ["NAME", "FEDERATION", "ROUND", "PHASE", "REPORTED"], table
    assert "Succeeded" in table and "3/3" in table
    for member in MEMBERS:  # each participant records the verdict on its own update
        path = f"/apis/{API}/namespaces/{d.ns(member)}/participants/{member}"
        participant = d.client.get(path)
        rounds = {r["round"]: r for r in participant["status"].get("rounds", [])}
        assert rounds[0]["state"] == "Merged" and rounds[0]["weight"] > 0, participant["status"]

    for doc in render_example(load_yaml([EXAMPLE / "next" / "round-1.yaml"]), d.keys, "",
                              suffix=d.suffix):  # fmt: skip
        d.client.apply(doc)
    d.wait_round("demo-round-1", "Succeeded")
    plan = read_plan(d.store, layout, 1, key).document
    assert plan.base.sha256 == result.next_base.sha256  # round 1 trained from round 0's base
    assert read_result(d.store, layout, 1, key).document.next_base is not None
