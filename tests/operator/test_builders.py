"""The Kubernetes objects the operator creates, built from stored (pruned, defaulted)
bodies: the training Job and its headless Service, the aggregator and bootstrap Jobs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tapestry_aggregator.strategy import Strategy
from tapestry_cli.main import build_parser
from tapestry_operator import api, settings
from tapestry_operator.builders import (
    COMPLETION_INDEX_FIELD,
    MAX_NAME,
    aggregator_job_name,
    bootstrap_job_name,
    build_aggregator_job,
    build_bootstrap_job,
    build_rendezvous_service,
    build_training_job,
    child_name,
    training_job_name,
)
from tapestry_operator.config import FederationConfig, ParticipantConfig, RoundConfig
from tapestry_protocol import pod
from tapestry_protocol.store import S3Location
from tests.operator import crd_defaults
from tests.operator.crd_defaults import NAMESPACE, store_spec

Obj = dict[str, Any]
ROUND = 5
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
COMPUTE = {
    "image": "registry.example/trainer:1-cuda",
    "nodes": 3,
    "gpusPerNode": 4,
    "resources": {"requests": {"cpu": "16", "memory": "128Gi"}, "limits": {"memory": "128Gi"}},
    "nodeSelector": {"nvidia.com/gpu.product": "H100"},
    "tolerations": TOLERATIONS,
    "priorityClassName": "training",
    "kueueQueue": "team-a",
    "shmSize": "16Gi",
}
DATA = {
    "pvc": "alpha-corpus",
    "path": "corpora/en/",
    "loader": "mylib.data:load",
    "loaderOptions": {"split": "train"},
}


def participant_body(**spec: Any) -> Obj:
    fields: dict[str, Any] = {
        "store": store_spec(prefix="tapestry/", caSecret={"name": "store-ca"}),
        "compute": COMPUTE,
        "data": DATA,
        **spec,
    }
    return crd_defaults.participant(**fields)


def minimal_participant_body() -> Obj:
    """The fewest choices (resources given: the CRD has no default for them)."""
    return crd_defaults.participant(compute={"resources": {}})


def container(job: Obj) -> Obj:
    (only,) = job["spec"]["template"]["spec"]["containers"]
    found: Obj = only
    return found


def env_of(job: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container(job)["env"]}


def values_of(job: Obj) -> dict[str, str]:
    return {n: e["value"] for n, e in env_of(job).items() if "value" in e}


def volumes_of(job: Obj) -> dict[str, Obj]:
    return {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}


def mounts_of(job: Obj) -> dict[str, Obj]:
    return {m["mountPath"]: m for m in container(job)["volumeMounts"]}


def walk(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair in a nested object."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk(v)


@pytest.fixture
def body() -> Obj:
    return participant_body()


@pytest.fixture
def config(body: Obj) -> ParticipantConfig:
    return ParticipantConfig.from_body(body)


@pytest.fixture
def job(config: ParticipantConfig, body: Obj) -> Obj:
    return build_training_job(config, ROUND, body, traceparent="00-" + "a" * 32 + "-" + "b" * 16)


@pytest.fixture
def federation_body() -> Obj:
    return crd_defaults.federation(
        store=store_spec(prefix="tapestry/", caSecret={"name": "store-ca"}),
        aggregation={"optimizer": "fedadam", "learningRate": 0.02, "maxShare": 0.5},
        aggregator={
            "image": "registry.example/operator:1",
            "resources": {"requests": {"cpu": "2"}, "limits": {"memory": "4Gi"}},
            "serviceAccountName": "aggregator",
        },
    )


@pytest.fixture
def federation(federation_body: Obj) -> FederationConfig:
    return FederationConfig.from_body(federation_body)


@pytest.fixture
def round_body() -> Obj:
    return crd_defaults.federation_round("fed-r2", round=2)


# --- names -----------------------------------------------------------------------------


def test_children_have_deterministic_names() -> None:
    assert training_job_name("alpha", 5) == "alpha-r5"
    assert aggregator_job_name("fed", 2) == "fed-r2-aggregate"
    assert bootstrap_job_name("fed") == "fed-bootstrap"
    assert child_name("a" * 40, "r1") == f"{'a' * 40}-r1"  # short enough: kept whole


@pytest.mark.parametrize("length", [1, 30, 50, 54, 55, 56, 63])
@pytest.mark.parametrize("suffix", ["r0", "r999999", "r999999-aggregate", "bootstrap"])
def test_child_names_stay_dns_labels_with_room_for_pod_indexes(length: int, suffix: str) -> None:
    parent = ("p" * (length - 1) + "z")[:length]
    name = child_name(parent, suffix)
    assert len(name) <= MAX_NAME - 6
    assert len(f"{name}-999") <= MAX_NAME  # the hostname of an Indexed Job's 1000th pod
    assert DNS_LABEL.match(name), name
    assert name.endswith(f"-{suffix}")
    assert child_name(parent, suffix) == name


def test_shortened_names_keep_a_hash_of_the_whole_name() -> None:
    a, b = "x" * 60 + "aaa", "x" * 60 + "bbb"  # equal where they are cut
    assert child_name(a, "r1") != child_name(b, "r1")
    assert re.fullmatch(r"x+-[0-9a-f]{8}-r1", child_name(a, "r1"))
    assert child_name(a, "r1") != child_name(a, "r2")
    assert len(training_job_name("p" * 63, 999999)) <= MAX_NAME - 6


# --- the training Job ---------------------------------------------------------------


def test_training_job_is_an_indexed_job_with_one_pod_per_node(job: Obj) -> None:
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["metadata"]["name"] == training_job_name("alpha", ROUND)
    assert job["metadata"]["namespace"] == NAMESPACE
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    assert container(job)["image"] == "registry.example/trainer:1-cuda"


def test_training_job_is_owned_by_its_participant(job: Obj, body: Obj) -> None:
    (owner,) = job["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": api.API_VERSION,
        "kind": "Participant",
        "name": "alpha",
        "uid": body["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_training_job_labels(job: Obj) -> None:
    labels = job["metadata"]["labels"]
    assert labels[api.LABEL_COMPONENT] == "trainer"
    assert labels[api.LABEL_MANAGED_BY] == api.MANAGER
    assert labels[api.LABEL_FEDERATION] == "fed"
    assert labels[api.LABEL_PARTICIPANT] == "alpha"
    assert labels[api.LABEL_ROUND] == str(ROUND)
    assert job["spec"]["template"]["metadata"]["labels"] == labels


def test_torchrun_is_wired_through_pet_variables(job: Obj, config: ParticipantConfig) -> None:
    name = job["metadata"]["name"]
    values = values_of(job)
    assert values["PET_NNODES"] == "3"
    assert values["PET_NPROC_PER_NODE"] == "4"  # one process per GPU
    assert values["PET_MASTER_ADDR"] == f"{name}-0.{name}"
    assert values["PET_MASTER_PORT"] == str(config.rendezvous_port)
    rank = env_of(job)["PET_NODE_RANK"]
    assert rank == {
        "name": "PET_NODE_RANK",
        "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}},
    }
    assert COMPLETION_INDEX_FIELD == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )


def test_node_zero_is_found_through_the_headless_service(
    job: Obj, config: ParticipantConfig, body: Obj
) -> None:
    service = build_rendezvous_service(config, ROUND, body)
    name = job["metadata"]["name"]
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"] == name
    assert values_of(job)["PET_MASTER_ADDR"].split(".")[1] == service["metadata"]["name"]
    assert (service["apiVersion"], service["kind"]) == ("v1", "Service")
    spec = service["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is True
    assert spec["selector"] == {"batch.kubernetes.io/job-name": name}
    (port,) = spec["ports"]
    assert str(port["port"]) == values_of(job)["PET_MASTER_PORT"]
    assert service["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]
    assert service["metadata"]["namespace"] == NAMESPACE
    assert service["metadata"]["labels"][api.LABEL_ROUND] == str(ROUND)


def test_the_pod_contract_environment(job: Obj, config: ParticipantConfig) -> None:
    values = values_of(job)
    assert values[pod.STORE] == config.store.pod_url()
    assert values[pod.FEDERATION] == "fed"
    assert values[pod.ROUND] == str(ROUND)
    assert values[pod.PARTICIPANT] == "alpha"
    assert values[pod.KEY] == pod.SIGNING_KEY_DIR
    assert values[pod.COORDINATOR_KEY] == crd_defaults.COORDINATOR_KEY
    assert values[pod.DATA] == pod.DATA_MOUNT
    assert values[pod.WORKDIR] == pod.WORK_MOUNT
    assert values[pod.VERDICT].startswith(pod.WORK_MOUNT + "/")
    assert values[pod.LOADER] == "mylib.data:load"
    assert json.loads(values[pod.LOADER_OPTIONS]) == {"split": "train"}
    assert values[pod.TRACEPARENT] == "00-" + "a" * 32 + "-" + "b" * 16
    location = S3Location.parse(values[pod.STORE], environ={})
    assert (location.bucket, location.prefix) == ("tapestry-store", "tapestry")
    assert location.params["credentials_dir"] == pod.STORE_CREDENTIALS_MOUNT
    assert location.params["ca_file"] == f"{pod.STORE_CA_MOUNT}/ca.crt"


def test_the_member_name_is_the_participant_identity_in_the_pod() -> None:
    body = participant_body(memberName="alpha-lab")
    job = build_training_job(ParticipantConfig.from_body(body), ROUND, body)
    assert values_of(job)[pod.PARTICIPANT] == "alpha-lab"
    assert job["metadata"]["labels"][api.LABEL_PARTICIPANT] == "alpha-lab"
    assert job["metadata"]["name"] == training_job_name("alpha", ROUND)  # the object's name


def test_optional_environment_is_left_out() -> None:
    body = minimal_participant_body()
    values = values_of(build_training_job(ParticipantConfig.from_body(body), ROUND, body))
    assert not {pod.LOADER, pod.LOADER_OPTIONS, pod.TRACEPARENT} & set(values)
    assert values["PET_NNODES"] == values["PET_NPROC_PER_NODE"] == "1"


def test_gpu_requests_and_limits_come_from_gpus_per_node(job: Obj) -> None:
    resources = container(job)["resources"]
    assert resources["requests"] == {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "4"}
    assert resources["limits"] == {"memory": "128Gi", "nvidia.com/gpu": "4"}


def test_gpus_are_requested_even_without_other_resources() -> None:
    body = crd_defaults.participant(compute={"gpusPerNode": 2, "resources": {}})
    job = build_training_job(ParticipantConfig.from_body(body), ROUND, body)
    assert container(job)["resources"] == {
        "requests": {"nvidia.com/gpu": "2"},
        "limits": {"nvidia.com/gpu": "2"},
    }


def test_cpu_training_requests_no_gpu() -> None:
    body = crd_defaults.participant(compute={"resources": {"requests": {"cpu": "2"}}})
    job = build_training_job(ParticipantConfig.from_body(body), ROUND, body)
    assert "nvidia.com/gpu" not in json.dumps(container(job)["resources"])
    assert container(job)["resources"] == {"requests": {"cpu": "2"}}


def test_building_leaves_the_spec_untouched(config: ParticipantConfig, body: Obj) -> None:
    before = json.dumps(body, sort_keys=True)
    build_training_job(config, ROUND, body)
    build_rendezvous_service(config, ROUND, body)
    assert json.dumps(body, sort_keys=True) == before
    assert "nvidia.com/gpu" not in json.dumps(config.resources)


def test_shared_memory_is_a_sized_memory_backed_empty_dir(job: Obj) -> None:
    volume = volumes_of(job)["shm"]
    assert volume == {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}
    assert mounts_of(job)[pod.SHM_MOUNT]["name"] == "shm"


def test_data_is_the_pvc_read_only_at_its_sub_path(job: Obj) -> None:
    volume = volumes_of(job)["data"]
    assert volume["persistentVolumeClaim"] == {"claimName": "alpha-corpus", "readOnly": True}
    mount = mounts_of(job)[pod.DATA_MOUNT]
    assert mount == {
        "name": "data", "mountPath": pod.DATA_MOUNT, "readOnly": True, "subPath": "corpora/en",
    }  # fmt: skip


def test_data_at_the_volume_root_has_no_sub_path() -> None:
    body = minimal_participant_body()
    job = build_training_job(ParticipantConfig.from_body(body), ROUND, body)
    assert "subPath" not in mounts_of(job)[pod.DATA_MOUNT]
    assert mounts_of(job)[pod.DATA_MOUNT]["readOnly"] is True


def _job(**spec: Any) -> Obj:
    body = participant_body(**spec)
    return build_training_job(ParticipantConfig.from_body(body), ROUND, body)


def test_without_a_workspace_the_work_directory_is_an_empty_dir() -> None:
    job = _job()
    assert volumes_of(job)["work"] == {"name": "work", "emptyDir": {}}
    assert mounts_of(job)[pod.WORK_MOUNT] == {"name": "work", "mountPath": pod.WORK_MOUNT}


def test_a_workspace_is_the_pvc_read_write_one_sub_directory_per_node() -> None:
    job = _job(workspace={"claimName": "alpha-work"})
    volume = volumes_of(job)["work"]
    assert volume == {"name": "work", "persistentVolumeClaim": {"claimName": "alpha-work"}}
    mount = mounts_of(job)[pod.WORK_MOUNT]
    assert mount == {
        "name": "work", "mountPath": pod.WORK_MOUNT, "subPathExpr": "node-$(PET_NODE_RANK)",
    }  # fmt: skip
    assert not mount.get("readOnly")
    # The variable the sub-path expands is the container's own, from the completion index.
    rank = {e["name"]: e for e in container(job)["env"]}["PET_NODE_RANK"]
    assert rank["valueFrom"]["fieldRef"]["fieldPath"].endswith("job-completion-index']")
    # Checkpoints, the verdict and the residual all live under the work mount.
    values = values_of(job)
    assert values[pod.WORKDIR] == pod.WORK_MOUNT
    assert values[pod.VERDICT].startswith(pod.WORK_MOUNT + "/")


def test_error_feedback_is_on_by_default_and_can_be_turned_off() -> None:
    assert values_of(_job())[pod.ERROR_FEEDBACK] == "true"
    assert values_of(_job(errorFeedback=False))[pod.ERROR_FEEDBACK] == "false"


def _secret_mounts(job: Obj) -> dict[str, Obj]:
    volumes = volumes_of(job)
    return {
        path: volumes[m["name"]]["secret"]
        for path, m in mounts_of(job).items()
        if "secret" in volumes[m["name"]]
    }


def test_secrets_are_read_only_files(job: Obj) -> None:
    secrets = _secret_mounts(job)
    assert secrets[pod.STORE_CREDENTIALS_MOUNT]["secretName"] == "store-credentials"
    assert secrets[pod.STORE_CA_MOUNT]["secretName"] == "store-ca"
    assert secrets[pod.STORE_CA_MOUNT]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert secrets[pod.SIGNING_KEY_DIR]["secretName"] == "alpha-key"
    assert secrets[pod.SIGNING_KEY_DIR]["items"] == [{"key": "signing.key", "path": "signing.key"}]
    for path in secrets:
        assert mounts_of(job)[path]["readOnly"] is True
    for secret in secrets.values():
        assert secret["defaultMode"] & 0o007 == 0  # not world-readable


def _assert_no_secret_in_the_environment(obj: Obj) -> None:
    keys = {key for key, _ in walk(obj)}
    assert not keys & {"secretKeyRef", "envFrom", "secretRef"}, keys
    for c in obj["spec"]["template"]["spec"]["containers"]:
        for entry in c.get("env", []):
            assert set(entry) in ({"name", "value"}, {"name", "valueFrom"}), entry
            assert set(entry.get("valueFrom", {"fieldRef": 1})) == {"fieldRef"}, entry
            assert "BEGIN" not in entry.get("value", "")  # no PEM text
            assert not re.search(r"(?i)secret|access_?key|password|token", entry["name"]), entry


def test_no_environment_variable_holds_a_secret(job: Obj) -> None:
    _assert_no_secret_in_the_environment(job)


def _assert_restricted(obj: Obj, name: str) -> None:
    spec = obj["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["containers"]:
        security = c["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert security["readOnlyRootFilesystem"] is True
        assert "privileged" not in security or security["privileged"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"]:
        for mount in c["volumeMounts"]:  # the only writable paths are emptyDirs
            if not mount.get("readOnly"):
                assert "emptyDir" in volumes[mount["name"]], (name, mount)
    assert not any(k == "hostPath" for k, _ in walk(spec))


def test_the_training_pod_is_restricted(job: Obj) -> None:
    _assert_restricted(job, "trainer")
    assert "serviceAccountName" not in job["spec"]["template"]["spec"]


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    """The operator's settings read again from the (monkeypatched) environment."""
    settings.current.cache_clear()
    yield
    settings.current.cache_clear()


