"""Verified reads and write-once publication of protocol objects.

Writers upload shards first and the signed manifest last, with a conditional create:
the manifest is the commit point, so a half-uploaded set of shards is invisible.
Readers verify the document (schema, identity, signature) before trusting any field,
and each shard's size and sha256 before using any byte of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic

from tapestry_protocol import documents, jsonsafe, rejections
from tapestry_protocol.documents import (
    MAX_TEXT,
    CloseRecord,
    CloseTrigger,
    D,
    Excluded,
    Included,
    Member,
    ModelManifest,
    Privacy,
    Receipt,
    ReceiptState,
    Ref,
    Role,
    RoundPlan,
    RoundResult,
    UpdateManifest,
    check_identity,
    now_rfc3339,
    rfc3339,
)
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
class Verified(Generic[D]):
    """A document that passed every check, with the sha256 of its stored bytes."""

    key: str
    document: D
    sha256: str

    @property
    def directory(self) -> str:
        return self.key[: self.key.rindex("/") + 1]

    @property
    def ref(self) -> Ref:
        return Ref(self.key, self.sha256)


def read_document(
    store: ObjectStore, key: str, cls: type[D], where: str | None = None
) -> tuple[D, dict[str, Any], str]:
    """The typed document at `key`, its raw JSON (to verify) and the sha256 of its bytes."""
    where = where or key
    data = _bounded_get(store, key, where)
    if len(data) > jsonsafe.MAX_DOCUMENT_BYTES:
        raise Rejected(
            rejections.MALFORMED_DOCUMENT,
            f"{where} is larger than the {jsonsafe.MAX_DOCUMENT_BYTES >> 20} MiB a document may be",
        )
    document, raw = documents.load(data, cls, where)
    return document, raw, sha256_hex(data)


def _bounded_get(store: ObjectStore, key: str, where: str) -> bytes:
    """A document's bytes, read no further than one byte past the size limit: a
    participant's huge manifest costs a reader one limit's worth of memory."""
    try:
        return store.get(key, length=jsonsafe.MAX_DOCUMENT_BYTES + 1)
    except ObjectNotFound:
        raise Rejected(rejections.MISSING_MANIFEST, f"{where} does not exist") from None


def _read_signed(
    store: ObjectStore,
    layout: Layout,
    key: str,
    cls: type[D],
    round_number: int,
    signer: str,
    public_key: str,
    participant: str | None = None,
) -> Verified[D]:
    document, raw, digest = read_document(store, key, cls)
    check_identity(
        document,
        key,
        federation=layout.federation,
        round_number=round_number,
        participant=participant,
    )
    verify(raw, signer, public_key)
    return Verified(key, document, digest)


def fetch_shard(store: ObjectStore, directory: str, ref: ShardRef) -> bytes:
    """The shard's bytes, only once their size and sha256 match the manifest; read no
    further than one byte past the size the manifest states."""
    key = directory + ref.name
    try:
        data = store.get(key, length=ref.size + 1)
    except ObjectNotFound:
        raise Rejected(rejections.MISSING_SHARD, f"shard {key} is listed but absent") from None
    _check_shard(key, ref, len(data), sha256_hex(data))
    return data


def check_shard(store: ObjectStore, directory: str, ref: ShardRef, chunk: int = 1 << 20) -> int:
    """`fetch_shard`'s checks on a shard hashed as it streams, for readers that need
    only the verdict (bounded memory whatever the shard size); returns its size."""
    key = directory + ref.name
    digest = hashlib.sha256()
    size = 0
    try:
        for part in store.iter_chunks(key, chunk):
            size += len(part)
            if size > ref.size:
                break  # one chunk past the stated size is enough to refuse it
            digest.update(part)
    except ObjectNotFound:
        raise Rejected(rejections.MISSING_SHARD, f"shard {key} is listed but absent") from None
    _check_shard(key, ref, size, digest.hexdigest())
    return size


def _check_shard(key: str, ref: ShardRef, size: int, digest: str) -> None:
    if size != ref.size:  # readers stop one byte past the stated size
        actual = f"more than {ref.size}" if size > ref.size else str(size)
        raise Rejected(
            rejections.SIZE_MISMATCH, f"shard {key} is {actual} bytes, manifest says {ref.size}"
        )
    if digest != ref.sha256:
        raise Rejected(
            rejections.HASH_MISMATCH,
            f"shard {key} has sha256 {digest[:16]}…, manifest says {ref.sha256[:16]}…",
        )


def decode_shard(data: bytes, ref: ShardRef, encoding: str, where: str) -> dict[str, FloatArray]:
    """Decode a verified shard into float32 arrays named exactly as the manifest says.

    `where` names the shard object, so a refusal points at the bytes at fault."""
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
    data, digest = _encode_shard(tensors, names, encoding)
    return _put_shard(store, directory, index, names, data, digest)


def _encode_shard(
    tensors: Mapping[str, FloatArray], names: list[str], encoding: str
) -> tuple[bytes, str]:
    """A shard's safetensors bytes and their sha256."""
    stored: dict[str, Tensor] = {}
    for name in names:
        stored.update(encode_delta(name, tensors[name], encoding))
    data = encode_safetensors(stored)
    return data, sha256_hex(data)


