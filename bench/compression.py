"""Benchmark: what the delta encodings save in bytes and cost in model quality.

P participants (one language each) train the `tiny` GPT for R DiLoCo rounds of H inner
steps, five times over, each time with another encoding of the deltas they upload:

- fp32: the delta as trained;
- bf16: rounded to bfloat16;
- int8: blockwise absmax int8 (one float32 scale per 256 values);
- int8 + error feedback: int8, each participant adding what rounding dropped last round
  to this round's delta (`tapestry_trainer.feedback`, as the participant does);
- codebook + error feedback: INTELLECT-1's 256 levels per tensor, with error feedback.

Bytes are those of the safetensors shard the participant would upload (the protocol's
own encoder), per participant per round; quality is the shared model's validation loss
on the pooled held-out data (and each participant's own) after the R rounds, mean +- std
over seeds. All arms draw the very same batches. The pieces are the project's own,
in-process, as in bench/joining.py: the trainer's model, loader and inner loop, the
protocol's encodings, the trainer's error feedback, the aggregator's outer step.

Usage: python bench/compression.py [--quick] [--out FILE] [--data DIR]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from joining import (
    INNER_LR,
    POOLED,
    Arrays,
    Scorer,
    Setup,
    _outer,
    _train,
    build_setup,
    mean_std,
    run_seeds,
)
from report import header, write

from tapestry_protocol.shards import Tensor, decode_delta, encode_delta, encode_safetensors
from tapestry_trainer import feedback, plugins, privacy
from tapestry_trainer.inner import state_arrays
from tapestry_trainer.specs import ModelSpec

ROOT = Path(__file__).resolve().parents[1]

FULL: dict[str, Any] = {
    "participants": 3, "rounds": 6, "innerSteps": 25, "batchSize": 8, "seqLen": 128,
    "seeds": [0, 1, 2], "evalBatches": 4, "evalBatchSize": 16,
}  # fmt: skip
QUICK: dict[str, Any] = {
    "participants": 2, "rounds": 2, "innerSteps": 2, "batchSize": 4, "seqLen": 32,
    "seeds": [0], "evalBatches": 1, "evalBatchSize": 4,
}  # fmt: skip
# arm -> (encoding, error feedback)
ARMS: dict[str, tuple[str, bool]] = {
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "int8": ("int8", False),
    "int8+ef": ("int8", True),
    "codebook+ef": ("codebook", True),
}
BYTES_TARGET = 0.26  # int8 + error feedback: at most this share of fp32's bytes
LOSS_TARGET = 0.01  # ... with the validation loss within this of fp32's (relative)


def upload(delta: Mapping[str, np.ndarray], encoding: str) -> tuple[int, Arrays]:
    """The size of the one safetensors shard holding `delta` under `encoding`, and the
    delta the aggregator reads back from it (encoded once, for both)."""
    stored: dict[str, Tensor] = {}
    for name, values in delta.items():
        stored |= encode_delta(name, values, encoding)
    received = {name: decode_delta(stored, name, encoding) for name in delta}
    return len(encode_safetensors(stored)), received


def run_arm(setup: Setup, spec: ModelSpec, seed: int, arm: str, scorer: Scorer) -> dict[str, Any]:
    """R DiLoCo rounds with the arm's encoding; per round the loss and the bytes."""
    encoding, with_feedback = ARMS[arm]
    config = setup.config(seed)
    base = state_arrays(plugins.build_model(spec))
    everywhere = [*setup.names, POOLED]
    curve = [scorer(base, everywhere)]
    tokens = {n: config.steps * config.tokens_per_step for n in setup.names}
    residual: dict[str, Arrays] = {}
    state: dict[str, Arrays] = {}
    sent_bytes: list[dict[str, int]] = []
    residual_norms: list[dict[str, float]] = []
    for r in range(setup.rounds):
        arrived: dict[str, Arrays] = {}
        sizes: dict[str, int] = {}
        norms: dict[str, float] = {}
        for n in setup.names:
            local = _train(spec, base, setup.data[n], config, r * config.steps)
            delta = {k: (base[k] - local[k]).astype(np.float32) for k in base}
            if with_feedback and n in residual:
                delta = feedback.add(delta, residual[n])
            sizes[n], received = upload(delta, encoding)
            if with_feedback:  # what rounding dropped: feedback.quantisation_residual
                residual[n] = {k: (delta[k] - received[k]).astype(np.float32) for k in delta}
                norms[n] = privacy.l2_norm(residual[n])
            # the outer step reads `base - local`: hand it the local model the
            # aggregator effectively receives
            arrived[n] = {k: base[k] - received[k] for k in base}
        base = _outer(setup.diloco, base, arrived, tokens, state)
        curve.append(scorer(base, everywhere))
        sent_bytes.append(sizes)
        residual_norms.append(norms)
        stamp = time.strftime("%H:%M:%S")
        line = f"pooled {curve[-1][POOLED]:.4f}, {sum(sizes.values())} bytes up"
        print(f"[{stamp} seed {seed}] {arm} round {r + 1}: {line}", flush=True)
    out: dict[str, Any] = {"curve": curve, "bytes": sent_bytes}
    if with_feedback:
        out["residualNorm"] = residual_norms
    return out


