"""The coordinator's held-out scorer for the validation floor (torch).

`tapestry_aggregator.validation` refuses an update whose model, `base - delta`, scores a
held-out loss worse than the base's by more than a margin. The aggregator has no torch,
so the scoring itself lives here and reaches it as a plain callable
(`tapestry_aggregator.validation.Scorer`): named float32 arrays in, mean loss out.

The model is built once from the plan's model spec (the built-in GPT or a plug-in
factory), in float32 and eval mode on the CPU; each call runs it on the given weights
through `torch.func.functional_call`, on the very arrays it is handed (no copy), so the
scorer adds no model-sized buffer of its own to the caller's base and candidate. The
tokens are fixed: the built-in shard set's validation split through
`tapestry_trainer.data.evaluate` (the same windows the local runner's report scores),
or `BATCHES` batches drawn once from a plug-in loader's validation split. The same
weights therefore always give the same figure on one machine and software stack; CPUs
with other vector units may differ in the last bits.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from tapestry_protocol.documents import RoundPlan
from tapestry_protocol.shards import FloatArray
from tapestry_trainer import plugins
from tapestry_trainer.data import LoaderContext, evaluate, load_index
from tapestry_trainer.inner import _exchanged
from tapestry_trainer.specs import InnerConfig, ModelSpec

#: Batches of the plan's batch size scored per model (as the local runner's report does).
BATCHES = 8
SPLIT = "validation"


class ScoringError(ValueError):
    """The held-out data or the model cannot be used for scoring; the message says why."""


class _Bound(nn.Module):
    """The model run on weights it is handed (`weights`), not on its own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.weights: dict[str, Tensor] = {}

    def forward(self, input_ids: Tensor, targets: Tensor) -> Tensor:
        loss: Tensor = functional_call(self.model, self.weights, (input_ids, targets))
        return loss


class HeldOutScorer:
    """Mean loss of full models on a fixed held-out set (a `validation.Scorer`)."""

    def __init__(
        self,
        spec: ModelSpec,
        data: str | Path,
        *,
        seq_len: int,
        batch_size: int,
        loader: str | None = None,
        loader_options: Mapping[str, Any] | None = None,
        batches: int = BATCHES,
    ) -> None:
        self.data = str(data)
        self.seq_len, self.batch_size, self.batches = seq_len, batch_size, batches
        try:
            model = plugins.build_model(spec).float().eval()
        except (plugins.PluginError, ValueError) as e:
            raise ScoringError(f"cannot build the plan's model: {e}") from None
        model.requires_grad_(False)
        own = _exchanged(model)
        self.shapes = {name: tuple(t.shape) for name, t in own.items()}
        for tensor in own.values():  # every call hands in all of these: free the originals
            tensor.data = torch.empty(0, dtype=tensor.dtype)
        self.model = _Bound(model)
        self.fixed: list[tuple[Tensor, Tensor]] | None = None
        if loader is None:
            self._check_shard_set()
        else:
            self.fixed = self._draw(loader, dict(loader_options or {}))

    def _check_shard_set(self) -> None:
        try:
            index = load_index(self.data)
        except (FileNotFoundError, ValueError) as e:
            raise ScoringError(f"validation data: {e}") from None
        if not any(int(f["tokens"]) > self.seq_len for f in index["splits"].get(SPLIT, [])):
            raise ScoringError(
                f"validation data {self.data} has no {SPLIT} split with a window of "
                f"{self.seq_len + 1} tokens"
            )

    def _draw(self, loader: str, options: dict[str, Any]) -> list[tuple[Tensor, Tensor]]:
        """`batches` batches from a plug-in loader's validation split, drawn once."""
        ctx = LoaderContext(
            data=self.data, rank=0, world_size=1, micro_batch_size=self.batch_size,
            seq_len=self.seq_len, seed=0, split=SPLIT, options=options,
        )  # fmt: skip
        try:
            source = plugins.build_loader(ctx, loader)
            return [source.next_batch() for _ in range(self.batches)]
        except plugins.PluginError as e:
            raise ScoringError(f"validation loader: {e}") from None

    def __call__(self, tensors: Mapping[str, FloatArray]) -> float:
        names = set(tensors)
        if names != set(self.shapes):
            missing, extra = sorted(set(self.shapes) - names), sorted(names - set(self.shapes))
            raise ScoringError(
                f"weights do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        weights: dict[str, Tensor] = {}
        with warnings.catch_warnings():
            # Read-only arrays (decoded shards) are only read here, under no_grad.
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            for name, shape in self.shapes.items():
                array = np.asarray(tensors[name], dtype=np.float32)
                if tuple(array.shape) != shape:
                    raise ScoringError(f"{name}: shape {tuple(array.shape)} != model {shape}")
                weights[name] = torch.from_numpy(array)
        self.model.weights = weights
        try:
            return self._loss()
        finally:
            self.model.weights = {}  # hold no candidate between calls

    @torch.no_grad()
    def _loss(self) -> float:
        if self.fixed is None:
            return evaluate(
                self.model, self.data, split=SPLIT, batches=self.batches,
                batch_size=self.batch_size, seq_len=self.seq_len, device="cpu",
            )  # fmt: skip
        total = rows = 0.0
        for x, y in self.fixed:
            total += float(self.model(x, y)) * len(x)
            rows += len(x)
        return total / rows


def plan_scorer(
    plan: RoundPlan,
    data: str | Path,
    *,
    loader: str | None = None,
    loader_options: Mapping[str, Any] | None = None,
    batches: int = BATCHES,
) -> HeldOutScorer:
    """The scorer of a round: the plan's model, scored at its batch size and sequence
    length on `data` (a shard set, or a plug-in loader's data)."""
    try:
        spec = ModelSpec.from_dict(plan.model)
        config = InnerConfig.from_dict(plan.hyperparameters)
    except (ValueError, KeyError, TypeError) as e:
        raise ScoringError(f"the plan of round {plan.round} has no usable model: {e}") from None
    return HeldOutScorer(
        spec, data, seq_len=config.seq_len, batch_size=config.batch_size, loader=loader,
        loader_options=loader_options, batches=batches,
    )  # fmt: skip
