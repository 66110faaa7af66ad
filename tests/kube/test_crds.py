"""The CRDs in crds/ on a real API server: installed with kubectl, defaults applied, invalid
objects refused with a message that says what to fix, printer columns and the category.

The CRDs stay installed for the rest of the session (they are cluster-wide, and every test
that needs them installs the same bytes with server-side apply, which is idempotent).
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.kube.client import ApiError, KubeClient, Obj, now_rfc3339
from tests.kube.cluster import REPO_ROOT, KubeCluster
from tests.kube.helpers import Kube, kubectl_binary

pytestmark = pytest.mark.kube

API = "tapestry.dev/v1alpha1"
STATUS = "/status"
CRDS = ("federations", "federationrounds", "participants")
KEY = "ed25519:" + "A" * 43 + "="
SHA = "ab" * 32
STORE = {
    "endpoint": "https://minio.example:9000",
    "bucket": "tapestry",
    "credentialsSecret": {"name": "s3"},
}


@pytest.fixture(scope="module")
def crds(kube_cluster: KubeCluster, kube_admin: KubeClient) -> None:
    """Installs crds/ the way its README says and waits until all three are Established."""
    base = [kubectl_binary(), f"--kubeconfig={kube_cluster.kubeconfig}"]
    for argv in (
        ["apply", "--server-side", "-f", str(REPO_ROOT / "crds")],
        ["wait", "--for=condition=Established", "--timeout=60s"]
        + [f"crd/{plural}.tapestry.dev" for plural in CRDS],
    ):
        done = subprocess.run(base + argv, capture_output=True, text=True, timeout=90, check=False)
        assert done.returncode == 0, f"kubectl {' '.join(argv)}:\n{done.stdout}{done.stderr}"
        assert "Warning" not in done.stderr, done.stderr
    for plural in CRDS:
        got = kube_admin.get(
            f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{plural}.tapestry.dev"
        )
        conditions = {c["type"]: c["status"] for c in got["status"]["conditions"]}
        assert conditions.get("NamesAccepted") == "True", got["status"]


# --------------------------------------------------------------------------- objects


def federation(name: str = "demo", **spec: Any) -> Obj:
    return {
        "apiVersion": API,
        "kind": "Federation",
        "metadata": {"name": name},
        "spec": {
            "store": copy.deepcopy(STORE),
            "signingKeySecret": {"name": "coordinator-key"},
            "members": [{"name": "de", "publicKey": KEY}],
            **spec,
        },
    }


def federation_round(name: str = "demo-r1", round: int = 1, **spec: Any) -> Obj:
    return {
        "apiVersion": API,
        "kind": "FederationRound",
        "metadata": {"name": name},
        "spec": {"federation": "demo", "round": round, **spec},
    }


def participant(name: str = "de", **spec: Any) -> Obj:
    return {
        "apiVersion": API,
        "kind": "Participant",
        "metadata": {"name": name},
        "spec": {
            "federation": "demo",
            "store": copy.deepcopy(STORE),
            "coordinatorPublicKey": KEY,
            "signingKeySecret": {"name": "member-key"},
            "data": {"pvc": "corpus"},
            **spec,
        },
    }


def path_of(kube: Kube, obj: Obj, name: str | None = None) -> str:
    return kube.client.resource(obj["apiVersion"], obj["kind"]).path(kube.namespace, name)


def create(kube: Kube, obj: Obj) -> Obj:
    """POSTs with strict field validation, as kubectl does: unknown fields are errors."""
    return kube.client.request(
        "POST", path_of(kube, obj), obj, params={"fieldValidation": "Strict"}
    )


def merge_patch(kube: Kube, obj: Obj, patch: Obj, subresource: str = "") -> Obj:
    path = path_of(kube, obj, obj["metadata"]["name"]) + subresource
    return kube.client.patch(path, patch)


def refused(call: Callable[[], Obj], status: int = 422) -> ApiError:
    """The API server's refusal of a call."""
    with pytest.raises(ApiError) as err:
        call()
    assert err.value.status == status, err.value
    return err.value


def complaints(error: ApiError) -> list[str]:
    """Its field errors (Status details.causes), less the note that an error of the schema
    (a wrong type, enum or a missing required field) kept the CEL rules from running."""
    causes = json.loads(error.body).get("details", {}).get("causes", [])
    said = [f"{c.get('field', '')}: {c.get('message', '')}" for c in causes]
    return [c for c in said if "some validation rules were not checked" not in c]


