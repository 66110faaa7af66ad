"""The protocol's signed JSON documents: typed objects, versioned schemas, one reader.

| kind | written by | at |
| --- | --- | --- |
| `RoundPlan` | coordinator | `rounds/<r>/plan.json` |
| `Receipt` | participant | `rounds/<r>/receipts/<participant>/<state>.json` |
| `UpdateManifest` | participant | `rounds/<r>/updates/<participant>/manifest.json` |
| `CloseRecord` | coordinator | `rounds/<r>/close.json` |
| `ModelManifest` | coordinator | `bases/<r>/manifest.json`, `optimizer/<r>/manifest.json` |
| `RoundResult` | coordinator (aggregator) | `rounds/<r>/result.json` |

Each kind is a frozen dataclass with `to_json()` and `from_json()`; the camelCase wire
names appear only here and in `schemas/`. Every read validates the bytes against the
kind's JSON Schema (shared definitions in `schemas/defs.v1.json`, every number bounded)
before `from_json` runs, so `from_json` never meets a value of the wrong type.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Any, ClassVar, Protocol, TypeVar

import jsonschema
from referencing import Registry, Resource

from tapestry_protocol import jsonsafe, rejections
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.shards import ShardRef
from tapestry_protocol.signing import canonical_json

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MAX_TEXT = 4096  # the schemas' longest message (defs `text`)


class Kind(StrEnum):
    """Document kinds; each names its schema file `schemas/<file>.v<N>.json`."""

    PLAN = "RoundPlan"
    RECEIPT = "Receipt"
    UPDATE = "UpdateManifest"
    CLOSE = "CloseRecord"
    MODEL = "ModelManifest"
    RESULT = "RoundResult"

    @property
    def schema_file(self) -> str:
        return {
            Kind.PLAN: "round-plan",
            Kind.RECEIPT: "receipt",
            Kind.UPDATE: "update-manifest",
            Kind.CLOSE: "close-record",
            Kind.MODEL: "model-manifest",
            Kind.RESULT: "round-result",
        }[self]


class Role(StrEnum):
    """What a model manifest holds."""

    BASE = "base"
    OPTIMIZER = "optimizer"


class Outcome(StrEnum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ReceiptState(StrEnum):
    """A participant's answer to a plan; also the receipt's object name."""

    ACCEPTED = "Accepted"
    DECLINED = "Declined"
    FAILED = "Failed"


class CloseTrigger(StrEnum):
    """Why the coordinator closed a round."""

    ALL_REPORTED = "AllReported"
    DEADLINE = "Deadline"
    QUORUM_LOST = "QuorumLost"
    MANUAL = "Manual"


_formats = jsonschema.FormatChecker()


@_formats.checks("date-time", raises=ValueError)
def _is_datetime(value: object) -> bool:
    if isinstance(value, str):
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


def rfc3339(when: datetime) -> str:
    """The one timestamp form documents and statuses use: UTC, whole seconds, `Z`."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


