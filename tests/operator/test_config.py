"""The typed spec views read bodies as the API server stores them: pruned and defaulted
by the CRDs' own schemas (crd_defaults), so the schema's defaults are the only ones."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest

from tapestry_aggregator.strategy import Strategy
from tapestry_operator.config import (
    HYPERPARAMETERS,
    FederationConfig,
    ParticipantConfig,
    RoundConfig,
    SecretRef,
    StoreSpec,
    parse_duration,
)
from tapestry_protocol import pod
from tapestry_protocol.layout import Layout
from tapestry_protocol.store import S3Location
from tests.operator import crd_defaults
from tests.operator.crd_defaults import MEMBER_KEYS, NAMESPACE, schema, store_spec


def schema_default(kind: str, *path: str) -> Any:
    node = schema(kind)
    for name in path:
        node = node["properties"][name]
    return node["default"]


# --- durations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("90s", timedelta(seconds=90)),
        ("10m", timedelta(minutes=10)),
        ("1h", timedelta(hours=1)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2h0m3s", timedelta(hours=2, seconds=3)),
        ("1.5h", timedelta(minutes=90)),
        ("250ms", timedelta(milliseconds=250)),
        ("1m500ms", timedelta(minutes=1, milliseconds=500)),
        ("720h", timedelta(days=30)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "h", "1d", "1 h", " 1h", "1h ", "-1s", "1h30", "1.s"])
def test_parse_duration_refuses_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_every_duration_field_default_parses_and_matches_its_pattern() -> None:
    fields = [
        ("Participant", ("spec", "pollInterval")),
        ("Federation", ("spec", "roundDefaults", "deadline")),
    ]
    for kind, path in fields:
        node = schema(kind)
        for name in path:
            node = node["properties"][name]
        assert re.fullmatch(node["pattern"].strip("^$"), node["default"])
        assert parse_duration(node["default"]) > timedelta(0)


# --- the store --------------------------------------------------------------------------


def _store(**changes: Any) -> StoreSpec:
    return StoreSpec.from_spec(
        crd_defaults.federation(store=store_spec(**changes))["spec"]["store"]
    )


def test_store_spec_reads_a_defaulted_store() -> None:
    store = _store()
    assert store == StoreSpec(
        "https://s3.example:9000", "tapestry-store", "", None, SecretRef("store-credentials"), None
    )


def test_store_spec_reads_region_and_ca_with_the_schema_default_key() -> None:
    store = _store(region="eu-west-1", caSecret={"name": "store-ca"})
    assert store.region == "eu-west-1"
    assert store.ca == SecretRef("store-ca", schema_default(
        "Federation", "spec", "store", "caSecret", "key"
    ))  # fmt: skip
    assert store.ca is not None and store.ca.key == "ca.crt"


@pytest.mark.parametrize(
    ("prefix", "path"),
    [("", ""), ("tapestry/", "tapestry"), ("/a/b/", "a/b"), ("team/one", "team/one")],
)
def test_the_prefix_is_the_url_path(prefix: str, path: str) -> None:
    url = _store(prefix=prefix).url()
    suffix = f"/{path}" if path else ""
    assert url == f"s3://tapestry-store{suffix}?endpoint=https://s3.example:9000"
    location = S3Location.parse(url, environ={})
    assert (location.bucket, location.prefix) == ("tapestry-store", path)
    assert location.endpoint == "https://s3.example:9000"


def test_pod_url_points_at_the_mounted_credentials_and_ca() -> None:
    store = _store(prefix="tapestry/", region="us-east-1", caSecret={"name": "ca", "key": "b.pem"})
    location = S3Location.parse(store.pod_url(), environ={})
    assert location.bucket == "tapestry-store" and location.prefix == "tapestry"
    assert location.endpoint == "https://s3.example:9000"
    assert dict(location.params) == {
        "region": "us-east-1",
        "ca_file": f"{pod.STORE_CA_MOUNT}/b.pem",
        "credentials_dir": pod.STORE_CREDENTIALS_MOUNT,
    }


def test_pod_url_without_a_ca_uses_the_system_trust_store() -> None:
    location = S3Location.parse(_store().pod_url(), environ={})
    assert dict(location.params) == {"credentials_dir": pod.STORE_CREDENTIALS_MOUNT}


def test_the_url_never_carries_credentials() -> None:
    url = _store(caSecret={"name": "ca"}).pod_url()
    assert "store-credentials" not in url  # the Secret's name, let alone its entries
    assert "@" not in url.split("?")[0]


# --- Federation ---------------------------------------------------------------------


def test_federation_config_reads_a_defaulted_body() -> None:
    config = FederationConfig.from_body(crd_defaults.federation())
    assert (config.name, config.namespace, config.generation) == ("fed", NAMESPACE, 1)
    assert config.layout == Layout("fed")
    assert config.store == StoreSpec(
        "https://s3.example:9000", "tapestry-store", "", None, SecretRef("store-credentials"), None
    )
    assert config.signing_key == SecretRef("coordinator-key")
    assert config.preset == schema_default("Federation", "spec", "model", "preset")
    assert config.seed == schema_default("Federation", "spec", "model", "seed")
    assert config.strategy == Strategy()  # the schema's defaults are the strategy's
    assert config.defaults == {
        name: schema_default("Federation", "spec", "roundDefaults", name)
        for name in HYPERPARAMETERS
    }
    assert config.encoding == "fp32"
    assert config.deadline == timedelta(hours=1)
    assert config.quorum == 1
    assert config.members == MEMBER_KEYS
    aggregator = ("Federation", "spec", "aggregator")
    assert config.aggregator_image == schema_default(*aggregator, "image")
    assert config.aggregator_resources == schema_default(*aggregator, "resources")
    assert config.aggregator_service_account is None
    assert (config.auto_rounds, config.max_rounds) == (False, None)


def test_federation_names_an_image_for_the_bootstrap_job() -> None:
    """Round 0's base is published by a Job in the trainer image: it must be known."""
    config = FederationConfig.from_body(crd_defaults.federation())
    assert config.trainer_image


