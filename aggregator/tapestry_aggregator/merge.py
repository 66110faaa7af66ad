"""Merge a round's verified deltas into the next base, one shard at a time.

Every delta uses the base's shard layout, so shard i of the base, of each delta and of
the optimizer state hold the same tensors. The merge walks the shards in order and, for
each, adds the participants' decoded deltas into one float32 accumulator while the next
shards are fetched and hashed in background threads. Peak memory is a few shards,
whatever the model size or the number of participants.

A delta that fails a check mid-stream (hash, shape, NaN) is rejected with its reason
and the merge restarts without it; shards are content-addressed, so the partial output
of the abandoned pass is simply never referenced.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tapestry_aggregator.strategy import Strategy, compute_weights, outer_step
from tapestry_protocol import documents, rejections
from tapestry_protocol.exchange import (
    COORDINATOR,
    Verified,
    commit_document,
    commit_model,
    decode_shard,
    fetch_shard,
    read_document,
    read_model,
    read_plan,
    read_plan_base,
    read_update,
    upload_shard,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.shards import FloatArray, ShardRef
from tapestry_protocol.signing import SigningKey, verify
from tapestry_protocol.store import ObjectExists, ObjectStore

Progress = Callable[[str, int, int], None]


@dataclass
class _Rejection(Exception):
    participant: str
    reason: str
    message: str


@dataclass
class MergeStats:
    bytes_read: int = 0
    passes: int = 0
    delta_norms: dict[str, float] = field(default_factory=dict)


def read_result(
    store: ObjectStore, layout: Layout, round_number: int, coordinator_key: str
) -> Verified:
    key = layout.result(round_number)
    document, digest = read_document(store, key, "RoundResult")
    documents.check_identity(document, key, federation=layout.federation, round_number=round_number)
    verify(document, COORDINATOR, coordinator_key)
    return Verified(key, document, digest)


def aggregate_round(
    store: ObjectStore,
    layout: Layout,
    round_number: int,
    signer: SigningKey,
    strategy: Strategy,
    *,
    failed: dict[str, str] | None = None,
    prefetch: int = 4,
    progress: Progress | None = None,
) -> Verified:
    """Aggregate round `round_number` and publish its signed result (write-once).

    Idempotent: if the round already has a result, that result is returned. `failed`
    names participants known to have crashed (with a message), for the result's record.
    """
    if signer.key_id != COORDINATOR:
        raise ValueError(f"the aggregator signs as {COORDINATOR!r}, not {signer.key_id!r}")
    coordinator_key = signer.public_key_text
    if store.exists(layout.result(round_number)):
        return read_result(store, layout, round_number, coordinator_key)
    started = time.monotonic()
    plan = read_plan(store, layout, round_number, coordinator_key)
    base = read_plan_base(store, layout, plan, coordinator_key)
    state = _previous_state(store, layout, base, coordinator_key, strategy)

    accepted: dict[str, Verified] = {}
    rejected: dict[str, tuple[str, str]] = {}
    for entry in plan.document["participants"]:
        name = entry["name"]
        try:
            accepted[name] = read_update(store, layout, plan, base, name)
        except Rejected as e:
            if e.reason == rejections.MISSING_MANIFEST and failed and name in failed:
                rejected[name] = (rejections.TRAINING_FAILED, failed[name])
            else:
                rejected[name] = (e.reason, e.message)

    stats = MergeStats()
    next_base: Verified | None = None
    next_state: Verified | None = None
    weights: dict[str, float] = {}
    while len(accepted) >= plan.document["minParticipants"]:
        weights = compute_weights(
            {n: u.document["tokens"] for n, u in accepted.items()},
            strategy.weighting,
            strategy.max_share,
        )
        try:
            next_base, next_state = _merge(
                store,
                layout,
                round_number,
                base,
                state,
                accepted,
                weights,
                strategy,
                signer,
                stats,
                prefetch,
                progress,
            )
            break
        except _Rejection as r:
            rejected[r.participant] = (r.reason, r.message)
            del accepted[r.participant]

    quorum = plan.document["minParticipants"]
    outcome = "Succeeded" if next_base is not None else "Failed"
    message = (
        f"merged {len(accepted)} of {len(plan.document['participants'])} updates"
        if next_base is not None
        else f"{len(accepted)} valid updates, fewer than the quorum of {quorum}"
    )
    result = signer.sign(
        {
            "kind": "RoundResult",
            "schemaVersion": documents.SCHEMA_VERSION,
            "federation": layout.federation,
            "round": round_number,
            "outcome": outcome,
            "message": message,
            "plan": {"sha256": plan.sha256},
            "base": {"sha256": base.sha256},
            "nextBase": _ref(next_base),
            "optimizerState": _ref(next_state),
            "strategy": strategy.to_json(),
            "accepted": [
                {
                    "participant": n,
                    "weight": weights[n],
                    "tokens": u.document["tokens"],
                    "manifestSha256": u.sha256,
                    "metrics": {
                        **u.document["metrics"],
                        "deltaNorm": stats.delta_norms.get(n),
                    },
                }
                for n, u in sorted(accepted.items())
                if next_base is not None
            ],
            "rejected": [
                {"participant": n, "reason": reason, "message": msg}
                for n, (reason, msg) in sorted(rejected.items())
            ],
            "metrics": _round_metrics(accepted, weights, stats, started)
            if next_base is not None
            else {"seconds": round(time.monotonic() - started, 3)},
            "createdAt": documents.now_rfc3339(),
        }
    )
    try:
        return commit_document(store, layout.result(round_number), result)
    except ObjectExists:  # another aggregator finished first: its result stands
        return read_result(store, layout, round_number, coordinator_key)


def _ref(model: Verified | None) -> dict[str, str] | None:
    return None if model is None else {"manifest": model.key, "sha256": model.sha256}


def _round_metrics(
    accepted: dict[str, Verified], weights: dict[str, float], stats: MergeStats, started: float
) -> dict[str, float | str | None]:
    losses = [(weights[n], u.document["metrics"].get("trainLoss")) for n, u in accepted.items()]
    known = [(w, loss) for w, loss in losses if isinstance(loss, int | float)]
    return {
        "participants": len(accepted),
        "tokens": sum(u.document["tokens"] for u in accepted.values()),
        "trainLoss": sum(w * loss for w, loss in known) / sum(w for w, _ in known)
        if known
        else None,
        "bytesRead": stats.bytes_read,
        "mergePasses": stats.passes,
        "seconds": round(time.monotonic() - started, 3),
    }


def _previous_state(
    store: ObjectStore, layout: Layout, base: Verified, coordinator_key: str, strategy: Strategy
) -> Verified | None:
    """Optimizer state published alongside the base, if the strategy keeps any."""
    if not strategy.slots:
        return None
    round_of_base = layout.model_round(base.key)
    key = layout.optimizer_manifest(round_of_base)
    if not store.exists(key):
        return None  # the first outer step starts from zero state
    return read_model(store, layout, key, coordinator_key, role="optimizer")


def _merge(
    store: ObjectStore,
    layout: Layout,
    round_number: int,
    base: Verified,
    state: Verified | None,
    accepted: dict[str, Verified],
    weights: dict[str, float],
    strategy: Strategy,
    signer: SigningKey,
    stats: MergeStats,
    prefetch: int,
    progress: Progress | None,
) -> tuple[Verified, Verified | None]:
    stats.passes += 1
    names = sorted(accepted)
    base_refs = base.shards
    state_refs = state.shards if state is not None else None
    norms_sq = {n: 0.0 for n in names}
    uploads: list[tuple[Future[ShardRef], Future[ShardRef] | None]] = []
    # Reads run `prefetch` ahead on one pool; the new shards upload on another, so
    # writing shard i overlaps reading shard i+1. At most two uploads are in flight.
    with (
        ThreadPoolExecutor(max_workers=max(1, prefetch)) as pool,
        ThreadPoolExecutor(max_workers=1) as writer,
    ):
        for index, (participant, data) in enumerate(
            _prefetched(pool, store, base, accepted, names, prefetch)
        ):
            shard = index // (len(names) + 1)
            if participant == "":
                base_ref = base_refs[shard]
                current = decode_shard(data, base_ref, "fp32", base.directory + base_ref.name)
                accumulator: dict[str, FloatArray] = {}
                continue
            update = accepted[participant]
            try:
                delta = decode_shard(
                    data, update.shards[shard], update.document["encoding"], update.key
                )
            except Rejected as e:
                raise _Rejection(participant, e.reason, e.message) from None
            weight = np.float32(weights[participant])
            for tensor, values in delta.items():
                norms_sq[participant] += _checked_norm_sq(
                    participant, update, tensor, values, current[tensor]
                )
                if tensor in accumulator:
                    accumulator[tensor] += weight * values
                else:
                    accumulator[tensor] = weight * values
            stats.bytes_read += len(data)
            if participant == names[-1]:
                new, new_state = _step_shard(
                    store, state, state_refs, shard, current, accumulator, strategy
                )
                group = list(base_refs[shard].tensors)
                if len(uploads) >= 2:
                    _wait(uploads[-2])
                base_upload = writer.submit(
                    upload_shard,
                    store,
                    layout.base_dir(round_number + 1),
                    shard,
                    new,
                    group,
                    "fp32",
                )
                state_upload = None
                if strategy.slots:
                    slots = [f"{s}/{t}" for s in strategy.slots for t in group]
                    state_upload = writer.submit(
                        upload_shard,
                        store,
                        layout.optimizer_dir(round_number + 1),
                        shard,
                        new_state,
                        slots,
                        "fp32",
                    )
                uploads.append((base_upload, state_upload))
                if progress:
                    progress("merge", shard + 1, len(base_refs))
        out_base = [b.result() for b, _ in uploads]
        out_state = [s.result() for _, s in uploads if s is not None]
    stats.delta_norms = {n: float(np.sqrt(v)) for n, v in norms_sq.items()}
    meta = {"round": round_number, "strategy": strategy.optimizer}
    model_spec = base.document["model"]
    next_base = commit_model(
        store, layout, round_number + 1, out_base, signer, "base", model_spec, meta
    )
    next_state = (
        commit_model(store, layout, round_number + 1, out_state, signer, "optimizer", {}, meta)
        if strategy.slots
        else None
    )
    return next_base, next_state


def _wait(pair: tuple[Future[ShardRef], Future[ShardRef] | None]) -> None:
    for future in pair:
        if future is not None:
            future.result()


def _checked_norm_sq(
    participant: str, update: Verified, tensor: str, values: FloatArray, base: FloatArray
) -> float:
    """Squared L2 norm of a delta tensor, refusing wrong shapes and NaN/inf.

    One dot product gives both the norm and the check: it is finite unless a value is
    not (or squares overflow, which a second look tells apart)."""
    if values.shape != base.shape:
        raise _Rejection(
            participant,
            rejections.TENSOR_MISMATCH,
            f"{update.key}: {tensor} has shape {list(values.shape)}, "
            f"the base has {list(base.shape)}",
        )
    flat = values.reshape(-1)
    norm_sq = float(np.dot(flat, flat))
    if not np.isfinite(norm_sq) and not np.isfinite(flat).all():
        raise _Rejection(
            participant, rejections.NON_FINITE, f"{update.key}: {tensor} holds NaN or infinity"
        )
    return norm_sq


def _step_shard(
    store: ObjectStore,
    state: Verified | None,
    state_refs: list[ShardRef] | None,
    shard: int,
    current: dict[str, FloatArray],
    grad: dict[str, FloatArray],
    strategy: Strategy,
) -> tuple[dict[str, FloatArray], dict[str, FloatArray]]:
    previous: dict[str, FloatArray] = {}
    if state is not None and state_refs is not None:
        ref = state_refs[shard]
        previous = decode_shard(
            fetch_shard(store, state.directory, ref), ref, "fp32", state.directory + ref.name
        )
    new: dict[str, FloatArray] = {}
    new_state: dict[str, FloatArray] = {}
    for tensor in current:
        slots = {
            s: previous[f"{s}/{tensor}"] for s in strategy.slots if f"{s}/{tensor}" in previous
        }
        new[tensor], stepped = outer_step(strategy, current[tensor], grad[tensor], slots)
        for s, values in stepped.items():
            new_state[f"{s}/{tensor}"] = values
    return new, new_state


def _prefetched(
    pool: ThreadPoolExecutor,
    store: ObjectStore,
    base: Verified,
    accepted: dict[str, Verified],
    names: list[str],
    depth: int,
) -> Iterator[tuple[str, bytes]]:
    """Yield (participant or "" for the base, verified shard bytes) in merge order,
    keeping `depth` fetches in flight ahead of the consumer."""
    jobs: list[tuple[str, str, ShardRef]] = []
    for shard, base_ref in enumerate(base.shards):
        jobs.append(("", base.directory, base_ref))
        jobs += [(n, accepted[n].directory, accepted[n].shards[shard]) for n in names]
    pending: deque[tuple[str, Future[bytes]]] = deque()
    position = 0
    while position < len(jobs) or pending:
        while position < len(jobs) and len(pending) <= depth:
            who, directory, ref = jobs[position]
            pending.append((who, pool.submit(fetch_shard, store, directory, ref)))
            position += 1
        who, future = pending.popleft()
        try:
            data = future.result()
        except Rejected as e:
            if who == "":
                raise
            for _, other in pending:
                other.cancel()
            raise _Rejection(who, e.reason, e.message) from None
        yield who, data


def result_summary(result: Verified) -> dict[str, Any]:
    """The parts of a result that status pages and the CLI show."""
    doc = result.document
    return {
        "round": doc["round"],
        "outcome": doc["outcome"],
        "message": doc["message"],
        "accepted": {a["participant"]: a["weight"] for a in doc["accepted"]},
        "rejected": {r["participant"]: f"{r['reason']}: {r['message']}" for r in doc["rejected"]},
        "metrics": doc["metrics"],
    }
