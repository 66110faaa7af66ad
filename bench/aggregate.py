"""Benchmark: streaming aggregation against plain read and the load-everything way.

A grid of cells, each N participants with fp32 deltas of M MiB (a model-size axis at
fixed N and a participant axis at fixed M), on a filesystem store and on MinIO. Per
cell, measured side by side in fresh child processes (so each peak RSS is its own):

- read:      merely read every delta shard from the store (the floor for any merge);
- streaming: `tapestry_aggregator.merge.aggregate_round`, with full verification;
- naive:     load every delta into memory, then average, then write the new base
             (skipped where N x M would exceed `--naive-max-gib`).

read and streaming alternate (read, streaming, naive, read, streaming) and the faster
of each pair is reported. Throughput per core is delta bytes / CPU seconds, where CPU
seconds are the measuring process's plus the store server's (MinIO) during the
measurement: GB/s per core = bytes / wall / cores used, cores used = CPU s / wall.
`--profile` adds a per-thread CPU profile (cProfile on `time.thread_time`) of one merge.

Usage: python bench/aggregate.py [--quick] [--stores fs,minio] [--out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import header, proc_cpu_s, proc_status_kib, write

FEDERATION = "bench"
MIB = 1 << 20


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


def _clear(store: Any, layout: Any) -> None:
    """Remove round 0's outputs so that a measurement writes them afresh."""
    for prefix in (layout.result(0), layout.base_dir(1), layout.optimizer_dir(1),
                   layout.round_prefix(0) + "parts/"):  # fmt: skip
        for info in list(store.list(prefix)):
            store.delete(info.key)


def outputs_hash(store: Any, layout: Any) -> str:
    """sha256 over the result, the next base and optimizer state (keys and bytes)."""
    digest = hashlib.sha256()
    for prefix in (layout.result(0), layout.base_dir(1), layout.optimizer_dir(1)):
        for info in sorted(store.list(prefix), key=lambda i: i.key):
            digest.update(info.key.encode() + b"\0" + store.get(info.key))
    return digest.hexdigest()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(kind: str, url: str, workdir: Path) -> dict[str, Any]:
    """Run one measurement in this process: wall and CPU seconds, peak RSS."""
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
    _clear(store, layout)
    plan = read_plan(store, layout, 0, key)
    base = read_plan_base(store, layout, plan, key)
    names = plan.document.names
    updates = {n: read_update(store, layout, plan, base, n) for n in names}
    cpu, started = _cpu_s(), time.perf_counter()
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
    elif kind == "profile":
        stats = _profiled(lambda: aggregate_round(store, layout, 0, signer, Strategy("fedavg")))
    else:
        aggregate_round(store, layout, 0, signer, Strategy("fedavg"))
    wall, cpu = time.perf_counter() - started, _cpu_s() - cpu
    out: dict[str, Any] = {"seconds": wall, "cpuSeconds": cpu, "peakRssMiB": peak_rss_kib() / 1024}
    if kind == "streaming":
        out["outputsSha256"] = outputs_hash(store, layout)
    if kind == "profile":
        out["profile"] = stats
    return out


# Where the merge's CPU time goes: functions (pstats keys' file:name) by category.
CATEGORIES = {
    "hashing (sha256)": ("sha256", "openssl_sha256", "hexdigest", "'update' of '_hashlib"),
    "store I/O (read, write, HTTP)": ("method 'read'", "method 'write'", "readinto", "recv",
                                      "sendall", "send'", "posix.open", "io.open", "fsync",
                                      "replace", "rename", "posix.stat", "urllib3"),
    "decode and checks (safetensors, dot)": ("decode", "frombuffer", "dot", "isfinite",
                                             "_checked_norm_sq", "json.loads", "loads"),
    "accumulate and outer step (NumPy)": ("merge_shards", "outer_step", "_step_shard"),
    "encode new base (tobytes, copy)": ("encode", "tobytes", "join", "ascontiguousarray"),
    "signatures": ("sign", "verify", "ed25519"),
}  # fmt: skip


def _profiled(run: Any) -> dict[str, Any]:
    """Run `run` with a CPU-time profiler in every thread; summarise self time by
    category (cProfile alone would see only the main thread)."""
    profiles: list[cProfile.Profile] = []
    original = threading.Thread.run

    def profiled_run(thread: threading.Thread) -> None:
        profile = cProfile.Profile(time.thread_time)
        profiles.append(profile)
        profile.runcall(original, thread)

    threading.Thread.run = profiled_run  # type: ignore[method-assign,assignment]
    main = cProfile.Profile(time.thread_time)
    try:
        main.runcall(run)
    finally:
        threading.Thread.run = original  # type: ignore[method-assign]
    stats = pstats.Stats(main)
    for profile in profiles:
        stats.add(profile)
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    totals = dict.fromkeys([*CATEGORIES, "other"], 0.0)
    top = []
    for (file, line, name), (_, _, tottime, _, _) in raw.items():
        label = f"{Path(file).name}:{line}({name})"
        top.append((tottime, label))
        key = f"{file}:{name}"
        for category, needles in CATEGORIES.items():
            if any(n in key for n in needles):
                totals[category] += tottime
                break
        else:
            totals["other"] += tottime
    top.sort(reverse=True)
    return {
        "cpuSecondsByCategory": {k: round(v, 3) for k, v in totals.items()},
        "topSelfTime": [{"function": f, "cpuSeconds": round(t, 3)} for t, f in top[:15]],
    }


def peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM)."""
    return int(proc_status_kib("VmHWM"))


def _proc_cpu_s(pid: int | None) -> float:
    """A server process's CPU seconds so far (user + system), 0 without one."""
    return 0.0 if pid is None else float(proc_cpu_s(pid))


