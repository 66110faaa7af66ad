"""Attacks on the merge, the robust policies against them, and the harness that measures
each attack x policy: one definition for tests/aggregator/test_adversarial.py (small, in
CI) and bench/robust.py (the table in docs/benchmarks.md).

Honest deltas are trained once, with the real participant entry point
(`tapestry_trainer.participant`) on real text, one data set per member. Each attack then
replaces the updates of its attackers (the last members), and every attack x policy goes
through the real protocol in a federation of its own on a filesystem store: the base and
a signed plan, signed updates (`publish_update`), the close record, `aggregate_round`.

What is measured, per attack x policy:

- what happened to each attacker: refused (reason) or merged with adjustments (reasons);
- movement: ||new - honest|| / ||honest - base||, where honest is the merge of the honest
  members alone under the same policy (1.0 = the attack moved the model by one whole
  honest round's step);
- pooled validation loss: the mean held-out loss over the members' validation splits,
  against the all-honest run (every member sends its honest delta) of the same policy;
- the policy's stated movement bound (`movement_bound`), which the measurement must meet.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tapestry_aggregator.merge import aggregate_round
from tapestry_aggregator.strategy import Strategy
from tapestry_protocol import rejections
from tapestry_protocol.documents import CloseTrigger, RoundResult
from tapestry_protocol.exchange import (
    COORDINATOR,
    close_round,
    decode_shard,
    fetch_shard,
    load_tensors,
    make_plan,
    publish_model,
    publish_plan,
    publish_update,
    read_model,
    read_update,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.shards import FloatArray, plan_shards
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store.filesystem import FilesystemStore
from tapestry_trainer.specs import InnerConfig, ModelSpec

Delta = dict[str, FloatArray]

#: Every federation of the harness closes its round at this instant (reproducible bytes).
CLOSED_AT = datetime(2030, 1, 1, tzinfo=UTC)
#: A poison's norm, in median honest norms: large, yet far below the merge's hard limit.
POISON_SCALE = 100.0
#: The colluders' common delta: the honest members' mean, reversed and scaled by this.
COLLUSION_SCALE = -10.0


# --- the attacks -----------------------------------------------------------------------


def norm(delta: Mapping[str, FloatArray]) -> float:
    """L2 norm of a whole delta, in float64."""
    return math.sqrt(sum(float(np.dot(v.reshape(-1).astype(np.float64), v.reshape(-1)))
                         for v in delta.values()))  # fmt: skip


def scaled(delta: Mapping[str, FloatArray], factor: float) -> Delta:
    return {n: (np.float32(factor) * v).astype(np.float32) for n, v in delta.items()}


def mean_of(deltas: Sequence[Mapping[str, FloatArray]]) -> Delta:
    return {
        n: np.mean([d[n].astype(np.float64) for d in deltas], axis=0).astype(np.float32)
        for n in deltas[0]
    }


def constant_direction(like: Mapping[str, FloatArray], length: float) -> Delta:
    """Every coordinate the same positive value, `length` long in all."""
    count = sum(v.size for v in like.values())
    value = np.float32(length / math.sqrt(count))
    return {n: np.full(v.shape, value, dtype=np.float32) for n, v in like.items()}


def random_direction(like: Mapping[str, FloatArray], length: float, seed: int = 7) -> Delta:
    """A fixed random direction (seeded), `length` long."""
    rng = np.random.default_rng(seed)
    raw = {n: rng.standard_normal(v.shape) for n, v in like.items()}
    total = math.sqrt(sum(float((r * r).sum()) for r in raw.values()))
    return {n: (r * (length / total)).astype(np.float32) for n, r in raw.items()}


def with_nan(delta: Mapping[str, FloatArray]) -> Delta:
    """The delta with one NaN in its first tensor: signed, well-formed, and poisonous."""
    out = {n: v.copy() for n, v in delta.items()}
    first = next(iter(out))
    out[first].reshape(-1)[0] = np.nan
    return out


@dataclass(frozen=True)
class AttackInput:
    """What an attacker builds its update from: its own honest delta, the honest members'
    deltas (an omniscient attacker), and the honest token claim."""

    own: Delta
    honest: list[Delta]
    tokens: int

    @property
    def median_norm(self) -> float:
        return float(np.median([norm(d) for d in [*self.honest, self.own]]))


@dataclass(frozen=True)
class Attack:
    """Who attacks (the last `attackers` of `members`) and what each sends."""

    name: str
    label: str
    members: int
    attackers: int
    poison: Callable[[AttackInput], Delta]
    token_factor: int = 1
    #: The undefended mean must move the model by more than one honest step.
    big: bool = True
    #: A malformed update: refused with this reason under every policy.
    malformed: str | None = None

    def updates(self, attack: AttackInput) -> tuple[Delta, int]:
        return self.poison(attack), attack.tokens * self.token_factor


ATTACKS: tuple[Attack, ...] = (
    Attack("scaled-x10", "scaled x10", 4, 1, lambda a: scaled(a.own, 10.0)),
    Attack("scaled-x100", "scaled x100", 4, 1, lambda a: scaled(a.own, 100.0)),
    Attack("scaled-x1e4", "scaled x1e4", 4, 1, lambda a: scaled(a.own, 1e4)),
    Attack("sign-flip", "sign flip", 4, 1, lambda a: scaled(a.own, -1.0), big=False),
    Attack(
        "constant-poison",
        "constant direction, 100x norm",
        4,
        1,
        lambda a: constant_direction(a.own, POISON_SCALE * a.median_norm),
    ),
    Attack(
        "random-poison",
        "random direction, 100x norm",
        4,
        1,
        lambda a: random_direction(a.own, POISON_SCALE * a.median_norm),
    ),
    Attack(
        "inflated-tokens",
        "tokens x100, sign flip",
        4,
        1,
        lambda a: scaled(a.own, -1.0),
        token_factor=100,
    ),
    Attack(
        "collude-1-of-4",
        "1 of 4: -10 x honest mean",
        4,
        1,
        lambda a: scaled(mean_of(a.honest), COLLUSION_SCALE),
    ),
    Attack(
        "collude-2-of-7",
        "2 of 7: -10 x honest mean",
        7,
        2,
        lambda a: scaled(mean_of(a.honest), COLLUSION_SCALE),
    ),
    Attack(
        "malformed-nan",
        "malformed: a NaN",
        4,
        1,
        lambda a: with_nan(a.own),
        big=False,
        malformed=rejections.NON_FINITE,
    ),
)
ATTACKS_BY_NAME = {a.name: a for a in ATTACKS}


# --- the policies ----------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """What an operator would set from a rehearsal round: the honest median norm."""

    median_norm: float

    @property
    def fixed_bound(self) -> float:
        """Twice the honest median norm, rounded up to two significant digits."""
        raw = 2.0 * self.median_norm
        digits = 10.0 ** (math.floor(math.log10(raw)) - 1)
        return math.ceil(raw / digits) * digits


#: Median clipping's factor, the trimmed mean's fraction (per end: floor(0.3 n) >= the
#: attackers for 1 of 4 and 2 of 7), the token cap's ratio, the validation margin.
MEDIAN_FACTOR = 2.0
TRIM = 0.3
TOKEN_RATIO = 1.0
VALIDATION_MARGIN = 0.05
#: The stated loss bounds (see Policy.loss_bound): empirical, measured on the demo task
#: (bench/robust.py) and the CI setup with a margin; the movement bounds are the
#: guarantees. A clipped minority pushing against the consensus with its whole clip
#: bound can undo about one round's gain (2 of 7 at twice the median norm: 1.3 of it);
#: the coordinate-wise rules stay inside the honest values (0.56); the validation floor
#: leaves the honest merge, which lacks the refused member's data (0.28 when that member
#: is the only one of its language). The token cap's is exact instead: an inflated claim
#: is merged exactly as the same update with an honest claim.
CLIP_LOSS_BOUND = 1.5
COORDINATE_LOSS_BOUND = 0.75
VALIDATION_LOSS_BOUND = 0.5


@dataclass(frozen=True)
class Policy:
    """A robust-aggregation setting of the Strategy, and the attacks it defends against
    (for those the attacker must be refused or neutralised with `reasons`)."""

    name: str
    label: str
    settings: Callable[[Calibration], dict[str, Any]]
    defends: frozenset[str]
    reasons: frozenset[str]
    #: For the attacks it defends: the share of the all-honest round's gain in pooled
    #: validation loss (base - all honest) that an attack may cost at most.
    loss_bound: float | None = None
    needs_scorer: bool = False

    def strategy(self, calibration: Calibration) -> Strategy:
        return Strategy(**self.settings(calibration))

    @property
    def available(self) -> bool:
        """Whether this build's Strategy has the policy's fields (and scorer)."""
        known = {f.name for f in fields(Strategy)}
        if not set(self.settings(Calibration(1.0))) <= known:
            return False
        if self.needs_scorer:
            try:
                import tapestry_trainer.scoring  # noqa: F401
            except ImportError:
                return False
        return True


_LARGE = frozenset(
    {"scaled-x10", "scaled-x100", "scaled-x1e4", "constant-poison", "random-poison",
     "collude-1-of-4", "collude-2-of-7"}
)  # fmt: skip
POLICIES: tuple[Policy, ...] = (
    Policy("mean", "mean (no defence)", lambda c: {}, frozenset(), frozenset()),
    Policy(
        "clip-fixed",
        "fixed clipping",
        lambda c: {"clip": "fixed", "clip_bound": c.fixed_bound},
        _LARGE,
        frozenset({rejections.CLIPPED}),
        CLIP_LOSS_BOUND,
    ),
    Policy(
        "clip-median",
        "median-relative clipping",
        lambda c: {"clip": "median", "clip_bound": MEDIAN_FACTOR},
        _LARGE,
        frozenset({rejections.CLIPPED}),
        CLIP_LOSS_BOUND,
    ),
    Policy(
        "trimmed-mean",
        "trimmed mean",
        lambda c: {"combine": "trimmed-mean", "trim": TRIM},
        _LARGE,
        frozenset({rejections.TRIMMED}),
        COORDINATE_LOSS_BOUND,
    ),
    Policy(
        "median",
        "coordinate-wise median",
        lambda c: {"combine": "median"},
        _LARGE,
        frozenset({rejections.TRIMMED}),
        COORDINATE_LOSS_BOUND,
    ),
    Policy(
        "token-cap",
        "token cap",
        lambda c: {"max_token_ratio": TOKEN_RATIO},
        frozenset({"inflated-tokens"}),
        frozenset({rejections.TOKENS_CAPPED}),
    ),
    Policy(
        "validation",
        "validation floor",
        lambda c: {"validation_margin": VALIDATION_MARGIN},
        _LARGE | {"sign-flip", "inflated-tokens"},
        frozenset({rejections.WORSE_ON_VALIDATION}),
        VALIDATION_LOSS_BOUND,
        needs_scorer=True,
    ),
)
POLICIES_BY_NAME = {p.name: p for p in POLICIES}


def step_scale(strategy: Strategy) -> float:
    """new = base - scale x g for round 0 (zero optimizer state): lr for FedAvg,
    lr x (1 + momentum) for DiLoCo's Nesterov step."""
    if strategy.optimizer == "fedavg":
        return strategy.lr
    if strategy.optimizer == "diloco":
        return strategy.lr * (1.0 + strategy.momentum)
    raise ValueError("the movement bounds are stated for the linear outer steps only")