def _security(job: Obj) -> tuple[Obj, Obj]:
    spec = job["spec"]["template"]["spec"]
    return spec["securityContext"], container(job)["securityContext"]


def test_the_chart_s_workload_settings_replace_every_pod_s_security_contexts(
    monkeypatch: pytest.MonkeyPatch,
    fresh_settings: None,
    config: ParticipantConfig,
    body: Obj,
    federation: FederationConfig,
    federation_body: Obj,
    round_body: Obj,
) -> None:
    pod_context = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "Localhost",
                   "localhostProfile": "tapestry.json"}}  # fmt: skip
    container_context = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False}
    monkeypatch.setenv(settings.WORKLOAD_POD_SECURITY_CONTEXT, json.dumps(pod_context))
    monkeypatch.setenv(settings.WORKLOAD_SECURITY_CONTEXT, json.dumps(container_context))
    jobs = [
        build_training_job(config, ROUND, body),
        build_aggregator_job(federation, RoundConfig.from_body(round_body), federation_body),
        build_bootstrap_job(federation, federation_body),
    ]
    for job in jobs:
        assert _security(job) == (pod_context, container_context), job["metadata"]["name"]


def test_without_settings_every_pod_gets_its_own_copy_of_the_restricted_defaults(
    monkeypatch: pytest.MonkeyPatch, fresh_settings: None, config: ParticipantConfig, body: Obj
) -> None:
    monkeypatch.delenv(settings.WORKLOAD_POD_SECURITY_CONTEXT, raising=False)
    monkeypatch.delenv(settings.WORKLOAD_SECURITY_CONTEXT, raising=False)
    first, second = (build_training_job(config, r, body) for r in (1, 2))
    _assert_restricted(first, "trainer")
    _security(first)[1]["capabilities"]["drop"].clear()  # one pod's change stays its own
    assert _security(second)[1]["capabilities"] == {"drop": ["ALL"]}
    assert _security(second) == (
        settings.Settings().pod_security_context,
        settings.Settings().container_security_context,
    )


