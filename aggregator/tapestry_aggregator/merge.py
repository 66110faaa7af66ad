"""Merge a closed round's verified deltas into the next base, one shard at a time.

Three steps, each a function:

1. `collect_inputs`: the plan, its base, the close record (which fixes exactly which
   updates the merge uses), the optimizer state that goes with the base, and every
   included update verified; refusals recorded with their reasons.
2. `stream_merge`: for each shard i, the base shard, then every participant's shard i
   (fetched and hashed by background threads, `prefetch` ahead), decoded, checked and
   added into one float32 accumulator; then the outer step for that shard, and the new
   base and optimizer-state shards are uploaded (content-addressed). Peak memory is a few
   shards, whatever the model size or the number of participants. A delta found bad
   mid-stream is refused with its reason and the merge restarts without it.
   The robust policies (robust.py) change this step: with norm clipping a first pass
   (`norm_pass`) streams every update once for its L2 norm, so each delta's scale is known
   before it is added; the coordinate-wise rules (trimmed-mean, median) hold the N decoded
   shard-i deltas at once, so their memory is participants x shard size (plus the sort's
   N x `robust.COLUMN_BLOCK` floats), still independent of the model size.
3. `commit_round`: the next base's and optimizer state's manifests, then the signed
   result, each write-once.

Every output is a pure function of the close record and the stored inputs, so a re-run
from any crash point writes the same bytes and finds its earlier writes already there,
and of two racing aggregators both write the same result. Only store outages and the
aggregator's own bugs fail a run; whatever one participant's bytes hold is that
participant's refusal.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from tapestry_aggregator import robust
from tapestry_aggregator.robust import PolicyRecord
from tapestry_aggregator.strategy import Strategy, compute_weights, outer_step
from tapestry_protocol import rejections
from tapestry_protocol.documents import (
    MAX_TEXT,
    CloseRecord,
    Contribution,
    ModelManifest,
    Outcome,
    Refusal,
    Role,
    RoundPlan,
    RoundResult,
    UpdateManifest,
)
from tapestry_protocol.exchange import (
    COORDINATOR,
    Verified,
    commit_model,
    decode_shard,
    fetch_shard,
    publish_result,
    read_close,
    read_model,
    read_plan,
    read_plan_base,
    read_result,
    read_update,
    upload_shard,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.progress import Phase, ProgressCallback, ProgressEvent
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.shards import FloatArray, ShardRef
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store import ObjectStore, StoreError
from tapestry_telemetry import catalog, metrics, tracing, tracing_enabled
from tapestry_telemetry.catalog import SpanName
from tapestry_telemetry.store import metered

if TYPE_CHECKING:
    from tapestry_aggregator.validation import Score, Scorer

log = logging.getLogger(__name__)


@dataclass
class _Rejection(Exception):
    participant: str
    reason: str
    message: str


@dataclass
class RoundInputs:
    """Everything a merge reads, verified; `refusals` grows as updates fail."""

    plan: Verified[RoundPlan]
    base: Verified[ModelManifest]
    close: Verified[CloseRecord]
    state: Verified[ModelManifest] | None
    updates: dict[str, Verified[UpdateManifest]]
    refusals: dict[str, Refusal] = field(default_factory=dict)

    def refuse(self, participant: str, reason: str, message: str) -> None:
        self.updates.pop(participant, None)
        self.refusals[participant] = Refusal(participant, reason, message[:MAX_TEXT])


@dataclass
class Merged:
    """The uploaded shards of the next base and optimizer state, and what it took."""

    base: list[ShardRef]
    state: list[ShardRef]
    weights: dict[str, float]
    delta_norms: dict[str, float]
    bytes_read: int
    passes: int
    records: dict[str, PolicyRecord] = field(default_factory=dict)


def aggregate_round(
    store: ObjectStore,
    layout: Layout,
    round_number: int,
    signer: SigningKey,
    strategy: Strategy,
    *,
    prefetch: int = 4,
    progress: ProgressCallback | None = None,
    traceparent: str | None = None,
    scorer: Scorer | None = None,
) -> Verified[RoundResult]:
    """Aggregate the closed round `round_number` and publish its signed result.

    Idempotent: a round that has a result returns it; a re-run after a crash yields the
    same bytes. The round must have been closed (`exchange.close_round`). With
    `strategy.validation_margin` set, `scorer` (the coordinator's held-out loss of a full
    model, `validation.Scorer`) scores every update before the merge and those worse than
    the base by more than the margin are refused.

    Its span continues `traceparent` (the round's context, which the coordinator gives
    the aggregator Job), or else the plan's, and links to the span each merged update
    was made in (the manifests' trace context). Telemetry never enters the result."""
    if signer.key_id != COORDINATOR:
        raise ValueError(f"the aggregator signs as {COORDINATOR!r}, not {signer.key_id!r}")
    if strategy.validation_margin is not None and scorer is None:
        raise ValueError(
            f"the strategy sets a validation margin ({strategy.validation_margin:g}) but no "
            "scorer was given: pass the coordinator's held-out set (a validation.Scorer)"
        )
    coordinator_key = signer.public_key_text
    if store.exists(layout.result(round_number)):
        return read_result(store, layout, round_number, coordinator_key)
    store = metered(store, layout.federation)
    started = time.monotonic()
    parent = traceparent or _round_context(store, layout, round_number, coordinator_key)
    attributes: dict[str, str | int] = {
        catalog.FEDERATION: layout.federation,
        catalog.ROUND: round_number,
    }
    with tracing.phase(SpanName.AGGREGATION, parent, attributes) as span:
        with tracing.phase(SpanName.AGGREGATION_COLLECT):
            inputs = collect_inputs(store, layout, round_number, coordinator_key, strategy)
        scores: dict[str, Score] = {}
        if strategy.validation_margin is not None and scorer is not None:
            from tapestry_aggregator.validation import score_updates  # it imports this module

            scores = score_updates(store, inputs, scorer, strategy.validation_margin)
        for name, update in sorted(inputs.updates.items()):
            link = tracing.link_to(update.document.traceparent, {catalog.PARTICIPANT: name})
            if link is not None:
                span.add_link(link.context, link.attributes)
        merge_started = time.monotonic()
        with tracing.phase(SpanName.AGGREGATION_MERGE):
            merged = merge_until_quorum(store, layout, inputs, strategy, prefetch, progress, scores)
        merge_seconds = time.monotonic() - merge_started
        with tracing.phase(SpanName.AGGREGATION_COMMIT):
            result = commit_round(store, layout, inputs, merged, strategy, signer)
        outcome = str(result.document.outcome)
        span.set_attribute(catalog.ROUND_OUTCOME, outcome)
    elapsed = time.monotonic() - started
    instruments = metrics()
    labels = {catalog.FEDERATION: layout.federation}
    instruments.aggregation_duration.record(elapsed, {**labels, catalog.ROUND_OUTCOME: outcome})
    if merged is not None and merge_seconds > 0:
        instruments.aggregation_throughput.set(merged.bytes_read / merge_seconds, labels)
    log.info(
        "round %d of %s: %s in %.1f s", round_number, layout.federation, outcome, elapsed
    )  # fmt: skip
    return result


def _round_context(
    store: ObjectStore, layout: Layout, round_number: int, coordinator_key: str
) -> object:
    """The round's trace context from its plan (read only when tracing is on); a plan
    that cannot be read fails the merge later, with its reason."""
    if not tracing_enabled():
        return None
    try:
        plan = read_plan(store, layout, round_number, coordinator_key)
    except Rejected:
        return None
    return tracing.round_span_context(plan.document.traceparent, plan.sha256)


def collect_inputs(
    store: ObjectStore, layout: Layout, round_number: int, coordinator_key: str, strategy: Strategy
) -> RoundInputs:
    """Read and verify everything the merge uses; a bad update becomes a refusal."""
    plan = read_plan(store, layout, round_number, coordinator_key)
    base = read_plan_base(store, layout, plan, coordinator_key)
    close = read_close(store, layout, round_number, coordinator_key)
    if close.document.plan_sha256 != plan.sha256:
        raise Rejected(rejections.WRONG_PLAN, f"{close.key} closes another plan of this round")
    state = previous_state(store, layout, base, coordinator_key, strategy)
    inputs = RoundInputs(plan, base, close, state, {})
    for excluded in close.document.excluded:
        inputs.refuse(excluded.participant, excluded.reason, excluded.message)
    for included in close.document.included:
        name = included.participant
        try:
            update = _guarded(name, partial(read_update, store, layout, plan, base, name))
            if update.sha256 != included.manifest_sha256:
                raise _Rejection(
                    name, rejections.HASH_MISMATCH, f"{update.key} differs from the closed one"
                )
            inputs.updates[name] = update
        except _Rejection as r:
            inputs.refuse(name, r.reason, r.message)
    return inputs


def previous_state(
    store: ObjectStore,
    layout: Layout,
    base: Verified[ModelManifest],
    coordinator_key: str,
    strategy: Strategy,
) -> Verified[ModelManifest] | None:
    """The optimizer state published with `base`: part of the chain, never guessed.

    Round 0's base starts from zero state, and so does a round whose predecessor used
    another optimizer. Otherwise the predecessor's result names the state, and a
    missing or unverifiable one fails the aggregation instead of resetting momentum."""
    if not strategy.slots:
        return None
    base_round = layout.model_round(base.key)
    if base_round == 0:
        return None
    previous = base_round - 1
    try:
        result = read_result(store, layout, previous, coordinator_key).document
    except Rejected as e:
        raise Rejected(
            rejections.MISSING_OPTIMIZER_STATE,
            f"base {base.key} comes from round {previous}, whose result cannot be read "
            f"({e.reason}: {e.message}); its optimizer state cannot be found",
        ) from None
    if result.next_base is None or result.next_base.sha256 != base.sha256:
        raise Rejected(
            rejections.WRONG_BASE, f"round {previous}'s result did not publish {base.key}"
        )
    if Strategy.from_json(result.strategy).optimizer != strategy.optimizer:
        return None  # a new optimizer starts from zero state
    ref = result.optimizer_state
    if ref is None:
        raise Rejected(
            rejections.MISSING_OPTIMIZER_STATE,
            f"round {previous} used {strategy.optimizer} but its result names no optimizer state",
        )
    try:
        state = read_model(
            store, layout, ref.manifest, coordinator_key, role=Role.OPTIMIZER,
            expected_sha256=ref.sha256,
        )  # fmt: skip
    except Rejected as e:
        raise Rejected(
            rejections.MISSING_OPTIMIZER_STATE,
            f"optimizer state {ref.manifest} of round {previous} does not verify "
            f"({e.reason}: {e.message})",
        ) from None
    expected = [[f"{s}/{t}" for s in strategy.slots for t in g] for g in base.document.groups]
    if state.document.groups != expected:
        raise Rejected(
            rejections.MISSING_OPTIMIZER_STATE,
            f"optimizer state {ref.manifest} does not hold {strategy.optimizer}'s slots for "
            "every tensor of the base",
        )
    return state


def merge_until_quorum(
    store: ObjectStore,
    layout: Layout,
    inputs: RoundInputs,
    strategy: Strategy,
    prefetch: int,
    progress: ProgressCallback | None,
    scores: Mapping[str, Score] | None = None,
) -> Merged | None:
    """Stream the merge; each refusal mid-stream restarts it without that update, until
    it succeeds or fewer updates than the quorum remain (None).

    Each attempt starts the policies afresh (the median norm and the weights depend on
    who is left): tokens counted (cap), then with clipping a norm pass, then the merge."""
    passes = bytes_read = 0
    plan = inputs.plan.document
    while len(inputs.updates) >= plan.min_participants:
        weights, records = attempt_weights(inputs, strategy, scores)
        counter = [0]
        try:
            scales = dict.fromkeys(inputs.updates, 1.0)
            if strategy.clip != "none":
                passes += 1
                norms = norm_pass(store, inputs, prefetch, counter)
                scales = robust.clip_scales(strategy, norms, records)
            passes += 1
            base, state, norms = stream_merge(
                store, layout, inputs, weights, strategy, prefetch, progress, counter,
                scales, records,
            )  # fmt: skip
        except _Rejection as r:
            inputs.refuse(r.participant, r.reason, r.message)
            bytes_read += counter[0]
            continue
        return Merged(base, state, weights, norms, bytes_read + counter[0], passes, records)
    return None


def attempt_weights(
    inputs: RoundInputs, strategy: Strategy, scores: Mapping[str, Score] | None = None
) -> tuple[dict[str, float], dict[str, PolicyRecord]]:
    """One attempt's weights over the updates still in, and its fresh policy records
    (validation scores, then the token cap)."""
    plan = inputs.plan.document
    records: dict[str, PolicyRecord] = {}
    for name, score in sorted((scores or {}).items()):
        if name in inputs.updates:
            records[name] = PolicyRecord(
                {"validationLoss": score.loss, "baseValidationLoss": score.base_loss}
            )
    claimed = {n: u.document.tokens for n, u in inputs.updates.items()}
    counted = robust.count_tokens(strategy, plan, claimed, records)
    if strategy.combine == "mean":
        weights = compute_weights(counted, strategy.weighting, strategy.max_share)
    else:  # coordinate-wise rules: every participant is one vote
        weights = dict.fromkeys(sorted(inputs.updates), 1.0 / len(inputs.updates))
    return weights, records


def norm_of(squares: list[float]) -> float:
    """The L2 norm from per-tensor squared norms added in merge order (shard, then
    tensor), the one order in which every pass and every part sums them."""
    total = 0.0
    for square in squares:
        total += square
    return float(np.sqrt(total))


def norm_pass(
    store: ObjectStore, inputs: RoundInputs, prefetch: int, counter: list[int]
) -> dict[str, float]:
    """Each included delta's L2 norm, in one streaming pass with the merge's checks (a
    bad shard is the same refusal it would be in the merge); one shard at a time."""
    names = sorted(inputs.updates)
    norms_sq = dict.fromkeys(names, 0.0)
    with ThreadPoolExecutor(max_workers=max(1, prefetch)) as pool:
        shards = _shards(pool, store, inputs.base, inputs.updates, names, prefetch)
        for shard, current, deltas in shards:
            for participant, data in deltas:
                update = inputs.updates[participant]
                _, squares = _checked_delta(participant, update, shard, data, current)
                for square in squares:  # the merge's order, so both passes agree exactly
                    norms_sq[participant] += square
                counter[0] += len(data)
    return {n: float(np.sqrt(v)) for n, v in norms_sq.items()}


def commit_round(
    store: ObjectStore,
    layout: Layout,
    inputs: RoundInputs,
    merged: Merged | None,
    strategy: Strategy,
    signer: SigningKey,
) -> Verified[RoundResult]:
    """Commit the next base and optimizer state, then the result (all write-once)."""
    plan = inputs.plan.document
    round_number = plan.round
    next_base = next_state = None
    if merged is not None:
        meta = {"round": round_number, "strategy": strategy.optimizer}
        next_base = commit_model(
            store, layout, round_number + 1, merged.base, signer, Role.BASE,
            inputs.base.document.model, meta,
        )  # fmt: skip
        if strategy.slots:
            next_state = commit_model(
                store, layout, round_number + 1, merged.state, signer, Role.OPTIMIZER, {}, meta
            )
    updates = inputs.updates if merged is not None else {}
    records = merged.records if merged is not None else {}
    accepted = tuple(
        Contribution(
            n,
            merged.weights[n],
            u.document.tokens,
            u.sha256,
            merged.delta_norms[n],
            u.document.metrics,
            tuple(records[n].adjustments) if n in records else (),
            dict(records[n].figures) if n in records else {},
        )
        for n, u in sorted(updates.items())
        if merged is not None
    )
    refused = dict(inputs.refusals)
    if merged is None:  # valid updates that were not merged, because the quorum failed
        for n, u in inputs.updates.items():
            refused[n] = Refusal(n, rejections.NO_QUORUM, f"{u.key} is valid, but the round failed")
    message = (
        f"merged {len(accepted)} of {len(plan.participants)} updates"
        if merged is not None
        else f"{len(inputs.updates)} valid updates, fewer than the quorum of "
        f"{plan.min_participants}"
    )
    result = RoundResult(
        layout.federation,
        round_number,
        Outcome.SUCCEEDED if merged is not None else Outcome.FAILED,
        message,
        inputs.plan.sha256,
        inputs.base.sha256,
        inputs.close.sha256,
        None if next_base is None else next_base.ref,
        None if next_state is None else next_state.ref,
        strategy.to_json(),
        accepted,
        tuple(refused[n] for n in sorted(refused)),
        _round_metrics(accepted, merged),
    )
    return publish_result(store, layout, result, signer)


def _round_metrics(
    accepted: tuple[Contribution, ...], merged: Merged | None
) -> dict[str, float | str | None]:
    known = [(a.weight, a.metrics.get("trainLoss")) for a in accepted]
    losses = [(w, float(v)) for w, v in known if isinstance(v, int | float)]
    loss = None
    if losses and sum(w for w, _ in losses) > 0:
        loss = sum(w * v for w, v in losses) / sum(w for w, _ in losses)
        # Rounding can carry the mean just past its inputs, and so past the schema's range.
        loss = min(max(loss, min(v for _, v in losses)), max(v for _, v in losses))
    return {
        "participants": len(accepted),
        "tokens": sum(a.tokens for a in accepted),
        "trainLoss": loss,
        "bytesRead": merged.bytes_read if merged else 0,
        "mergePasses": merged.passes if merged else 0,
    }


def _guarded(
    participant: str, read: Callable[[], Verified[UpdateManifest]]
) -> Verified[UpdateManifest]:
    """Run one participant's read; whatever its bytes cause is that participant's
    refusal. Store outages propagate: they are nobody's refusal, and a re-run retries."""
    try:
        return read()
    except Rejected as e:
        raise _Rejection(participant, e.reason, e.message) from None
    except StoreError:
        raise
    except Exception as e:
        log.exception("unexpected error reading %s's update; refusing it", participant)
        raise _Rejection(
            participant, rejections.UNREADABLE_UPDATE, f"{type(e).__name__}: {e}"[:1000]
        ) from None


def stream_merge(
    store: ObjectStore,
    layout: Layout,
    inputs: RoundInputs,
    weights: dict[str, float],
    strategy: Strategy,
    prefetch: int,
    progress: ProgressCallback | None,
    counter: list[int],
    scales: Mapping[str, float] | None = None,
    records: dict[str, PolicyRecord] | None = None,
) -> tuple[list[ShardRef], list[ShardRef], dict[str, float]]:
    """One pass over every shard; raises _Rejection naming the first bad update.

    Each delta is multiplied by its clip scale (1 without clipping). The mean adds
    weight x scale x delta into one accumulator per tensor (memory: a few shards); the
    coordinate-wise rules (trimmed-mean, median) first fill an N x tensor stack with the
    scaled deltas of all N participants for the shard, unweighted, and combine it per
    coordinate (memory: N x shard size). The norms returned are those before clipping."""
    squares: dict[str, list[float]] = {}
    out = merge_shards(
        store, layout, inputs, weights, strategy, prefetch, progress, counter, scales,
        squares=squares,
    )  # fmt: skip
    if strategy.combine != "mean":
        lo, hi = robust.kept_ranks(strategy.combine, len(out.names), strategy.trim)
        trimmed = np.array(out.trimmed, dtype=np.int64)
        records = records if records is not None else {}
        robust.record_trimmed(
            strategy.combine, lo, hi, out.names, trimmed, out.coordinates, records
        )
    return out.base, out.state, {n: norm_of(v) for n, v in squares.items()}


@dataclass
class ShardsMerged:
    """A merge of some shards: the uploaded new base and state shards, in shard order,
    and the coordinate-wise rules' tallies (per participant in `names` order)."""

    names: list[str]
    base: list[ShardRef]
    state: list[ShardRef]
    trimmed: list[int]
    coordinates: int


def merge_shards(
    store: ObjectStore,
    layout: Layout,
    inputs: RoundInputs,
    weights: Mapping[str, float],
    strategy: Strategy,
    prefetch: int,
    progress: ProgressCallback | None,
    counter: list[int],
    scales: Mapping[str, float] | None = None,
    shards: Sequence[int] | None = None,
    squares: dict[str, list[float]] | None = None,
) -> ShardsMerged:
    """`stream_merge`'s pass over `shards` (default: all), in order; each update's
    per-tensor squared norms are appended to `squares` in merge order."""
    round_number = inputs.plan.document.round
    base, state, accepted = inputs.base, inputs.state, inputs.updates
    names = sorted(accepted)
    scales = scales if scales is not None else dict.fromkeys(names, 1.0)
    coordinatewise = strategy.combine != "mean"
    lo, hi = robust.kept_ranks(strategy.combine, len(names), strategy.trim) if coordinatewise \
        else (0, len(names) - 1)  # fmt: skip
    trimmed = np.zeros(len(names), dtype=np.int64)
    coordinates = 0
    base_refs = base.document.shards
    norms_sq = squares if squares is not None else {}
    for name in names:
        norms_sq.setdefault(name, [])
    uploads: list[tuple[Future[ShardRef], Future[ShardRef] | None]] = []
    # Reads run `prefetch` ahead on one pool; the new shards upload on another, so
    # writing shard i overlaps reading shard i+1. At most two uploads are in flight.
    with (
        ThreadPoolExecutor(max_workers=max(1, prefetch)) as pool,
        ThreadPoolExecutor(max_workers=1) as writer,
    ):
        for shard, current, deltas in _shards(pool, store, base, accepted, names, prefetch, shards):
            accumulator: dict[str, FloatArray] = {}
            for row, (participant, data) in enumerate(deltas):
                update = accepted[participant]
                delta, shard_squares = _checked_delta(participant, update, shard, data, current)
                norms_sq[participant] += shard_squares
                scale = np.float32(scales[participant])
                weight = np.float32(weights[participant] * scales[participant])
                for tensor, values in delta.items():
                    if coordinatewise:
                        if tensor not in accumulator:
                            shape = (len(names), *values.shape)
                            accumulator[tensor] = np.empty(shape, dtype=np.float32)
                        accumulator[tensor][row] = values if scale == 1 else scale * values
                    elif tensor in accumulator:
                        accumulator[tensor] += weight * values
                    else:
                        accumulator[tensor] = weight * values
                del delta
                counter[0] += len(data)
            if coordinatewise:
                for tensor in list(accumulator):
                    stack = accumulator.pop(tensor)
                    accumulator[tensor] = robust.combine(stack, lo, hi, trimmed)
                    coordinates += stack[0].size
                    del stack
            new, new_state = _step_shard(store, state, shard, current, accumulator, strategy)
            del accumulator
            group = list(base_refs[shard].tensors)
            if len(uploads) >= 2:
                _wait(uploads[-2])
            base_upload = writer.submit(
                upload_shard, store, layout.base_dir(round_number + 1), shard, new, group, "fp32"
            )
            state_upload = None
            if strategy.slots:
                slots = [f"{s}/{t}" for s in strategy.slots for t in group]
                state_upload = writer.submit(
                    upload_shard, store, layout.optimizer_dir(round_number + 1), shard,
                    new_state, slots, "fp32",
                )  # fmt: skip
            uploads.append((base_upload, state_upload))
            if progress:
                progress(ProgressEvent(Phase.MERGE, shard + 1, len(base_refs)))
        out_base = [b.result() for b, _ in uploads]
        out_state = [s.result() for _, s in uploads if s is not None]
    return ShardsMerged(names, out_base, out_state, [int(t) for t in trimmed], coordinates)


def check_shards(
    store: ObjectStore, inputs: RoundInputs, prefetch: int, shards: Sequence[int]
) -> tuple[dict[str, list[float]], dict[str, tuple[int, str, str]]]:
    """The merge's checks of every update on `shards`, refusing nobody: each update's
    per-tensor squared norms in merge order, and for those that fail, the first failing
    shard with its refusal (reason, message), exactly as the merge would refuse it."""
    names = sorted(inputs.updates)
    squares: dict[str, list[float]] = {n: [] for n in names}
    failures: dict[str, tuple[int, str, str]] = {}
    with ThreadPoolExecutor(max_workers=max(1, prefetch)) as pool:
        fetched = _shards(pool, store, inputs.base, inputs.updates, names, prefetch, shards, True)
        for shard, current, deltas in fetched:
            for participant, data in deltas:
                if participant in failures:
                    continue
                try:
                    if isinstance(data, _Rejection):
                        raise data
                    update = inputs.updates[participant]
                    _, shard_squares = _checked_delta(participant, update, shard, data, current)
                except _Rejection as r:
                    failures[participant] = (shard, r.reason, r.message)
                    continue
                squares[participant] += shard_squares
    return squares, failures


def _checked_delta(
    participant: str,
    update: Verified[UpdateManifest],
    shard: int,
    data: bytes,
    current: dict[str, FloatArray],
) -> tuple[dict[str, FloatArray], list[float]]:
    """One participant's decoded shard `shard` and each tensor's squared norm, checked
    against the base shard `current` (shapes, NaN/inf, size); a bad one is its refusal."""
    ref = update.document.shards[shard]
    where = update.directory + ref.name
    delta = _guarded_decode(participant, data, ref, update.document.encoding, where)
    squares = [
        _checked_norm_sq(participant, where, tensor, values, current[tensor])
        for tensor, values in delta.items()
    ]
    return delta, squares


def _guarded_decode(
    participant: str, data: bytes, ref: ShardRef, encoding: str, where: str
) -> dict[str, FloatArray]:
    try:
        return decode_shard(data, ref, encoding, where)
    except Rejected as e:
        raise _Rejection(participant, e.reason, e.message) from None
    except Exception as e:
        log.exception("unexpected error decoding %s; refusing %s's update", where, participant)
        raise _Rejection(
            participant, rejections.UNREADABLE_UPDATE, f"{where}: {type(e).__name__}: {e}"[:1000]
        ) from None


def _wait(pair: tuple[Future[ShardRef], Future[ShardRef] | None]) -> None:
    for future in pair:
        if future is not None:
            future.result()


# A delta's norm must be far inside float32 range so that every derived value (the
# weighted sum, the optimizer step, the recorded norm) stays finite and signable.
MAX_DELTA_NORM = 1e15


def _checked_norm_sq(
    participant: str, where: str, tensor: str, values: FloatArray, base: FloatArray
) -> float:
    """Squared L2 norm of a delta tensor, refusing wrong shapes, NaN/inf and huge values.

    One float32 dot product gives both the norm and the check: it is finite unless a
    value is not, or the squares overflow, which a second look tells apart."""
    if values.shape != base.shape:
        raise _Rejection(
            participant,
            rejections.TENSOR_MISMATCH,
            f"{where}: {tensor} has shape {list(values.shape)}, the base has {list(base.shape)}",
        )
    flat = values.reshape(-1)
    with np.errstate(over="ignore"):  # an overflowing norm is the refusal below, not a warning
        norm_sq = float(np.dot(flat, flat))
    if not np.isfinite(norm_sq) and not np.isfinite(flat).all():
        raise _Rejection(
            participant, rejections.NON_FINITE, f"{where}: {tensor} holds NaN or infinity"
        )
    if not norm_sq <= MAX_DELTA_NORM**2:
        raise _Rejection(
            participant,
            rejections.DELTA_TOO_LARGE,
            f"{where}: {tensor} has an L2 norm above {MAX_DELTA_NORM:g}",
        )
    return norm_sq


def _step_shard(
    store: ObjectStore,
    state: Verified[ModelManifest] | None,
    shard: int,
    current: dict[str, FloatArray],
    grad: dict[str, FloatArray],
    strategy: Strategy,
) -> tuple[dict[str, FloatArray], dict[str, FloatArray]]:
    previous: dict[str, FloatArray] = {}
    if state is not None:
        ref = state.document.shards[shard]
        where = state.directory + ref.name
        previous = decode_shard(fetch_shard(store, state.directory, ref), ref, "fp32", where)
    new: dict[str, FloatArray] = {}
    new_state: dict[str, FloatArray] = {}
    for tensor in current:
        slots = {s: previous[f"{s}/{tensor}"] for s in strategy.slots if previous}
        new[tensor], stepped = outer_step(strategy, current[tensor], grad[tensor], slots)
        for s, values in stepped.items():
            new_state[f"{s}/{tensor}"] = values
    return new, new_state


def _shards(
    pool: ThreadPoolExecutor,
    store: ObjectStore,
    base: Verified[ModelManifest],
    accepted: dict[str, Verified[UpdateManifest]],
    names: list[str],
    depth: int,
    shards: Sequence[int] | None = None,
    tolerant: bool = False,
) -> Iterator[tuple[int, dict[str, FloatArray], Iterator[tuple[str, bytes]]]]:
    """For each shard (of `shards`, default all): its index, the decoded base shard, and
    the participants' verified shard bytes in merge order, with `depth` fetches in flight
    ahead of the consumer. `tolerant`: a participant's bad shard is yielded as its
    _Rejection in place of the bytes (for `check_shards`) instead of raised."""
    indices = range(len(base.document.shards)) if shards is None else shards
    jobs: list[tuple[str, str, ShardRef]] = []
    for shard in indices:
        jobs.append(("", base.directory, base.document.shards[shard]))
        jobs += [(n, accepted[n].directory, accepted[n].document.shards[shard]) for n in names]
    fetched = _prefetched(pool, store, jobs, depth, tolerant)
    for shard in indices:
        base_ref = base.document.shards[shard]
        _, data = next(fetched)
        assert isinstance(data, bytes)  # the base's own failures are raised
        current = decode_shard(data, base_ref, "fp32", base.directory + base_ref.name)
        # Only a tolerant caller (check_shards) sees a _Rejection in place of bytes.
        yield shard, current, (next(fetched) for _ in names)  # type: ignore[misc]


def _prefetched(
    pool: ThreadPoolExecutor,
    store: ObjectStore,
    jobs: list[tuple[str, str, ShardRef]],
    depth: int,
    tolerant: bool = False,
) -> Iterator[tuple[str, bytes | _Rejection]]:
    """Yield (participant or "" for the base, verified shard bytes) in job order."""
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
            if tolerant:
                yield who, _Rejection(who, e.reason, e.message)
                continue
            for _, other in pending:
                other.cancel()
            raise _Rejection(who, e.reason, e.message) from None
        yield who, data