# --- the setup: members, their data, honest training -------------------------------------


@dataclass(frozen=True)
class Setup:
    """The model, inner training and each member's data; `holdout` is the coordinator's
    own held-out shard set (the validation floor scores on it; nobody trains on it)."""

    spec: ModelSpec
    config: InnerConfig
    data: dict[str, Path]
    holdout: Path
    shard_bytes: int = 64 << 10
    warmup_rounds: int = 1

    @property
    def members(self) -> list[str]:
        return list(self.data)


@dataclass
class Honest:
    """The round-0 base and every member's honest, really trained update."""

    base: Delta
    groups: list[list[str]]
    deltas: dict[str, Delta]
    tokens: dict[str, int]
    metrics: dict[str, dict[str, float | str | None]]
    keys: dict[str, SigningKey]
    coordinator: SigningKey


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A work directory in memory (tmpfs) where the machine has one: the stores here
    fsync every object, which on a disk costs more than the merges themselves."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="tapestry-adversarial-", dir=parent))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """The participant entry point in this process, as one torchrun rank of one."""
    saved = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def train_honest(setup: Setup, workdir: Path) -> Honest:
    """Every member trains through the real participant entry point: `warmup_rounds`
    federated rounds (merged by the default strategy) make a base that has learnt
    something, and the next round's deltas are the honest ones, read back from the store
    and verified. (From freshly initialised weights a sign-flipped delta is nearly as good
    as the honest one: the first step's changes of the tied embeddings and the layers
    multiply, and flipping both keeps their product.)"""
    from tapestry_trainer.baseline import initial_arrays

    store = FilesystemStore(workdir / "training-store", create=True)
    layout = Layout("honest")
    coordinator = SigningKey.generate(COORDINATOR)
    keys = {name: SigningKey.generate(name) for name in setup.members}
    for key in keys.values():
        key.save(workdir / "keys")
    arrays = initial_arrays(setup.spec)
    groups = plan_shards([(n, a.nbytes) for n, a in arrays.items()], setup.shard_bytes)
    base = publish_model(store, layout, 0, arrays, groups, coordinator, model=setup.spec.to_dict())
    with _single_process(), _torch_threads(1):
        for r in range(setup.warmup_rounds + 1):
            plan = publish_plan(store, layout, _plan(layout, base, setup, keys, r), coordinator)
            for name in setup.members:
                _train(setup, workdir, store, layout, name, r, coordinator)
            if r == setup.warmup_rounds:
                break
            close_round(store, layout, plan, coordinator, CloseTrigger.ALL_REPORTED, CLOSED_AT)
            result = aggregate_round(store, layout, r, coordinator, Strategy())
            ref = result.document.next_base
            assert ref is not None, result.document.message
            base = read_model(
                store, layout, ref.manifest, coordinator.public_key_text,
                expected_sha256=ref.sha256,
            )  # fmt: skip
    deltas: dict[str, Delta] = {}
    tokens: dict[str, int] = {}
    metrics: dict[str, dict[str, float | str | None]] = {}
    for name in setup.members:
        update = read_update(store, layout, plan, base, name)
        delta: Delta = {}
        for shard in update.document.shards:
            data = fetch_shard(store, update.directory, shard)
            delta.update(decode_shard(data, shard, update.document.encoding, shard.name))
        deltas[name] = delta
        tokens[name] = update.document.tokens
        metrics[name] = dict(update.document.metrics)
    return Honest(load_tensors(store, base), groups, deltas, tokens, metrics, keys, coordinator)


def _train(
    setup: Setup,
    workdir: Path,
    store: FilesystemStore,
    layout: Layout,
    name: str,
    round_number: int,
    coordinator: SigningKey,
) -> None:
    """One member's share of a round: `python -m tapestry_trainer.participant`, here."""
    from tapestry_trainer import participant

    argv = [
        "--store", str(store.root), "--federation", layout.federation,
        "--round", str(round_number), "--name", name,
        "--key", str(workdir / "keys" / f"{name}.key"),
        "--coordinator-key", coordinator.public_key_text, "--data", str(setup.data[name]),
        "--workdir", str(workdir / "work"),
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # its one-line JSON summary
        code = participant.main(argv)
    if code != 0:
        raise RuntimeError(f"honest training of {name} in round {round_number} exited {code}")


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Few threads: on a shared two-core machine more only contend (and tiny models
    gain nothing from them)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _plan(
    layout: Layout,
    base: Any,
    setup: Setup,
    keys: Mapping[str, SigningKey],
    round_number: int = 0,
) -> Any:
    return make_plan(
        layout, round_number, base, model=setup.spec.to_dict(),
        hyperparameters=setup.config.to_dict(),
        participants={n: k.public_key_text for n, k in keys.items()}, min_participants=1,
        deadline="2030-01-01T00:00:00Z",
    )  # fmt: skip


# --- one merge, and one attack x policy --------------------------------------------------


@dataclass(frozen=True)
class Merge:
    """One federation's round: its signed result and the next base's tensors."""

    result: RoundResult
    new: Delta


@dataclass
class Case:
    """One attack x policy, measured."""

    attack: str
    policy: str
    members: list[str]
    attackers: list[str]
    refused: dict[str, str]  # attacker -> reason
    adjusted: dict[str, list[str]]  # attacker -> adjustment reasons
    figures: dict[str, dict[str, float | str | None]]  # attacker -> policy figures
    honest_refused: dict[str, str]
    honest_adjusted: dict[str, list[str]]
    attacker_weight: float
    movement: float
    bound: float | None
    loss: float
    all_honest_loss: float
    honest_only_loss: float
    base_loss: float

    @property
    def neutralised(self) -> bool:
        return bool(self.refused) or bool(self.adjusted)

    @property
    def loss_change(self) -> float:
        return self.loss - self.all_honest_loss

    @property
    def gain_lost(self) -> float:
        """The share of the all-honest round's gain (base - all honest) the attack cost."""
        return self.loss_change / (self.base_loss - self.all_honest_loss)

    def to_json(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "policy": self.policy,
            "members": len(self.members),
            "attackers": self.attackers,
            "refused": self.refused,
            "adjusted": self.adjusted,
            "attackerFigures": self.figures,
            "honestRefused": self.honest_refused,
            "honestAdjusted": self.honest_adjusted,
            "attackerWeight": self.attacker_weight,
            "movement": self.movement,
            "movementBound": self.bound,
            "validationLoss": self.loss,
            "allHonestValidationLoss": self.all_honest_loss,
            "honestOnlyValidationLoss": self.honest_only_loss,
            "baseValidationLoss": self.base_loss,
            "lossChange": self.loss_change,
            "gainLost": self.gain_lost,
        }


@dataclass
class Harness:
    """Runs attack x policy merges over one set of honest deltas, caching the honest
    reference merges and the evaluations (identical models are evaluated once)."""

    setup: Setup
    honest: Honest
    root: Path
    store: FilesystemStore = field(init=False)
    calibration: Calibration = field(init=False)
    _merges: dict[str, Merge] = field(default_factory=dict, init=False)
    _losses: dict[tuple[int, bytes], float] = field(default_factory=dict, init=False)
    _scorer: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.store = FilesystemStore(self.root / "store", create=True)
        norms = [norm(d) for d in self.honest.deltas.values()]
        self.calibration = Calibration(float(np.median(norms)))

    def merge(
        self, federation: str, updates: Mapping[str, tuple[Delta, int]], policy: Policy
    ) -> Merge:
        """The real protocol for one round of `federation`: base, plan, signed updates,
        close, aggregate (idempotent per federation name)."""
        if federation in self._merges:
            return self._merges[federation]
        layout, setup, honest = Layout(federation), self.setup, self.honest
        coordinator = honest.coordinator
        keys = {n: honest.keys[n] for n in updates}
        base = publish_model(
            self.store, layout, 0, honest.base, honest.groups, coordinator,
            model=setup.spec.to_dict(),
        )  # fmt: skip
        plan = publish_plan(self.store, layout, _plan(layout, base, setup, keys), coordinator)
        for name, (delta, tokens) in sorted(updates.items()):
            publish_update(
                self.store, layout, plan, base, delta, keys[name], tokens=tokens,
                metrics=honest.metrics[name],
            )  # fmt: skip
        close_round(self.store, layout, plan, coordinator, CloseTrigger.ALL_REPORTED, CLOSED_AT)
        scorer = None
        if policy.needs_scorer:
            if self._scorer is None:
                from tapestry_trainer.scoring import plan_scorer

                self._scorer = plan_scorer(plan.document, setup.holdout)
            scorer = self._scorer
        strategy = policy.strategy(self.calibration)
        key = coordinator.public_key_text
        result = aggregate_round(self.store, layout, 0, coordinator, strategy, scorer=scorer)
        ref = result.document.next_base
        assert ref is not None, f"{federation}: {result.document.message}"
        new_base = read_model(self.store, layout, ref.manifest, key, expected_sha256=ref.sha256)
        merged = Merge(result.document, load_tensors(self.store, new_base))
        self._merges[federation] = merged
        return merged

    def loss(self, arrays: Mapping[str, FloatArray], members: Sequence[str]) -> float:
        """Pooled held-out loss: the mean over `members`' validation splits."""
        from tapestry_trainer.baseline import evaluate_arrays

        digest = b"".join(_digest(arrays[n]) for n in sorted(arrays))
        key = (len(members), digest)
        if key not in self._losses:
            data = [str(self.setup.data[m]) for m in members]
            losses = evaluate_arrays(self.setup.spec, arrays, data, self.setup.config)
            self._losses[key] = float(np.mean(losses))
        return self._losses[key]

    def honest_only(self, members: int, attackers: int, policy: Policy) -> Merge:
        names = self.setup.members[: members - attackers]
        return self.merge(
            f"honest-{members}-{attackers}-{policy.name}",
            {n: (self.honest.deltas[n], self.honest.tokens[n]) for n in names}, policy,
        )  # fmt: skip

    def all_honest(self, members: int, policy: Policy) -> Merge:
        names = self.setup.members[:members]
        return self.merge(
            f"all-honest-{members}-{policy.name}",
            {n: (self.honest.deltas[n], self.honest.tokens[n]) for n in names}, policy,
        )  # fmt: skip

    def run(self, attack: Attack, policy: Policy) -> Case:
        """One attack x policy through the real merge, measured against its references."""
        with _torch_threads(1):
            return self._run(attack, policy)

    def _run(self, attack: Attack, policy: Policy) -> Case:
        members = self.setup.members[: attack.members]
        honest_names = members[: attack.members - attack.attackers]
        attackers = members[len(honest_names) :]
        honest = [self.honest.deltas[n] for n in honest_names]
        updates = {n: (self.honest.deltas[n], self.honest.tokens[n]) for n in honest_names}
        for name in attackers:
            attack_input = AttackInput(self.honest.deltas[name], honest, self.honest.tokens[name])
            updates[name] = attack.updates(attack_input)
        merged = self.merge(f"{attack.name}-{policy.name}", updates, policy)
        reference = self.honest_only(attack.members, attack.attackers, policy)
        everyone = self.all_honest(attack.members, policy)
        result = merged.result
        refused = {r.participant: r.reason for r in result.rejected}
        accepted = {a.participant: a for a in result.accepted}
        base = self.honest.base
        step = _distance(reference.new, base)
        movement = _distance(merged.new, reference.new) / step
        strategy = policy.strategy(self.calibration)
        honest_step = step / step_scale(strategy)  # ||g_h||, the honest pseudo-gradient
        bound = movement_bound(
            policy, strategy, updates, honest, attackers, accepted, refused, honest_step,
            self.calibration,
        )  # fmt: skip
        return Case(
            attack=attack.name,
            policy=policy.name,
            members=members,
            attackers=attackers,
            refused={n: refused[n] for n in attackers if n in refused},
            adjusted={
                n: [a.reason for a in accepted[n].adjustments]
                for n in attackers
                if n in accepted and accepted[n].adjustments
            },
            figures={n: dict(accepted[n].policy) for n in attackers if n in accepted},
            honest_refused={n: refused[n] for n in honest_names if n in refused},
            honest_adjusted={
                n: [a.reason for a in accepted[n].adjustments]
                for n in honest_names
                if n in accepted and accepted[n].adjustments
            },
            attacker_weight=sum(accepted[n].weight for n in attackers if n in accepted),
            movement=movement,
            bound=bound,
            loss=self.loss(merged.new, members),
            all_honest_loss=self.loss(everyone.new, members),
            honest_only_loss=self.loss(reference.new, members),
            base_loss=self.loss(base, members),
        )


def _digest(array: FloatArray) -> bytes:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest()


def _distance(a: Mapping[str, FloatArray], b: Mapping[str, FloatArray]) -> float:
    return math.sqrt(sum(float(((a[n].astype(np.float64) - b[n]) ** 2).sum()) for n in sorted(a)))


# --- the stated bounds -------------------------------------------------------------------


def movement_bound(
    policy: Policy,
    strategy: Strategy,
    updates: Mapping[str, tuple[Delta, int]],
    honest: Sequence[Delta],
    attackers: Sequence[str],
    accepted: Mapping[str, Any],
    refused: Mapping[str, str],
    honest_step: float,
    calibration: Calibration,
) -> float | None:
    """The movement each policy guarantees at most, in honest steps (None: no bound).

    - weighted mean (mean, clipping, token cap; equal honest weights, honest deltas not
      clipped): new - honest = scale x (sum_a w_a c_a - W g_h), so the movement is at
      most W (max_a ||c_a|| + ||g_h||) / ||g_h||, where W is the attackers' total weight
      and ||c_a|| is an attacker's norm as merged: its own (mean, token cap; unbounded,
      the cap bounds only W) or at most the clip bound (fixed B, or the factor x the
      round's median norm, which a minority cannot lift above the largest honest norm).
    - trimmed mean (floor(trim x n) >= attackers) and median (attackers < n / 2): every
      coordinate of the result lies within the honest members' values, as does the honest
      merge's, so the movement is at most ||max_h - min_h|| / ||g_h|| (the honest spread).
    - validation floor: a refused attacker leaves exactly the honest merge (0); one it
      let through moves the model as under the mean.
    - a malformed update is refused under every policy: 0.
    """
    merged = [a for a in attackers if a in accepted]
    if not merged:
        return 0.0
    if strategy.combine != "mean":
        stack = [np.concatenate([d[n].reshape(-1) for n in sorted(d)]) for d in honest]
        spread = np.max(stack, axis=0).astype(np.float64) - np.min(stack, axis=0)
        return float(np.linalg.norm(spread)) / honest_step
    weight = sum(float(accepted[a].weight) for a in merged)
    lengths = [norm(updates[a][0]) for a in merged]
    if strategy.clip == "fixed":
        assert strategy.clip_bound is not None
        lengths = [min(length, strategy.clip_bound) for length in lengths]
    elif strategy.clip == "median":
        assert strategy.clip_bound is not None
        everyone = sorted(norm(d) for d, _ in updates.values())
        middle = len(everyone) // 2
        median = (
            everyone[middle] if len(everyone) % 2 else (everyone[middle - 1] + everyone[middle]) / 2
        )
        lengths = [min(length, strategy.clip_bound * median) for length in lengths]
    return weight * (max(lengths) + honest_step) / honest_step


# --- text for the members, without downloads ----------------------------------------------


#: Seven members' text from the standard library's documentation: real prose on different
#: topics, no download. The last module of each group is the coordinator's held-out text
#: (so it has some of every member's kind of text; no member trains on it).
STDLIB_GROUPS = {
    "alice": ["json", "csv", "argparse", "pathlib"],
    "bob": ["asyncio.tasks", "collections", "itertools", "heapq"],
    "carol": ["logging", "functools", "dataclasses", "contextlib"],
    "dave": ["email.message", "http.client", "urllib.request", "smtplib"],
    "erin": ["unittest", "typing", "enum", "inspect"],
    "frank": ["statistics", "random", "calendar", "decimal"],
    "grace": ["threading", "subprocess", "shutil", "socket"],
}


def module_text(name: str) -> str:
    """A module's docstring and those of the functions and classes it defines itself:
    the same text in every process, whatever else has been imported."""
    module = importlib.import_module(name)
    parts = [inspect.getdoc(module) or ""]
    for _, member in sorted(vars(module).items()):
        if callable(member) and getattr(member, "__module__", None) == module.__name__:
            parts.append(inspect.getdoc(member) or "")
    return "\n\n".join(p for p in parts if p)


def stdlib_setup(
    root: Path, spec: ModelSpec, config: InnerConfig, shard_bytes: int, members: int = 7
) -> Setup:
    """Up to seven members, each one group of STDLIB_GROUPS but its last module, and the
    coordinator's held-out set from those last modules; shard sets under `root`."""
    from tapestry_trainer.data import prepare_shards

    text = root / "text"
    data: dict[str, Path] = {}
    held_out: list[Path] = []
    for name, modules in list(STDLIB_GROUPS.items())[:members]:
        files = []
        for module in modules:
            path = text / name / f"{module}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(module_text(module))
            files.append(path)
        held_out.append(files.pop())
        data[name] = root / "data" / name
        prepare_shards(files, data[name], val_fraction=0.1, block_tokens=128)
    holdout = root / "data" / "holdout"
    prepare_shards(held_out, holdout, val_fraction=0.9, block_tokens=128)
    return Setup(spec, config, data, holdout, shard_bytes)