def _assert_failure_policy(obj: Obj, container_name: str) -> None:
    fail, ignore = obj["spec"]["podFailurePolicy"]["rules"]
    assert fail == {
        "action": "FailJob",
        "onExitCodes": {
            "containerName": container_name,
            "operator": "In",
            "values": [int(c) for c in pod.PERMANENT_EXIT_CODES],
        },
    }
    assert int(pod.ExitCode.CRASH) not in fail["onExitCodes"]["values"]  # crashes retry
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    names = [c["name"] for c in obj["spec"]["template"]["spec"]["containers"]]
    assert container_name in names
    assert obj["spec"]["backoffLimit"] >= 1


def test_refusals_fail_the_training_job_at_once_and_evictions_do_not_count(job: Obj) -> None:
    _assert_failure_policy(job, "trainer")


def test_kueue_label_and_suspend_when_a_queue_is_set(job: Obj) -> None:
    assert job["metadata"]["labels"][api.KUEUE_QUEUE_LABEL] == "team-a"
    assert job["spec"]["suspend"] is True


def test_no_kueue_no_label_and_not_suspended() -> None:
    body = minimal_participant_body()
    job = build_training_job(ParticipantConfig.from_body(body), ROUND, body)
    assert api.KUEUE_QUEUE_LABEL not in job["metadata"]["labels"]
    assert not job["spec"].get("suspend")