def _put_shard(
    store: ObjectStore, directory: str, index: int, names: list[str], data: bytes, digest: str
) -> ShardRef:
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
    """Upload the shards in order, encoding and hashing the next one while the current
    one uploads (both mostly run outside the GIL): the CPU work hides behind the
    network. At most two encoded shards are held at once."""
    refs: list[ShardRef] = []
    if not groups:
        return refs
    with ThreadPoolExecutor(1, thread_name_prefix="shard-encode") as encoder:
        following = encoder.submit(_encode_shard, tensors, groups[0], encoding)
        for index, names in enumerate(groups):
            data, digest = following.result()
            if index + 1 < len(groups):
                following = encoder.submit(_encode_shard, tensors, groups[index + 1], encoding)
            refs.append(_put_shard(store, directory, index, names, data, digest))
            del data
    return refs


def commit_document(store: ObjectStore, key: str, document: D, signer: SigningKey) -> Verified[D]:
    """Sign and publish a document write-once. The same bytes already there (a re-run) is
    success; different bytes mean another writer won, and ObjectExists says so.

    The signed JSON is validated first: a document this writer could not read back is a
    bug to surface here, before anything that depends on it is published."""
    signed = signer.sign(document.to_json())
    documents.validate(signed, document.KIND, key)
    data = documents.encode(signed)
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
    role: Role = Role.BASE,
    model: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Verified[ModelManifest]:
    """Publish a full float32 tensor set as `bases/<round>` or `optimizer/<round>`."""
    directory = model_dir(layout, round_number, role)
    refs = _upload_shards(store, directory, groups, tensors, "fp32")
    return commit_model(store, layout, round_number, refs, signer, role, model, metadata)


def model_dir(layout: Layout, round_number: int, role: Role) -> str:
    if role == Role.BASE:
        return layout.base_dir(round_number)
    return layout.optimizer_dir(round_number)


