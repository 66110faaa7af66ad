"""A small federation on a filesystem store: coordinator, two participants, a base
of several shards and a signed plan."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from tapestry_protocol.documents import (
    CloseRecord,
    CloseTrigger,
    ModelManifest,
    Receipt,
    ReceiptState,
    RoundPlan,
    RoundResult,
    UpdateManifest,
)
from tapestry_protocol.exchange import (
    COORDINATOR,
    Verified,
    close_round,
    make_plan,
    publish_model,
    publish_plan,
    publish_receipt,
    publish_update,
    read_plan,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.shards import FloatArray, plan_shards
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store import ObjectStore

if TYPE_CHECKING:
    from tapestry_aggregator.strategy import Strategy

HYPERPARAMETERS = {"innerSteps": 2, "learningRate": 1e-3, "batchSize": 2, "seqLen": 8}
#: Every test closes its rounds at this instant, so close records are reproducible.
CLOSED_AT = datetime(2030, 1, 1, tzinfo=UTC)


@dataclass
class Federation:
    store: ObjectStore
    layout: Layout
    coordinator: SigningKey
    participants: dict[str, SigningKey]
    base: Verified[ModelManifest]
    plan: Verified[RoundPlan]
    tensors: dict[str, FloatArray]

    def plan_round(
        self,
        round_number: int,
        base: Verified[ModelManifest],
        min_participants: int = 1,
        encoding: str = "fp32",
    ) -> Verified[RoundPlan]:
        """Publish a signed plan for `round_number` training from `base`."""
        return _publish_plan(self.store, self.layout, self.coordinator, self.participants,
                             round_number, base, min_participants, encoding)  # fmt: skip

    def read_plan(self, round_number: int) -> Verified[RoundPlan]:
        return read_plan(self.store, self.layout, round_number, self.coordinator.public_key_text)

    def delta(self, scale: float = 0.01, seed: int = 0) -> dict[str, FloatArray]:
        rng = np.random.default_rng(seed)
        return {
            n: (rng.standard_normal(a.shape) * scale).astype(np.float32)
            for n, a in self.tensors.items()
        }

    def publish(
        self,
        who: str,
        delta: Mapping[str, FloatArray],
        *,
        tokens: int = 1000,
        metrics: Mapping[str, float | str | None] | None = None,
        plan: Verified[RoundPlan] | None = None,
        base: Verified[ModelManifest] | None = None,
    ) -> Verified[UpdateManifest]:
        """`who`'s signed update for `plan` (default: round 0's) trained from `base`."""
        return publish_update(
            self.store, self.layout, plan or self.plan, base or self.base, delta,
            self.participants[who], tokens=tokens, metrics=dict(metrics or {}),
        )  # fmt: skip

    def receipt(
        self,
        who: str,
        state: ReceiptState,
        reason: str = "Test",
        message: str = "",
        plan: Verified[RoundPlan] | None = None,
    ) -> Verified[Receipt]:
        """`who`'s signed receipt for `plan` (default: round 0's)."""
        return publish_receipt(
            self.store, self.layout, plan or self.plan, self.participants[who], state, reason,
            message,
        )  # fmt: skip

    def close(
        self, round_number: int = 0, trigger: CloseTrigger = CloseTrigger.ALL_REPORTED
    ) -> Verified[CloseRecord]:
        """Close the round as the coordinator would, at the fixed instant CLOSED_AT."""
        return close_round(self.store, self.layout, self.read_plan(round_number),
                           self.coordinator, trigger, CLOSED_AT)  # fmt: skip

    def aggregate(
        self, round_number: int, strategy: Strategy, *, prefetch: int = 4
    ) -> Verified[RoundResult]:
        """Close the round (idempotent), then aggregate it."""
        from tapestry_aggregator.merge import aggregate_round

        self.close(round_number)
        return aggregate_round(
            self.store, self.layout, round_number, self.coordinator, strategy, prefetch=prefetch
        )


def model_tensors(seed: int = 0) -> dict[str, FloatArray]:
    rng = np.random.default_rng(seed)
    shapes = {"emb": (16, 8), "l0.w": (8, 8), "l0.b": (8,), "l1.w": (8, 8), "head": (8, 16)}
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def make_federation(
    store: ObjectStore,
    name: str = "demo",
    *,
    encoding: str = "fp32",
    min_participants: int = 1,
    participants: tuple[str, ...] = ("alice", "bob"),
) -> Federation:
    layout = Layout(name)
    coordinator = SigningKey.generate(COORDINATOR)
    keys = {p: SigningKey.generate(p) for p in participants}
    tensors = model_tensors()
    groups = plan_shards([(n, a.nbytes) for n, a in tensors.items()], 600)
    assert len(groups) >= 3
    base = publish_model(store, layout, 0, tensors, groups, coordinator, model={"preset": "t"})
    plan = _publish_plan(store, layout, coordinator, keys, 0, base, min_participants, encoding)
    return Federation(store, layout, coordinator, keys, base, plan, tensors)


def _publish_plan(
    store: ObjectStore,
    layout: Layout,
    coordinator: SigningKey,
    participants: dict[str, SigningKey],
    round_number: int,
    base: Verified[ModelManifest],
    min_participants: int,
    encoding: str,
) -> Verified[RoundPlan]:
    plan = make_plan(
        layout, round_number, base, model={"preset": "t"}, hyperparameters=HYPERPARAMETERS,
        participants={p: k.public_key_text for p, k in participants.items()},
        min_participants=min_participants, deadline="2030-01-01T00:00:00Z", encoding=encoding,
    )  # fmt: skip
    return publish_plan(store, layout, plan, coordinator)
