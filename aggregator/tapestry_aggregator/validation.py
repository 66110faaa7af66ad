"""The validation floor: the coordinator's held-out set scores each delta before the merge.

A participant signs its own update, so a signature proves only who sent it. With
`Strategy.validation_margin` set, the coordinator evaluates every included update's model,
`base - delta` (what the member's own training produced; with an outer learning rate of 1
it is exactly the member's local model), on data that no participant trains on, and
refuses (`WorseOnValidation`) each one whose held-out loss exceeds the base's by more than
the margin. A sign-flipped, scaled or random-direction delta makes the loss much worse and
is refused; an honest delta lowers it (or, late in training, barely moves it).

Memory: the full base plus one candidate model at a time (2 x model size) and one decoded
delta shard, independent of the number of participants. Unlike the merge this needs the
whole model at once, because a loss is a property of a whole model; it is optional for
that reason. The scorer itself is given (the trainer's `tapestry_trainer.scoring` builds
one with torch); this module has no torch.

Deterministic: members are scored in sorted order, each from the same bytes, by a scorer
that evaluates fixed batches. Bad bytes met here are that member's refusal with the same
reason the merge would give (the merge's own guarded decode and checks are used).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from tapestry_protocol import rejections
from tapestry_protocol.exchange import fetch_shard, load_tensors
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.shards import FloatArray
from tapestry_protocol.store import ObjectStore

if TYPE_CHECKING:
    from tapestry_aggregator.merge import RoundInputs

log = logging.getLogger(__name__)


class ValidationError(ValueError):
    """The validation floor cannot be applied as configured (the margin, or a base that
    the held-out set cannot score): the coordinator's setup, not a participant's fault."""


class Scorer(Protocol):
    """The held-out loss (lower is better) of a full model given as named float32 tensors,
    named and shaped as the base. It must be deterministic: the same tensors, the same
    figure, so that a re-run of the aggregation refuses the same updates."""

    def __call__(self, tensors: Mapping[str, FloatArray]) -> float: ...


@dataclass(frozen=True)
class Score:
    """One member's held-out figures (recorded per contribution as validationLoss and
    baseValidationLoss)."""

    participant: str
    loss: float  # held-out loss of base - delta (the member's own model for lr-1 steps)
    base_loss: float


def score_updates(
    store: ObjectStore, inputs: RoundInputs, scorer: Scorer, margin: float
) -> dict[str, Score]:
    """Score every update of `inputs` against the base; refuse those worse by more than
    `margin` (and those whose bytes are bad, with their own reason). Returns the scores
    of all scored members, refused ones included."""
    # Imported here: merge.py calls this module, so a top-level import would be a cycle.
    from tapestry_aggregator.merge import _checked_norm_sq, _guarded_decode, _Rejection

    if not (math.isfinite(margin) and margin >= 0):
        raise ValidationError(f"the validation margin must be a finite number >= 0, got {margin}")
    base = inputs.base
    current = load_tensors(store, base)  # the coordinator's own, verified: errors propagate
    base_loss = float(scorer(current))
    if not math.isfinite(base_loss):
        raise ValidationError(
            f"the base {base.key} scores a held-out loss of {base_loss}; the validation "
            "data or its loader do not fit this model"
        )
    scores: dict[str, Score] = {}
    for name in sorted(inputs.updates):
        update = inputs.updates[name]
        try:
            candidate: dict[str, FloatArray] = {}
            for ref in update.document.shards:
                where = update.directory + ref.name
                try:
                    data = fetch_shard(store, update.directory, ref)
                except Rejected as e:
                    raise _Rejection(name, e.reason, e.message) from None
                delta = _guarded_decode(name, data, ref, update.document.encoding, where)
                for tensor, values in delta.items():
                    _checked_norm_sq(name, where, tensor, values, current[tensor])
                    candidate[tensor] = np.subtract(current[tensor], values, dtype=np.float32)
                del data, delta
        except _Rejection as r:
            inputs.refuse(r.participant, r.reason, r.message)
            continue
        loss = float(scorer(candidate))
        del candidate
        if math.isnan(loss):
            loss = math.inf  # a model that yields NaN is no better than an infinite loss
        scores[name] = Score(name, loss, base_loss)
        log.info("%s: held-out loss %.6g (base %.6g)", name, loss, base_loss)
        if not loss <= base_loss + margin:
            inputs.refuse(
                name,
                rejections.WORSE_ON_VALIDATION,
                f"{update.key}: held-out loss {loss:.6g} is worse than the base's "
                f"{base_loss:.6g} by {loss - base_loss:.6g}, more than the margin {margin:g}",
            )
    return scores
