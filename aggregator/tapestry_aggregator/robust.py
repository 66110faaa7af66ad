"""The robust-aggregation policies, as pure functions the streaming merge calls.

Each policy answers one way a validly signed participant can pull the shared model:

- token cap (`count_tokens`): a claim of more tokens than the plan's batch x steps x seq
  len allows would buy weight; the claim is counted at the cap.
- norm clipping (`clip_scales`): a scaled delta would move the model by its scale; each
  delta is scaled down to a bound, fixed or a multiple of the round's median norm.
- coordinate-wise trimmed mean and median (`combine`): a delta far off in any direction
  is outvoted coordinate by coordinate; every participant counts once (unweighted).

What each did to a participant is recorded in the result (`PolicyRecord`): the figures in
`Contribution.policy`, and an `Adjustment` with a reason code where it changed something.
All arithmetic is float32 or float64 in a fixed order, so a re-run gives the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from tapestry_aggregator.strategy import Strategy
from tapestry_protocol import rejections
from tapestry_protocol.documents import Adjustment, RoundPlan
from tapestry_protocol.shards import FloatArray

#: Columns of one tensor sorted at a time by the coordinate-wise rules: the sort's
#: temporaries are N x this many floats, on top of the N x shard-size stack.
COLUMN_BLOCK = 1 << 16


@dataclass
class PolicyRecord:
    """What the policies did to one participant: figures and adjustments, in order."""

    figures: dict[str, float | str | None] = field(default_factory=dict)
    adjustments: list[Adjustment] = field(default_factory=list)

    def adjust(self, reason: str, message: str) -> None:
        assert reason in rejections.ADJUSTMENTS, reason
        self.adjustments.append(Adjustment(reason, message))


def token_budget(plan: RoundPlan) -> int:
    """The tokens an honest participant trains on: innerSteps x batchSize x seqLen.

    The trainer reports exactly this (`InnerResult.tokens` = steps x batch x seq len,
    the global batch over all its ranks), so a ratio of 1 never caps an honest claim."""
    h = plan.hyperparameters
    return int(h["innerSteps"]) * int(h["batchSize"]) * int(h["seqLen"])


def count_tokens(
    strategy: Strategy,
    plan: RoundPlan,
    claimed: Mapping[str, int],
    records: dict[str, PolicyRecord],
) -> dict[str, int]:
    """The tokens each participant is weighted by: its claim, capped at
    `max_token_ratio` x the plan's budget when that is set (recorded as tokensCounted)."""
    if strategy.max_token_ratio is None:
        return dict(claimed)
    budget = token_budget(plan)
    cap = math.floor(strategy.max_token_ratio * budget)
    counted: dict[str, int] = {}
    for name in sorted(claimed):
        tokens = claimed[name]
        counted[name] = min(tokens, cap)
        record = records.setdefault(name, PolicyRecord())
        record.figures["tokensCounted"] = counted[name]
        if tokens > cap:
            record.adjust(
                rejections.TOKENS_CAPPED,
                f"claimed {tokens} tokens, more than {strategy.max_token_ratio:g} x the plan's "
                f"{budget} (innerSteps x batchSize x seqLen); counted {cap}",
            )
    return counted


def clip_bound(strategy: Strategy, norms: Mapping[str, float]) -> float:
    """The round's L2 bound: `clip_bound` itself (fixed), or `clip_bound` x the median of
    the round's delta norms (median; the mean of the two middle ones for an even count)."""
    assert strategy.clip_bound is not None and strategy.clip != "none"
    if strategy.clip == "fixed":
        return strategy.clip_bound
    ordered = sorted(norms[n] for n in sorted(norms))
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return strategy.clip_bound * median