def parse_time(value: str) -> datetime:
    """A validated RFC 3339 timestamp of a document as an aware datetime."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _schema_text(name: str) -> dict[str, Any]:
    text = resources.files("tapestry_protocol").joinpath(f"schemas/{name}").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@cache
def schema(kind: Kind, version: int = SCHEMA_VERSION) -> dict[str, Any]:
    return _schema_text(f"{Kind(kind).schema_file}.v{version}.json")


@cache
def _validator(kind: Kind, version: int) -> jsonschema.Draft202012Validator:
    defs = _schema_text(f"defs.v{version}.json")
    registry: Registry[Any] = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
    return jsonschema.Draft202012Validator(
        schema(kind, version), registry=registry, format_checker=_formats
    )


def _field_path(error: jsonschema.ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return path.lstrip(".") or "(document)"


def validate(document: dict[str, Any], kind: Kind | str, where: str) -> None:
    """Raise Rejected naming the first field that breaks the schema."""
    kind = Kind(kind)
    version = document.get("schemaVersion")
    if document.get("kind") != kind:
        raise Rejected(
            rejections.MALFORMED_DOCUMENT,
            f"{where}: kind is {document.get('kind')!r}, expected {str(kind)!r}",
        )
    if version not in SUPPORTED_VERSIONS:
        raise Rejected(
            rejections.UNKNOWN_SCHEMA_VERSION,
            f"{where}: schemaVersion {version!r} is not supported "
            f"(this reader knows {sorted(SUPPORTED_VERSIONS)})",
        )
    error = jsonschema.exceptions.best_match(_validator(kind, version).iter_errors(document))
    if error is not None:
        raise Rejected(
            rejections.MALFORMED_DOCUMENT, f"{where}: field {_field_path(error)}: {error.message}"
        )


def parse(data: bytes, kind: str, where: str) -> dict[str, Any]:
    """Decode and validate a stored document; hostile bytes are rejected, never a crash."""
    try:
        document = jsonsafe.loads(
            data,
            max_bytes=jsonsafe.MAX_DOCUMENT_BYTES,
            max_depth=jsonsafe.MAX_DOCUMENT_DEPTH,
            what=where,
        )
    except jsonsafe.JSONRejected as e:
        raise Rejected(rejections.MALFORMED_DOCUMENT, str(e)) from None
    if not isinstance(document, dict):
        raise Rejected(rejections.MALFORMED_DOCUMENT, f"{where} is not a JSON object")
    validate(document, kind, where)
    return document


def encode(document: dict[str, Any]) -> bytes:
    """The stored bytes of a document (canonical JSON plus a newline)."""
    return canonical_json(document) + b"\n"


# --- typed documents -------------------------------------------------------------------


def _header(kind: Kind, federation: str, round_number: int) -> dict[str, Any]:
    return {
        "kind": str(kind),
        "schemaVersion": SCHEMA_VERSION,
        "federation": federation,
        "round": round_number,
    }


@dataclass(frozen=True)
class Ref:
    """A stored manifest: its key and the sha256 of its bytes."""

    manifest: str
    sha256: str

    def to_json(self) -> dict[str, str]:
        return {"manifest": self.manifest, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Ref | None:
        return None if data is None else cls(data["manifest"], data["sha256"])


def _ref_json(ref: Ref | None) -> dict[str, str] | None:
    return None if ref is None else ref.to_json()


@dataclass(frozen=True)
class Member:
    """A participant named in a plan, with the public key its signatures verify with."""

    name: str
    public_key: str


@dataclass(frozen=True)
class RoundPlan:
    KIND: ClassVar[Kind] = Kind.PLAN
    federation: str
    round: int
    base: Ref
    model: dict[str, Any]
    hyperparameters: dict[str, Any]
    encoding: str
    participants: tuple[Member, ...]
    min_participants: int
    deadline: str
    issued_at: str
    traceparent: str | None = None

    @property
    def keys(self) -> dict[str, str]:
        """Participant name -> public key."""
        return {m.name: m.public_key for m in self.participants}

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.participants]

    def to_json(self) -> dict[str, Any]:
        out = _header(self.KIND, self.federation, self.round) | {
            "base": self.base.to_json(),
            "model": self.model,
            "hyperparameters": self.hyperparameters,
            "encoding": self.encoding,
            "participants": [
                {"name": m.name, "publicKey": m.public_key} for m in self.participants
            ],
            "minParticipants": self.min_participants,
            "deadline": self.deadline,
            "issuedAt": self.issued_at,
        }
        if self.traceparent:
            out["traceparent"] = self.traceparent
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RoundPlan:
        base = Ref.from_json(d["base"])
        assert base is not None
        return cls(
            d["federation"], d["round"], base, d["model"], d["hyperparameters"], d["encoding"],
            tuple(Member(p["name"], p["publicKey"]) for p in d["participants"]),
            d["minParticipants"], d["deadline"], d["issuedAt"], d.get("traceparent"),
        )  # fmt: skip


@dataclass(frozen=True)
class Privacy:
    """Participant-level differential privacy of an update: the participant clipped its
    delta to `clip_norm` and added Gaussian noise of std `noise_multiplier * clip_norm`
    before upload; (`epsilon`, `delta`) is its cumulative guarantee over `rounds` noised
    uploads, as `accountant` composes them."""

    clip_norm: float
    noise_multiplier: float
    epsilon: float
    delta: float
    rounds: int
    mechanism: str = "gaussian"
    accountant: str = "rdp"

    def to_json(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "accountant": self.accountant,
            "clipNorm": self.clip_norm,
            "noiseMultiplier": self.noise_multiplier,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "rounds": self.rounds,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> Privacy | None:
        if d is None:
            return None
        return cls(
            d["clipNorm"], d["noiseMultiplier"], d["epsilon"], d["delta"], int(d["rounds"]),
            d["mechanism"], d["accountant"],
        )  # fmt: skip


@dataclass(frozen=True)
class UpdateManifest:
    KIND: ClassVar[Kind] = Kind.UPDATE
    federation: str
    round: int
    participant: str
    plan_sha256: str
    base_sha256: str
    encoding: str
    shards: tuple[ShardRef, ...]
    tokens: int
    metrics: dict[str, float | str | None]
    created_at: str
    traceparent: str | None = None  # the trace context the update was made in
    privacy: Privacy | None = None

    def to_json(self) -> dict[str, Any]:
        out = _header(self.KIND, self.federation, self.round) | {
            "participant": self.participant,
            "plan": {"sha256": self.plan_sha256},
            "base": {"sha256": self.base_sha256},
            "encoding": self.encoding,
            "shards": [s.to_json() for s in self.shards],
            "tokens": self.tokens,
            "metrics": self.metrics,
            "createdAt": self.created_at,
        }
        if self.traceparent:
            out["traceparent"] = self.traceparent
        if self.privacy is not None:
            out["privacy"] = self.privacy.to_json()
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> UpdateManifest:
        return cls(
            d["federation"], d["round"], d["participant"], d["plan"]["sha256"],
            d["base"]["sha256"], d["encoding"], tuple(ShardRef.from_json(s) for s in d["shards"]),
            int(d["tokens"]), dict(d["metrics"]), d["createdAt"], d.get("traceparent"),
            Privacy.from_json(d.get("privacy")),
        )  # fmt: skip


@dataclass(frozen=True)
class ModelManifest:
    """A base or optimizer state. No timestamp: re-publishing gives the same bytes."""

    KIND: ClassVar[Kind] = Kind.MODEL
    federation: str
    round: int
    role: Role
    shards: tuple[ShardRef, ...]
    model: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, float | str | None] = field(default_factory=dict)

    @property
    def groups(self) -> list[list[str]]:
        """Tensor names per shard: every delta of a round mirrors the base's grouping."""
        return [list(s.tensors) for s in self.shards]

    def to_json(self) -> dict[str, Any]:
        return _header(self.KIND, self.federation, self.round) | {
            "role": str(self.role),
            "shards": [s.to_json() for s in self.shards],
            "model": self.model,
            "metadata": self.metadata,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ModelManifest:
        return cls(
            d["federation"], d["round"], Role(d["role"]),
            tuple(ShardRef.from_json(s) for s in d["shards"]), d["model"], dict(d["metadata"]),
        )  # fmt: skip


@dataclass(frozen=True)
class Receipt:
    """A participant's signed answer to a plan: who trains, and who will not come."""

    KIND: ClassVar[Kind] = Kind.RECEIPT
    federation: str
    round: int
    participant: str
    plan_sha256: str
    state: ReceiptState
    reason: str
    message: str
    created_at: str

    def to_json(self) -> dict[str, Any]:
        return _header(self.KIND, self.federation, self.round) | {
            "participant": self.participant,
            "plan": {"sha256": self.plan_sha256},
            "state": str(self.state),
            "reason": self.reason,
            "message": self.message,
            "createdAt": self.created_at,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Receipt:
        return cls(
            d["federation"], d["round"], d["participant"], d["plan"]["sha256"],
            ReceiptState(d["state"]), d["reason"], d["message"], d["createdAt"],
        )  # fmt: skip


@dataclass(frozen=True)
class Included:
    """An update the merge uses, pinned by the sha256 of its manifest's bytes."""

    participant: str
    manifest_sha256: str


@dataclass(frozen=True)
class Excluded:
    """A member whose update the merge does not use, and why (a rejection reason)."""

    participant: str
    reason: str
    message: str


@dataclass(frozen=True)
class CloseRecord:
    """Exactly which updates a round merges; fixed before the merge starts."""

    KIND: ClassVar[Kind] = Kind.CLOSE
    federation: str
    round: int
    plan_sha256: str
    trigger: CloseTrigger
    included: tuple[Included, ...]
    excluded: tuple[Excluded, ...]
    closed_at: str

    def to_json(self) -> dict[str, Any]:
        return _header(self.KIND, self.federation, self.round) | {
            "plan": {"sha256": self.plan_sha256},
            "trigger": str(self.trigger),
            "included": [
                {"participant": i.participant, "manifestSha256": i.manifest_sha256}
                for i in self.included
            ],
            "excluded": [
                {"participant": e.participant, "reason": e.reason, "message": e.message}
                for e in self.excluded
            ],
            "closedAt": self.closed_at,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CloseRecord:
        return cls(
            d["federation"], d["round"], d["plan"]["sha256"], CloseTrigger(d["trigger"]),
            tuple(Included(i["participant"], i["manifestSha256"]) for i in d["included"]),
            tuple(Excluded(e["participant"], e["reason"], e["message"]) for e in d["excluded"]),
            d["closedAt"],
        )  # fmt: skip


@dataclass(frozen=True)
class Adjustment:
    """What a robust-aggregation policy changed about a merged update (a reason from
    `rejections.ADJUSTMENTS`), e.g. clipped to the round's bound."""

    reason: str
    message: str


@dataclass(frozen=True)
class Contribution:
    """An accepted update in a result: its weight, tokens and metrics, and what the
    robust-aggregation policies did to it (`adjustments`, with figures in `policy`)."""

    participant: str
    weight: float
    tokens: int
    manifest_sha256: str
    delta_norm: float
    metrics: dict[str, float | str | None]
    adjustments: tuple[Adjustment, ...] = ()
    policy: dict[str, float | str | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "participant": self.participant,
            "weight": self.weight,
            "tokens": self.tokens,
            "manifestSha256": self.manifest_sha256,
            "deltaNorm": self.delta_norm,
            "metrics": self.metrics,
        }
        if self.adjustments:
            out["adjustments"] = [
                {"reason": a.reason, "message": a.message} for a in self.adjustments
            ]
        if self.policy:
            out["policy"] = self.policy
        return out

    @classmethod
    def from_json(cls, a: Mapping[str, Any]) -> Contribution:
        return cls(
            a["participant"], a["weight"], int(a["tokens"]), a["manifestSha256"],
            a["deltaNorm"], dict(a["metrics"]),
            tuple(Adjustment(j["reason"], j["message"]) for j in a.get("adjustments", ())),
            dict(a.get("policy", {})),
        )  # fmt: skip


@dataclass(frozen=True)
class Refusal:
    """A member whose update was not merged, with a reason from `rejections`."""

    participant: str
    reason: str
    message: str


@dataclass(frozen=True)
class RoundResult:
    """The outcome of a round: a pure function of its close record and stored inputs."""

    KIND: ClassVar[Kind] = Kind.RESULT
    federation: str
    round: int
    outcome: Outcome
    message: str
    plan_sha256: str
    base_sha256: str
    close_sha256: str
    next_base: Ref | None
    optimizer_state: Ref | None
    strategy: dict[str, Any]
    accepted: tuple[Contribution, ...]
    rejected: tuple[Refusal, ...]
    metrics: dict[str, float | str | None]

    @property
    def weights(self) -> dict[str, float]:
        return {a.participant: a.weight for a in self.accepted}

    def to_json(self) -> dict[str, Any]:
        return _header(self.KIND, self.federation, self.round) | {
            "outcome": str(self.outcome),
            "message": self.message,
            "plan": {"sha256": self.plan_sha256},
            "base": {"sha256": self.base_sha256},
            "close": {"sha256": self.close_sha256},
            "nextBase": _ref_json(self.next_base),
            "optimizerState": _ref_json(self.optimizer_state),
            "strategy": self.strategy,
            "accepted": [a.to_json() for a in self.accepted],
            "rejected": [
                {"participant": r.participant, "reason": r.reason, "message": r.message}
                for r in self.rejected
            ],
            "metrics": self.metrics,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RoundResult:
        return cls(
            d["federation"], d["round"], Outcome(d["outcome"]), d["message"],
            d["plan"]["sha256"], d["base"]["sha256"], d["close"]["sha256"],
            Ref.from_json(d["nextBase"]), Ref.from_json(d["optimizerState"]), d["strategy"],
            tuple(Contribution.from_json(a) for a in d["accepted"]),
            tuple(Refusal(r["participant"], r["reason"], r["message"]) for r in d["rejected"]),
            dict(d["metrics"]),
        )  # fmt: skip


class Document(Protocol):
    """What every typed document has."""

    KIND: ClassVar[Kind]

    @property
    def federation(self) -> str: ...

    @property
    def round(self) -> int: ...

    def to_json(self) -> dict[str, Any]: ...


D = TypeVar("D", RoundPlan, Receipt, UpdateManifest, CloseRecord, ModelManifest, RoundResult)


def load(data: bytes, cls: type[D], where: str) -> tuple[D, dict[str, Any]]:
    """Parse stored bytes as `cls`: the typed document and the raw, validated JSON (whose
    signature the caller verifies)."""
    raw = parse(data, cls.KIND, where)
    return cls.from_json(raw), raw


def check_identity(
    document: Document,
    where: str,
    *,
    federation: str,
    round_number: int,
    participant: str | None = None,
) -> None:
    """A document must say it belongs exactly where it was found (anti-replay)."""
    if document.federation != federation:
        raise Rejected(
            rejections.WRONG_FEDERATION,
            f"{where} belongs to federation {document.federation!r}, not {federation!r}",
        )
    if document.round != round_number:
        raise Rejected(
            rejections.WRONG_ROUND,
            f"{where} belongs to round {document.round}, not round {round_number}",
        )
    named = getattr(document, "participant", None)
    if participant is not None and named != participant:
        raise Rejected(
            rejections.WRONG_PARTICIPANT,
            f"{where} names participant {named!r}, not {participant!r}",
        )