def test_federation_config_reads_every_choice() -> None:
    body = crd_defaults.federation(
        store=store_spec(prefix="t/", region="r1", caSecret={"name": "ca", "key": "ca.pem"}),
        model={"preset": "small", "seed": 7},
        aggregation={
            "optimizer": "fedadam", "learningRate": 0.02, "beta1": 0.8, "beta2": 0.95,
            "tau": 0.01, "weighting": "equal", "maxShare": 0.6,
        },
        roundDefaults={
            "innerSteps": 100, "learningRate": 0.001, "batchSize": 32, "seqLen": 256,
            "warmupSteps": 0, "encoding": "int8", "deadline": "2h30m", "quorum": 2,
        },
        aggregator={
            "image": "registry.example/op:1", "resources": {"limits": {"memory": "2Gi"}},
            "serviceAccountName": "aggregator",
        },
        autoRounds={"enabled": True, "maxRounds": 10},
        metadata={"generation": 4},
    )  # fmt: skip
    config = FederationConfig.from_body(body)
    assert config.store.prefix == "t/" and config.store.region == "r1"
    assert config.store.ca == SecretRef("ca", "ca.pem")
    assert (config.preset, config.seed) == ("small", 7)
    assert config.strategy == Strategy(
        optimizer="fedadam", learning_rate=0.02, momentum=0.9, beta1=0.8, beta2=0.95, tau=0.01,
        weighting="equal", max_share=0.6,
    )  # fmt: skip
    assert config.defaults == {
        "innerSteps": 100, "learningRate": 0.001, "batchSize": 32, "seqLen": 256, "warmupSteps": 0,
    }  # fmt: skip
    assert (config.encoding, config.deadline, config.quorum) == (
        "int8", timedelta(hours=2, minutes=30), 2,
    )  # fmt: skip
    assert config.aggregator_image == "registry.example/op:1"
    assert config.aggregator_resources == {"limits": {"memory": "2Gi"}}
    assert config.aggregator_service_account == "aggregator"
    assert (config.auto_rounds, config.max_rounds) == (True, 10)
    assert config.generation == 4


# --- FederationRound ----------------------------------------------------------------


def test_round_config_reads_a_defaulted_body() -> None:
    config = RoundConfig.from_body(crd_defaults.federation_round(metadata={"generation": 2}))
    assert config == RoundConfig(
        name="fed-r0", namespace=NAMESPACE, uid="uid-federationround-fed-r0", federation="fed",
        round=0, suspend=False, overrides={}, encoding=None, deadline=None, quorum=None,
        generation=2,
    )  # fmt: skip


def test_a_round_without_overrides_takes_the_federation_defaults() -> None:
    federation = FederationConfig.from_body(crd_defaults.federation())
    config = RoundConfig.from_body(crd_defaults.federation_round())
    assert config.hyperparameters(federation) == federation.defaults


def test_round_overrides_win_over_the_federation_defaults() -> None:
    federation = FederationConfig.from_body(crd_defaults.federation())
    body = crd_defaults.federation_round(
        "fed-r3", round=3, innerSteps=8, learningRate=0.01, encoding="bf16", deadline="90m",
        quorum=2, suspend=True,
    )  # fmt: skip
    config = RoundConfig.from_body(body)
    assert config.round == 3 and config.suspend is True
    assert config.overrides == {"innerSteps": 8, "learningRate": 0.01}
    assert (config.encoding, config.deadline, config.quorum) == ("bf16", timedelta(minutes=90), 2)
    assert config.hyperparameters(federation) == {
        **federation.defaults, "innerSteps": 8, "learningRate": 0.01,
    }  # fmt: skip
    assert federation.defaults["innerSteps"] == 40  # the Federation's own view is unchanged


