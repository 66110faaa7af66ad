"""Standalone inner training on local shards, without the round protocol.

For local-only baselines, benchmarks and smoke tests of a participant's hardware; the same
code path as a federated round, minus the object store::

    torchrun --nproc-per-node 2 -m tapestry_trainer.train --data shards/de --preset tiny \\
        --inner-steps 200 --lr 3e-3 --batch-size 16 --seq-len 128 --out local.safetensors

The model and inner-training flags (``--preset``, ``--inner-steps``, ``--lr``, ...) are
the ones ``tapestry local run`` takes, with the same defaults (:mod:`tapestry_trainer.specs`).

Weights are read (``--init``) and written (``--out``) as safetensors files of float32 arrays
keyed by the exchange names (``inner.load_arrays``/``save_arrays``). Without torchrun it runs
as a single process. Metrics, and the validation loss when the shard set has a validation
split, are printed as one JSON line by rank 0 (and written to ``--metrics-out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tapestry_protocol.files import atomic_write_text
from tapestry_trainer import data, plugins
from tapestry_trainer.inner import (
    distributed,
    load_arrays,
    load_state_arrays,
    micro_batch_size,
    save_arrays,
    state_arrays,
    train_inner,
)
from tapestry_trainer.specs import (
    ModelSpec,
    add_inner_arguments,
    add_preset_argument,
    inner_config_from_args,
    model_spec_arg,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tapestry_trainer.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="shard set (or plug-in loader data path)")
    model = p.add_mutually_exclusive_group()
    add_preset_argument(model, aliases=("--model",))
    model.add_argument(
        "--model-spec", type=model_spec_arg, help="ModelSpec as a JSON file or JSON text"
    )
    p.add_argument("--loader", help="plug-in loader as module:function")
    add_inner_arguments(p)
    p.add_argument("--micro-batch-size", type=int, help="per rank and forward")
    p.add_argument("--init", type=Path, help="start weights (.safetensors); default: spec init")
    p.add_argument("--out", type=Path, help="write the trained weights (.safetensors)")
    p.add_argument("--checkpoint-dir", type=Path)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--metrics-out", type=Path)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = args.model_spec or ModelSpec.preset(args.preset, seed=args.seed)
    config = inner_config_from_args(args)
    with distributed(device=args.device) as ctx:
        model = plugins.build_model(spec)
        if args.init is not None and ctx.is_main:
            load_state_arrays(model, load_arrays(args.init))
        m = micro_batch_size(config, ctx, args.micro_batch_size)
        loader = plugins.loader_for(args.data, config, ctx, micro_batch=m, factory=args.loader)
        result = train_inner(
            model, loader, config, ctx, micro_batch=m, checkpoint_dir=args.checkpoint_dir,
            run_id="standalone",
        )  # fmt: skip
        if not ctx.is_main:
            return
        if args.out is not None:  # the weights first: nothing after training may lose them
            save_arrays(state_arrays(model), args.out)
        metrics: dict[str, Any] = result.to_dict()
        if args.loader is None and args.eval_batches > 0:
            try:
                metrics["validationLoss"] = data.evaluate(
                    model, args.data, batches=args.eval_batches, seq_len=config.seq_len,
                    batch_size=min(config.batch_size, 16),
                )  # fmt: skip
            except ValueError as e:  # a validation split too small for one window
                metrics["validationLoss"] = None
                print(f"no validation loss: {e}", file=sys.stderr)
        if args.metrics_out is not None:
            atomic_write_text(args.metrics_out, json.dumps(metrics, indent=2) + "\n")
        print(json.dumps(metrics))


if __name__ == "__main__":
    main()