def test_scheduling_choices_are_passed_through(job: Obj) -> None:
    spec = job["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert spec["tolerations"] == TOLERATIONS
    assert spec["priorityClassName"] == "training"


def test_no_scheduling_choices_no_fields() -> None:
    body = minimal_participant_body()
    spec = build_training_job(ParticipantConfig.from_body(body), ROUND, body)["spec"]
    assert not {"nodeSelector", "tolerations", "priorityClassName"} & set(spec["template"]["spec"])


def test_the_training_job_is_built_the_same_every_time(
    config: ParticipantConfig, body: Obj
) -> None:
    assert build_training_job(config, ROUND, body) == build_training_job(config, ROUND, body)
    assert build_rendezvous_service(config, ROUND, body) == build_rendezvous_service(
        config, ROUND, body
    )
    assert build_training_job(config, ROUND + 1, body)["metadata"]["name"] == "alpha-r6"


def test_child_names_of_a_long_participant_stay_short() -> None:
    body = participant_body()
    body["metadata"]["name"] = "a-very-long-participant-name-" + "x" * 34
    assert len(body["metadata"]["name"]) == 63
    config = ParticipantConfig.from_body(body)
    job = build_training_job(config, 123456, body)
    service = build_rendezvous_service(config, 123456, body)
    name = job["metadata"]["name"]
    assert len(name) <= MAX_NAME - 6 and DNS_LABEL.match(name)
    assert service["metadata"]["name"] == job["spec"]["template"]["spec"]["subdomain"] == name
    assert values_of(job)["PET_MASTER_ADDR"] == f"{name}-0.{name}"


# --- the aggregator Job ----------------------------------------------------------------


def _aggregate_args(job: Obj) -> Any:
    command = container(job)["command"]
    assert command[:2] == ["tapestry", "aggregate"]
    return build_parser().parse_args(command[1:])


def test_aggregator_job_runs_tapestry_aggregate(
    federation: FederationConfig, round_body: Obj
) -> None:
    round_config = RoundConfig.from_body(round_body)
    job = build_aggregator_job(federation, round_config, round_body)
    args = _aggregate_args(job)
    assert args.store == federation.store.pod_url()
    assert (args.federation, args.round) == ("fed", 2)
    assert args.key == Path(pod.SIGNING_KEY_DIR)
    assert Strategy.from_json(json.loads(args.strategy)) == federation.strategy
    assert federation.strategy == Strategy(
        optimizer="fedadam", learning_rate=0.02, max_share=0.5
    )  # the Federation's choices reach the merge
    assert container(job)["image"] == "registry.example/operator:1"


def test_the_default_strategy_reaches_the_aggregator_resolved() -> None:
    body = crd_defaults.federation()
    federation = FederationConfig.from_body(body)
    round_body = crd_defaults.federation_round()
    job = build_aggregator_job(federation, RoundConfig.from_body(round_body), round_body)
    parsed = Strategy.from_json(json.loads(_aggregate_args(job).strategy))
    assert parsed.to_json() == federation.strategy.to_json()
    assert parsed.lr == federation.strategy.lr == 0.7  # diloco's own learning rate
    assert container(job)["image"] == federation.aggregator_image


def test_aggregator_job_metadata(federation: FederationConfig, round_body: Obj) -> None:
    job = build_aggregator_job(federation, RoundConfig.from_body(round_body), round_body)
    assert job["metadata"]["name"] == aggregator_job_name("fed", 2)
    assert job["metadata"]["namespace"] == NAMESPACE
    (owner,) = job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "FederationRound", "fed-r2", round_body["metadata"]["uid"],
    )  # fmt: skip
    assert owner["controller"] is True
    labels = job["metadata"]["labels"]
    assert labels[api.LABEL_COMPONENT] == "aggregator"
    assert labels[api.LABEL_ROUND] == "2"
    assert job["spec"]["template"]["metadata"]["labels"] == labels


