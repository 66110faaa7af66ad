"""Verified reads and write-once publication of protocol objects.

Writers upload shards first and the signed manifest last, with a conditional create:
the manifest is the commit point, so a half-uploaded set of shards is invisible.
Readers verify the document (schema, identity, signature) before trusting any field,
and each shard's size and sha256 before using any byte of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from tapestry_protocol import documents, rejections
from tapestry_protocol.documents import check_identity, now_rfc3339
from tapestry_protocol.layout import MANIFEST, Layout, shard_name
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.shards import (
    FloatArray,
    ShardFormatError,
    ShardRef,
    Tensor,
    decode_delta,
    decode_safetensors,
    encode_delta,
    encode_safetensors,
    sha256_hex,
    stored_names,
)
from tapestry_protocol.signing import SigningKey, verify
from tapestry_protocol.store import ObjectExists, ObjectNotFound, ObjectStore

COORDINATOR = "coordinator"


@dataclass(frozen=True)
class Verified:
    """A document that passed every check, with the sha256 of its stored bytes."""

    key: str
    document: dict[str, Any]
    sha256: str

    @cached_property
    def shards(self) -> list[ShardRef]:
        """Parsed once: the merge looks shards up for every participant and shard."""
        return [ShardRef.from_json(s) for s in self.document["shards"]]

    @property
    def directory(self) -> str:
        return self.key[: -len(MANIFEST)]


def read_document(
    store: ObjectStore, key: str, kind: str, where: str | None = None
) -> tuple[dict[str, Any], str]:
    where = where or key
    try:
        data = store.get(key)
    except ObjectNotFound:
        raise Rejected(rejections.MISSING_MANIFEST, f"{where} does not exist") from None
    return documents.parse(data, kind, where), sha256_hex(data)


def fetch_shard(store: ObjectStore, directory: str, ref: ShardRef) -> bytes:
    """The shard's bytes, only once their size and sha256 match the manifest."""
    key = directory + ref.name
    try:
        data = store.get(key)
    except ObjectNotFound:
        raise Rejected(rejections.MISSING_SHARD, f"shard {key} is listed but absent") from None
    if len(data) != ref.size:
        raise Rejected(
            rejections.SIZE_MISMATCH, f"shard {key} is {len(data)} bytes, manifest says {ref.size}"
        )
    digest = sha256_hex(data)
    if digest != ref.sha256:
        raise Rejected(
            rejections.HASH_MISMATCH,
            f"shard {key} has sha256 {digest[:16]}…, manifest says {ref.sha256[:16]}…",
        )
    return data


def decode_shard(data: bytes, ref: ShardRef, encoding: str, where: str) -> dict[str, FloatArray]:
    """Decode a verified shard into float32 arrays named exactly as the manifest says."""
    try:
        stored, _ = decode_safetensors(data)
    except ShardFormatError as e:
        raise Rejected(rejections.MALFORMED_DOCUMENT, f"{where}: {e}") from None
    expected = stored_names(ref.tensors, encoding)
    if sorted(stored) != expected:
        missing = sorted(set(expected) - set(stored))
        extra = sorted(set(stored) - set(expected))
        raise Rejected(
            rejections.TENSOR_MISMATCH,
            f"{where}: tensors differ from the manifest (missing {missing[:3]}, extra {extra[:3]})",
        )
    try:
        return {name: decode_delta(stored, name, encoding) for name in ref.tensors}
    except ValueError as e:
        raise Rejected(rejections.TENSOR_MISMATCH, f"{where}: {e}") from None


def upload_shard(
    store: ObjectStore,
    directory: str,
    index: int,
    tensors: Mapping[str, FloatArray],
    names: list[str],
    encoding: str,
) -> ShardRef:
    """Encode and upload one content-addressed shard. One already there (a retry, a
    racing twin) is by construction the same bytes, so it is kept."""
    stored: dict[str, Tensor] = {}
    for name in names:
        stored.update(encode_delta(name, tensors[name], encoding))
    data = encode_safetensors(stored)
    digest = sha256_hex(data)
    key = directory + shard_name(index, digest)
    try:
        store.put(key, data, if_absent=True)
    except ObjectExists:
        if store.stat(key).size != len(data):
            raise Rejected(rejections.SIZE_MISMATCH, f"{key} exists with another size") from None
    return ShardRef(shard_name(index, digest), len(data), digest, tuple(names))


def _upload_shards(
    store: ObjectStore,
    directory: str,
    groups: list[list[str]],
    tensors: Mapping[str, FloatArray],
    encoding: str,
) -> list[ShardRef]:
    return [
        upload_shard(store, directory, i, tensors, group, encoding)
        for i, group in enumerate(groups)
    ]


