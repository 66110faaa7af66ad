"""Scale-out aggregation: K parts each merge a disjoint range of shards; one commit.

One aggregator process reads N x model bytes; past some N and model size that is too
much for one pod. Here part k of K (an Indexed Job's pod) takes the shards
`part_shards(S, k, K)` and exchanges what the merge needs from the whole model through
write-once objects signed by the coordinator, `layout.part(round, k, K, phase)`:

1. check: every part reads the same signed manifests and close record (`collect_inputs`,
   so every part makes the same refusals of manifests), then streams its shards of every
   included update through the merge's own checks, refusing nobody: each update's
   per-tensor squared norms, and where one fails, its first failing shard and refusal.
   Without clipping a part also merges its shards optimistically, with the weights of the
   whole included set, which is the final merge when no part finds a bad delta.
2. Every part waits for all K check objects and settles the round alike (`settle`): the
   refusals in the order a single process would find them, its quorum test after each,
   the weights, the norms (summed in the single process's order, so bit-identical), the
   clip scales and the single process's bytesRead and mergePasses. Only if a delta was
   refused or clipping is on does each part merge its shards again (the merge object).
3. Part 0 (or `commit_parts`, any party) waits for every part, then commits the next
   base, optimizer state and result exactly as `aggregate_round` does.

So the result is the same bytes for every K, a re-run of a part finds its objects (or
writes the same bytes again: the merge is a pure function of the stored inputs and
Ed25519 signatures are deterministic), and K = 1 is `aggregate_round` itself. The
validation floor scores whole models and is refused with K > 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tapestry_aggregator import robust
from tapestry_aggregator.merge import (
    Merged,
    RoundInputs,
    ShardsMerged,
    _Rejection,
    aggregate_round,
    attempt_weights,
    check_shards,
    collect_inputs,
    commit_round,
    merge_shards,
    norm_of,
)
from tapestry_aggregator.strategy import Strategy
from tapestry_protocol import documents
from tapestry_protocol.documents import RoundResult
from tapestry_protocol.exchange import COORDINATOR, Verified, read_result
from tapestry_protocol.layout import Layout, check_part
from tapestry_protocol.progress import ProgressCallback
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.shards import ShardRef
from tapestry_protocol.signing import SigningKey, canonical_json, verify
from tapestry_protocol.store import ObjectExists, ObjectNotFound, ObjectStore
from tapestry_telemetry.store import metered

log = logging.getLogger(__name__)

CHECK, MERGE = "check", "merge"
KIND = "AggregationPart"
#: How long a part waits for the others by default: a crashed pod's index is re-run by
#: the Job controller with its backoff, which must fit inside this.
WAIT_S = 3600.0
POLL_S = 1.0


class PartError(Exception):
    """A part's object is not what this run would write (another strategy or close
    record), or does not verify: retrying cannot help."""


class PartsMissing(Exception):
    """Some parts had not written their objects when the wait ran out; a re-run (of this
    index, once the others are done) goes on from what is stored."""


def part_shards(count: int, part: int, parts: int) -> range:
    """Part `part`'s shards of `count`: contiguous, sizes differing by at most one."""
    check_part(part, parts)
    return range(count * part // parts, count * (part + 1) // parts)


def check_parallel(strategy: Strategy, parts: int) -> None:
    """Refuse what a scaled-out aggregation cannot do (ValueError: the caller's mistake)."""
    if parts > 1 and strategy.validation_margin is not None:
        raise ValueError(
            "the validation floor scores whole models, so it cannot run in parts: use "
            f"one aggregator (parts 1), not {parts}, or drop the validation margin"
        )


@dataclass(frozen=True)
class Failure:
    """An update's first failing shard in a part, and the refusal the merge makes."""

    shard: int
    reason: str
    message: str


@dataclass(frozen=True)
class PartCheck:
    squares: dict[str, list[float]]
    failures: dict[str, Failure]
    merged: ShardsMerged | None  # the optimistic merge of the part's shards, if any


@dataclass(frozen=True)
class Settled:
    """The round as a single process would merge it; `inputs` has its refusals."""

    inputs: RoundInputs
    merged: Merged | None  # None: the quorum failed; otherwise base/state not yet known
    scales: dict[str, float]
    optimistic: bool  # the check objects' merges are the final ones


def aggregate_part(
    store: ObjectStore,
    layout: Layout,
    round_number: int,
    signer: SigningKey,
    strategy: Strategy,
    part: int,
    parts: int,
    *,
    prefetch: int = 4,
    wait: float = WAIT_S,
    poll: float = POLL_S,
    progress: ProgressCallback | None = None,
    traceparent: str | None = None,
) -> Verified[RoundResult] | None:
    """Run part `part` of `parts`; part 0 then commits and returns the result, the
    others return None once their objects are stored. Parts 1 is `aggregate_round`."""
    check_part(part, parts)
    check_parallel(strategy, parts)
    if parts == 1:
        return aggregate_round(
            store, layout, round_number, signer, strategy, prefetch=prefetch,
            progress=progress, traceparent=traceparent,
        )  # fmt: skip
    if signer.key_id != COORDINATOR:
        raise ValueError(f"the aggregator signs as {COORDINATOR!r}, not {signer.key_id!r}")
    key = signer.public_key_text
    if store.exists(layout.result(round_number)):
        return read_result(store, layout, round_number, key)
    store = metered(store, layout.federation)
    started = time.monotonic()
    inputs = collect_inputs(store, layout, round_number, key, strategy)
    shards = part_shards(len(inputs.base.document.shards), part, parts)
    exchange = _Exchange(store, layout, inputs, strategy, signer, parts)
    check = exchange.read(part, CHECK)
    if check is None:
        check = exchange.write(part, CHECK, _check(store, layout, inputs, strategy, shards,
                                                   prefetch, progress))  # fmt: skip
    settled = settle(inputs, strategy, exchange.wait_all(CHECK, wait, poll))
    redo = settled.merged is not None and not settled.optimistic
    if redo and settled.merged is not None and exchange.read(part, MERGE) is None:
        merged = merge_shards(
            store, layout, settled.inputs, settled.merged.weights, strategy, prefetch,
            progress, [0], settled.scales, shards,
        )  # fmt: skip
        exchange.write(part, MERGE, PartCheck({}, {}, merged))
    log.info("part %d of %d of round %d: stored in %.1f s", part, parts, round_number,
             time.monotonic() - started)  # fmt: skip
    if part != 0:
        return None
    return commit_parts(
        store, layout, round_number, signer, strategy, parts, wait=wait, poll=poll,
        inputs=inputs,
    )  # fmt: skip


def commit_parts(
    store: ObjectStore,
    layout: Layout,
    round_number: int,
    signer: SigningKey,
    strategy: Strategy,
    parts: int,
    *,
    wait: float = WAIT_S,
    poll: float = POLL_S,
    inputs: RoundInputs | None = None,
) -> Verified[RoundResult]:
    """Once every part is stored, commit the next base, optimizer state and result:
    the same documents `aggregate_round` writes. Idempotent, like them."""
    key = signer.public_key_text
    if store.exists(layout.result(round_number)):
        return read_result(store, layout, round_number, key)
    if inputs is None:
        inputs = collect_inputs(store, layout, round_number, key, strategy)
    exchange = _Exchange(store, layout, inputs, strategy, signer, parts)
    checks = exchange.wait_all(CHECK, wait, poll)
    settled = settle(inputs, strategy, checks)
    merged = settled.merged
    if merged is not None:
        if settled.optimistic:
            pieces = [c.merged for c in checks]
        else:
            pieces = [c.merged for c in exchange.wait_all(MERGE, wait, poll)]
        names = sorted(settled.inputs.updates)
        trimmed = [0] * len(names)
        coordinates = 0
        for piece in pieces:
            assert piece is not None and piece.names == names, "parts merged other updates"
            merged.base += piece.base
            merged.state += piece.state
            trimmed = [a + b for a, b in zip(trimmed, piece.trimmed, strict=True)]
            coordinates += piece.coordinates
        if strategy.combine != "mean":
            lo, hi = robust.kept_ranks(strategy.combine, len(names), strategy.trim)
            robust.record_trimmed(
                strategy.combine, lo, hi, names, np.array(trimmed, dtype=np.int64),
                coordinates, merged.records,
            )  # fmt: skip
    return commit_round(store, layout, settled.inputs, merged, strategy, signer)


def settle(inputs: RoundInputs, strategy: Strategy, checks: list[PartCheck]) -> Settled:
    """Decide the round from every part's checks exactly as `merge_until_quorum` would
    in one process: each attempt refuses the first bad delta in merge order (shard, then
    participant), until none is left or the quorum fails. `inputs` is not changed."""
    inputs = replace(inputs, updates=dict(inputs.updates), refusals=dict(inputs.refusals))
    failures: dict[str, Failure] = {}
    squares: dict[str, list[float]] = {n: [] for n in inputs.updates}
    for check in checks:  # in part order, so in shard order
        for name, failure in check.failures.items():
            failures.setdefault(name, failure)
        for name, values in check.squares.items():
            squares[name] += values
    shard_count = len(inputs.base.document.shards)
    optimistic = not failures and all(c.merged is not None for c in checks)
    passes = bytes_read = 0
    while len(inputs.updates) >= inputs.plan.document.min_participants:
        weights, records = attempt_weights(inputs, strategy)
        names = sorted(inputs.updates)
        bad = [(failures[n].shard, n) for n in names if n in failures]
        stop = min(bad) if bad else None
        for _ in range(2 if strategy.clip != "none" else 1):  # the norm pass, the merge
            passes += 1
            bytes_read += _bytes_before(inputs, names, shard_count, stop)
            if stop is not None:
                break
        if stop is not None:
            failure = failures[stop[1]]
            inputs.refuse(stop[1], failure.reason, failure.message)
            continue
        norms = {n: norm_of(squares[n]) for n in names}
        scales = dict.fromkeys(names, 1.0)
        if strategy.clip != "none":
            scales = robust.clip_scales(strategy, norms, records)
        merged = Merged([], [], weights, norms, bytes_read, passes, records)
        return Settled(inputs, merged, scales, optimistic)
    return Settled(inputs, None, {}, False)


def _bytes_before(
    inputs: RoundInputs, names: list[str], shard_count: int, stop: tuple[int, str] | None
) -> int:
    """The delta bytes one process's pass reads before it meets `stop` (or in all)."""
    total = 0
    for shard in range(shard_count):
        for name in names:
            if (shard, name) == stop:
                return total
            total += inputs.updates[name].document.shards[shard].size
    return total


def _check(
    store: ObjectStore,
    layout: Layout,
    inputs: RoundInputs,
    strategy: Strategy,
    shards: range,
    prefetch: int,
    progress: ProgressCallback | None,
) -> PartCheck:
    """The check pass over the part's shards; without clipping, the optimistic merge,
    falling back to the plain checks where a delta fails."""
    if strategy.clip == "none" and len(inputs.updates) >= inputs.plan.document.min_participants:
        weights, _ = attempt_weights(inputs, strategy)
        squares: dict[str, list[float]] = {}
        try:
            merged = merge_shards(
                store, layout, inputs, weights, strategy, prefetch, progress, [0], None,
                shards, squares,
            )  # fmt: skip
            return PartCheck(squares, {}, merged)
        except _Rejection:
            pass  # somebody's delta fails here: find every failure, merge later
    squares, failures = check_shards(store, inputs, prefetch, shards)
    found = {n: Failure(*f) for n, f in failures.items()}
    return PartCheck({n: v for n, v in squares.items() if n not in found}, found, None)


class _Exchange:
    """The parts' signed, write-once objects of one round, bound to its close record
    and strategy: an object written for other inputs is a PartError, never used."""

    def __init__(
        self,
        store: ObjectStore,
        layout: Layout,
        inputs: RoundInputs,
        strategy: Strategy,
        signer: SigningKey,
        parts: int,
    ) -> None:
        self.store, self.layout, self.signer, self.parts = store, layout, signer, parts
        self.round = inputs.plan.document.round
        strategy_json = canonical_json(strategy.to_json())
        self.binding = {
            "closeSha256": inputs.close.sha256,
            "strategySha256": hashlib.sha256(strategy_json).hexdigest(),
        }

    def _header(self, part: int, phase: str) -> dict[str, Any]:
        return {
            "kind": KIND,
            "federation": self.layout.federation,
            "round": self.round,
            "part": part,
            "parts": self.parts,
            "phase": phase,
            **self.binding,
        }

    def write(self, part: int, phase: str, check: PartCheck) -> PartCheck:
        key = self.layout.part(self.round, part, self.parts, phase)
        body = {**self._header(part, phase), **_to_json(check)}
        data = documents.encode(self.signer.sign(body))
        try:
            self.store.put(key, data, if_absent=True)
        except ObjectExists:
            if self.store.get(key) != data:
                raise PartError(f"{key} exists with other content than this run's") from None
        return check

    def read(self, part: int, phase: str) -> PartCheck | None:
        key = self.layout.part(self.round, part, self.parts, phase)
        try:
            data = self.store.get(key)
        except ObjectNotFound:
            return None
        try:
            raw = json.loads(data)
            verify(raw, COORDINATOR, self.signer.public_key_text)
        except (ValueError, Rejected) as e:
            raise PartError(f"{key} does not verify: {e}") from None
        header = {k: raw.get(k) for k in self._header(part, phase)}
        if header != self._header(part, phase):
            raise PartError(
                f"{key} was written for other inputs (close record or strategy) than this "
                "run's; the round's parts must all run with the same strategy"
            )
        return _from_json(raw)

    def wait_all(self, phase: str, wait: float, poll: float) -> list[PartCheck]:
        """Every part's `phase` object, in part order, waiting up to `wait` seconds."""
        deadline = time.monotonic() + wait
        found: dict[int, PartCheck] = {}
        while True:
            for part in range(self.parts):
                if part not in found and (check := self.read(part, phase)) is not None:
                    found[part] = check
            missing = [p for p in range(self.parts) if p not in found]
            if not missing:
                return [found[p] for p in range(self.parts)]
            if time.monotonic() >= deadline:
                keys = ", ".join(self.layout.part(self.round, p, self.parts, phase)
                                 for p in missing)  # fmt: skip
                raise PartsMissing(
                    f"round {self.round}: {len(missing)} of {self.parts} parts have not "
                    f"written their {phase} object after {wait:g} s (missing {keys}); "
                    "run the missing parts, then this one again"
                )
            time.sleep(poll)


def _to_json(check: PartCheck) -> dict[str, Any]:
    merged = check.merged
    return {
        "squares": check.squares,
        "failures": {
            n: {"shard": f.shard, "reason": f.reason, "message": f.message}
            for n, f in check.failures.items()
        },
        "merged": None if merged is None else {
            "names": merged.names,
            "base": [r.to_json() for r in merged.base],
            "state": [r.to_json() for r in merged.state],
            "trimmed": merged.trimmed,
            "coordinates": merged.coordinates,
        },
    }  # fmt: skip


def _from_json(raw: dict[str, Any]) -> PartCheck:
    merged = raw["merged"]
    return PartCheck(
        {n: [float(v) for v in values] for n, values in raw["squares"].items()},
        {n: Failure(int(f["shard"]), f["reason"], f["message"])
         for n, f in raw["failures"].items()},
        None if merged is None else ShardsMerged(
            list(merged["names"]),
            [ShardRef.from_json(r) for r in merged["base"]],
            [ShardRef.from_json(r) for r in merged["state"]],
            [int(t) for t in merged["trimmed"]],
            int(merged["coordinates"]),
        ),
    )  # fmt: skip