def run_seed(setup: Setup, seed: int, threads: int, arms: Sequence[str]) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    spec = ModelSpec.preset("tiny", seed=seed)
    scorer = Scorer(spec, setup)
    return {"seed": seed, **{arm: run_arm(setup, spec, seed, arm, scorer) for arm in arms}}


def summarise(
    runs: Sequence[Mapping[str, Any]], names: Sequence[str], arms: Sequence[str]
) -> dict[str, Any]:
    """Per arm: bytes per participant per round (mean over everything), its share of
    fp32's, and the final loss on every eval set, mean +- std over seeds."""
    out: dict[str, Any] = {}
    for arm in arms:
        per_upload = [b for run in runs for rnd in run[arm]["bytes"] for b in rnd.values()]
        rounds = len(runs[0][arm]["curve"])
        out[arm] = {
            "encoding": ARMS[arm][0],
            "errorFeedback": ARMS[arm][1],
            "bytesPerParticipantPerRound": sum(per_upload) / len(per_upload),
            "final": {
                w: mean_std([run[arm]["curve"][-1][w] for run in runs]) for w in [*names, POOLED]
            },
            "curve": {
                POOLED: [
                    mean_std([run[arm]["curve"][r][POOLED] for run in runs]) for r in range(rounds)
                ]
            },
        }
    fp32 = out["fp32"]
    for figures in out.values():
        figures["bytesVsFp32"] = (
            figures["bytesPerParticipantPerRound"] / fp32["bytesPerParticipantPerRound"]
        )
        loss, reference = figures["final"][POOLED]["mean"], fp32["final"][POOLED]["mean"]
        figures["pooledLossVsFp32"] = (loss - reference) / reference
    return out


def targets(arms: Mapping[str, Any]) -> list[dict[str, Any]]:
    ef = arms["int8+ef"]
    return [
        {
            "target": f"int8 + error feedback uploads <= {BYTES_TARGET:.0%} of fp32's bytes",
            "measured": {"bytesVsFp32": ef["bytesVsFp32"]},
            "met": ef["bytesVsFp32"] <= BYTES_TARGET,
        },
        {
            "target": f"... with the pooled validation loss within {LOSS_TARGET:.0%} of fp32's",
            "measured": {
                "pooledLossVsFp32": ef["pooledLossVsFp32"],
                "int8": ef["final"][POOLED]["mean"],
                "fp32": arms["fp32"]["final"][POOLED]["mean"],
            },
            "met": abs(ef["pooledLossVsFp32"]) <= LOSS_TARGET,
        },
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 2 participants, 2 short rounds")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compression.json")
    p.add_argument("--data", type=Path, default=None,
                   help="a sub-folder of .txt per participant (default: demo corpus)")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-compression")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo outer learning rate")
    p.add_argument("--outer-momentum", type=float, default=0.9, help="DiLoCo Nesterov momentum")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=2, help="seeds trained in parallel processes")
    args = p.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        size["seeds"] = args.seeds
    if args.rounds is not None:
        size["rounds"] = args.rounds
    started = time.monotonic()
    setup = build_setup(args, size)
    names = setup.names
    arms = list(ARMS)
    print(f"participants {names}, {size}", flush=True)
    runs = run_seeds(run_seed, setup, size["seeds"], args.jobs, args.threads, arms)
    summary = summarise(runs, names, arms)
    report = header("compression", args.quick, "compression.py")
    report |= {
        "participants": names,
        "size": size,
        "innerLearningRate": INNER_LR,
        "strategy": setup.diloco.to_json(),
        "arms": summary,
        "targets": targets(summary),
        "runs": runs,
        "wallSeconds": round(time.monotonic() - started, 1),
    }
    write(args.out, report)
    for arm, figures in summary.items():
        loss = figures["final"][POOLED]["mean"]
        print(
            f"{arm:8} {figures['bytesPerParticipantPerRound']:>12.0f} B "
            f"({figures['bytesVsFp32']:.1%})  pooled loss {loss:.4f} "
            f"({figures['pooledLossVsFp32']:+.2%})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