def commit_document(store: ObjectStore, key: str, document: dict[str, Any]) -> Verified:
    """Publish a manifest write-once. If the same bytes are already there (a re-run),
    that is success; different bytes mean another writer won, and ObjectExists says so."""
    data = documents.encode(document)
    try:
        store.put(key, data, if_absent=True)
    except ObjectExists:
        if store.get(key) != data:
            raise ObjectExists(f"{key} was already published with other content", key) from None
    return Verified(key, document, sha256_hex(data))


# --- models (bases and optimizer state) ----------------------------------------------


def publish_model(
    store: ObjectStore,
    layout: Layout,
    round_number: int,
    tensors: Mapping[str, FloatArray],
    groups: list[list[str]],
    signer: SigningKey,
    *,
    role: str = "base",
    model: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Verified:
    """Publish a full float32 tensor set as `bases/<round>` or `optimizer/<round>`."""
    directory = model_dir(layout, round_number, role)
    refs = _upload_shards(store, directory, groups, tensors, "fp32")
    return commit_model(store, layout, round_number, refs, signer, role, model, metadata)


def model_dir(layout: Layout, round_number: int, role: str) -> str:
    if role == "base":
        return layout.base_dir(round_number)
    if role == "optimizer":
        return layout.optimizer_dir(round_number)
    raise ValueError(f"unknown model role {role!r}")


def commit_model(
    store: ObjectStore,
    layout: Layout,
    round_number: int,
    refs: list[ShardRef],
    signer: SigningKey,
    role: str = "base",
    model: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Verified:
    """Sign and commit the manifest of already uploaded model shards.

    It has no timestamp: the same shards give the same bytes, so a re-run is idempotent.
    """
    document = signer.sign(
        {
            "kind": "ModelManifest",
            "schemaVersion": documents.SCHEMA_VERSION,
            "federation": layout.federation,
            "round": round_number,
            "role": role,
            "shards": [r.to_json() for r in refs],
            "model": dict(model or {}),
            "metadata": dict(metadata or {}),
        }
    )
    return commit_document(store, model_dir(layout, round_number, role) + MANIFEST, document)


def read_model(
    store: ObjectStore,
    layout: Layout,
    key: str,
    coordinator_key: str,
    *,
    role: str = "base",
    expected_sha256: str | None = None,
) -> Verified:
    """Read and verify a base (or optimizer-state) manifest signed by the coordinator."""
    round_number = layout.model_round(key, role)
    document, digest = read_document(store, key, "ModelManifest")
    check_identity(document, key, federation=layout.federation, round_number=round_number)
    if expected_sha256 is not None and digest != expected_sha256:
        raise Rejected(
            rejections.WRONG_BASE, f"{key} has sha256 {digest[:16]}…, the plan names another"
        )
    if document["role"] != role:
        raise Rejected(rejections.MALFORMED_DOCUMENT, f"{key} has role {document['role']!r}")
    verify(document, COORDINATOR, coordinator_key)
    return Verified(key, document, digest)


def read_plan_base(
    store: ObjectStore, layout: Layout, plan: Verified, coordinator_key: str
) -> Verified:
    """The base a plan names, verified against the plan's hash and the coordinator's key."""
    ref = plan.document["base"]
    return read_model(
        store, layout, ref["manifest"], coordinator_key, expected_sha256=ref["sha256"]
    )


def load_tensors(store: ObjectStore, model: Verified) -> dict[str, FloatArray]:
    """Every tensor of a verified model, shard by shard (used where the model fits)."""
    out: dict[str, FloatArray] = {}
    for ref in model.shards:
        data = fetch_shard(store, model.directory, ref)
        out.update(decode_shard(data, ref, "fp32", model.directory + ref.name))
    return out


def shard_groups(model: Verified) -> list[list[str]]:
    return [list(ref.tensors) for ref in model.shards]


# --- plans -----------------------------------------------------------------------------


def make_plan(
    layout: Layout,
    round_number: int,
    base: Verified,
    *,
    model: Mapping[str, Any],
    hyperparameters: Mapping[str, Any],
    participants: Mapping[str, str],
    min_participants: int,
    deadline: str,
    encoding: str = "fp32",
    traceparent: str | None = None,
) -> dict[str, Any]:
    """An unsigned round plan; `participants` maps names to their public keys."""
    plan: dict[str, Any] = {
        "kind": "RoundPlan",
        "schemaVersion": documents.SCHEMA_VERSION,
        "federation": layout.federation,
        "round": round_number,
        "base": {"manifest": base.key, "sha256": base.sha256},
        "model": dict(model),
        "hyperparameters": dict(hyperparameters),
        "encoding": encoding,
        "participants": [{"name": n, "publicKey": k} for n, k in sorted(participants.items())],
        "minParticipants": min_participants,
        "deadline": deadline,
        "issuedAt": now_rfc3339(),
    }
    if traceparent:
        plan["traceparent"] = traceparent
    return plan


def publish_plan(
    store: ObjectStore, layout: Layout, plan: dict[str, Any], signer: SigningKey
) -> Verified:
    """Sign and publish a round plan write-once (ObjectExists if the round has one)."""
    return commit_document(store, layout.plan(plan["round"]), signer.sign(plan))


def read_plan(
    store: ObjectStore, layout: Layout, round_number: int, coordinator_key: str
) -> Verified:
    key = layout.plan(round_number)
    document, digest = read_document(store, key, "RoundPlan")
    check_identity(document, key, federation=layout.federation, round_number=round_number)
    verify(document, COORDINATOR, coordinator_key)
    names = [p["name"] for p in document["participants"]]
    if len(set(names)) != len(names):
        raise Rejected(rejections.MALFORMED_DOCUMENT, f"{key}: a participant is listed twice")
    return Verified(key, document, digest)


def participant_keys(plan: Verified) -> dict[str, str]:
    return {p["name"]: p["publicKey"] for p in plan.document["participants"]}


# --- updates ---------------------------------------------------------------------------


def publish_update(
    store: ObjectStore,
    layout: Layout,
    plan: Verified,
    base: Verified,
    delta: Mapping[str, FloatArray],
    signer: SigningKey,
    *,
    tokens: int,
    metrics: Mapping[str, float | str | None],
) -> Verified:
    """Upload a participant's delta in the base's shard layout, then commit its manifest.

    If this participant already committed an update for the round (a restarted pod),
    that committed update stands and is returned: a round takes one update each."""
    round_number = plan.document["round"]
    participant = signer.key_id
    directory = layout.update_dir(round_number, participant)
    if store.exists(directory + MANIFEST):
        return read_update(store, layout, plan, base, participant)
    encoding = plan.document["encoding"]
    refs = _upload_shards(store, directory, shard_groups(base), delta, encoding)
    uploaded = sum(r.size for r in refs)
    document = signer.sign(
        {
            "kind": "UpdateManifest",
            "schemaVersion": documents.SCHEMA_VERSION,
            "federation": layout.federation,
            "round": round_number,
            "participant": participant,
            "plan": {"sha256": plan.sha256},
            "base": {"sha256": base.sha256},
            "encoding": encoding,
            "shards": [r.to_json() for r in refs],
            "tokens": tokens,
            "metrics": {**metrics, "bytesUploaded": uploaded},
            "createdAt": now_rfc3339(),
        }
    )
    return commit_document(store, directory + MANIFEST, document)


def read_update(
    store: ObjectStore, layout: Layout, plan: Verified, base: Verified, participant: str
) -> Verified:
    """Verify one participant's committed update against the plan and the base layout.

    Shard bytes are checked later, as they are streamed (`fetch_shard`).
    """
    round_number = plan.document["round"]
    keys = participant_keys(plan)
    directory = layout.update_dir(round_number, participant)
    key = directory + MANIFEST
    if participant not in keys:
        raise Rejected(rejections.UNKNOWN_SIGNER, f"{participant!r} is not in the round plan")
    document, digest = read_document(store, key, "UpdateManifest")
    check_identity(
        document,
        key,
        federation=layout.federation,
        round_number=round_number,
        participant=participant,
    )
    verify(document, participant, keys[participant])
    if document["plan"]["sha256"] != plan.sha256:
        raise Rejected(rejections.WRONG_PLAN, f"{key} was made for another plan of this round")
    if document["base"]["sha256"] != base.sha256:
        raise Rejected(rejections.WRONG_BASE, f"{key} was trained from another base")
    if document["encoding"] != plan.document["encoding"]:
        raise Rejected(
            rejections.MALFORMED_DOCUMENT,
            f"{key} uses encoding {document['encoding']!r}, the plan asks for "
            f"{plan.document['encoding']!r}",
        )
    update = Verified(key, document, digest)
    _check_shard_layout(update, base)
    return update


def _check_shard_layout(update: Verified, base: Verified) -> None:
    expected = shard_groups(base)
    listed = [list(ref.tensors) for ref in update.shards]
    if len(listed) < len(expected):
        raise Rejected(
            rejections.MISSING_SHARD,
            f"{update.key} lists {len(listed)} shards, the base has {len(expected)}",
        )
    if len(listed) > len(expected):
        raise Rejected(
            rejections.EXTRA_SHARD,
            f"{update.key} lists {len(listed)} shards, the base has {len(expected)}",
        )
    for i, (got, want) in enumerate(zip(listed, expected, strict=True)):
        if got != want or not update.shards[i].name.startswith(f"part-{i:05d}-"):
            raise Rejected(
                rejections.TENSOR_MISMATCH,
                f"{update.key}: shard {i} does not hold the same tensors as the base",
            )