# --------------------------------------------------------------------------- valid objects


def test_minimal_objects_are_accepted_with_their_defaults(kube: Kube, crds: None) -> None:
    created = create(kube, federation())
    stored = kube.get(API, "Federation", "demo")
    assert stored is not None and stored["spec"] == created["spec"]
    spec = stored["spec"]
    assert spec["store"] == {**STORE, "prefix": ""}
    assert spec["model"] == {
        "trainerImage": "ghcr.io/tapestry-dev/tapestry-trainer:0.1.0-cpu",
        "preset": "tiny",
        "seed": 0,
    }
    assert spec["aggregation"] == {
        "optimizer": "diloco",
        "momentum": 0.9,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 0.001,
        "weighting": "tokens",
        "clipping": {"mode": "none"},
        "combine": {"rule": "mean", "trim": 0.1},
        "parallelism": 1,
    }
    assert spec["roundDefaults"] == {
        "innerSteps": 40,
        "learningRate": 0.003,
        "batchSize": 16,
        "seqLen": 128,
        "warmupSteps": 4,
        "encoding": "fp32",
        "deadline": "1h",
        "quorum": 1,
    }
    assert spec["aggregator"] == {
        "image": "ghcr.io/tapestry-dev/tapestry-operator:0.1.0",
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
    }
    assert spec["autoRounds"] == {"enabled": False}

    rnd = create(kube, federation_round())
    assert rnd["spec"] == {"federation": "demo", "round": 1, "suspend": False}

    part = create(kube, participant(store={**STORE, "caSecret": {"name": "minio-ca"}}))
    spec = part["spec"]
    assert spec["store"]["caSecret"] == {"name": "minio-ca", "key": "ca.crt"}
    assert spec["compute"] == {
        "image": "ghcr.io/tapestry-dev/tapestry-trainer:0.1.0-cpu",
        "nodes": 1,
        "gpusPerNode": 0,
        "rendezvousPort": 29500,
        "shmSize": "1Gi",
    }
    assert spec["data"] == {"pvc": "corpus", "path": ""}
    assert spec["admission"] == {"mode": "Automatic"}
    assert (spec["pollInterval"], spec["historyLimit"]) == ("30s", 3)
    assert spec["errorFeedback"] is True and "workspace" not in spec
    assert "memberName" not in spec  # the default is metadata.name, resolved by the operator


