"""Loader factory of the example plug-in: ``make_loader(ctx) -> BatchLoader``.

Reads every ``*.txt`` under ``ctx.data`` as UTF-8 bytes and serves random windows. Sample
``g`` of the global stream starts at an offset drawn from a generator seeded with
``(ctx.seed, g)``, so the stream is identical on every rank, rank ``r`` takes its own slice
of each global micro batch, and ``{"consumed": n}`` is the whole resumable state.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tapestry_trainer.data import LoaderContext


class TextWindows:
    def __init__(self, ctx: LoaderContext) -> None:
        files = sorted(Path(ctx.data).rglob("*.txt"))
        text = "\n".join(p.read_text(encoding="utf-8") for p in files).encode("utf-8")
        self.tokens = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
        if len(self.tokens) <= ctx.seq_len + 1:
            raise ValueError(f"{ctx.data} holds too little text for seq_len {ctx.seq_len}")
        self.ctx = ctx
        self.consumed = ctx.start  # a round continues the stream where earlier rounds ended

    def next_batch(self) -> tuple[Tensor, Tensor]:
        m, t = self.ctx.micro_batch_size, self.ctx.seq_len
        first = self.consumed + self.ctx.rank * m
        rows = []
        for g in range(first, first + m):
            rng = np.random.default_rng([self.ctx.seed, g])
            start = int(rng.integers(0, len(self.tokens) - t - 1))
            rows.append(self.tokens[start : start + t + 1])
        self.consumed += self.ctx.world_size * m
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.consumed = int(state["consumed"])


def make_loader(ctx: LoaderContext) -> TextWindows:
    return TextWindows(ctx)