# --- Participant ------------------------------------------------------------------------


def test_a_participant_without_compute_resources_is_read() -> None:
    config = ParticipantConfig.from_body(crd_defaults.participant())
    assert config.resources == {}


def test_participant_config_reads_a_defaulted_body() -> None:
    # compute.resources is the one field given: the schema has no default for it (above)
    config = ParticipantConfig.from_body(crd_defaults.participant(compute={"resources": {}}))
    compute = ("Participant", "spec", "compute")
    assert (config.name, config.namespace, config.generation) == ("alpha", NAMESPACE, 1)
    assert config.uid == "uid-participant-alpha"
    assert config.member == "alpha"  # memberName unset: metadata.name
    assert config.federation == "fed" and config.layout == Layout("fed")
    assert config.store.endpoint == "https://s3.example:9000"
    assert config.coordinator_key == crd_defaults.COORDINATOR_KEY
    assert config.signing_key == SecretRef("alpha-key")
    assert config.image == schema_default(*compute, "image")
    assert (config.nodes, config.gpus_per_node, config.procs_per_node) == (1, 0, 1)
    assert config.resources == {}
    assert config.node_selector == {} and config.tolerations == []
    assert config.priority_class is None and config.kueue_queue is None
    assert config.shm_size == schema_default(*compute, "shmSize")
    assert 1 <= config.rendezvous_port <= 65535
    assert (config.pvc, config.data_path) == ("alpha-data", "")
    assert config.loader is None and config.loader_options == {}
    assert config.manual is False
    assert config.approved == frozenset() and config.denied == frozenset()
    assert config.poll == timedelta(seconds=30)
    assert config.history_limit == 3


def test_participant_config_reads_every_choice() -> None:
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    body = crd_defaults.participant(
        memberName="alpha-lab",
        compute={
            "image": "registry.example/trainer:1-cuda", "nodes": 4, "gpusPerNode": 8,
            "procsPerNode": 4,
            "resources": {"requests": {"cpu": "16", "memory": "128Gi"}},
            "nodeSelector": {"gpu": "h100"}, "tolerations": tolerations,
            "priorityClassName": "training", "kueueQueue": "team-a", "shmSize": 2147483648,
        },
        data={"pvc": "corpus", "path": "en/", "loader": "mylib.data:load",
              "loaderOptions": {"split": "train", "shards": [1, 2]}},
        admission={"mode": "Manual", "approvedRounds": [1, 2], "deniedRounds": [3]},
        pollInterval="2m", historyLimit=0,
    )  # fmt: skip
    config = ParticipantConfig.from_body(body)
    assert config.member == "alpha-lab" and config.name == "alpha"
    assert config.image == "registry.example/trainer:1-cuda"
    assert (config.nodes, config.gpus_per_node, config.procs_per_node) == (4, 8, 4)
    assert config.resources == {"requests": {"cpu": "16", "memory": "128Gi"}}
    assert config.node_selector == {"gpu": "h100"}
    assert config.tolerations == tolerations
    assert (config.priority_class, config.kueue_queue) == ("training", "team-a")
    assert config.shm_size == "2147483648"  # int-or-string, always handed on as text
    assert (config.pvc, config.data_path) == ("corpus", "en/")
    assert config.loader == "mylib.data:load"
    assert config.loader_options == {"split": "train", "shards": [1, 2]}
    assert config.manual is True
    assert (config.approved, config.denied) == (frozenset({1, 2}), frozenset({3}))
    assert config.poll == timedelta(minutes=2)
    assert config.history_limit == 0


@pytest.mark.parametrize(("gpus", "procs"), [(0, 1), (1, 1), (4, 4), (8, 8)])
def test_procs_per_node_defaults_to_one_per_gpu(gpus: int, procs: int) -> None:
    body = crd_defaults.participant(compute={"gpusPerNode": gpus, "resources": {}})
    assert ParticipantConfig.from_body(body).procs_per_node == procs


def test_the_config_does_not_share_mutable_state_with_the_body() -> None:
    body = crd_defaults.participant(
        compute={"nodeSelector": {"a": "b"}, "resources": {}},
        data={"pvc": "d", "loaderOptions": {"k": "v"}},
    )
    config = ParticipantConfig.from_body(body)
    config.node_selector["x"] = "y"
    config.loader_options["k"] = "changed"
    assert body["spec"]["compute"]["nodeSelector"] == {"a": "b"}
    assert body["spec"]["data"]["loaderOptions"] == {"k": "v"}