def test_a_full_participant_round_trips(kube: Kube, crds: None) -> None:
    """Every optional field set to a valid value is kept as written (nothing is pruned)."""
    spec: Obj = {
        "memberName": "germany",
        "compute": {
            "image": "registry.example/trainer:1.0-cuda",
            "nodes": 2,
            "gpusPerNode": 8,
            "procsPerNode": 4,
            "resources": {"requests": {"cpu": "16", "memory": "128Gi"}, "limits": {"cpu": 32}},
            "nodeSelector": {"nvidia.com/gpu.product": "H100"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {
                    "key": "spot",
                    "operator": "Equal",
                    "value": "yes",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
            ],
            "priorityClassName": "training",
            "kueueQueue": "team-a",
            "rendezvousPort": 23456,
            "shmSize": "16Gi",
        },
        "data": {
            "pvc": "corpus",
            "path": "text/de",
            "loader": "my_loaders.parquet:load",
            "loaderOptions": {"columns": ["text"], "nested": {"limit": 10}},
        },
        "admission": {"mode": "Manual", "approvedRounds": [1, 2], "deniedRounds": [3]},
        "pollInterval": "1m30s",
        "historyLimit": 0,
        "errorFeedback": False,
        "workspace": {"claimName": "germany-work"},
    }
    created = create(kube, participant(**spec))
    for key, value in spec.items():
        assert created["spec"][key] == value, key


# --------------------------------------------------------------------------- invalid objects

Mutation = Callable[[Obj], None]


def _set(path: str, value: Any) -> Mutation:
    """Sets spec.<path> (dots; a number indexes a list) on a manifest."""

    def mutate(obj: Obj) -> None:
        node: Any = obj["spec"]
        *parents, last = path.split(".")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        if value is None:
            del node[last]
        else:
            node[last] = value

    return mutate


INVALID: list[tuple[str, Callable[[], Obj], Mutation, list[str]]] = [
    (
        "bad-public-key",
        federation,
        _set("members.0.publicKey", "ed25519:tooShort"),
        ["spec.members[0].publicKey", "should match '^ed25519:[A-Za-z0-9+/=]{44}$'"],
    ),
    (
        "quorum-above-members",
        federation,
        _set("roundDefaults", {"quorum": 3}),
        [
            "spec.roundDefaults.quorum",
            "roundDefaults.quorum (3) must not exceed the number of members (1)",
        ],
    ),
    (
        "no-members",
        federation,
        _set("members", []),
        ["spec.members", "should have at least 1 items"],
    ),
    (
        "duplicate-member-names",
        federation,
        _set("members", [{"name": "de", "publicKey": KEY}, {"name": "de", "publicKey": KEY}]),
        ["spec.members[1]", "Duplicate value", '"name":"de"'],
    ),
    (
        "member-name-not-a-label",
        federation,
        _set("members.0.name", "Germany"),
        ["spec.members[0].name", "should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"],
    ),
    (
        "endpoint-without-scheme",
        federation,
        _set("store.endpoint", "minio.example:9000"),
        ["spec.store.endpoint", "should match '^https?://'"],
    ),
    (
        "bucket-with-capitals",
        federation,
        _set("store.bucket", "My_Bucket"),
        ["spec.store.bucket", "should match"],
    ),
    (
        "unknown-identity-provider",
        federation,
        _set("store.identities", {"provider": "vault", "adminSecret": {"name": "admin"}}),
        ["spec.store.identities.provider", 'Unsupported value: "vault"'],
    ),
    (
        "identities-without-admin-secret",
        federation,
        _set("store.identities", {"provider": "minio"}),
        ["spec.store.identities.adminSecret", "Required value"],
    ),
    (
        "unknown-optimizer",
        federation,
        _set("aggregation", {"optimizer": "sgd"}),
        ["spec.aggregation.optimizer", 'Unsupported value: "sgd"', '"fedavg", "diloco", "fedadam"'],
    ),
    (
        "max-share-zero",
        federation,
        _set("aggregation", {"maxShare": 0}),
        ["spec.aggregation.maxShare", "should be greater than 0"],
    ),
    (
        "clipping-without-bound",
        federation,
        _set("aggregation", {"clipping": {"mode": "median"}}),
        ["spec.aggregation.clipping", "clipping.bound is required when clipping.mode is fixed"],
    ),
    (
        "clipping-bound-without-mode",
        federation,
        _set("aggregation", {"clipping": {"bound": 2.0}}),
        ["spec.aggregation.clipping", "clipping.bound is set but clipping.mode is none"],
    ),
    (
        "unknown-clipping-mode",
        federation,
        _set("aggregation", {"clipping": {"mode": "l2", "bound": 1.0}}),
        ["spec.aggregation.clipping.mode", 'Unsupported value: "l2"'],
    ),
    (
        "clipping-bound-zero",
        federation,
        _set("aggregation", {"clipping": {"mode": "fixed", "bound": 0}}),
        ["spec.aggregation.clipping.bound", "should be greater than 0"],
    ),
    (
        "unknown-combine-rule",
        federation,
        _set("aggregation", {"combine": {"rule": "mode"}}),
        ["spec.aggregation.combine.rule", 'Unsupported value: "mode"'],
    ),
    (
        "trim-half",
        federation,
        _set("aggregation", {"combine": {"rule": "trimmed-mean", "trim": 0.5}}),
        ["spec.aggregation.combine.trim", "should be less than 0.5"],
    ),
    (
        "token-ratio-below-one",
        federation,
        _set("aggregation", {"maxTokenRatio": 0.5}),
        ["spec.aggregation.maxTokenRatio", "should be greater than or equal to 1"],
    ),
    (
        "validation-without-data",
        federation,
        _set("aggregation", {"validation": {"margin": 0.1}}),
        ["spec.aggregation.validation.data", "Required value"],
    ),
    (
        "validation-data-path-absolute",
        federation,
        _set(
            "aggregation",
            {"validation": {"margin": 0.1, "data": {"claimName": "held", "path": "/etc"}}},
        ),
        ["spec.aggregation.validation.data.path", "must be relative"],
    ),
    (
        "validation-with-parallel-aggregation",
        federation,
        _set(
            "aggregation",
            {"parallelism": 2, "validation": {"margin": 0.1, "data": {"claimName": "held"}}},
        ),
        ["spec.aggregation", "needs aggregation.parallelism 1"],
    ),
    (
        "parallelism-zero",
        federation,
        _set("aggregation", {"parallelism": 0}),
        ["spec.aggregation.parallelism", "should be greater than or equal to 1"],
    ),
    (
        "default-deadline-above-maximum",
        federation,
        _set("roundDefaults", {"deadline": "721h"}),
        ["spec.roundDefaults.deadline", "deadline must be between 1m and 720h"],
    ),
    (
        "round-out-of-range",
        federation_round,
        _set("round", 1_000_000),
        ["spec.round", "should be less than or equal to 999999"],
    ),
    (
        "unknown-encoding",
        federation_round,
        _set("encoding", "fp16"),
        ["spec.encoding", 'Unsupported value: "fp16"', 'supported values: "fp32", "bf16", "int8"'],
    ),
    (
        "deadline-below-minimum",
        federation_round,
        _set("deadline", "5s"),
        ["spec.deadline", "deadline must be between 1m and 720h"],
    ),
    (
        "deadline-not-a-duration",
        federation_round,
        _set("deadline", "soon"),
        ["spec.deadline", "should match '^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$'"],
    ),
    (
        "quorum-zero",
        federation_round,
        _set("quorum", 0),
        ["spec.quorum", "should be greater than or equal to 1"],
    ),
    (
        "negative-gpus-per-node",
        participant,
        _set("compute", {"gpusPerNode": -1}),
        ["spec.compute.gpusPerNode", "should be greater than or equal to 0"],
    ),
    (
        "more-processes-than-gpus",
        participant,
        _set("compute", {"gpusPerNode": 2, "procsPerNode": 4}),
        ["spec.compute.procsPerNode", "procsPerNode must not exceed gpusPerNode"],
    ),
    (
        "toleration-exists-with-value",
        participant,
        _set("compute", {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}),
        ["spec.compute.tolerations[0]", "a toleration with operator Exists must not have a value"],
    ),
    (
        "round-approved-and-denied",
        participant,
        _set("admission", {"approvedRounds": [1, 2], "deniedRounds": [2]}),
        ["spec.admission", "a round cannot be both approved and denied"],
    ),
    (
        "round-approved-twice",
        participant,
        _set("admission", {"approvedRounds": [1, 1]}),
        ["spec.admission.approvedRounds[1]", "Duplicate value: 1"],
    ),
    (
        "bad-loader",
        participant,
        _set("data.loader", "my_loaders.load"),
        ["spec.data.loader", "should match '^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$'"],
    ),
    (
        "data-path-escapes-volume",
        participant,
        _set("data.path", "text/../../etc"),
        ["spec.data.path", "data.path must be relative and must not contain '..'"],
    ),
    (
        "missing-pvc",
        participant,
        _set("data.pvc", None),
        ["spec.data.pvc", "Required value"],
    ),
    (
        "poll-interval-above-maximum",
        participant,
        _set("pollInterval", "2h"),
        ["spec.pollInterval", "pollInterval must be between 1s and 1h"],
    ),
    (
        "bad-shm-size",
        participant,
        _set("compute", {"shmSize": "lots"}),
        ["spec.compute.shmSize", "should match"],
    ),
    (
        "privacy-zero-noise",
        participant,
        _set("privacy", {"noiseMultiplier": 0, "clipNorm": 1.0}),
        ["spec.privacy.noiseMultiplier", "should be greater than 0"],
    ),
    (
        "privacy-negative-clip-norm",
        participant,
        _set("privacy", {"noiseMultiplier": 1.0, "clipNorm": -1.0}),
        ["spec.privacy.clipNorm", "should be greater than 0"],
    ),
    (
        "privacy-without-clip-norm",
        participant,
        _set("privacy", {"noiseMultiplier": 1.0}),
        ["spec.privacy.clipNorm", "Required value"],
    ),
    (
        "privacy-delta-too-large",
        participant,
        _set("privacy", {"noiseMultiplier": 1.0, "clipNorm": 1.0, "delta": 0.5}),
        ["spec.privacy.delta", "should be less than or equal to 0.1"],
    ),
    (
        "privacy-delta-zero",
        participant,
        _set("privacy", {"noiseMultiplier": 1.0, "clipNorm": 1.0, "delta": 0}),
        ["spec.privacy.delta", "should be greater than 0"],
    ),
    (
        "workspace-is-the-data-pvc",
        participant,
        _set("workspace", {"claimName": "corpus"}),
        ["spec.workspace.claimName", "workspace.claimName must not be the data PVC"],
    ),
    (
        "workspace-without-claim",
        participant,
        _set("workspace", {}),
        ["spec.workspace.claimName", "Required value"],
    ),
    (
        "error-feedback-not-a-boolean",
        participant,
        _set("errorFeedback", "yes"),
        ["spec.errorFeedback", "must be of type boolean"],
    ),
]


@pytest.mark.parametrize(
    ("make", "mutate", "expected"),
    [pytest.param(make, mutate, expected, id=name) for name, make, mutate, expected in INVALID],
)
def test_invalid_objects_are_refused_saying_what_to_fix(
    kube: Kube, crds: None, make: Callable[[], Obj], mutate: Mutation, expected: list[str]
) -> None:
    obj = make()
    mutate(obj)
    error = refused(lambda: create(kube, obj))
    message = error.message
    for text in expected:
        assert text in message, message
    assert len(complaints(error)) == 1, f"one mistake, one complaint: {message}"
    kube.create(make())  # the same manifest without the mistake is fine


def test_a_bad_string_for_a_duration_is_not_also_reported_as_out_of_range(
    kube: Kube, crds: None
) -> None:
    message = refused(lambda: create(kube, federation_round(deadline="soon"))).message
    assert "should match" in message and "between 1m and 720h" not in message, message


def test_unknown_fields_are_refused_by_strict_validation(kube: Kube, crds: None) -> None:
    obj = federation(colour="red")
    obj["spec"]["members"][0]["role"] = "admin"
    message = refused(lambda: create(kube, obj), status=400).message
    assert 'unknown field "spec.colour"' in message, message
    assert 'unknown field "spec.members[0].role"' in message, message
    # kubectl validates strictly by default and says the same.
    result = kube.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(obj), check=False)
    assert result.returncode != 0
    assert "colour" in result.stderr and "field not declared in schema" in result.stderr, (
        result.stderr
    )
    # Without strict validation the API server prunes them: the schema is structural.
    kept = kube.client.create(path_of(kube, obj), obj)
    assert "colour" not in kept["spec"] and "role" not in kept["spec"]["members"][0]