def _child(kind: str, url: str, workdir: Path, server_pid: int | None) -> dict[str, Any]:
    before = _proc_cpu_s(server_pid)
    out = subprocess.run(
        [sys.executable, __file__, "--measure", kind, "--url", url, "--workdir", str(workdir)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["serverCpuSeconds"] = _proc_cpu_s(server_pid) - before
    return result


def _start_minio(tmp: Path) -> tuple[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.s3servers import start_minio

    server = start_minio(tmp / "minio")
    return server.url_for("bench"), server


def _throughput(bytes_read: int, m: dict[str, Any]) -> dict[str, float]:
    """GB/s wall, cores used (CPU s / wall, client plus store server), GB/s per core."""
    cpu = m["cpuSeconds"] + m["serverCpuSeconds"]
    return {
        "gbPerS": bytes_read / m["seconds"] / 1e9,
        "coresUsed": cpu / m["seconds"],
        "gbPerSPerCore": bytes_read / cpu / 1e9,
    }


def run_cell(
    store_kind: str, n: int, model_mib: int, shard_mib: int, naive_max_gib: float, profile: bool
) -> dict[str, Any]:
    """Set up one cell's round, measure it, delete its data."""
    tmp = Path(tempfile.mkdtemp(prefix=f"tapestry-bench-{store_kind}-"))
    server = None
    try:
        if store_kind == "fs":
            url = str(tmp / "store")
        else:
            url, server = _start_minio(tmp)
        pid = server.proc.pid if server is not None and server.proc is not None else None
        tag = f"[{store_kind} N={n} M={model_mib} MiB]"
        print(f"{tag} writing {n} deltas", flush=True)
        setup(url, n, model_mib, shard_mib, tmp)
        row: dict[str, Any] = {"store": store_kind, "participants": n, "modelMiB": model_mib}
        runs: dict[str, list[dict[str, Any]]] = {"read": [], "streaming": [], "naive": []}
        naive = n * model_mib / 1024 <= naive_max_gib
        order = ["read", "streaming"] + (["naive"] if naive else []) + ["read", "streaming"]
        for kind in order:
            m = _child(kind, url, tmp, pid)
            runs[kind].append(m)
            cpu = m["cpuSeconds"] + m["serverCpuSeconds"]
            print(f"  {kind:9s} {m['seconds']:7.2f} s {cpu:7.2f} CPU s "
                  f"{m['peakRssMiB']:7.0f} MiB", flush=True)  # fmt: skip
        delta_bytes = n * model_mib * MIB
        row["deltaBytes"] = delta_bytes
        for kind, ms in runs.items():
            if ms:
                best = min(ms, key=lambda m: m["seconds"])
                row[kind] = {**best, **_throughput(delta_bytes, best), "runs": ms}
            else:
                row[kind] = {"skipped": f"N x M above {naive_max_gib:g} GiB in memory"}
        row["streamingOverRead"] = row["streaming"]["seconds"] / row["read"]["seconds"]
        row["sameOutputs"] = len({m["outputsSha256"] for m in runs["streaming"]}) == 1
        row["rssTargetMiB"] = shard_mib + 512
        row["rssMet"] = row["streaming"]["peakRssMiB"] <= row["rssTargetMiB"]
        if profile:
            print(f"{tag} profiling one merge", flush=True)
            row["profile"] = _child("profile", url, tmp, pid)
        return row
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _cells(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(N, M) pairs: the size axis at --fixed-n, the participant axis at --fixed-mib."""
    cells = [(args.fixed_n, m) for m in _ints(args.sizes)]
    cells += [(n, args.fixed_mib) for n in _ints(args.participants)]
    return list(dict.fromkeys(cells))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fs store, N=2, 16 MiB")
    parser.add_argument("--stores", default="fs,minio")
    parser.add_argument("--sizes", default="64,256,1024", help="model MiB at --fixed-n")
    parser.add_argument("--fixed-n", type=int, default=4)
    parser.add_argument("--participants", default="2,8,16,32,64", help="N at --fixed-mib")
    parser.add_argument("--fixed-mib", type=int, default=64)
    parser.add_argument("--shard-mib", type=int, default=32)
    parser.add_argument("--naive-max-gib", type=float, default=12.0)
    parser.add_argument("--minio-cells", default="", help="N:MiB,... for MinIO (default: the grid)")
    parser.add_argument("--profile-cell", default="fs,16,64", help="store,N,MiB to profile")
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
    if args.quick:
        args.stores, args.sizes, args.fixed_n, args.participants = "fs", "16", 2, ""
        args.shard_mib, args.profile_cell = 4, "fs,2,16"
    rows = []
    for store_kind in args.stores.split(","):
        cells = _cells(args)
        if store_kind == "minio" and args.minio_cells:
            cells = [
                (int(c.split(":")[0]), int(c.split(":")[1])) for c in args.minio_cells.split(",")
            ]
        for n, mib in cells:
            profile = args.profile_cell == f"{store_kind},{n},{mib}"
            rows.append(run_cell(store_kind, n, mib, args.shard_mib, args.naive_max_gib, profile))
    report = header("aggregate", args.quick, "aggregate.py")
    report.update({
        "shardMiB": args.shard_mib,
        "rssTarget": "one shard (shardMiB) + 512 MiB",
        "throughput": "delta bytes (N x M) / CPU seconds of the measuring process plus "
                      "the store server; GB = 1e9 bytes; best of two runs by wall time",
        "rows": rows,
    })  # fmt: skip
    write(args.out, report)


if __name__ == "__main__":
    main()
