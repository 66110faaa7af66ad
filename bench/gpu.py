"""Benchmark: tokens/s and MFU of the trainer on NVIDIA GPUs (bf16 autocast), 350m then 1b.

Per preset, on one GPU: the project's model (`plugins.build_model`), loader
(`plugins.loader_for` over a synthetic shard set) and inner loop (`train_inner`, which on
GPU runs bf16 autocast over fp32 master weights with fused AdamW). One short train_inner
call warms up (CUDA context, kernels, allocator; excluded), then one timed call of the
remaining steps, with `torch.cuda.synchronize()` on both sides of the clock. The timed
step count is cut to fit the time budget from the warm-up's pace. A preset that runs out
of memory is retried with half the micro batch (gradient accumulation keeps the batch),
down to 1, then recorded as "did not fit". With several GPUs (`--multi N`, default: all
of them when there are more than one) the first preset that fitted also runs under N
processes (DDP, NCCL), each at the single GPU's batch.

MFU = achieved model FLOPs/s / (peak dense bf16 FLOPs/s x GPUs), model FLOPs per token
= 6 N + 12 n_layer d_model seq_len (GPTConfig.flops_per_token); the peak comes from a
table by GPU name or `--peak-tflops`, and MFU is null when neither knows it.

The result is written after every preset, so a run stopped by the time guard (default
420 s) or by `bench/gpu.sh`'s timeout still leaves what it measured. `--device cpu
--quick` runs the same code on CPU (tiny preset, fp32, 3 timed steps) as a smoke test.
Without a GPU and without `--device cpu` it exits with status 2.

Usage: python bench/gpu.py [--quick] [--device cuda|cpu] [--presets 350m,1b]
       [--peak-tflops F] [--multi N] [--budget-s S] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks (NVIDIA datasheets), matched in order against the device name.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM (HBM3)
    ("A100", 312.0),
    ("L4", 121.0),
]
# Per preset: global batch (sequences), first micro batch tried, sequence length.
PLANS: dict[str, dict[str, int]] = {
    "350m": {"batchSize": 32, "microBatch": 16, "seqLen": 1024},
    "1b": {"batchSize": 16, "microBatch": 8, "seqLen": 2048},
    "tiny": {"batchSize": 8, "microBatch": 8, "seqLen": 128},
}
FULL: dict[str, Any] = {"presets": ["350m", "1b"], "warmupSteps": 3, "steps": 30}
QUICK: dict[str, Any] = {"presets": ["tiny"], "warmupSteps": 1, "steps": 3}
LR = 3e-4
FLOPS_FORMULA = "6 * params + 12 * n_layers * d_model * seq_len per token (training)"
MIN_SECONDS_FOR_A_PRESET = 40.0


def peak_tflops(name: str | None, given: float | None) -> tuple[float | None, str | None]:
    """(peak dense bf16 TFLOP/s per device, where it came from)."""
    if given is not None:
        return given, "--peak-tflops"
    for key, value in PEAK_TFLOPS if name else []:
        if key in str(name):
            return value, f"table: {key}"
    return None, None


def measure(
    preset: str, plan: dict[str, int], args: argparse.Namespace, data: str, deadline: float,
    share: float,
) -> dict[str, Any]:  # fmt: skip
    """One preset on this process's device (all ranks when distributed), with the OOM
    fallback; `share` is the fraction of the remaining time this preset may use."""
    import torch

    from tapestry_trainer.inner import init_distributed

    ctx = init_distributed(device=args.device)
    if ctx.device.type == "cuda":  # the previous preset's cached blocks go back first
        gc.collect()
        torch.cuda.empty_cache()
    spec = _spec(preset)
    assert spec.gpt is not None
    row: dict[str, Any] = {
        "preset": preset, "params": spec.param_count(), "worldSize": ctx.world_size,
        "seqLen": plan["seqLen"], "batchSize": plan["batchSize"] * ctx.world_size,
        "flopsPerToken": spec.gpt.flops_per_token(plan["seqLen"]), "attempts": [],
    }  # fmt: skip
    micro = min(plan["microBatch"], plan["batchSize"])
    while True:
        try:
            row |= _timed(spec, plan, micro, ctx, args, data, deadline, share)
            row["fit"] = True
            return row
        except torch.cuda.OutOfMemoryError:
            row["attempts"].append({"microBatch": micro, "error": "out of memory"})
        # Outside the handler: the traceback no longer pins the failed run's tensors.
        gc.collect()
        torch.cuda.empty_cache()
        if micro == 1 or ctx.distributed:  # ranks would have to agree on a retry
            row |= {"fit": False, "status": "did not fit"}
            return row
        micro //= 2


def _spec(preset: str) -> Any:
    from tapestry_trainer.specs import ModelSpec

    return ModelSpec.preset(preset)


def _timed(
    spec: Any, plan: dict[str, int], micro: int, ctx: Any, args: argparse.Namespace, data: str,
    deadline: float, share: float,
) -> dict[str, Any]:  # fmt: skip
    import torch
    import torch.distributed as dist

    from tapestry_trainer import plugins
    from tapestry_trainer.inner import train_inner
    from tapestry_trainer.specs import InnerConfig

    cuda = ctx.device.type == "cuda"

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize(ctx.device)
        if ctx.distributed:
            dist.barrier()
        return time.perf_counter()

    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    built = time.perf_counter()
    model = plugins.build_model(spec, device=ctx.device)
    build_s = sync() - built
    warm = InnerConfig(
        steps=args.warmup_steps, lr=LR, batch_size=plan["batchSize"] * ctx.world_size,
        seq_len=plan["seqLen"], warmup_steps=1, checkpoint_every=0,
    )  # fmt: skip
    loader = plugins.loader_for(data, warm, ctx, micro_batch=micro)
    try:
        t0 = sync()
        train_inner(model, loader, warm, ctx, micro_batch=micro, log_every=0)
        warm_s = sync() - t0
        # Steps that fit this preset's share of the time left, at the warm-up's pace
        # (pessimistic: the warm-up includes the first, slowest step); rank 0 decides.
        left = (deadline - time.monotonic()) * share
        steps = max(2, min(args.steps, int(left / (warm_s / args.warmup_steps))))
        if ctx.distributed:
            box = [steps]
            dist.broadcast_object_list(box, src=0)
            steps = int(box[0])
        timed = replace(warm, steps=steps)
        t0 = sync()
        result = train_inner(model, loader, timed, ctx, micro_batch=micro, log_every=0)
        elapsed = sync() - t0
    finally:
        del model, loader
    tps = timed.steps * timed.tokens_per_step / elapsed
    flops = tps * spec.gpt.flops_per_token(plan["seqLen"])
    return {
        "microBatch": micro,
        "accumulation": timed.batch_size // (ctx.world_size * micro),
        "buildSeconds": build_s,
        "warmupSteps": args.warmup_steps,
        "warmupSeconds": warm_s,
        "steps": timed.steps,
        "seconds": elapsed,
        "tokens": timed.steps * timed.tokens_per_step,
        "tokensPerSecond": tps,
        "tokensPerSecondPerDevice": tps / ctx.world_size,
        "trainerTokensPerSecond": result.tokens_per_s,  # its own figure: the loop only
        "modelTflopsPerSecond": flops / 1e12,
        "finalLoss": result.final_loss,
        "peakMemoryGiB": torch.cuda.max_memory_allocated(ctx.device) / 2**30 if cuda else None,
    }


def with_mfu(row: dict[str, Any], peak: float | None) -> dict[str, Any]:
    if row.get("fit") and peak is not None:
        row["mfu"] = row["modelTflopsPerSecond"] / (peak * row["worldSize"])
    else:
        row["mfu"] = None
    return row


# --------------------------------------------------------------------------- processes


def worker(args: argparse.Namespace) -> None:
    """One rank of the multi-device run; rank 0 writes its row to `--worker-out`."""
    from tapestry_trainer.inner import init_distributed, shutdown_distributed

    ctx = init_distributed(device=args.device)
    try:
        preset = args.presets[0]
        plan = PLANS[preset] | {"microBatch": args.micro_batch}
        row = measure(preset, plan, args, args.data, time.monotonic() + args.budget_s, 0.9)
        if ctx.is_main:
            Path(args.worker_out).write_text(json.dumps(row))
    finally:
        shutdown_distributed()


def multi(
    preset: str, micro: int, nproc: int, args: argparse.Namespace, data: str, seconds: float,
    out: Path,
) -> dict[str, Any]:  # fmt: skip
    """The preset under `nproc` processes, launched by torchrun, each at the single
    device's batch (weak scaling)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", str(Path(__file__).resolve()), "--worker",
        "--worker-out", str(out), "--device", args.device, "--presets", preset,
        "--micro-batch", str(micro), "--data", data, "--budget-s", str(seconds),
        "--warmup-steps", str(args.warmup_steps), "--steps", str(args.steps),
    ]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=seconds + 60)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"preset": preset, "worldSize": nproc, "fit": False, "status": "timed out"}
    if done.returncode != 0 or not out.is_file():
        tail = (done.stdout + done.stderr)[-1500:]
        return {"preset": preset, "worldSize": nproc, "fit": False,
                "status": f"failed (exit {done.returncode})", "log": tail}  # fmt: skip
    row: dict[str, Any] = json.loads(out.read_text())
    return row


