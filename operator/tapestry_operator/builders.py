"""Kubernetes objects the operator creates, built by pure functions (no API calls).

Children have deterministic names (so a create that returns 409 means done), owner
references (so deleting the parent collects them), the recommended labels, and the
restricted Pod Security Standard.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from tapestry_operator import api, settings
from tapestry_operator.config import FederationConfig, ParticipantConfig, RoundConfig, SecretRef
from tapestry_protocol import pod
from tapestry_protocol.exchange import COORDINATOR
from tapestry_protocol.store.s3 import CREDENTIAL_FILES
from tapestry_telemetry import pod_environment

Obj = dict[str, Any]

TRAINER = "trainer"
AGGREGATOR = "aggregator"
BOOTSTRAP = "bootstrap"
STORE_IDENTITY = "store-identity"
ACCESS_KEY_ENTRY, SECRET_KEY_ENTRY = CREDENTIAL_FILES[0]  # a credentials Secret's entries
MAX_NAME = 63
JOB_BACKOFF_LIMIT = 3  # crashes retried; permanent refusals fail at once
COMPLETION_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def child_name(parent: str, suffix: str) -> str:
    """`<parent>-<suffix>`, shortened with a hash when it would pass 63 characters
    (Job pods' hostnames and label values must stay DNS labels)."""
    name = f"{parent}-{suffix}"
    if len(name) <= MAX_NAME - 6:  # room for an Indexed Job's `-<index>` hostnames
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{parent[: MAX_NAME - 6 - len(suffix) - 10]}-{digest}-{suffix}"


def training_job_name(participant: str, round_number: int) -> str:
    return child_name(participant, f"r{round_number}")


def aggregator_job_name(federation: str, round_number: int) -> str:
    return child_name(federation, f"r{round_number}-aggregate")


def bootstrap_job_name(federation: str) -> str:
    return child_name(federation, "bootstrap")


def owner_reference(body: Mapping[str, Any]) -> Obj:
    return {
        "apiVersion": body.get("apiVersion", api.API_VERSION),
        "kind": body["kind"],
        "name": body["metadata"]["name"],
        "uid": body["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(component: str, federation: str, **extra: str) -> dict[str, str]:
    out = {
        api.LABEL_NAME: api.APP,
        api.LABEL_COMPONENT: component,
        api.LABEL_MANAGED_BY: api.MANAGER,
        api.LABEL_PART_OF: federation,
        api.LABEL_FEDERATION: federation,
    }
    out.update(extra)
    return out


def restricted_container_security() -> Obj:
    """Every container's security context: the restricted Pod Security Standard unless
    the operator's settings (the chart's `workloads.securityContext`) say otherwise."""
    return copy.deepcopy(settings.current().container_security_context)


def restricted_pod_security() -> Obj:
    """Every pod's security context (the chart's `workloads.podSecurityContext`)."""
    return copy.deepcopy(settings.current().pod_security_context)


def _secret_volume(name: str, ref: SecretRef, items: list[str] | None = None) -> Obj:
    secret: Obj = {"secretName": ref.name, "defaultMode": 0o440}
    if items:
        secret["items"] = [{"key": k, "path": k} for k in items]
    return {"name": name, "secret": secret}


def store_identity_secret_name(federation: str, member: str) -> str:
    """The Secret with `member`'s own store key (spec.store.identities): what the
    consortium hands that member, or, for the coordinator, what its own pods mount."""
    return child_name(federation, f"store-{member}")


def build_store_identity_secret(
    federation: FederationConfig, member: str, access_key: str, secret_key: str,
    owner: Mapping[str, Any],
) -> Obj:  # fmt: skip
    """The Secret of one member's store identity, owned by the Federation; its entries
    are those a Participant's credentialsSecret has."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": store_identity_secret_name(federation.name, member),
            "namespace": federation.namespace,
            "labels": labels(STORE_IDENTITY, federation.name, **{api.LABEL_PARTICIPANT: member}),
            "ownerReferences": [owner_reference(owner)],
        },
        "stringData": {ACCESS_KEY_ENTRY: access_key, SECRET_KEY_ENTRY: secret_key},
    }


def pod_store_credentials(config: FederationConfig | ParticipantConfig) -> SecretRef:
    """The credentials the pods mount: with store identities, the coordinator's own
    scoped key, never the admin's (only the operator process reads that)."""
    if isinstance(config, FederationConfig) and config.store.identities is not None:
        return SecretRef(store_identity_secret_name(config.name, COORDINATOR))
    return config.store.credentials


def _store_volumes(config: FederationConfig | ParticipantConfig) -> tuple[list[Obj], list[Obj]]:
    """The store's credentials and CA as read-only files (never environment values)."""
    volumes = [_secret_volume("store-credentials", pod_store_credentials(config))]
    mounts = [
        {"name": "store-credentials", "mountPath": pod.STORE_CREDENTIALS_MOUNT, "readOnly": True}
    ]
    if config.store.ca is not None:
        volumes.append(_secret_volume("store-ca", config.store.ca, [config.store.ca.key]))
        mounts.append({"name": "store-ca", "mountPath": pod.STORE_CA_MOUNT, "readOnly": True})
    return volumes, mounts


def _signing_volume(ref: SecretRef) -> tuple[Obj, Obj]:
    return (
        _secret_volume("signing-key", ref, ["signing.key"]),
        {"name": "signing-key", "mountPath": pod.SIGNING_KEY_DIR, "readOnly": True},
    )


def _data_volume(claim: str, path: str) -> tuple[Obj, Obj]:
    """A data PVC, read-only at the data mount (`path` inside it, if any)."""
    mount: Obj = {"name": "data", "mountPath": pod.DATA_MOUNT, "readOnly": True}
    if path.strip("/"):
        mount["subPath"] = path.strip("/")
    volume = {"name": "data", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    return volume, mount


def _work_volume(claim: str | None) -> tuple[Obj, Obj]:
    """The trainer's work directory: an emptyDir, or the member's workspace PVC so
    checkpoints and the error-feedback residual outlive the pod; each node of the Job
    writes its own sub-directory there (node-<PET_NODE_RANK>)."""
    mount: Obj = {"name": "work", "mountPath": pod.WORK_MOUNT}
    if claim is None:
        return {"name": "work", "emptyDir": {}}, mount
    mount["subPathExpr"] = "node-$(PET_NODE_RANK)"
    return {"name": "work", "persistentVolumeClaim": {"claimName": claim}}, mount


def _env(values: Mapping[str, str]) -> list[Obj]:
    return [{"name": k, "value": v} for k, v in values.items()]


def _with_telemetry(env: dict[str, str], traceparent: str | None) -> dict[str, str]:
    """`env` plus the operator's OTEL_* settings (so the pod exports to this party's own
    collector) and the trace context to continue, each only where `env` does not set it
    already: the pod's own environment is merged into, never replaced."""
    extra = pod_environment()
    if traceparent:
        extra[pod.TRACEPARENT] = traceparent
    return {**extra, **env}


def _pod_failure_policy(container: str) -> Obj:
    """Refusals and misconfiguration fail the Job at once; crashes use the backoff
    budget; evictions and preemptions do not count at all."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": container,
                    "operator": "In",
                    "values": [int(c) for c in pod.PERMANENT_EXIT_CODES],
                },
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }


def build_rendezvous_service(
    config: ParticipantConfig, round_number: int, owner: Mapping[str, Any]
) -> Obj:
    """The headless Service whose DNS names let torchrun's nodes find node 0."""
    name = training_job_name(config.name, round_number)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": config.namespace,
            "labels": labels(TRAINER, config.federation, **_round_labels(config, round_number)),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rendezvous happens before readiness
            "selector": {"batch.kubernetes.io/job-name": name},
            "ports": [{"name": "c10d", "port": config.rendezvous_port}],
        },
    }


def _round_labels(config: ParticipantConfig, round_number: int) -> dict[str, str]:
    return {api.LABEL_PARTICIPANT: config.member, api.LABEL_ROUND: str(round_number)}


def build_training_job(
    config: ParticipantConfig,
    round_number: int,
    owner: Mapping[str, Any],
    traceparent: str | None = None,
) -> Obj:
    """The Indexed Job of one participant's round: one pod per node, torchrun in each,
    wired as Kubeflow Trainer does (PET_* variables, node rank from the completion
    index, node 0 found through the headless Service)."""
    name = training_job_name(config.name, round_number)
    job_labels = labels(TRAINER, config.federation, **_round_labels(config, round_number))
    if config.kueue_queue:
        job_labels[api.KUEUE_QUEUE_LABEL] = config.kueue_queue
    volumes, mounts = _store_volumes(config)
    key_volume, key_mount = _signing_volume(config.signing_key)
    data_volume, data_mount = _data_volume(config.pvc, config.data_path)
    work_volume, work_mount = _work_volume(config.workspace)
    volumes += [
        key_volume,
        data_volume,
        work_volume,
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}},
    ]
    mounts += [key_mount, data_mount, work_mount, {"name": "shm", "mountPath": pod.SHM_MOUNT}]
    env = {
        "PET_NNODES": str(config.nodes),
        "PET_NPROC_PER_NODE": str(config.procs_per_node),
        "PET_MASTER_ADDR": f"{name}-0.{name}",
        "PET_MASTER_PORT": str(config.rendezvous_port),
        pod.STORE: config.store.pod_url(),
        pod.FEDERATION: config.federation,
        pod.ROUND: str(round_number),
        pod.PARTICIPANT: config.member,
        pod.KEY: pod.SIGNING_KEY_DIR,
        pod.COORDINATOR_KEY: config.coordinator_key,
        pod.DATA: pod.DATA_MOUNT,
        pod.WORKDIR: pod.WORK_MOUNT,
        pod.VERDICT: f"{pod.WORK_MOUNT}/verdict.json",
        "HOME": pod.WORK_MOUNT,  # the root filesystem is read-only: scratch goes here
        "TMPDIR": pod.WORK_MOUNT,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if config.loader:
        env[pod.LOADER] = config.loader
    if config.loader_options:
        env[pod.LOADER_OPTIONS] = json.dumps(config.loader_options, sort_keys=True)
    if config.privacy is not None:
        env |= config.privacy.environment()
    env[pod.ERROR_FEEDBACK] = "true" if config.error_feedback else "false"
    env = _with_telemetry(env, traceparent)
    resources = _gpu_resources(config.resources, config.gpus_per_node)
    container: Obj = {
        "name": TRAINER,
        "image": config.image,
        "command": ["python", "-m", "tapestry_trainer.launch"],
        "env": [
            *_env(env),
            {
                "name": "PET_NODE_RANK",
                "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}},
            },
        ],
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": restricted_container_security(),
        "terminationMessagePath": pod.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "subdomain": name,
        "automountServiceAccountToken": False,  # the trainer never calls the API
        "enableServiceLinks": False,
        "securityContext": restricted_pod_security(),
        "containers": [container],
        "volumes": volumes,
    }
    if config.node_selector:
        pod_spec["nodeSelector"] = dict(config.node_selector)
    if config.tolerations:
        pod_spec["tolerations"] = list(config.tolerations)
    if config.priority_class:
        pod_spec["priorityClassName"] = config.priority_class
    spec: Obj = {
        "completionMode": "Indexed",
        "completions": config.nodes,
        "parallelism": config.nodes,
        "backoffLimit": JOB_BACKOFF_LIMIT * config.nodes,
        "podFailurePolicy": _pod_failure_policy(TRAINER),
        "template": {"metadata": {"labels": dict(job_labels)}, "spec": pod_spec},
    }
    if config.kueue_queue:
        spec["suspend"] = True  # Kueue admits the Job by unsuspending it
    return _job(name, config.namespace, job_labels, owner, spec)


def _job(
    name: str, namespace: str, job_labels: dict[str, str], owner: Mapping[str, Any], spec: Obj
) -> Obj:
    """A Job owned by `owner` (deleting the resource collects it)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": job_labels,
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": spec,
    }


def _gpu_resources(resources: Mapping[str, Any], gpus: int) -> Obj:
    """The container's resources with `nvidia.com/gpu` set explicitly from gpusPerNode."""
    out: Obj = {k: dict(v) for k, v in resources.items() if k in ("requests", "limits")}
    if gpus:
        out.setdefault("requests", {})["nvidia.com/gpu"] = str(gpus)
        out.setdefault("limits", {})["nvidia.com/gpu"] = str(gpus)
    return out


def _coordinator_job(
    config: FederationConfig,
    owner: Mapping[str, Any],
    name: str,
    component: str,
    image: str,
    command: list[str],
    job_labels: dict[str, str],
    traceparent: str | None = None,
    data: tuple[Obj, Obj] | None = None,
) -> Obj:
    """A Job in the coordinator's namespace that signs as the coordinator: its key and
    the store's credentials mounted as files, scratch in the work mount, and `data`
    (a volume and its mount), if any."""
    volumes, mounts = _store_volumes(config)
    key_volume, key_mount = _signing_volume(config.signing_key)
    volumes += [key_volume, {"name": "work", "emptyDir": {}}]
    mounts += [key_mount, {"name": "work", "mountPath": pod.WORK_MOUNT}]
    if data is not None:
        volumes.append(data[0])
        mounts.append(data[1])
    scratch = {"PYTHONUNBUFFERED": "1", "HOME": pod.WORK_MOUNT, "TMPDIR": pod.WORK_MOUNT}
    container: Obj = {
        "name": component,
        "image": image,
        "command": command,
        # the root filesystem is read-only: scratch goes here
        "env": _env(_with_telemetry(scratch, traceparent)),
        "resources": {k: dict(v) for k, v in config.aggregator_resources.items()},
        "volumeMounts": mounts,
        "securityContext": restricted_container_security(),
    }
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": restricted_pod_security(),
        "containers": [container],
        "volumes": volumes,
    }
    if config.aggregator_service_account:
        pod_spec["serviceAccountName"] = config.aggregator_service_account
    spec = {
        "backoffLimit": JOB_BACKOFF_LIMIT,
        "podFailurePolicy": _pod_failure_policy(component),
        "template": {"metadata": {"labels": dict(job_labels)}, "spec": pod_spec},
    }
    return _job(name, config.namespace, job_labels, owner, spec)


