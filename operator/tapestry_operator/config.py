"""Typed views of the custom resources' specs, read once per reconcile.

The API server applies the schema's defaults (`crds/`), so these classes read defaulted
fields directly and keep no defaults of their own: there is one definition of each.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote

from tapestry_aggregator.strategy import Strategy
from tapestry_protocol import pod
from tapestry_protocol.documents import Ref
from tapestry_protocol.layout import Layout

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

# Round overrides and their Federation defaults share these names; the plan's
# hyperparameters use the same camelCase keys.
HYPERPARAMETERS = ("innerSteps", "learningRate", "batchSize", "seqLen", "warmupSteps")


def parse_duration(text: str) -> timedelta:
    """A Kubernetes-style duration (`90s`, `1h30m`); the CRD pattern has checked it."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration like 30s, 10m or 1h30m")
    return timedelta(seconds=sum(float(n) * _UNIT[u] for n, u in parts))


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str = ""


# Who can issue store identities (spec.store.identities.provider); the CRD's enum.
IDENTITY_PROVIDERS = ("minio",)


@dataclass(frozen=True)
class IdentitiesSpec:
    """`spec.store.identities`: the coordinator issues each member its own scoped store
    key, with the admin credentials that only the operator process reads."""

    provider: str
    admin: SecretRef


@dataclass(frozen=True)
class StoreSpec:
    """Where the federation's objects live; the same shape on both roles."""

    endpoint: str
    bucket: str
    prefix: str
    region: str | None
    credentials: SecretRef
    ca: SecretRef | None
    identities: IdentitiesSpec | None = None  # the coordinator's only

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> StoreSpec:
        ca = spec.get("caSecret")
        issued = spec.get("identities")
        return cls(
            spec["endpoint"],
            spec["bucket"],
            spec["prefix"],
            spec.get("region") or None,
            SecretRef(spec["credentialsSecret"]["name"]),
            SecretRef(ca["name"], ca["key"]) if ca else None,
            IdentitiesSpec(issued["provider"], SecretRef(issued["adminSecret"]["name"]))
            if issued
            else None,
        )

    def url(self, *, ca_file: str | None = None, credentials_dir: str | None = None) -> str:
        """The store URL as `open_store` reads it; paths are where a pod mounts them."""
        path = f"{self.bucket}/{self.prefix.strip('/')}".rstrip("/")
        query = [f"endpoint={quote(self.endpoint, safe=':/')}"]
        if self.region:
            query.append(f"region={quote(self.region)}")
        if ca_file:
            query.append(f"ca_file={quote(ca_file, safe='/')}")
        if credentials_dir:
            query.append(f"credentials_dir={quote(credentials_dir, safe='/')}")
        return f"s3://{path}?{'&'.join(query)}"

    def pod_url(self) -> str:
        """The URL inside a pod that mounts the credentials and CA Secrets."""
        ca = f"{pod.STORE_CA_MOUNT}/{self.ca.key}" if self.ca else None
        return self.url(ca_file=ca, credentials_dir=pod.STORE_CREDENTIALS_MOUNT)


def robust_policy(aggregation: Mapping[str, Any]) -> dict[str, Any]:
    """The Strategy fields of spec.aggregation's robust policies (clipping, combine,
    maxTokenRatio, validation.margin); the CRD's defaults are the Strategy's."""
    clipping = aggregation.get("clipping", {})
    combine = aggregation.get("combine", {})
    validation = aggregation.get("validation")
    return {
        "clip": clipping.get("mode", Strategy.clip),
        "clip_bound": clipping.get("bound"),
        "combine": combine.get("rule", Strategy.combine),
        "trim": combine.get("trim", Strategy.trim),
        "max_token_ratio": aggregation.get("maxTokenRatio"),
        "validation_margin": None if validation is None else validation["margin"],
    }


@dataclass(frozen=True)
class HeldOutData:
    """`spec.aggregation.validation.data`: the coordinator's held-out set on a PVC."""

    claim_name: str
    path: str

    @classmethod
    def from_spec(cls, validation: Mapping[str, Any] | None) -> HeldOutData | None:
        if validation is None:
            return None
        data = validation["data"]
        return cls(data["claimName"], data.get("path", ""))


@dataclass(frozen=True)
class FederationConfig:
    """A Federation's spec: the coordinator's view of the consortium."""

    name: str
    namespace: str
    store: StoreSpec
    signing_key: SecretRef
    preset: str
    seed: int
    trainer_image: str
    initial_base: Ref | None
    strategy: Strategy
    defaults: dict[str, Any]
    encoding: str
    deadline: timedelta
    quorum: int
    members: dict[str, str]
    aggregator_image: str
    aggregator_resources: dict[str, Any]
    aggregator_service_account: str | None
    auto_rounds: bool
    max_rounds: int | None
    generation: int = 0
    validation_data: HeldOutData | None = None  # the validation floor's held-out set
    aggregation_parallelism: int = 1  # spec.aggregation.parallelism: aggregator pods

    @property
    def layout(self) -> Layout:
        return Layout(self.name)  # the store URL carries the prefix

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> FederationConfig:
        spec, meta = body["spec"], body["metadata"]
        model = spec["model"]
        agg = spec["aggregation"]
        defaults = spec["roundDefaults"]
        aggregator = spec["aggregator"]
        auto = spec["autoRounds"]
        strategy = Strategy(
            optimizer=agg["optimizer"],
            learning_rate=agg.get("learningRate"),
            momentum=agg["momentum"],
            beta1=agg["beta1"],
            beta2=agg["beta2"],
            tau=agg["tau"],
            weighting=agg["weighting"],
            max_share=agg.get("maxShare"),
            **robust_policy(agg),
        )
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            store=StoreSpec.from_spec(spec["store"]),
            signing_key=SecretRef(spec["signingKeySecret"]["name"]),
            preset=model["preset"],
            seed=model["seed"],
            trainer_image=model["trainerImage"],
            initial_base=Ref.from_json(model.get("initialBase")),
            strategy=strategy,
            defaults={k: defaults[k] for k in HYPERPARAMETERS if k in defaults},
            encoding=defaults["encoding"],
            deadline=parse_duration(defaults["deadline"]),
            quorum=defaults["quorum"],
            members={m["name"]: m["publicKey"] for m in spec["members"]},
            aggregator_image=aggregator["image"],
            aggregator_resources=aggregator["resources"],
            aggregator_service_account=aggregator.get("serviceAccountName"),
            auto_rounds=auto["enabled"],
            max_rounds=auto.get("maxRounds"),
            generation=meta.get("generation", 0),
            validation_data=HeldOutData.from_spec(agg.get("validation")),
            aggregation_parallelism=agg.get("parallelism", 1),
        )


