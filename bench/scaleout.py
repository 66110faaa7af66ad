"""Benchmark: scale-out aggregation, K parts each in its own process, then the commit.

One round (N participants x M MiB fp32 deltas, filesystem store) is aggregated with
K = 1, 2, ... parts, each part a fresh child process as each index of the Indexed Job
is a pod: the K parts start together, part 0 commits once every part is stored. The
runs alternate over K (`--repeats` rounds of K = 1, 2, ...). Per run: the parts phase
(start until the last part's objects are stored), the commit phase (part 0's commit),
and each part's wall, CPU seconds and peak RSS (VmHWM). The outputs (result, next base,
optimizer state: keys and bytes) are hashed after every run and must be the same for
every K.

Usage: python bench/scaleout.py [--quick] [--parts 1,2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregate import FEDERATION, _clear, _cpu_s, _store, outputs_hash, peak_rss_kib, setup
from report import header, write


def part(url: str, workdir: Path, index: int, parts: int, started: float) -> dict[str, Any]:
    """Run part `index` of `parts` here; times measured against the shared `started`
    (time.time of the parent's launch) so phases line up across processes."""
    from tapestry_aggregator import merge
    from tapestry_aggregator import parts as parts_module
    from tapestry_aggregator.memory import keep_freed_memory
    from tapestry_aggregator.strategy import Strategy
    from tapestry_protocol.exchange import COORDINATOR
    from tapestry_protocol.layout import Layout
    from tapestry_protocol.signing import load_signing_key

    keep_freed_memory()
    marks: dict[str, float] = {}
    module: Any = merge if parts == 1 else parts_module
    name = "commit_round" if parts == 1 else "commit_parts"
    commit = getattr(module, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        marks["commitStart"] = time.time() - started
        try:
            return commit(*args, **kwargs)
        finally:
            marks["commitEnd"] = time.time() - started

    setattr(module, name, timed)
    store, layout = _store(url), Layout(FEDERATION)
    signer = load_signing_key(COORDINATOR, workdir / f"{COORDINATOR}.key")
    marks["start"] = time.time() - started
    cpu = _cpu_s()
    parts_module.aggregate_part(
        store, layout, 0, signer, Strategy("fedavg"), index, parts, poll=0.05
    )
    end = time.time() - started
    return {
        "part": index,
        "start": marks["start"],
        "stored": marks.get("commitStart", end),
        "end": end,
        **({"commit": marks["commitEnd"] - marks["commitStart"]} if "commitEnd" in marks else {}),
        "cpuSeconds": _cpu_s() - cpu,
        "peakRssMiB": peak_rss_kib() / 1024,
    }


def run_k(url: str, workdir: Path, parts: int) -> dict[str, Any]:
    """One aggregation of the round with `parts` parts, all launched at once."""
    from tapestry_protocol.layout import Layout

    store, layout = _store(url), Layout(FEDERATION)
    _clear(store, layout)
    started = time.time()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--part",
                str(i),
                "--parts",
                str(parts),
                "--url",
                url,
                "--workdir",
                str(workdir),
                "--started",
                repr(started),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(parts)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"part exited {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.time() - started
    zero = results[0]
    row = {
        "parts": parts,
        "wallSeconds": wall,
        "partsPhaseSeconds": max(r["stored"] for r in results),
        "commitSeconds": zero.get("commit", 0.0),
        "maxPeakRssMiB": max(r["peakRssMiB"] for r in results),
        "cpuSeconds": sum(r["cpuSeconds"] for r in results),
        "perPart": results,
        "outputsSha256": outputs_hash(store, layout),
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=2, 16 MiB, K=1,2, once")
    parser.add_argument("--participants", type=int, default=8)
    parser.add_argument("--model-mib", type=int, default=128)
    parser.add_argument("--shard-mib", type=int, default=32)
    parser.add_argument("--parts", default="1,2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/scaleout.json"))
    parser.add_argument("--part", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part is not None:
        print(json.dumps(part(args.url, args.workdir, args.part, int(args.parts), args.started)))
        return
    if args.quick:
        args.participants, args.model_mib, args.shard_mib, args.repeats = 2, 16, 4, 1
    ks = [int(k) for k in args.parts.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="tapestry-bench-scaleout-"))
    runs = []
    try:
        url = str(tmp / "store")
        print(f"writing {args.participants} deltas of {args.model_mib} MiB", flush=True)
        setup(url, args.participants, args.model_mib, args.shard_mib, tmp)
        for _ in range(args.repeats):
            for k in ks:
                row = run_k(url, tmp, k)
                runs.append(row)
                print(
                    f"  K={k}: parts {row['partsPhaseSeconds']:6.2f} s, commit "
                    f"{row['commitSeconds']:5.2f} s, wall {row['wallSeconds']:6.2f} s, "
                    f"peak RSS {row['maxPeakRssMiB']:5.0f} MiB, {row['outputsSha256'][:12]}",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {}
    for k in ks:
        rows = [r for r in runs if r["parts"] == k]
        best[str(k)] = min(rows, key=lambda r: r["wallSeconds"])
    report = header("scaleout", args.quick, "scaleout.py")
    report.update({
        "store": "fs",
        "participants": args.participants,
        "modelMiB": args.model_mib,
        "shardMiB": args.shard_mib,
        "deltaBytes": args.participants * args.model_mib << 20,
        "best": {k: {f: r[f] for f in ("wallSeconds", "partsPhaseSeconds", "commitSeconds",
                                        "maxPeakRssMiB", "cpuSeconds")} for k, r in best.items()},
        "identical": len({r["outputsSha256"] for r in runs}) == 1,
        "runs": runs,
    })  # fmt: skip
    write(args.out, report)


if __name__ == "__main__":
    main()