# --------------------------------------------------------------------------- updates


def test_round_number_and_federation_are_immutable(kube: Kube, crds: None) -> None:
    rnd = create(kube, federation_round())
    message = refused(lambda: merge_patch(kube, rnd, {"spec": {"round": 2}})).message
    assert "spec.round: Invalid value: 2: spec.round is immutable: apply a new" in message
    message = refused(lambda: merge_patch(kube, rnd, {"spec": {"federation": "other"}})).message
    assert 'spec.federation: Invalid value: "other": spec.federation is immutable' in message
    # The overrides are not: they are what a GitOps change of the round's manifest edits.
    changed = merge_patch(kube, rnd, {"spec": {"innerSteps": 80, "suspend": True}})
    assert changed["spec"]["innerSteps"] == 80 and changed["metadata"]["generation"] == 2

    part = create(kube, participant())
    message = refused(lambda: merge_patch(kube, part, {"spec": {"federation": "other"}})).message
    assert "spec.federation is immutable" in message


def test_the_member_name_is_immutable_once_the_participant_exists(kube: Kube, crds: None) -> None:
    part = create(kube, participant(name="de"))
    # Spelling out the name it already has (metadata.name) changes nothing, so it is allowed,
    merge_patch(kube, part, {"spec": {"memberName": "de"}})
    # and so is dropping it again;
    merge_patch(kube, part, {"spec": {"memberName": None}})
    # another name is not.
    message = refused(lambda: merge_patch(kube, part, {"spec": {"memberName": "fr"}})).message
    assert "spec.memberName: Invalid value" in message, message
    assert "spec.memberName is immutable (unset, it is metadata.name)" in message

    named = create(kube, participant(name="de-cluster", memberName="germany"))
    message = refused(lambda: merge_patch(kube, named, {"spec": {"memberName": None}})).message
    assert "spec.memberName is immutable" in message
    message = refused(lambda: merge_patch(kube, named, {"spec": {"memberName": "spain"}})).message
    assert "spec.memberName is immutable" in message


