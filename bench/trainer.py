"""Benchmark: the trainer's tokens/s per process against a bare PyTorch loop, and 2-process
DDP on CPU.

Three arms train the same model from the same initialisation on the same token windows,
one after the other in alternating repetitions (bare, trainer, trainer + checkpoints,
bare, ...), each from a freshly built model:

- **bare**: a hand-written loop: AdamW (betas 0.9, 0.95, the same decay groups), the
  same warmup + cosine learning rate, forward, backward, clip, step. Its batches are
  drawn from the project's loader *before* the clock starts and kept in memory, so the
  loader's cost counts as the trainer's overhead;
- **trainer**: `tapestry_trainer.inner.train_inner` with the project's loader
  (`plugins.loader_for`), checkpoints off (`checkpoint_every=0`);
- **trainer + checkpoints**: the same at the command line's default interval (every 10
  steps and at the end), as users run it.

Each arm is timed from just before its optimizer exists (train_inner's whole call) to
its last step; model building and data preparation are outside. Overhead =
1 - trainer tokens/s / bare tokens/s, on the medians; the same from the process's CPU
seconds (one torch thread) is reported beside it, since on a shared machine the wall
clock also measures the neighbours. Both arms must end with identical
weights (on CPU the trainer's math is the bare loop's, bit for bit), which checks that
they did the same work.

DDP: the trainer in 1 process and in 2 (gloo, `init_distributed` from the environment
torchrun sets), one torch thread each (OMP_NUM_THREADS=1), weak scaling: every rank takes the single
process's batch, so the global batch doubles. Efficiency = tps(2) / (2 * tps(1)). Launches
alternate (1, 2, 1, 2, ...); each does one short untimed warm-up run first.

Usage: python bench/trainer.py [--quick] [--out FILE] [--threads N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from report import header, write

from tapestry_trainer import plugins
from tapestry_trainer.data import prepare_shards
from tapestry_trainer.inner import (
    CHECKPOINT,
    DistContext,
    init_distributed,
    shutdown_distributed,
    state_arrays,
)
from tapestry_trainer.inner import train_inner as _train_inner
from tapestry_trainer.specs import FLAG_DEFAULTS, InnerConfig, ModelSpec, default_warmup

ROOT = Path(__file__).resolve().parents[1]

FULL: dict[str, Any] = {
    "preset": "tiny", "batchSize": 16, "seqLen": 128, "steps": 20, "repeats": 5,
    "ddpSteps": 12, "ddpLaunches": 3, "warmupSteps": 2,
}  # fmt: skip
QUICK: dict[str, Any] = {
    "preset": "tiny", "batchSize": 4, "seqLen": 32, "steps": 3, "repeats": 1,
    "ddpSteps": 2, "ddpLaunches": 1, "warmupSteps": 1,
}  # fmt: skip
LR = FLAG_DEFAULTS["lr"]  # the command line's (and the demo's) inner learning rate
CHECKPOINT_EVERY = FLAG_DEFAULTS["checkpoint_every"]
OVERHEAD_TARGET = 0.05
ADAM_BETAS = (0.9, 0.95)
ARMS = ("bare", "trainer", "trainerCheckpoints")

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def synthetic_shards(root: Path, tokens: int, seed: int = 0) -> str:
    """A shard set of about `tokens` byte tokens of word-like text (the content does not
    change the speed of a step); returns its directory."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz", dtype=np.uint8)
    words = [bytes(rng.choice(letters, size=int(n))).decode() for n in rng.integers(2, 10, 4000)]
    text = root / "text"
    text.mkdir(parents=True, exist_ok=True)
    picks = rng.integers(0, len(words), tokens // 6 + 1)
    (text / "synthetic.txt").write_text(" ".join(words[i] for i in picks))
    return str(prepare_shards([text], root / "shards", val_fraction=0.01).parent)


def weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, array in sorted(state_arrays(model).items()):
        digest.update(name.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def draw_batches(data: str, config: InnerConfig) -> tuple[Batches, float]:
    """The batches the trainer's loader gives a fresh run of `config`, in order, and the
    seconds it took per batch (a cost the trainer pays inside its loop)."""
    loader = plugins.loader_for(data, config, DistContext())
    started = time.perf_counter()
    batches = [loader.next_batch() for _ in range(config.steps)]
    return batches, (time.perf_counter() - started) / config.steps


def bare(spec: ModelSpec, config: InnerConfig, batches: Batches) -> dict[str, Any]:
    """The hand-written loop: what the trainer's inner run amounts to, nothing more."""
    model = plugins.build_model(spec)
    model.train()
    cpu, started = time.process_time(), time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=ADAM_BETAS,
        eps=1e-8,
    )
    loss = torch.zeros(())
    for step, (x, y) in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = config.lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    tokens = sum(x.numel() for x, _ in batches)
    return {
        "tokens": tokens,
        "wallSeconds": wall,
        "cpuSeconds": cpu,
        "tokensPerSecond": tokens / wall,
        "tokensPerCpuSecond": tokens / cpu,
        "finalLoss": float(loss.detach()),
        "weightsSha256": weights_hash(model),
    }


def trainer(
    spec: ModelSpec, config: InnerConfig, data: str, checkpoint_dir: Path | None
) -> dict[str, Any]:
    """One call of train_inner on a fresh model and loader, timed around the call."""
    model = plugins.build_model(spec)
    loader = plugins.loader_for(data, config, DistContext())
    cpu, started = time.process_time(), time.perf_counter()
    result = _train_inner(model, loader, config, checkpoint_dir=checkpoint_dir, run_id="bench")
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "tokens": result.tokens,
        "tokensLoaded": loader.state_dict()["consumed"] * config.seq_len,
        "wallSeconds": wall,
        "cpuSeconds": cpu,
        "tokensPerSecond": result.tokens / wall,
        "tokensPerCpuSecond": result.tokens / cpu,
        "loopTokensPerSecond": result.tokens_per_s,  # the trainer's own figure: loop only
        "finalLoss": result.final_loss,
        "weightsSha256": weights_hash(model),
        "checkpoints": 0 if checkpoint_dir is None else -(-config.steps // CHECKPOINT_EVERY),
        "checkpointBytes": (checkpoint_dir / CHECKPOINT).stat().st_size if checkpoint_dir else 0,
    }


def single_process(
    spec: ModelSpec, config: InnerConfig, data: str, size: dict[str, Any], tmp: Path
) -> tuple[dict[str, list[dict[str, Any]]], float]:
    """The three arms, alternating, after one short untimed warm-up of each; and the
    loader's seconds per batch."""
    warm = replace(config, steps=size["warmupSteps"], warmup_steps=1)
    bare(spec, warm, draw_batches(data, warm)[0])
    trainer(spec, warm, data, None)
    batches, loader_s = draw_batches(data, config)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    ckpt = replace(config, checkpoint_every=CHECKPOINT_EVERY)
    for rep in range(size["repeats"]):
        runs["bare"].append(bare(spec, config, batches))
        runs["trainer"].append(trainer(spec, config, data, None))
        runs["trainerCheckpoints"].append(trainer(spec, ckpt, data, tmp / f"ckpt-{rep}"))
        print(
            "  "
            + ", ".join(f"{arm} {runs[arm][-1]['tokensPerSecond']:8.0f} tok/s" for arm in ARMS),
            flush=True,
        )
    return runs, loader_s


# --------------------------------------------------------------------------- DDP


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun (or alone): a warm-up run, then `--repeats` timed runs of
    the trainer at `--batch-size` sequences per rank; rank 0 writes the figures."""
    torch.set_num_threads(1)
    ctx = init_distributed(device="cpu")
    try:
        spec = ModelSpec.preset(args.preset)
        config = InnerConfig(
            steps=args.steps, lr=LR, batch_size=args.batch_size * ctx.world_size,
            seq_len=args.seq_len, warmup_steps=default_warmup(args.steps),
        )  # fmt: skip
        warm = replace(config, steps=args.warmup_steps, warmup_steps=1)
        runs = []
        for cfg in [warm] + [config] * args.repeats:
            model = plugins.build_model(spec)
            loader = plugins.loader_for(args.data, cfg, ctx)
            if ctx.distributed:
                torch.distributed.barrier()
            cpu, started = time.process_time(), time.perf_counter()
            result = _train_inner(model, loader, cfg, ctx)
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            runs.append({
                "tokens": result.tokens, "wallSeconds": wall, "rank0CpuSeconds": cpu,
                "tokensPerSecond": result.tokens / wall,
                "loopTokensPerSecond": result.tokens_per_s, "finalLoss": result.final_loss,
            })  # fmt: skip
        if ctx.is_main:
            Path(args.worker_out).write_text(
                json.dumps({"worldSize": ctx.world_size, "runs": runs[1:]})
            )
    finally:
        shutdown_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(nproc: int, data: str, size: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run the worker in `nproc` processes with the environment torchrun gives its ranks
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; one node), without torchrun's own
    process, which would only add its start-up; rank 0's figures."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--worker-out", str(out),
        "--data", data, "--preset", size["preset"], "--batch-size", str(size["batchSize"]),
        "--seq-len", str(size["seqLen"]), "--steps", str(size["ddpSteps"]),
        "--warmup-steps", str(size["warmupSteps"]), "--repeats", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    env["OMP_NUM_THREADS"] = "1"
    if nproc > 1:
        env |= {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}  # fmt: skip
    ranks = [{"RANK": str(r), "LOCAL_RANK": str(r)} if nproc > 1 else {} for r in range(nproc)]
    procs = [
        subprocess.Popen(
            command,
            env=env | rank,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        for rank in ranks
    ]
    logs = [proc.communicate()[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise SystemExit(f"{nproc}-process run failed:\n" + "\n".join(t[-2000:] for t in logs))
    result: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return result


def ddp(data: str, size: dict[str, Any], tmp: Path) -> dict[str, Any]:
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for _ in range(size["ddpLaunches"]):
        for nproc in (1, 2):
            got = launch(nproc, data, size, tmp / f"ddp-{nproc}.json")
            assert got["worldSize"] == nproc, got
            runs[nproc] += got["runs"]
            print(f"  {nproc} process(es): {got['runs'][-1]['tokensPerSecond']:8.0f} tok/s",
                  flush=True)  # fmt: skip
    tps = {n: statistics.median(r["tokensPerSecond"] for r in rows) for n, rows in runs.items()}
    return {
        "backend": "gloo",
        "launcher": "2 processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, "
        "MASTER_ADDR/PORT), as `torch.distributed.run --standalone --nproc-per-node 2` sets it",
        "scaling": "weak: every rank takes the single process's batch "
        f"({size['batchSize']} sequences), so 2 processes train a global batch of "
        f"{2 * size['batchSize']}",
        "threadsPerProcess": 1,
        "cores": os.cpu_count(),
        "steps": size["ddpSteps"],
        "processes": {
            str(n): {"worldSize": n, "tokensPerSecond": tps[n], "runs": runs[n]} for n in runs
        },
        "efficiency": tps[2] / (2 * tps[1]),
    }


# --------------------------------------------------------------------------- main


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    arms: dict[str, Any] = {}
    for arm, rows in runs.items():
        arms[arm] = {
            "tokensPerSecond": statistics.median(r["tokensPerSecond"] for r in rows),
            "tokensPerCpuSecond": statistics.median(r["tokensPerCpuSecond"] for r in rows),
            "runs": rows,
        }
    return arms


def targets(
    arms: dict[str, Any], overhead: dict[str, float], cpu_overhead: dict[str, float]
) -> list[dict[str, Any]]:
    """Verdicts on the wall-clock medians, as asked; the CPU-time figure beside them says
    whether a verdict is the trainer's or the shared machine's."""
    bare_tps = arms["bare"]["tokensPerSecond"]
    cases = {
        "trainer": "(checkpoints off)",
        "trainerCheckpoints": f"with checkpoints at the default interval (every "
        f"{CHECKPOINT_EVERY} steps), as users run it",
    }
    return [
        {
            "target": f"trainer overhead <= {OVERHEAD_TARGET:.0%} against a bare PyTorch loop "
            + how,
            "measured": {
                "bare": bare_tps,
                "trainer": arms[arm]["tokensPerSecond"],
                "overhead": overhead[arm],
                "cpuOverhead": cpu_overhead[arm],
            },
            "met": overhead[arm] <= OVERHEAD_TARGET,
        }
        for arm, how in cases.items()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 steps, 1 repetition")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trainer.json")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the single-process arms (1: steadiest on a shared "
                   "machine; 0: torch's default)")  # fmt: skip
    p.add_argument("--no-ddp", action="store_true", help="skip the 2-process part")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--warmup-steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    started = time.monotonic()
    size = dict(QUICK if args.quick else FULL)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    spec = ModelSpec.preset(size["preset"])
    config = InnerConfig(
        steps=size["steps"], lr=LR, batch_size=size["batchSize"], seq_len=size["seqLen"],
        warmup_steps=default_warmup(size["steps"]),
    )  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="tapestry-bench-trainer-"))
    try:
        tokens = 2 * size["repeats"] * config.steps * config.tokens_per_step
        data = synthetic_shards(tmp / "data", max(tokens, 200_000))
        print(f"{size}, {torch.get_num_threads()} thread(s)", flush=True)
        runs, loader_s = single_process(spec, config, data, size, tmp)
        scaling = None if args.no_ddp else ddp(data, size, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    arms = summarise(runs)
    bare_tps = arms["bare"]["tokensPerSecond"]
    overhead = {arm: 1 - arms[arm]["tokensPerSecond"] / bare_tps for arm in ARMS[1:]}
    # The same from CPU seconds: what each arm costs, whatever else runs on the cores.
    cpu_overhead = {
        arm: 1 - arms[arm]["tokensPerCpuSecond"] / arms["bare"]["tokensPerCpuSecond"]
        for arm in ARMS[1:]
    }
    # Per repetition against the bare run just before it: robust to the machine's drift.
    paired = {
        arm: statistics.median(
            1 - t["tokensPerSecond"] / b["tokensPerSecond"]
            for b, t in zip(runs["bare"], runs[arm], strict=True)
        )
        for arm in ARMS[1:]
    }
    bare_step_s = statistics.median(r["wallSeconds"] for r in runs["bare"]) / config.steps
    ckpt_runs = runs["trainerCheckpoints"]
    extra_s = statistics.median(r["wallSeconds"] for r in ckpt_runs) - statistics.median(
        r["wallSeconds"] for r in runs["trainer"]
    )
    hashes = {r["weightsSha256"] for rows in runs.values() for r in rows}
    counts = {r["tokens"] for rows in runs.values() for r in rows}
    counts |= {r["tokensLoaded"] for r in runs["trainer"] + runs["trainerCheckpoints"]}
    assert spec.gpt is not None
    report = header("trainer", args.quick, "trainer.py")
    report |= {
        "size": size,
        "model": {
            "preset": size["preset"],
            "params": spec.param_count(),
            "flopsPerToken": spec.gpt.flops_per_token(config.seq_len),
        },
        "inner": config.to_dict(),
        "threads": torch.get_num_threads(),
        "data": "synthetic word-like text, byte tokens, the project's shard format and loader",
        "timing": "bare: optimizer creation to the last step, batches drawn beforehand; "
        "trainer: the whole train_inner call (its loader included); model built outside",
        "tokensPerRun": config.steps * config.tokens_per_step,
        "sameTokens": len(counts) == 1,
        "sameWeights": len(hashes) == 1,
        "arms": arms,
        "overhead": overhead,
        "pairedOverhead": paired,
        "cpuOverhead": cpu_overhead,
        "whereTheTimeGoes": {
            "bareSecondsPerStep": bare_step_s,
            "loaderSecondsPerBatch": loader_s,
            "loaderShareOfABareStep": loader_s / bare_step_s,
            "secondsPerCheckpoint": extra_s / ckpt_runs[0]["checkpoints"],
            "checkpointBytes": ckpt_runs[0]["checkpointBytes"],
        },
        "ddp": scaling,
        "targets": targets(arms, overhead, cpu_overhead),
        "loadAtEnd": round(os.getloadavg()[0], 2),
        "wallSeconds": round(time.monotonic() - started, 1),
    }
    write(args.out, report)
    for t in report["targets"]:
        got = t["measured"]
        print(f"{'MET' if t['met'] else 'NOT MET'}: {t['target']} "
              f"({got['overhead']:+.1%}; CPU time {got['cpuOverhead']:+.1%})")  # fmt: skip
    if scaling is not None:
        print(f"DDP 2 processes on {os.cpu_count()} cores: efficiency {scaling['efficiency']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
