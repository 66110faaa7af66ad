"""The math of one outer step, as pure NumPy functions on one tensor at a time.

The pseudo-gradient of participant i is `delta_i = base - local_i`; the round's
pseudo-gradient is the weighted sum `g = sum_i w_i * delta_i` (weights sum to 1).

- FedAvg (SGD, lr 1):  new = base - lr * g            (lr 1 = the average of the locals)
- DiLoCo (Nesterov):   m = mu*m + g;  new = base - lr * (g + mu*m)
- FedAdam:             m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;
                       new = base - lr * m / (sqrt(v) + tau)        (Reddi et al., 2021)

All arithmetic is float32 in a fixed order, so a re-run is bit-for-bit identical.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tapestry_protocol.shards import FloatArray

OPTIMIZERS = ("fedavg", "diloco", "fedadam")
WEIGHTINGS = ("tokens", "equal")
CLIP_MODES = ("none", "fixed", "median")
COMBINE_RULES = ("mean", "trimmed-mean", "median")
DEFAULT_LR = {"fedavg": 1.0, "diloco": 0.7, "fedadam": 0.01}
STATE_SLOTS = {"fedavg": (), "diloco": ("momentum",), "fedadam": ("m", "v")}


@dataclass(frozen=True)
class Strategy:
    """How a round's deltas become the next base; stored in every round result."""

    optimizer: str = "diloco"
    learning_rate: float | None = None
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    weighting: str = "tokens"
    max_share: float | None = None
    # Robust policies (robust.py); the defaults leave the weighted mean untouched.
    clip: str = "none"  # none | fixed | median
    clip_bound: float | None = None  # fixed: L2 bound; median: multiple of the median norm
    combine: str = "mean"  # mean (weighted) | trimmed-mean | median (coordinate-wise)
    trim: float = 0.1  # trimmed-mean: fraction dropped at EACH end, per coordinate
    max_token_ratio: float | None = None  # tokens above ratio * batch*steps*seqLen are capped
    validation_margin: float | None = None  # refuse a delta whose held-out loss is worse by more

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown outer optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}"
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"unknown weighting {self.weighting!r}; use one of {', '.join(WEIGHTINGS)}"
            )
        if self.max_share is not None and not 0 < self.max_share <= 1:
            raise ValueError(f"max_share must be in (0, 1], got {self.max_share}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        self._check_robust()

    def _check_robust(self) -> None:
        if self.clip not in CLIP_MODES:
            raise ValueError(f"unknown clip mode {self.clip!r}; use one of {', '.join(CLIP_MODES)}")
        if self.clip == "none":
            if self.clip_bound is not None:
                raise ValueError("clip_bound is set but clip is 'none'; use clip fixed or median")
        elif self.clip_bound is None or not _finite(self.clip_bound) or self.clip_bound <= 0:
            raise ValueError(
                f"clip {self.clip!r} needs a positive, finite clip_bound, got {self.clip_bound}"
            )
        if self.combine not in COMBINE_RULES:
            raise ValueError(
                f"unknown combine rule {self.combine!r}; use one of {', '.join(COMBINE_RULES)}"
            )
        if not (_finite(self.trim) and 0 <= self.trim < 0.5):
            raise ValueError(f"trim must be in [0, 0.5), got {self.trim}")
        if self.max_token_ratio is not None and not (
            _finite(self.max_token_ratio) and self.max_token_ratio >= 1
        ):
            raise ValueError(
                f"max_token_ratio must be at least 1 (an honest update claims ratio 1), "
                f"got {self.max_token_ratio}"
            )
        if self.validation_margin is not None and not (
            _finite(self.validation_margin) and self.validation_margin >= 0
        ):
            raise ValueError(
                f"validation_margin must be a finite number >= 0, got {self.validation_margin}"
            )

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.optimizer]

    @property
    def slots(self) -> tuple[str, ...]:
        return STATE_SLOTS[self.optimizer]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "learning_rate": self.lr}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Strategy:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown strategy fields {unknown}; known: {sorted(known)}")
        return cls(**dict(data))


