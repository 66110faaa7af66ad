"""Benchmark: how long the test Kubernetes control plane takes to start, warm.

Starts and stops the cluster of `tests/kube` a few times (binaries already built) and
writes the start times, until the node is Ready, to a JSON file.

Usage: python bench/cluster_start.py --runs 3 --out bench/results/cluster-start.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.kube.cluster import KubeCluster, ensure_binaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/cluster-start.json"))
    args = parser.parse_args()
    binaries = ensure_binaries(sys.stderr)
    seconds = []
    for run in range(args.runs):
        cluster = KubeCluster(binaries)
        try:
            cluster.start()
            seconds.append(round(cluster.startup_seconds, 2))
            print(f"run {run + 1}: cluster up in {cluster.startup_seconds:.1f} s", flush=True)
        finally:
            cluster.stop()
            cluster.remove()
    report = {
        "benchmark": "cluster-start",
        "target": "warm start under 30 s",
        "seconds": seconds,
        "median": statistics.median(seconds),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
