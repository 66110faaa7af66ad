"""Tapestry's data plane: everything torch-side of a participant's inner training.

Modules (torch is imported only by those that need it, so ``import tapestry_trainer`` and
:mod:`tapestry_trainer.specs` / :mod:`tapestry_trainer.corpus` work without it):

- :mod:`~tapestry_trainer.specs` -- ``ModelSpec`` and ``InnerConfig``, the JSON the round
  plan carries; presets and analytic parameter counts. No torch.
- :mod:`~tapestry_trainer.model` -- the built-in GPT family.
- :mod:`~tapestry_trainer.plugins` -- ``module:function`` model and loader plug-ins.
- :mod:`~tapestry_trainer.data` -- byte tokenizer, token shards, loader, evaluation.
- :mod:`~tapestry_trainer.corpus` -- the multilingual demo corpus. No torch.
- :mod:`~tapestry_trainer.inner` -- DDP inner loop, checkpoints, weight exchange helpers.
- :mod:`~tapestry_trainer.train` -- standalone CLI (local-only baselines, smoke tests).

The names below resolve lazily, on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ModelSpec": "specs",
    "InnerConfig": "specs",
    "GPTConfig": "specs",
    "PRESETS": "specs",
    "build_model": "plugins",
    "build_loader": "plugins",
    "LoaderContext": "data",
    "ByteTokenizer": "data",
    "prepare_shards": "data",
    "evaluate": "data",
    "prepare_demo_corpus": "corpus",
    "init_distributed": "inner",
    "shutdown_distributed": "inner",
    "micro_batch_size": "inner",
    "train_inner": "inner",
    "state_arrays": "inner",
    "load_state_arrays": "inner",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tapestry_trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tapestry_trainer.{_LAZY[name]}"), name)