@dataclass(frozen=True)
class RoundConfig:
    """A FederationRound's spec resolved against its Federation's defaults."""

    name: str
    namespace: str
    uid: str
    federation: str
    round: int
    suspend: bool
    overrides: dict[str, Any]
    encoding: str | None
    deadline: timedelta | None
    quorum: int | None
    generation: int

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> RoundConfig:
        spec, meta = body["spec"], body["metadata"]
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta.get("uid", ""),
            federation=spec["federation"],
            round=spec["round"],
            suspend=spec["suspend"],
            overrides={k: spec[k] for k in HYPERPARAMETERS if k in spec},
            encoding=spec.get("encoding"),
            deadline=parse_duration(spec["deadline"]) if spec.get("deadline") else None,
            quorum=spec.get("quorum"),
            generation=meta.get("generation", 0),
        )

    def hyperparameters(self, federation: FederationConfig) -> dict[str, Any]:
        return {**federation.defaults, **self.overrides}


@dataclass(frozen=True)
class PrivacySpec:
    """spec.privacy: the trainer clips and noises its delta (docs/privacy.md); the CRD
    has checked the ranges and defaulted delta, the trainer checks them again."""

    noise_multiplier: float
    clip_norm: float
    delta: float

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> PrivacySpec | None:
        if spec is None:
            return None
        return cls(float(spec["noiseMultiplier"]), float(spec["clipNorm"]), float(spec["delta"]))

    def environment(self) -> dict[str, str]:
        """The trainer pod's variables (`tapestry_protocol.pod`)."""
        return {
            pod.DP_NOISE_MULTIPLIER: repr(self.noise_multiplier),
            pod.DP_CLIP_NORM: repr(self.clip_norm),
            pod.DP_DELTA: repr(self.delta),
        }


@dataclass(frozen=True)
class ParticipantConfig:
    """A Participant's spec: one member's own cluster, data and compute."""

    name: str
    namespace: str
    uid: str
    member: str
    federation: str
    store: StoreSpec
    coordinator_key: str
    signing_key: SecretRef
    image: str
    nodes: int
    gpus_per_node: int
    procs_per_node: int
    resources: dict[str, Any]
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    priority_class: str | None
    kueue_queue: str | None
    shm_size: str
    rendezvous_port: int
    pvc: str
    data_path: str
    loader: str | None
    loader_options: dict[str, Any]
    manual: bool
    approved: frozenset[int]
    denied: frozenset[int]
    poll: timedelta
    history_limit: int
    generation: int = 0
    privacy: PrivacySpec | None = None
    error_feedback: bool = True
    workspace: str | None = None  # spec.workspace.claimName: a PVC for the work directory

    @property
    def layout(self) -> Layout:
        return Layout(self.federation)  # the store URL carries the prefix

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ParticipantConfig:
        spec, meta = body["spec"], body["metadata"]
        compute = spec["compute"]
        data = spec["data"]
        admission = spec["admission"]
        gpus = compute["gpusPerNode"]
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta.get("uid", ""),
            member=spec.get("memberName") or meta["name"],
            federation=spec["federation"],
            store=StoreSpec.from_spec(spec["store"]),
            coordinator_key=spec["coordinatorPublicKey"],
            signing_key=SecretRef(spec["signingKeySecret"]["name"]),
            image=compute["image"],
            nodes=compute["nodes"],
            gpus_per_node=gpus,
            procs_per_node=compute.get("procsPerNode") or max(1, gpus),
            resources=compute.get("resources", {}),
            node_selector=dict(compute.get("nodeSelector", {})),
            tolerations=list(compute.get("tolerations", [])),
            priority_class=compute.get("priorityClassName") or None,
            kueue_queue=compute.get("kueueQueue") or None,
            shm_size=str(compute["shmSize"]),
            rendezvous_port=compute["rendezvousPort"],
            pvc=data["pvc"],
            data_path=data["path"],
            loader=data.get("loader") or None,
            loader_options=dict(data.get("loaderOptions", {})),
            manual=admission["mode"] == "Manual",
            approved=frozenset(admission.get("approvedRounds", [])),
            denied=frozenset(admission.get("deniedRounds", [])),
            poll=parse_duration(spec["pollInterval"]),
            history_limit=spec["historyLimit"],
            generation=meta.get("generation", 0),
            privacy=PrivacySpec.from_spec(spec.get("privacy")),
            error_feedback=spec["errorFeedback"],
            workspace=spec.get("workspace", {}).get("claimName"),
        )