def build_aggregator_job(
    federation: FederationConfig,
    round_config: RoundConfig,
    owner: Mapping[str, Any],
    traceparent: str | None = None,
) -> Obj:
    """The Job that merges a closed round (operator image, no torch); re-running it is
    safe: the merge of a closed round is deterministic and write-once. `traceparent`:
    the round's trace context, which the aggregator's span continues.

    With the validation floor (`spec.aggregation.validation`) it runs in the trainer
    image instead (scoring a model needs torch), with the held-out set's PVC mounted
    read-only at the data mount."""
    command = [
        "tapestry", "aggregate",
        "--store", federation.store.pod_url(),
        "--federation", federation.name,
        "--round", str(round_config.round),
        "--key", pod.SIGNING_KEY_DIR,
        "--strategy", json.dumps(federation.strategy.to_json(), sort_keys=True),
    ]  # fmt: skip
    image, data = federation.aggregator_image, None
    held_out = federation.validation_data
    if held_out is not None and federation.strategy.validation_margin is not None:
        image = federation.trainer_image
        data = _data_volume(held_out.claim_name, held_out.path)
        command += ["--validation-data", pod.DATA_MOUNT]
    parts = federation.aggregation_parallelism
    if parts > 1:  # each pod's part is its JOB_COMPLETION_INDEX; part 0 commits
        command += ["--parts", str(parts)]
    job = _coordinator_job(
        federation, owner, aggregator_job_name(federation.name, round_config.round),
        AGGREGATOR, image, command,
        labels(AGGREGATOR, federation.name, **{api.LABEL_ROUND: str(round_config.round)}),
        traceparent, data,
    )  # fmt: skip
    if parts > 1:
        _index_parts(job["spec"], parts)
    return job