def clip_scales(
    strategy: Strategy, norms: Mapping[str, float], records: dict[str, PolicyRecord]
) -> dict[str, float]:
    """Each delta's factor min(1, bound / norm), recorded as clipScale and clipBound (the
    norm before clipping is the contribution's deltaNorm); 1 for all without clipping."""
    if strategy.clip == "none":
        return dict.fromkeys(norms, 1.0)
    bound = clip_bound(strategy, norms)
    scales: dict[str, float] = {}
    for name in sorted(norms):
        norm = norms[name]
        scale = 1.0 if norm <= bound else bound / norm
        scales[name] = scale
        record = records.setdefault(name, PolicyRecord())
        record.figures.update({"clipScale": scale, "clipBound": bound})
        if scale < 1.0:
            record.adjust(
                rejections.CLIPPED,
                f"delta norm {norm:.6g} above the {strategy.clip} bound {bound:.6g}; "
                f"scaled by {scale:.6g}",
            )
    return scales


def kept_ranks(rule: str, count: int, trim: float) -> tuple[int, int]:
    """The ranks (0-based, inclusive) whose values a coordinate-wise rule averages among
    `count` sorted values: trimmed-mean drops floor(trim x count) at each end; median
    keeps the middle one, or the middle two for an even count."""
    if rule == "trimmed-mean":
        k = math.floor(trim * count)
        return k, count - 1 - k
    if rule == "median":
        return (count - 1) // 2, count // 2
    raise ValueError(f"{rule!r} is not a coordinate-wise rule")


def combine(stack: FloatArray, lo: int, hi: int, trimmed: npt.NDArray[np.int64]) -> FloatArray:
    """Per coordinate, the mean of the values of ranks lo..hi of `stack` (shape N x ...,
    one row per participant in merge order), in float32.

    Adds to `trimmed[i]` the number of coordinates where row i fell outside the kept
    values (strictly below rank lo's or above rank hi's value, so ties count as kept).
    Sorts COLUMN_BLOCK columns at a time: memory is the stack plus N x COLUMN_BLOCK."""
    count = stack.shape[0]
    flat = stack.reshape(count, -1)
    out = np.empty(flat.shape[1], dtype=np.float32)
    kept = np.float32(hi - lo + 1)
    for start in range(0, flat.shape[1], COLUMN_BLOCK):
        block = flat[:, start : start + COLUMN_BLOCK]
        ordered = np.sort(block, axis=0)
        if lo == hi:
            out[start : start + block.shape[1]] = ordered[lo]
        else:
            total = ordered[lo].copy()
            for rank in range(lo + 1, hi + 1):  # a fixed order of float32 additions
                total += ordered[rank]
            out[start : start + block.shape[1]] = total / kept
        if lo > 0 or hi < count - 1:
            outside = (block < ordered[lo]) | (block > ordered[hi])
            trimmed += outside.sum(axis=1, dtype=np.int64)
    return out.reshape(stack.shape[1:])


def chance_trimmed(lo: int, hi: int, count: int) -> float:
    """The fraction of coordinates a participant is trimmed away at if its values rank
    like everyone else's: (count - kept) / count."""
    return (count - (hi - lo + 1)) / count


def record_trimmed(
    rule: str,
    lo: int,
    hi: int,
    names: list[str],
    trimmed: npt.NDArray[np.int64],
    coordinates: int,
    records: dict[str, PolicyRecord],
) -> None:
    """Record each participant's trimmedFraction, and a Trimmed adjustment for those
    trimmed away more than halfway from chance to always, the sign of an outlier."""
    count = len(names)
    chance = chance_trimmed(lo, hi, count)
    threshold = chance + (1.0 - chance) / 2
    for i, name in enumerate(names):
        fraction = float(trimmed[i]) / coordinates if coordinates else 0.0
        record = records.setdefault(name, PolicyRecord())
        record.figures["trimmedFraction"] = fraction
        if chance > 0 and fraction > threshold:
            record.adjust(
                rejections.TRIMMED,
                f"{fraction:.1%} of its coordinates were left out of the {rule} (by chance "
                f"{chance:.1%} of {count} participants' would be)",
            )