def test_aggregator_pod(federation: FederationConfig, round_body: Obj) -> None:
    job = build_aggregator_job(federation, RoundConfig.from_body(round_body), round_body)
    _assert_restricted(job, "aggregator")
    _assert_failure_policy(job, "aggregator")
    _assert_no_secret_in_the_environment(job)
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["serviceAccountName"] == "aggregator"
    assert container(job)["resources"] == {"requests": {"cpu": "2"}, "limits": {"memory": "4Gi"}}
    secrets = _secret_mounts(job)
    assert secrets[pod.STORE_CREDENTIALS_MOUNT]["secretName"] == "store-credentials"
    assert secrets[pod.STORE_CA_MOUNT]["secretName"] == "store-ca"
    assert secrets[pod.SIGNING_KEY_DIR]["secretName"] == "coordinator-key"
    assert values_of(job)["HOME"] in mounts_of(job)  # a writable home on a read-only root


def test_aggregator_without_a_service_account_uses_the_namespace_default() -> None:
    federation = FederationConfig.from_body(crd_defaults.federation())
    round_body = crd_defaults.federation_round()
    job = build_aggregator_job(federation, RoundConfig.from_body(round_body), round_body)
    assert "serviceAccountName" not in job["spec"]["template"]["spec"]
    assert container(job)["resources"] == federation.aggregator_resources