def _index_parts(spec: Obj, parts: int) -> None:
    """An Indexed Job of `parts` pods that run at once (the parts wait for each other);
    a crashed pod's index alone is re-run, within its own backoff budget."""
    spec.update(
        completionMode="Indexed",
        completions=parts,
        parallelism=parts,
        backoffLimitPerIndex=JOB_BACKOFF_LIMIT,
    )
    del spec["backoffLimit"]  # with a per-index limit it defaults to unlimited


def build_bootstrap_job(federation: FederationConfig, owner: Mapping[str, Any]) -> Obj:
    """The Job that publishes round 0's base from the model preset (trainer image: it
    needs torch to initialise the model; the operator does not have it)."""
    command = [
        "python", "-m", "tapestry_trainer.bootstrap",
        "--store", federation.store.pod_url(),
        "--federation", federation.name,
        "--preset", federation.preset,
        "--seed", str(federation.seed),
        "--key", pod.SIGNING_KEY_DIR,
    ]  # fmt: skip
    return _coordinator_job(
        federation, owner, bootstrap_job_name(federation.name), BOOTSTRAP,
        federation.trainer_image, command, labels(BOOTSTRAP, federation.name),
    )  # fmt: skip


def build_auto_round(
    federation: FederationConfig, round_number: int, owner: Mapping[str, Any]
) -> Obj:
    """The FederationRound that `autoRounds` starts: the Federation's defaults, nothing
    overridden, owned by the Federation."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": "FederationRound",
        "metadata": {
            "name": child_name(federation.name, f"round-{round_number}"),
            "namespace": federation.namespace,
            "labels": labels("round", federation.name, **{api.LABEL_ROUND: str(round_number)}),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {"federation": federation.name, "round": round_number},
    }
