"""Benchmark: streaming aggregation against the load-everything way, same store, same run.

For N participants with deltas of `--model-mib` each, three measurements run, each in a
fresh child process so that its peak RSS is its own:

- read:      merely read every delta shard from the store (the floor for any merge);
- naive:     what Flower/NVFlare-style aggregators do: load every delta into memory,
             then average, then write the new base;
- streaming: `tapestry_aggregator.merge.aggregate_round`, with full verification.

Usage: python bench/aggregate.py --stores fs,minio --participants 2,8,16 --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

FEDERATION = "bench"


def _store(url: str) -> Any:
    from tapestry_protocol.store import open_store

    return open_store(url, create=True)


def setup(url: str, participants: int, model_mib: int, shard_mib: int, workdir: Path) -> None:
    """Publish a base, a plan and N signed fp32 deltas."""
    from tapestry_protocol.documents import CloseTrigger
    from tapestry_protocol.exchange import (
        COORDINATOR,
        close_round,
        make_plan,
        publish_model,
        publish_plan,
        publish_update,
    )
    from tapestry_protocol.layout import Layout
    from tapestry_protocol.shards import plan_shards
    from tapestry_protocol.signing import SigningKey

    store, layout = _store(url), Layout(FEDERATION)
    coordinator = SigningKey.generate(COORDINATOR)
    coordinator.save(workdir)
    rng = np.random.default_rng(0)
    rows = model_mib * (1 << 20) // 4 // 4096
    tensors = {f"layer{i:03d}": np.empty((rows // 64, 4096), np.float32) for i in range(64)}
    for value in tensors.values():
        value[:] = rng.random(value.shape, dtype=np.float32)
    groups = plan_shards([(n, v.nbytes) for n, v in tensors.items()], shard_mib << 20)
    base = publish_model(store, layout, 0, tensors, groups, coordinator)
    keys = {f"p{i:02d}": SigningKey.generate(f"p{i:02d}") for i in range(participants)}
    plan = publish_plan(
        store,
        layout,
        make_plan(
            layout,
            0,
            base,
            model={},
            participants={n: k.public_key_text for n, k in keys.items()},
            hyperparameters={"innerSteps": 1, "learningRate": 1.0, "batchSize": 1, "seqLen": 1},
            min_participants=1,
            deadline="2030-01-01T00:00:00Z",
        ),
        coordinator,
    )
    for i, (_, key) in enumerate(sorted(keys.items())):
        delta = {n: v * np.float32(0.01 * (i + 1)) for n, v in tensors.items()}
        publish_update(store, layout, plan, base, delta, key, tokens=1000 + i, metrics={})
    close_round(store, layout, plan, coordinator, CloseTrigger.ALL_REPORTED, datetime.now(UTC))


def measure(kind: str, url: str, workdir: Path) -> dict[str, float]:
    """Run one measurement in this process; returns wall seconds and peak RSS."""
    from tapestry_aggregator.merge import aggregate_round
    from tapestry_aggregator.strategy import Strategy, compute_weights
    from tapestry_protocol.exchange import (
        COORDINATOR,
        decode_shard,
        fetch_shard,
        publish_model,
        read_plan,
        read_plan_base,
        read_update,
    )
    from tapestry_protocol.layout import Layout
    from tapestry_protocol.signing import load_signing_key

    store, layout = _store(url), Layout(FEDERATION)
    signer = load_signing_key(COORDINATOR, workdir / f"{COORDINATOR}.key")
    key = signer.public_key_text
    for info in list(store.list(layout.result(0))) + list(store.list(layout.base_dir(1))):
        store.delete(info.key)
    for info in list(store.list(layout.optimizer_dir(1))):
        store.delete(info.key)
    plan = read_plan(store, layout, 0, key)
    base = read_plan_base(store, layout, plan, key)
    names = plan.document.names
    updates = {n: read_update(store, layout, plan, base, n) for n in names}
    started = time.perf_counter()
    if kind == "read":
        for update in updates.values():
            for ref in update.document.shards:
                store.get(update.directory + ref.name)
    elif kind == "naive":
        deltas = {}
        for name, update in updates.items():
            tensors: dict[str, np.ndarray] = {}
            for ref in update.document.shards:
                data = fetch_shard(store, update.directory, ref)
                tensors.update(
                    {k: v.copy() for k, v in decode_shard(data, ref, "fp32", "").items()}
                )
            deltas[name] = tensors
        weights = compute_weights({n: u.document.tokens for n, u in updates.items()})
        base_tensors: dict[str, np.ndarray] = {}
        for ref in base.document.shards:
            data = fetch_shard(store, base.directory, ref)
            base_tensors.update(
                {k: v.copy() for k, v in decode_shard(data, ref, "fp32", "").items()}
            )
        new: dict[str, np.ndarray] = {}
        for t, value in base_tensors.items():
            total = np.zeros_like(value)
            for n in deltas:
                total += np.float32(weights[n]) * deltas[n][t]
            new[t] = value - total
        publish_model(store, layout, 1, new, base.document.groups, signer)
    else:
        aggregate_round(store, layout, 0, signer, Strategy("fedavg"))
    wall = time.perf_counter() - started
    return {"seconds": wall, "peakRssMiB": peak_rss_kib() / 1024}


def peak_rss_kib() -> int:
    """This process's peak RSS. Not ru_maxrss: Linux carries that over from the parent
    through fork and exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(kind: str, url: str, workdir: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", kind, "--url", url, "--workdir", str(workdir)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _start_minio(tmp: Path) -> tuple[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.s3servers import start_minio

    server = start_minio(tmp / "minio")
    return server.url_for("bench"), server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="fs,minio")
    parser.add_argument("--participants", default="2,8,16")
    parser.add_argument("--model-mib", type=int, default=256)
    parser.add_argument("--shard-mib", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench/results/aggregate.json"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        from tapestry_aggregator.memory import keep_freed_memory

        keep_freed_memory()  # as `tapestry aggregate` does
        print(json.dumps(measure(args.measure, args.url, args.workdir)))
        return
    rows = []
    for store_kind in args.stores.split(","):
        for n in [int(x) for x in args.participants.split(",")]:
            tmp = Path(tempfile.mkdtemp(prefix=f"tapestry-bench-{store_kind}-"))
            server = None
            try:
                if store_kind == "fs":
                    url = str(tmp / "store")
                else:
                    url, server = _start_minio(tmp)
                print(
                    f"[{store_kind} N={n}] writing {n} deltas of {args.model_mib} MiB", flush=True
                )
                setup(url, n, args.model_mib, args.shard_mib, tmp)
                row: dict[str, Any] = {"store": store_kind, "participants": n}
                for kind in ("read", "streaming", "naive"):
                    row[kind] = _child(kind, url, tmp)
                    print(
                        f"  {kind:9s} {row[kind]['seconds']:7.2f} s "
                        f"{row[kind]['peakRssMiB']:8.0f} MiB",
                        flush=True,
                    )
                row["streamingOverRead"] = row["streaming"]["seconds"] / row["read"]["seconds"]
                row["rssTargetMiB"] = args.model_mib + 512
                rows.append(row)
            finally:
                if server is not None:
                    server.stop()
                shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "benchmark": "aggregate",
        "modelMiB": args.model_mib,
        "shardMiB": args.shard_mib,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "memoryGiB": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        },
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