def commit_model(
    store: ObjectStore,
    layout: Layout,
    round_number: int,
    refs: list[ShardRef],
    signer: SigningKey,
    role: Role = Role.BASE,
    model: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Verified[ModelManifest]:
    """Sign and commit the manifest of already uploaded model shards (idempotent)."""
    document = ModelManifest(
        layout.federation, round_number, role, tuple(refs), dict(model or {}),
        dict(metadata or {}),
    )  # fmt: skip
    key = model_dir(layout, round_number, role) + MANIFEST
    return commit_document(store, key, document, signer)


def read_model(
    store: ObjectStore,
    layout: Layout,
    key: str,
    coordinator_key: str,
    *,
    role: Role = Role.BASE,
    expected_sha256: str | None = None,
) -> Verified[ModelManifest]:
    """Read and verify a base (or optimizer-state) manifest signed by the coordinator."""
    round_number = layout.model_round(key, role)
    model = _read_signed(
        store, layout, key, ModelManifest, round_number, COORDINATOR, coordinator_key
    )
    if expected_sha256 is not None and model.sha256 != expected_sha256:
        raise Rejected(
            rejections.WRONG_BASE, f"{key} has sha256 {model.sha256[:16]}…, the plan names another"
        )
    if model.document.role != role:
        raise Rejected(
            rejections.MALFORMED_DOCUMENT, f"{key} has role {str(model.document.role)!r}"
        )
    return model


def read_plan_base(
    store: ObjectStore, layout: Layout, plan: Verified[RoundPlan], coordinator_key: str
) -> Verified[ModelManifest]:
    """The base a plan names, verified against the plan's hash and the coordinator's key."""
    ref = plan.document.base
    return read_model(store, layout, ref.manifest, coordinator_key, expected_sha256=ref.sha256)


def load_tensors(store: ObjectStore, model: Verified[ModelManifest]) -> dict[str, FloatArray]:
    """Every tensor of a verified model, shard by shard (used where the model fits)."""
    out: dict[str, FloatArray] = {}
    for ref in model.document.shards:
        data = fetch_shard(store, model.directory, ref)
        out.update(decode_shard(data, ref, "fp32", model.directory + ref.name))
    return out


# --- plans -----------------------------------------------------------------------------


def make_plan(
    layout: Layout,
    round_number: int,
    base: Verified[ModelManifest],
    *,
    model: Mapping[str, Any],
    hyperparameters: Mapping[str, Any],
    participants: Mapping[str, str],
    min_participants: int,
    deadline: str,
    encoding: str = "fp32",
    traceparent: str | None = None,
) -> RoundPlan:
    """A round plan; `participants` maps names to their public keys."""
    return RoundPlan(
        layout.federation, round_number, base.ref, dict(model), dict(hyperparameters), encoding,
        tuple(Member(n, k) for n, k in sorted(participants.items())), min_participants,
        deadline, now_rfc3339(), traceparent,
    )  # fmt: skip


def publish_plan(
    store: ObjectStore, layout: Layout, plan: RoundPlan, signer: SigningKey
) -> Verified[RoundPlan]:
    """Sign and publish a round plan write-once (ObjectExists if the round has one)."""
    return commit_document(store, layout.plan(plan.round), plan, signer)


def read_plan(
    store: ObjectStore, layout: Layout, round_number: int, coordinator_key: str
) -> Verified[RoundPlan]:
    key = layout.plan(round_number)
    plan = _read_signed(store, layout, key, RoundPlan, round_number, COORDINATOR, coordinator_key)
    names = plan.document.names
    if len(set(names)) != len(names):
        raise Rejected(rejections.MALFORMED_DOCUMENT, f"{key}: a participant is listed twice")
    if plan.document.min_participants > len(names):
        raise Rejected(
            rejections.MALFORMED_DOCUMENT,
            f"{key}: a quorum of {plan.document.min_participants} is more than the "
            f"{len(names)} participants",
        )
    return plan


# --- receipts --------------------------------------------------------------------------


def publish_receipt(
    store: ObjectStore,
    layout: Layout,
    plan: Verified[RoundPlan],
    signer: SigningKey,
    state: ReceiptState,
    reason: str,
    message: str,
) -> Verified[Receipt]:
    """A participant's signed answer to a plan, write-once. Writing the same state again
    (a restart) keeps the first receipt."""
    round_number = plan.document.round
    receipt = Receipt(
        layout.federation, round_number, signer.key_id, plan.sha256, state, reason,
        message[:MAX_TEXT], now_rfc3339(),
    )  # fmt: skip
    key = layout.receipt(round_number, signer.key_id, state)
    try:
        return commit_document(store, key, receipt, signer)
    except ObjectExists:
        return read_receipt(store, layout, plan, signer.key_id, state)


def read_receipt(
    store: ObjectStore,
    layout: Layout,
    plan: Verified[RoundPlan],
    participant: str,
    state: ReceiptState,
) -> Verified[Receipt]:
    """One receipt, verified with the participant's key from the plan."""
    round_number = plan.document.round
    keys = plan.document.keys
    if participant not in keys:
        raise Rejected(rejections.UNKNOWN_SIGNER, f"{participant!r} is not in the round plan")
    key = layout.receipt(round_number, participant, state)
    receipt = _read_signed(
        store, layout, key, Receipt, round_number, participant, keys[participant], participant
    )
    if receipt.document.plan_sha256 != plan.sha256:
        raise Rejected(rejections.WRONG_PLAN, f"{key} answers another plan of this round")
    if receipt.document.state != state:
        raise Rejected(rejections.MALFORMED_DOCUMENT, f"{key} holds a {receipt.document.state}")
    return receipt


def read_receipts(
    store: ObjectStore, layout: Layout, plan: Verified[RoundPlan], participant: str
) -> dict[ReceiptState, Verified[Receipt]]:
    """The participant's receipts that exist and verify; a forged one is ignored."""
    out: dict[ReceiptState, Verified[Receipt]] = {}
    for state in ReceiptState:
        if store.exists(layout.receipt(plan.document.round, participant, state)):
            try:
                out[state] = read_receipt(store, layout, plan, participant, state)
            except Rejected:
                continue
    return out


# --- updates ---------------------------------------------------------------------------


def publish_update(
    store: ObjectStore,
    layout: Layout,
    plan: Verified[RoundPlan],
    base: Verified[ModelManifest],
    delta: Mapping[str, FloatArray],
    signer: SigningKey,
    *,
    tokens: int,
    metrics: Mapping[str, float | str | None],
    traceparent: str | None = None,
    privacy: Privacy | None = None,
) -> Verified[UpdateManifest]:
    """Upload a participant's delta in the base's shard layout, then commit its manifest
    (with the trace context it was made in, which the aggregator's span links to, and
    the differential privacy the delta was noised with, if any).

    If this participant already committed an update for the round (a restarted pod),
    that committed update stands and is returned: a round takes one update each."""
    round_number = plan.document.round
    participant = signer.key_id
    directory = layout.update_dir(round_number, participant)
    if store.exists(directory + MANIFEST):
        return read_update(store, layout, plan, base, participant)
    encoding = plan.document.encoding
    refs = _upload_shards(store, directory, base.document.groups, delta, encoding)
    update = UpdateManifest(
        layout.federation, round_number, participant, plan.sha256, base.sha256, encoding,
        tuple(refs), tokens, {**metrics, "bytesUploaded": sum(r.size for r in refs)},
        now_rfc3339(), traceparent, privacy,
    )  # fmt: skip
    return commit_document(store, directory + MANIFEST, update, signer)


def read_update(
    store: ObjectStore,
    layout: Layout,
    plan: Verified[RoundPlan],
    base: Verified[ModelManifest],
    participant: str,
) -> Verified[UpdateManifest]:
    """Verify one participant's committed update against the plan and the base layout.

    Shard bytes are checked later, as they are streamed (`fetch_shard`).
    """
    round_number = plan.document.round
    keys = plan.document.keys
    key = layout.update_manifest(round_number, participant)
    if participant not in keys:
        raise Rejected(rejections.UNKNOWN_SIGNER, f"{participant!r} is not in the round plan")
    update = _read_signed(
        store, layout, key, UpdateManifest, round_number, participant, keys[participant],
        participant,
    )  # fmt: skip
    document = update.document
    if document.plan_sha256 != plan.sha256:
        raise Rejected(rejections.WRONG_PLAN, f"{key} was made for another plan of this round")
    if document.base_sha256 != base.sha256:
        raise Rejected(rejections.WRONG_BASE, f"{key} was trained from another base")
    if document.encoding != plan.document.encoding:
        raise Rejected(
            rejections.MALFORMED_DOCUMENT,
            f"{key} uses encoding {document.encoding!r}, the plan asks for "
            f"{plan.document.encoding!r}",
        )
    _check_shard_layout(update, base)
    return update


def _check_shard_layout(update: Verified[UpdateManifest], base: Verified[ModelManifest]) -> None:
    expected = base.document.groups
    shards = update.document.shards
    if len(shards) != len(expected):
        reason = rejections.MISSING_SHARD if len(shards) < len(expected) else rejections.EXTRA_SHARD
        raise Rejected(
            reason, f"{update.key} lists {len(shards)} shards, the base has {len(expected)}"
        )
    for i, (shard, want) in enumerate(zip(shards, expected, strict=True)):
        if list(shard.tensors) != want or not shard.name.startswith(f"part-{i:05d}-"):
            raise Rejected(
                rejections.TENSOR_MISMATCH,
                f"{update.key}: shard {i} ({shard.name}) does not hold the same tensors as the "
                "base",
            )


def committed_updates(
    store: ObjectStore, layout: Layout, round_number: int, names: list[str]
) -> dict[str, str]:
    """Members with a committed update manifest -> sha256 of its bytes (unverified)."""
    out: dict[str, str] = {}
    for name in names:
        key = layout.update_manifest(round_number, name)
        try:  # an oversized manifest is included here and refused by the merge
            out[name] = sha256_hex(_bounded_get(store, key, key))
        except Rejected:
            continue  # none committed
    return out


# --- closing a round -------------------------------------------------------------------


def build_close(
    plan: Verified[RoundPlan],
    updates: Mapping[str, str],
    receipts: Mapping[str, Mapping[ReceiptState, Verified[Receipt]]],
    trigger: CloseTrigger,
    closed_at: datetime,
) -> CloseRecord:
    """The close record: every member with a committed update is included (the merge
    still verifies it); the others are excluded with what their receipts say."""
    included: list[Included] = []
    excluded: list[Excluded] = []
    when = rfc3339(closed_at)
    for name in sorted(plan.document.names):
        if name in updates:
            included.append(Included(name, updates[name]))
            continue
        answers = receipts.get(name, {})
        if ReceiptState.FAILED in answers:
            r = answers[ReceiptState.FAILED].document
            message = f"{r.reason}: {r.message}"[:MAX_TEXT]
            excluded.append(Excluded(name, rejections.TRAINING_FAILED, message))
        elif ReceiptState.DECLINED in answers:
            r = answers[ReceiptState.DECLINED].document
            message = f"{r.reason}: {r.message}"[:MAX_TEXT]
            excluded.append(Excluded(name, rejections.DECLINED, message))
        else:
            excluded.append(
                Excluded(name, rejections.LATE, f"no update when the round closed at {when}")
            )
    return CloseRecord(
        plan.document.federation, plan.document.round, plan.sha256, trigger, tuple(included),
        tuple(excluded), when,
    )  # fmt: skip


def publish_close(
    store: ObjectStore, layout: Layout, close: CloseRecord, signer: SigningKey
) -> Verified[CloseRecord]:
    """Commit a round's close record. If the round was closed before (a restart, a racing
    coordinator), the first record stands and is returned."""
    try:
        return commit_document(store, layout.close(close.round), close, signer)
    except ObjectExists:
        return read_close(store, layout, close.round, signer.public_key_text)


def close_round(
    store: ObjectStore,
    layout: Layout,
    plan: Verified[RoundPlan],
    signer: SigningKey,
    trigger: CloseTrigger,
    closed_at: datetime,
) -> Verified[CloseRecord]:
    """Observe the store and commit the close record of `plan`'s round (idempotent)."""
    round_number = plan.document.round
    if store.exists(layout.close(round_number)):
        return read_close(store, layout, round_number, signer.public_key_text)
    names = plan.document.names
    updates = committed_updates(store, layout, round_number, names)
    receipts = {n: read_receipts(store, layout, plan, n) for n in names if n not in updates}
    close = build_close(plan, updates, receipts, trigger, closed_at)
    return publish_close(store, layout, close, signer)


def read_close(
    store: ObjectStore, layout: Layout, round_number: int, coordinator_key: str
) -> Verified[CloseRecord]:
    key = layout.close(round_number)
    try:
        return _read_signed(
            store, layout, key, CloseRecord, round_number, COORDINATOR, coordinator_key
        )
    except Rejected as e:
        if e.reason == rejections.MISSING_MANIFEST:
            raise Rejected(rejections.NOT_CLOSED, f"round {round_number} is not closed") from None
        raise


# --- results ---------------------------------------------------------------------------


def publish_result(
    store: ObjectStore, layout: Layout, result: RoundResult, signer: SigningKey
) -> Verified[RoundResult]:
    """Commit a round's result; if another aggregator finished first, its result stands."""
    try:
        return commit_document(store, layout.result(result.round), result, signer)
    except ObjectExists:
        return read_result(store, layout, result.round, signer.public_key_text)


def read_result(
    store: ObjectStore, layout: Layout, round_number: int, coordinator_key: str
) -> Verified[RoundResult]:
    key = layout.result(round_number)
    return _read_signed(store, layout, key, RoundResult, round_number, COORDINATOR, coordinator_key)