# --------------------------------------------------------------------------- status, kubectl


def _ready(reason: str) -> Obj:
    return {"type": "Ready", "status": "True", "reason": reason, "message": "",
            "lastTransitionTime": now_rfc3339(), "observedGeneration": 1}  # fmt: skip


def test_status_is_a_validated_subresource(kube: Kube, crds: None) -> None:
    rnd = create(kube, federation_round())
    # A spec write does not touch status, a status write does not touch spec.
    ignored = merge_patch(kube, rnd, {"status": {"phase": "Training"}})
    assert "status" not in ignored
    written = merge_patch(
        kube, rnd, {"spec": {"round": 9}, "status": {"phase": "Training"}}, STATUS
    )
    assert written["status"] == {"phase": "Training"} and written["spec"]["round"] == 1
    message = refused(lambda: merge_patch(kube, rnd, {"status": {"phase": "Done"}}, STATUS)).message
    assert 'status.phase: Unsupported value: "Done"' in message, message
    bad_condition = _ready("not a reason")
    message = refused(
        lambda: merge_patch(kube, rnd, {"status": {"conditions": [bad_condition]}}, STATUS)
    ).message
    assert "status.conditions[0].reason" in message and "should match" in message, message


def test_kubectl_shows_printer_columns_short_names_and_the_category(
    kube: Kube, crds: None, tmp_path: Path
) -> None:
    fed = create(kube, federation())
    rnd = create(kube, federation_round("demo-r3", 3))
    part = create(kube, participant())
    ready = [_ready("Reconciled")]
    merge_patch(
        kube, fed, {"status": {"members": 1, "latestRound": 3, "conditions": ready}}, STATUS
    )
    next_base = {"manifest": "federations/demo/bases/000004/manifest.json", "sha256": SHA}
    result = {"outcome": "Succeeded", "trainLoss": 2.5, "nextBase": next_base}
    progress = {"phase": "Succeeded", "progress": "2/3", "reported": 2, "expected": 3}
    merge_patch(kube, rnd, {"status": {**progress, "result": result}}, STATUS)
    state = {"currentRound": 3, "state": "Uploaded", "conditions": ready}
    merge_patch(kube, part, {"status": state}, STATUS)
    # A fresh discovery cache: a cached one from before the CRDs would hide the category.
    cache = f"--cache-dir={tmp_path / 'kube-cache'}"

    def table(*args: str) -> list[list[str]]:
        out = kube.kubectl(cache, "get", *args).stdout
        return [line.split() for line in out.strip().splitlines()]

    header, row = table("federationrounds")
    assert header == ["NAME", "FEDERATION", "ROUND", "PHASE", "REPORTED", "AGE"]
    assert row[:5] == ["demo-r3", "demo", "3", "Succeeded", "2/3"]
    header, row = table("fr", "-o", "wide")
    assert header == ["NAME", "FEDERATION", "ROUND", "PHASE", "REPORTED", "AGE", "NEXT", "BASE",
                      "LOSS"]  # fmt: skip
    assert row[-2:] == [SHA, "2.5"]
    header, row = table("tfed")
    assert header == ["NAME", "MEMBERS", "LATEST", "READY", "AGE"]
    assert row[:4] == ["demo", "1", "3", "True"]
    header, row = table("tpart")
    assert header == ["NAME", "FEDERATION", "ROUND", "STATE", "READY", "AGE"]
    assert row[:5] == ["de", "demo", "3", "Uploaded", "True"]

    names = kube.kubectl(cache, "get", "tapestry", "-o", "name").stdout.split()
    assert sorted(names) == [
        "federation.tapestry.dev/demo",
        "federationround.tapestry.dev/demo-r3",
        "participant.tapestry.dev/de",
    ]
    explained = kube.kubectl(cache, "explain", "federation.spec.roundDefaults.deadline").stdout
    assert "How long after the plan is published members may upload" in explained, explained
