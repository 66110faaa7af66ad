"""A small federation on a filesystem store: coordinator, two participants, a base
of several shards and a signed plan."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tapestry_protocol.exchange import (
    COORDINATOR,
    Verified,
    make_plan,
    publish_model,
    publish_plan,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.shards import FloatArray, plan_shards
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store import ObjectStore

HYPERPARAMETERS = {"innerSteps": 2, "learningRate": 1e-3, "batchSize": 2, "seqLen": 8}


@dataclass
class Federation:
    store: ObjectStore
    layout: Layout
    coordinator: SigningKey
    participants: dict[str, SigningKey]
    base: Verified
    plan: Verified
    tensors: dict[str, FloatArray]

    def plan_round(
        self, round_number: int, base: Verified, min_participants: int = 1, encoding: str = "fp32"
    ) -> Verified:
        """Publish a signed plan for `round_number` training from `base`."""
        return _publish_plan(self.store, self.layout, self.coordinator, self.participants,
                             round_number, base, min_participants, encoding)  # fmt: skip

    def delta(self, scale: float = 0.01, seed: int = 0) -> dict[str, FloatArray]:
        rng = np.random.default_rng(seed)
        return {
            n: (rng.standard_normal(a.shape) * scale).astype(np.float32)
            for n, a in self.tensors.items()
        }


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
    base: Verified,
    min_participants: int,
    encoding: str,
) -> Verified:
    plan = make_plan(
        layout, round_number, base, model={"preset": "t"}, hyperparameters=HYPERPARAMETERS,
        participants={p: k.public_key_text for p, k in participants.items()},
        min_participants=min_participants, deadline="2030-01-01T00:00:00Z", encoding=encoding,
    )  # fmt: skip
    return publish_plan(store, layout, plan, coordinator)
