"""What the federation is measured against, and the measuring itself.

- `initial_arrays`: the round-0 weights a model spec defines (same seed, same weights).
- `train_local_only`: a participant that never federates, given the same compute: the
  same R rounds of H inner steps on its own data, each round continuing from its own
  previous model (a federation of one).
- `evaluate_arrays`: held-out loss of a set of weights on a participant's data.

Run as `python -m tapestry_trainer.baseline` for the local-only training, so the local
runner can train all baselines as parallel processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tapestry_protocol.shards import FloatArray, Tensor, decode_safetensors, encode_safetensors
from tapestry_trainer import plugins
from tapestry_trainer.data import LoaderContext, evaluate
from tapestry_trainer.inner import (
    DistContext,
    load_state_arrays,
    micro_batch_size,
    state_arrays,
    train_inner,
)
from tapestry_trainer.specs import InnerConfig, ModelSpec


def initial_arrays(spec: ModelSpec) -> dict[str, FloatArray]:
    return state_arrays(plugins.build_model(spec))


def train_local_only(
    spec: ModelSpec, config: InnerConfig, data: str, rounds: int, workdir: Path
) -> dict[str, FloatArray]:
    model = plugins.build_model(spec)
    for r in range(rounds):
        loader = plugins.build_loader(
            LoaderContext(
                data=data,
                rank=0,
                world_size=1,
                micro_batch_size=micro_batch_size(config, DistContext()),
                seq_len=config.seq_len,
                seed=config.seed,
            )
        )
        train_inner(
            model, loader, config, checkpoint_dir=workdir / f"round-{r}", run_id=f"local-only/{r}"
        )
    return state_arrays(model)


def evaluate_arrays(
    spec: ModelSpec, arrays: Mapping[str, FloatArray], data: str, config: InnerConfig
) -> float:
    model = plugins.build_model(spec)
    load_state_arrays(model, arrays)
    return evaluate(model, data, seq_len=config.seq_len, batch_size=config.batch_size)


def save_arrays(arrays: Mapping[str, FloatArray], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(encode_safetensors({n: Tensor.of(a) for n, a in arrays.items()}))
    tmp.replace(path)


def load_arrays(path: Path) -> dict[str, FloatArray]:
    tensors, _ = decode_safetensors(path.read_bytes())
    return {n: t.array for n, t in tensors.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="train a local-only baseline model")
    p.add_argument("--model", required=True, help="model spec JSON (as in the plan)")
    p.add_argument("--hyperparameters", required=True, help="JSON (as in the plan)")
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ModelSpec.from_dict(json.loads(args.model))
    config = InnerConfig.from_dict(json.loads(args.hyperparameters))
    arrays = train_local_only(spec, config, args.data, args.rounds, args.out.parent / "ckpt")
    save_arrays(arrays, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