def test_the_validation_floor_scores_in_the_trainer_image_on_the_held_out_pvc() -> None:
    """spec.aggregation.validation: the aggregator runs in the trainer image (scoring
    needs torch), mounts the held-out set's PVC read-only, and passes its mount point as
    --validation-data with the margin in the strategy; without it, none of that."""
    validation = {"margin": 0.05, "data": {"claimName": "held-out", "path": "/sets/pooled/"}}
    body = crd_defaults.federation(aggregation={"optimizer": "fedavg", "validation": validation})
    federation = FederationConfig.from_body(body)
    round_body = crd_defaults.federation_round()
    job = build_aggregator_job(federation, RoundConfig.from_body(round_body), round_body)
    args = _aggregate_args(job)
    assert Strategy.from_json(json.loads(args.strategy)).validation_margin == 0.05
    assert args.validation_data == Path(pod.DATA_MOUNT)
    assert container(job)["image"] == federation.trainer_image != federation.aggregator_image
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["data"]["persistentVolumeClaim"]
    assert claim == {"claimName": "held-out", "readOnly": True}
    (mount,) = [m for m in container(job)["volumeMounts"] if m["name"] == "data"]
    assert mount == {
        "name": "data", "mountPath": pod.DATA_MOUNT, "readOnly": True, "subPath": "sets/pooled",
    }  # fmt: skip
    _assert_restricted(job, "aggregator")

    plain = FederationConfig.from_body(crd_defaults.federation())
    job = build_aggregator_job(plain, RoundConfig.from_body(round_body), round_body)
    assert _aggregate_args(job).validation_data is None
    assert container(job)["image"] == plain.aggregator_image
    assert "data" not in {v["name"] for v in job["spec"]["template"]["spec"]["volumes"]}


