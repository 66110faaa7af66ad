"""Benchmark: what participant-level differential privacy costs the demo task.

The same `tapestry local run` (same data, model, seed and rounds) at several noise
multipliers: first without privacy, whose median update norm (from the coordinator's
signed results) becomes the clip norm of the private runs, so the clip itself costs
little and the noise is what is measured; then each noise level. For each it reports the
shared model's validation loss pooled over every participant's held-out data, and the
cumulative epsilon at delta that the participants' signed manifests state.

Usage: python bench/privacy.py --out bench/results/privacy.json [--quick] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from report import header, write

ROOT = Path(__file__).resolve().parents[1]
FULL = {"participants": 3, "rounds": 3, "inner_steps": 10, "batch_size": 8, "seq_len": 128}
QUICK = {"participants": 2, "rounds": 2, "inner_steps": 2, "batch_size": 2, "seq_len": 32}
LEVELS = (0.001, 0.01, 1.0)
QUICK_LEVELS = (1.0,)
DELTA = 1e-5


def _run(size: dict[str, int], workdir: Path, data: Path | None, dp: list[str]) -> dict[str, Any]:
    """One local federation from scratch; its summary.json."""
    command = [
        sys.executable, "-m", "tapestry_cli", "local", "run", "--fresh", "--no-baseline",
        "--participants", str(size["participants"]), "--rounds", str(size["rounds"]),
        "--preset", "tiny", "--inner-steps", str(size["inner_steps"]),
        "--batch-size", str(size["batch_size"]), "--seq-len", str(size["seq_len"]),
        "--workdir", str(workdir), *dp,
    ]  # fmt: skip
    if data is not None:
        command += ["--data", str(data)]
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"local run failed ({' '.join(dp) or 'no privacy'}):\n{done.stdout}")
    summary: dict[str, Any] = json.loads((workdir / "summary.json").read_text())
    return summary


def _update_norms(workdir: Path, rounds: int) -> list[float]:
    """Every merged update's L2 norm, as the coordinator's results record it."""
    from tapestry_protocol.documents import RoundResult
    from tapestry_protocol.exchange import read_document
    from tapestry_protocol.layout import Layout
    from tapestry_protocol.store import open_store

    store = open_store(str(workdir / "store"))
    layout = Layout("local")
    norms = []
    for r in range(rounds):
        result, _, _ = read_document(store, layout.result(r), RoundResult)
        norms += [a.delta_norm for a in result.accepted]
    return norms


def _untrained(workdir: Path, size: dict[str, int], names: list[str]) -> float:
    """The pooled loss of the round-0 model every run starts from (same spec and seed),
    evaluated as the runner evaluates: what no training at all scores."""
    from tapestry_trainer.baseline import evaluate_arrays, initial_arrays
    from tapestry_trainer.specs import InnerConfig, ModelSpec

    spec = ModelSpec.preset("tiny", seed=0)
    config = InnerConfig(steps=size["inner_steps"], lr=3e-3, batch_size=size["batch_size"],
                         seq_len=size["seq_len"])  # fmt: skip
    data = [str(workdir / "data" / name) for name in names]
    losses = evaluate_arrays(spec, initial_arrays(spec), data, config)
    return sum(losses) / len(losses)


def _pooled(summary: dict[str, Any]) -> float:
    """The shared model's loss averaged over the participants' held-out sets."""
    return float(summary["averages"]["shared (federated)"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    p.add_argument("--quick", action="store_true", help="2 participants x 2 rounds, one level")
    p.add_argument("--data", type=Path, default=None, help="own text (default: demo corpus)")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-privacy")
    p.add_argument("--levels", type=float, nargs="+", default=None, help="noise multipliers")
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    levels = args.levels or (QUICK_LEVELS if args.quick else LEVELS)
    started = time.monotonic()

    print(f"noise 0 (off): {size}", flush=True)
    plain = _run(size, args.workdir / "off", args.data, [])
    norms = _update_norms(args.workdir / "off", size["rounds"])
    clip = float(statistics.median(norms))
    rows: list[dict[str, Any]] = [
        {"noiseMultiplier": 0.0, "clipNorm": None, "epsilon": None, "delta": None,
         "rounds": size["rounds"], "validationLoss": _pooled(plain), "losses": plain["losses"]}
    ]  # fmt: skip
    for z in levels:
        print(f"noise {z:g}, clip {clip:.4g}", flush=True)
        dp = ["--dp-noise-multiplier", repr(z), "--dp-clip-norm", repr(clip),
              "--dp-delta", repr(DELTA)]  # fmt: skip
        summary = _run(size, args.workdir / f"noise-{z:g}", args.data, dp)
        guarantees = summary["privacy"].values()
        rows.append({
            "noiseMultiplier": z,
            "clipNorm": clip,
            "epsilon": max(g["epsilon"] for g in guarantees),
            "delta": DELTA,
            "rounds": max(g["rounds"] for g in guarantees),
            "validationLoss": _pooled(summary),
            "losses": summary["losses"],
        })  # fmt: skip
    report = {
        **header("privacy", args.quick, "privacy.py"),
        "task": {
            **size,
            "preset": "tiny",
            "data": str(args.data or "demo corpus"),
            "optimizer": "default of tapestry local run",
        },
        "updateNorms": {"median": clip, "min": min(norms), "max": max(norms)},
        "untrainedValidationLoss": _untrained(
            args.workdir / "off", size, sorted(plain["losses"]["shared (federated)"])
        ),
        "levels": rows,
        "seconds": round(time.monotonic() - started, 1),
    }
    write(args.out, report)
    for row in rows:
        eps = "-" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
        print(f"noise {row['noiseMultiplier']:g}: loss {row['validationLoss']:.4f}, epsilon {eps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
