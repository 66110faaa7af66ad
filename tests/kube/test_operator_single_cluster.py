"""The operator end to end on one cluster: the single-cluster example, applied with
kubectl-style server-side apply, trains two rounds on real MinIO.

Each participant's training Job runs torchrun with the tiny model on CPU in its own
namespace; the aggregator Job merges; the round reports Succeeded; the next base is in
the store and verifies; a second round trains from it.
"""

from __future__ import annotations

import time

import pytest

from tapestry_protocol.documents import UpdateManifest
from tapestry_protocol.exchange import (
    publish_model,
    read_document,
    read_model,
    read_plan,
    read_result,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.shards import DEFAULT_SHARD_BYTES, plan_shards
from tapestry_protocol.store import ObjectStore
from tapestry_trainer.baseline import initial_arrays
from tapestry_trainer.specs import ModelSpec
from tests.kube import deployment as shared
from tests.kube.client import Obj
from tests.kube.deployment import MEMBERS, Deployment, Setup
from tests.kube.tapestry_env import (
    API,
    EXAMPLE,
    Keys,
    kubectl,
    load_yaml,
    render_example,
    verdict_seen,
)

deployment = shared.deployment  # the shared fixture: the example, deployed per Setup
pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.torch, pytest.mark.slow]


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
    for member in MEMBERS:  # each participant records the verdict on its own update,
        # when its own poll of the store sees the result (after the round's, not with it)
        participant = d.wait_participant(member, verdict_seen(0), "to see round 0's result")
        rounds = {r["round"]: r for r in participant["status"].get("rounds", [])}
        assert rounds[0]["state"] == "Merged" and rounds[0]["weight"] > 0, participant["status"]

    for doc in render_example(load_yaml([EXAMPLE / "next" / "round-1.yaml"]), d.keys, "",
                              suffix=d.suffix):  # fmt: skip
        d.client.apply(doc)
    d.wait_round("demo-round-1", "Succeeded")
    plan = read_plan(d.store, layout, 1, key).document
    assert plan.base.sha256 == result.next_base.sha256  # round 1 trained from round 0's base
    assert read_result(d.store, layout, 1, key).document.next_base is not None

    # autoRounds: the next round starts by itself once the newest one succeeds, up to
    # maxRounds (rounds 0..2 here), and no further.
    federation = d.client.get(f"/apis/{API}/namespaces/{d.coordinator_ns}/federations/demo")
    federation["spec"]["autoRounds"] = {"enabled": True, "maxRounds": 3}
    d.client.apply({k: federation[k] for k in ("apiVersion", "kind", "spec")} | {
        "metadata": {"name": "demo", "namespace": d.coordinator_ns},
    })  # fmt: skip
    automatic = d.wait_round("demo-round-2", "Succeeded")  # created by the operator
    assert automatic["metadata"]["ownerReferences"][0]["kind"] == "Federation"
    second = read_result(d.store, layout, 1, key).document.next_base
    assert second is not None
    assert read_plan(d.store, layout, 2, key).document.base.sha256 == second.sha256
    time.sleep(12)  # more than one Federation visit: still no round 3
    rounds = d.client.get(f"/apis/{API}/namespaces/{d.coordinator_ns}/federationrounds")
    assert sorted(r["spec"]["round"] for r in rounds["items"]) == [0, 1, 2]


def _own_base(store: ObjectStore, keys: Keys) -> Obj:
    """Round 0's base published by the user (as `tapestry base publish` does), not by
    the bootstrap Job: other weights than the preset's seed 0 would give."""
    spec = ModelSpec.preset("tiny", seed=7)
    arrays = initial_arrays(spec)
    groups = plan_shards([(n, a.nbytes) for n, a in arrays.items()], DEFAULT_SHARD_BYTES)
    base = publish_model(store, Layout("demo"), 0, arrays, groups, keys.coordinator,
                         model=spec.to_dict())  # fmt: skip
    return {"model": {"initialBase": {"manifest": base.key, "sha256": base.sha256}}}


@pytest.mark.parametrize("deployment", [Setup(bucket="own", prepare=_own_base)], indirect=True)
def test_round_0_trains_from_a_base_the_user_published(deployment: Deployment) -> None:
    d = deployment
    d.wait_round("demo-round-0", "Succeeded")
    key = d.keys.coordinator.public_key_text
    own = d.client.get(f"/apis/{API}/namespaces/{d.coordinator_ns}/federations/demo")
    pinned = own["spec"]["model"]["initialBase"]
    assert read_plan(d.store, Layout("demo"), 0, key).document.base.sha256 == pinned["sha256"]
    assert d.job(d.coordinator_ns, "demo-bootstrap") is None  # nothing initialised a preset


WORKSPACE = "tapestry-work"  # the members' workspace PVC (provisioned by the node agent)


def _workspace_claim(namespace: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": WORKSPACE, "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }


@pytest.mark.parametrize(
    "deployment",
    [
        Setup(
            bucket="feedback",
            round_defaults={"encoding": "int8"},
            participants={m: {"workspace": {"claimName": WORKSPACE}} for m in ("de", "es")},
            apply_round=False,
        )
    ],
    indirect=True,
)
def test_int8_rounds_carry_the_residual_in_the_workspace(deployment: Deployment) -> None:
    """Two int8 rounds: de and es keep their work directory on a PVC, so round 1 sends
    round 0's rounding residual; member it has an emptyDir, so its round 1 starts from zero."""
    d = deployment
    for member in ("de", "es"):
        d.client.apply(_workspace_claim(f"tapestry-{member}{d.suffix}"))
    for doc in d.docs:
        if doc["kind"] == "FederationRound":
            d.client.apply(doc)
    d.wait_round("demo-round-0", "Succeeded")
    for doc in render_example(load_yaml([EXAMPLE / "next" / "round-1.yaml"]), d.keys, "",
                              suffix=d.suffix):  # fmt: skip
        d.client.apply(doc)
    d.wait_round("demo-round-1", "Succeeded")
    layout = Layout("demo")

    def metrics(round_number: int, member: str) -> dict[str, float | str | None]:
        key = layout.update_manifest(round_number, member)
        document, _, _ = read_document(d.store, key, UpdateManifest)
        assert document.encoding == "int8"
        return document.metrics

    for member in MEMBERS:
        first, second = metrics(0, member), metrics(1, member)
        assert first["errorFeedback"] == second["errorFeedback"] == "on", member
        assert first["carriedResidualNorm"] == 0.0
        left = first["residualNorm"]
        assert isinstance(left, float) and left > 0
        if member == "it":  # no workspace: the residual went with round 0's pod
            assert second["carriedResidualNorm"] == 0.0
        else:
            assert second["carriedResidualNorm"] == pytest.approx(left, rel=1e-6), member