# --------------------------------------------------------------------------- main


def _bench_module(name: str) -> Any:
    """A sibling script as a module, by path: `trainer` alone would also name the
    repository's trainer/ folder."""
    path = Path(__file__).resolve().parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny preset, 1 + 3 steps (CPU: CI)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--presets", type=lambda s: s.split(","), default=None,
                   help="comma-separated (default: 350m,1b; --quick: tiny)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="timed steps at most per preset")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s of one device (default: the table)")  # fmt: skip
    p.add_argument("--multi", type=int, default=None,
                   help="also run the first preset that fits under N processes "
                   "(default: every GPU when there are 2 or more; 0: off)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="time guard: start no work after this; what ran is written")  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    args.presets = args.presets or list(size["presets"])
    args.steps = args.steps or int(size["steps"])
    args.warmup_steps = args.warmup_steps or int(size["warmupSteps"])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    args = parse(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU found (torch.cuda.is_available() is False); "
              "for a CPU smoke run: --device cpu --quick", file=sys.stderr)  # fmt: skip
        return 2
    if args.worker:
        worker(args)
        return 0
    unknown = [p for p in args.presets if p not in PLANS]
    if unknown:
        print(f"bench/gpu.py: no plan for preset(s) {unknown}; known: {sorted(PLANS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import header, write

    synthetic_shards = _bench_module("trainer").synthetic_shards

    deadline = started + args.budget_s
    cuda = args.device == "cuda"
    if not cuda:  # the CPU smoke run: one thread, steadiest on a shared machine
        torch.set_num_threads(1)
    count = torch.cuda.device_count() if cuda else 0
    name = torch.cuda.get_device_name(0) if cuda else None
    peak, source = peak_tflops(name, args.peak_tflops)
    nproc = args.multi if args.multi is not None else (count if count > 1 else 0)
    report = header("gpu", args.quick, "gpu.py")
    report |= {
        "device": {
            "kind": args.device, "name": name, "count": count,
            "names": [torch.cuda.get_device_name(i) for i in range(count)],
            "torch": torch.__version__, "cuda": torch.version.cuda,
        },
        "precision": "bf16 autocast, fp32 master weights, fused AdamW" if cuda else "fp32",
        "threads": None if cuda else torch.get_num_threads(),
        "peakTflopsPerDevice": peak, "peakSource": source, "flopsFormula": FLOPS_FORMULA,
        "mfuFormula": "tokensPerSecond * flopsPerToken / (peakTflopsPerDevice * 1e12 * "
        "worldSize)",
        "timing": "warm-up train_inner call excluded; timed call between "
        "torch.cuda.synchronize() calls",
        "allocatorConf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "budgetSeconds": args.budget_s, "complete": False, "results": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tapestry-bench-gpu-") as tmp:
        biggest = max(PLANS[p]["batchSize"] * (PLANS[p]["seqLen"] + 1) for p in args.presets)
        data = synthetic_shards(Path(tmp) / "data", max(2 * biggest * 4, 200_000))
        runs = len(args.presets) + (1 if nproc > 1 else 0)
        for i, preset in enumerate(args.presets):
            left = deadline - time.monotonic()
            if left < (MIN_SECONDS_FOR_A_PRESET if not args.quick else 0):
                report["results"].append({"preset": preset, "status": "skipped: time budget"})
                continue
            print(f"{preset}: {left:.0f} s left", flush=True)
            try:
                row = measure(preset, PLANS[preset], args, data, deadline, 0.8 / (runs - i))
            except Exception as err:  # keep what the other presets measure
                row = {"preset": preset, "fit": False, "status": f"failed: {err!r}"[:500]}
            row = with_mfu(row, peak)
            report["results"].append(row)
            _print(row)
            write(args.out, report)
        fitted = [r for r in report["results"] if r.get("fit")]
        if nproc > 1 and fitted:
            left = deadline - time.monotonic()
            first = fitted[0]
            if left < MIN_SECONDS_FOR_A_PRESET and not args.quick:
                report["multi"] = {"preset": first["preset"], "status": "skipped: time budget"}
            else:
                print(f"{first['preset']} on {nproc} processes: {left:.0f} s left", flush=True)
                row = multi(first["preset"], first["microBatch"], nproc, args, data,
                            max(left - 30, 10), Path(tmp) / "multi.json")  # fmt: skip
                row = with_mfu(row, peak)
                if row.get("fit"):
                    row["scalingEfficiency"] = row["tokensPerSecond"] / (
                        nproc * first["tokensPerSecond"]
                    )
                report["multi"] = row
                _print(row)
    report["complete"] = True
    report["wallSeconds"] = round(time.monotonic() - started, 1)
    write(args.out, report)
    return 0


def _print(row: dict[str, Any]) -> None:
    if not row.get("fit"):
        print(f"  {row['preset']}: {row.get('status')}", flush=True)
        return
    mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
    print(f"  {row['preset']} x{row['worldSize']}: {row['tokensPerSecond']:,.0f} tok/s, "
          f"{row['modelTflopsPerSecond']:.1f} TFLOP/s, MFU {mfu}, micro {row['microBatch']}",
          flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