def add_robust_arguments(parser: argparse.ArgumentParser) -> None:
    """The robust policies' flags, shared by `tapestry aggregate` and `tapestry local run`
    (read back by `robust_from_args`; the Strategy checks the values)."""
    group = parser.add_argument_group("robust aggregation", "see docs/aggregator.md")
    group.add_argument(
        "--clip", default=Strategy.clip, choices=CLIP_MODES,
        help="norm clipping of each delta (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--clip-bound", type=float, default=None, metavar="X",
        help="fixed: the L2 bound; median: the multiple of the round's median delta norm",
    )  # fmt: skip
    group.add_argument(
        "--combine", default=Strategy.combine, choices=COMBINE_RULES,
        help="how the deltas are combined (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--trim", type=float, default=Strategy.trim, metavar="FRACTION",
        help="trimmed-mean: fraction dropped at each end per coordinate (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--max-token-ratio", type=float, default=None, metavar="RATIO",
        help="count no claim above RATIO x the plan's innerSteps x batchSize x seqLen",
    )  # fmt: skip


def robust_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The Strategy fields of the flags `add_robust_arguments` adds."""
    return {
        "clip": args.clip,
        "clip_bound": args.clip_bound,
        "combine": args.combine,
        "trim": args.trim,
        "max_token_ratio": args.max_token_ratio,
    }


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and bool(np.isfinite(value))


def compute_weights(
    tokens: Mapping[str, int], weighting: str = "tokens", max_share: float | None = None
) -> dict[str, float]:
    """Each accepted participant's share of the round, summing to 1.

    With `max_share` no participant gets more than that share (anti-capture); the
    excess goes to the others in proportion to their weights. If the cap cannot be met
    (cap * participants < 1), everyone gets an equal share.
    """
    names = sorted(tokens)
    if not names:
        return {}
    if weighting == "equal" or sum(tokens.values()) == 0:
        raw = {n: 1.0 for n in names}
    elif weighting == "tokens":
        raw = {n: float(tokens[n]) for n in names}
    else:
        raise ValueError(f"unknown weighting {weighting!r}")
    total = sum(raw.values())
    weights = {n: raw[n] / total for n in names}
    if max_share is None:
        return weights
    if max_share * len(names) < 1:
        return {n: 1.0 / len(names) for n in names}
    capped: set[str] = set()
    while True:
        over = {n for n in names if n not in capped and weights[n] > max_share + 1e-12}
        if not over:
            return weights
        capped |= over
        free = [n for n in names if n not in capped]
        remaining = 1.0 - max_share * len(capped)
        free_total = sum(raw[n] for n in free)
        weights = {n: max_share for n in capped}
        for n in free:
            weights[n] = remaining * raw[n] / free_total if free_total else 0.0


def outer_step(
    strategy: Strategy,
    base: FloatArray,
    grad: FloatArray,
    state: Mapping[str, FloatArray],
) -> tuple[FloatArray, dict[str, FloatArray]]:
    """One outer-optimizer step for one tensor; returns the new base and new state."""
    lr = np.float32(strategy.lr)
    if strategy.optimizer == "fedavg":
        return (base - lr * grad).astype(np.float32), {}
    if strategy.optimizer == "diloco":
        mu = np.float32(strategy.momentum)
        momentum = mu * state.get("momentum", np.zeros_like(base)) + grad
        new = base - lr * (grad + mu * momentum)
        return new.astype(np.float32), {"momentum": momentum.astype(np.float32)}
    b1, b2, tau = np.float32(strategy.beta1), np.float32(strategy.beta2), np.float32(strategy.tau)
    m = b1 * state.get("m", np.zeros_like(base)) + (np.float32(1) - b1) * grad
    v = b2 * state.get("v", np.zeros_like(base)) + (np.float32(1) - b2) * grad * grad
    new = base - lr * m / (np.sqrt(v) + tau)
    return new.astype(np.float32), {"m": m.astype(np.float32), "v": v.astype(np.float32)}
