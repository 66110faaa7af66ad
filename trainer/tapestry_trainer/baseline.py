"""What the federation is measured against, and the measuring itself.

- `initial_arrays`: the round-0 weights a model spec defines (same seed, same weights).
- `train_local_only`: a participant that never federates, given the same compute: the
  same R rounds of H inner steps on its own data, each round continuing from its own
  previous model and from where its data stream stopped (a federation of one).
- `evaluate_arrays`: held-out loss of a set of weights on each participant's data.

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

from tapestry_protocol.shards import FloatArray
from tapestry_trainer import plugins
from tapestry_trainer.data import evaluate
from tapestry_trainer.inner import (
    DistContext,
    load_state_arrays,
    save_arrays,
    state_arrays,
    train_inner,
)
from tapestry_trainer.specs import InnerConfig, ModelSpec, model_spec_arg


def initial_arrays(spec: ModelSpec) -> dict[str, FloatArray]:
    return state_arrays(plugins.build_model(spec))


def train_local_only(
    spec: ModelSpec, config: InnerConfig, data: str, rounds: int, workdir: Path
) -> dict[str, FloatArray]:
    model = plugins.build_model(spec)
    for r in range(rounds):
        loader = plugins.loader_for(data, config, DistContext(), round_number=r)
        train_inner(
            model, loader, config, checkpoint_dir=workdir / f"round-{r}", run_id=f"local-only/{r}"
        )
    return state_arrays(model)


def evaluate_arrays(
    spec: ModelSpec, arrays: Mapping[str, FloatArray], data: Sequence[str], config: InnerConfig
) -> list[float]:
    """Held-out loss of one set of weights on each data directory (one model build)."""
    model = plugins.build_model(spec)
    load_state_arrays(model, arrays)
    return [evaluate(model, d, seq_len=config.seq_len, batch_size=config.batch_size) for d in data]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="train a local-only baseline model")
    p.add_argument(
        "--model-spec", dest="spec", type=model_spec_arg,
        help="ModelSpec as JSON text or a JSON file (as in the plan); required",
    )  # fmt: skip
    p.add_argument("--model", dest="spec", type=model_spec_arg, help=argparse.SUPPRESS)
    p.add_argument("--hyperparameters", required=True, help="JSON (as in the plan)")
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.spec is None:
        p.error("--model-spec is required")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec: ModelSpec = args.spec
    config = InnerConfig.from_dict(json.loads(args.hyperparameters))
    arrays = train_local_only(spec, config, args.data, args.rounds, args.out.parent / "ckpt")
    save_arrays(arrays, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