# --- the bootstrap Job -------------------------------------------------------------


def test_bootstrap_job_publishes_round_zero_in_the_trainer_image(
    federation: FederationConfig, federation_body: Obj
) -> None:
    job = build_bootstrap_job(federation, federation_body)
    assert job["metadata"]["name"] == bootstrap_job_name("fed")
    assert job["metadata"]["labels"][api.LABEL_COMPONENT] == "bootstrap"
    (owner,) = job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("Federation", "fed", True)
    c = container(job)
    assert c["image"] == federation.trainer_image
    assert c["image"] != federation.aggregator_image  # initialising the model needs torch
    command = c["command"]
    assert command[:3] == ["python", "-m", "tapestry_trainer.bootstrap"]
    flags = dict(zip(command[3::2], command[4::2], strict=True))
    assert flags == {
        "--store": federation.store.pod_url(),
        "--federation": "fed",
        "--preset": federation.preset,
        "--seed": str(federation.seed),
        "--key": pod.SIGNING_KEY_DIR,
    }
    _assert_restricted(job, "bootstrap")
    _assert_failure_policy(job, "bootstrap")
    _assert_no_secret_in_the_environment(job)


def test_bootstrap_job_has_an_image() -> None:
    body = crd_defaults.federation()
    job = build_bootstrap_job(FederationConfig.from_body(body), body)
    assert container(job)["image"], "a container without an image is refused by the API server"
