"""Benchmark: upload and download throughput of the store layer against the plain minio SDK.

One MinIO on loopback, one process, the same bytes. Each repetition runs every arm of
every operation, alternating which arm goes first, so both see the same machine load:

- raw put / raw get: one object of the update's size, through `S3Store.put` / `S3Store.get`
  against `Minio.put_object(part_size, num_parallel_uploads)` / parallel ranged
  `Minio.get_object` calls of the same part size and concurrency;
- publish / fetch: the protocol path. `exchange.publish_update` (encode every shard,
  sha256 it, upload it, sign and commit the manifest) against the plain client uploading
  the same shard bytes, already encoded, one object each; and the aggregator's verified
  read (`read_update`, then `fetch_shard` + `decode_shard` of every shard, as many in
  flight as the aggregator's prefetch) against parallel ranged GETs of the same objects.

Every arm checks what it moved (sizes, sha256) outside the timed region.

Usage: python bench/transfer.py [--quick] [--reps N] [--url s3://bucket?endpoint=...]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minio import Minio
from report import header, write

from tapestry_protocol.exchange import (
    COORDINATOR,
    commit_model,
    decode_shard,
    fetch_shard,
    make_plan,
    publish_plan,
    publish_update,
    read_update,
)
from tapestry_protocol.layout import Layout, shard_name
from tapestry_protocol.shards import (
    DEFAULT_SHARD_BYTES,
    FloatArray,
    ShardRef,
    encode_delta,
    encode_safetensors,
    plan_shards,
)
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store import S3Credentials, open_store
from tapestry_protocol.store.s3 import DEFAULT_PART_SIZE, DEFAULT_WORKERS, MiB, S3Store

FEDERATION = "bench-transfer"
PARTICIPANT = "p00"
#: (hidden, intermediate, vocabulary, layers): a Llama-style decoder of about 1 GiB in
#: fp32 (268 M parameters, 147 tensors), and a 32 MiB one for --quick.
FULL_MODEL = (1024, 2816, 30720, 16)
QUICK_MODEL = (256, 704, 8192, 5)
OPERATIONS = ("put", "get", "publish", "fetch")


def model_shapes(hidden: int, inter: int, vocab: int, layers: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes in checkpoint order (embeddings, blocks, head)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def make_delta(shapes: dict[str, tuple[int, ...]]) -> dict[str, FloatArray]:
    rng = np.random.default_rng(0)
    delta: dict[str, FloatArray] = {}
    for name, shape in shapes.items():
        values = rng.random(shape, dtype=np.float32)
        values -= np.float32(0.5)
        values *= np.float32(1e-3)
        delta[name] = values
    return delta


def plain_client(store: S3Store, credentials_dir: str, workers: int) -> Minio:
    """The minio SDK as anyone would use it, with a connection pool as large as the
    store's and the same region (no GetBucketLocation round trip)."""
    creds = S3Credentials.from_dir(credentials_dir)
    endpoint = urlsplit(store.location.endpoint)
    return Minio(
        endpoint.netloc,
        access_key=creds.access_key,
        secret_key=creds.secret_key,
        secure=endpoint.scheme == "https",
        region="us-east-1",
        http_client=urllib3.PoolManager(maxsize=workers + 2, retries=False),
    )


class Plain:
    """The plain parallel client: SDK multipart uploads, parallel ranged downloads."""

    def __init__(self, client: Minio, bucket: str, part_size: int, workers: int) -> None:
        self.client, self.bucket, self.part_size, self.workers = client, bucket, part_size, workers

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(
            self.bucket, key, io.BytesIO(data), len(data),
            part_size=self.part_size, num_parallel_uploads=self.workers,
        )  # fmt: skip

    def get_many(self, keys: list[str]) -> list[bytearray]:
        """Every object, `part_size` ranges with `workers` of them in flight at once."""
        sizes = [self.client.stat_object(self.bucket, k).size or 0 for k in keys]
        buffers = [bytearray(size) for size in sizes]
        jobs = [
            (i, offset, min(self.part_size, size - offset))
            for i, size in enumerate(sizes)
            for offset in range(0, size, self.part_size)
        ]

        def fetch(job: tuple[int, int, int]) -> None:
            i, offset, length = job
            response = self.client.get_object(self.bucket, keys[i], offset=offset, length=length)
            try:
                data = response.read()
            finally:
                response.close()
                response.release_conn()
            if len(data) != length:
                raise RuntimeError(f"{keys[i]}@{offset}: got {len(data)} of {length} bytes")
            buffers[i][offset : offset + length] = data

        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(fetch, jobs))
        return buffers


class Setup:
    """A signed plan and base manifest naming the update's shard layout, so that
    `publish_update` and `read_update` run exactly as in a round. The base's shards are
    never read, so they are not uploaded."""

    def __init__(self, store: S3Store, delta: dict[str, FloatArray], shard_bytes: int) -> None:
        self.layout = Layout(FEDERATION)
        self.coordinator = SigningKey.generate(COORDINATOR)
        self.participant = SigningKey.generate(PARTICIPANT)
        self.groups = plan_shards([(n, v.nbytes) for n, v in delta.items()], shard_bytes)
        refs = [
            ShardRef(shard_name(i, "0" * 64), sum(delta[n].nbytes for n in g), "0" * 64, tuple(g))
            for i, g in enumerate(self.groups)
        ]
        self.base = commit_model(store, self.layout, 0, refs, self.coordinator)
        plan = make_plan(
            self.layout, 0, self.base, model={},
            participants={PARTICIPANT: self.participant.public_key_text},
            hyperparameters={"innerSteps": 1, "learningRate": 1.0, "batchSize": 1, "seqLen": 1},
            min_participants=1, deadline="2030-01-01T00:00:00Z",
        )  # fmt: skip
        self.plan = publish_plan(store, self.layout, plan, self.coordinator)


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
        "stdev": round(statistics.stdev(values), 1) if len(values) > 1 else 0.0,
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    part_size, workers = args.part_mib * MiB, args.workers
    store = open_store(url, create=True, part_size=part_size, max_workers=workers)
    assert isinstance(store, S3Store), url
    creds_dir = dict(parse_qsl(urlsplit(url).query)).get("credentials_dir")
    if not creds_dir:
        raise SystemExit("--url must name a credentials_dir (the plain client needs the keys)")
    plain = Plain(plain_client(store, creds_dir, workers), store.bucket, part_size, workers)
    prefix = store.prefix

    shapes = model_shapes(*(QUICK_MODEL if args.quick else FULL_MODEL))
    delta = make_delta(shapes)
    setup = Setup(store, delta, args.shard_mib * MiB)
    directory = setup.layout.update_dir(0, PARTICIPANT)
    # What publish_update will upload: the shards are deterministic, so the plain arm
    # moves exactly these bytes and the store arm must produce the same digests.
    shards = [
        encode_safetensors({k: v for n in g for k, v in encode_delta(n, delta[n], "fp32").items()})
        for g in setup.groups
    ]
    digests = [hashlib.sha256(s).hexdigest() for s in shards]
    blob = b"".join(shards)
    blob_sha = hashlib.sha256(blob).hexdigest()
    update_bytes = len(blob)
    print(
        f"update: {len(shapes)} tensors, {update_bytes / MiB:.1f} MiB in {len(shards)} shards of "
        f"<= {args.shard_mib} MiB; part size {args.part_mib} MiB, {workers} in flight",
        flush=True,
    )

    seconds: dict[str, dict[str, list[float]]] = {
        op: {"store": [], "plain": []} for op in OPERATIONS
    }
    checks: dict[str, dict[str, list[bool]]] = {op: {"store": [], "plain": []} for op in OPERATIONS}

    def delete_update() -> None:
        for info in list(store.list(directory)):
            store.delete(info.key)

    def arm_put(arm: str, rep: int) -> None:
        key = f"raw/{arm}-{rep}"
        if arm == "store":
            t, _ = timed(lambda: store.put(key, blob))
        else:
            t, _ = timed(lambda: plain.put(prefix + key, blob))
        seconds["put"][arm].append(t)
        checks["put"][arm].append(store.stat(key).size == update_bytes)

    def arm_get(arm: str, rep: int) -> None:
        key = f"raw/{arm}-{rep}"
        if arm == "store":
            t, data = timed(lambda: store.get(key))
        else:
            t, (data,) = timed(lambda: plain.get_many([prefix + key]))
        seconds["get"][arm].append(t)
        checks["get"][arm].append(len(data) == update_bytes and _sha(data) == blob_sha)
        del data
        store.delete(key)

    def arm_publish(arm: str, rep: int) -> None:
        if arm == "store":
            delete_update()
            t, update = timed(
                lambda: publish_update(
                    store,
                    setup.layout,
                    setup.plan,
                    setup.base,
                    delta,
                    setup.participant,
                    tokens=1,
                    metrics={},
                )
            )
            ok = [r.sha256 for r in update.document.shards] == digests
        else:

            def put_all() -> None:
                for i, data in enumerate(shards):
                    plain.put(f"{prefix}plain/shards/{i:05d}", data)

            t, _ = timed(put_all)
            ok = [store.stat(f"plain/shards/{i:05d}").size for i in range(len(shards))] == [
                len(s) for s in shards
            ]
        seconds["publish"][arm].append(t)
        checks["publish"][arm].append(ok)

    def arm_fetch(arm: str, rep: int) -> None:
        if arm == "store":

            def fetch_all() -> list[dict[str, FloatArray]]:
                update = read_update(store, setup.layout, setup.plan, setup.base, PARTICIPANT)
                where = update.directory

                def one(ref: ShardRef) -> dict[str, FloatArray]:
                    return decode_shard(fetch_shard(store, where, ref), ref, "fp32", where)

                with ThreadPoolExecutor(workers) as pool:  # the aggregator's prefetch
                    return list(pool.map(one, update.document.shards))

            t, decoded = timed(fetch_all)
            ok = all(
                np.array_equal(values, delta[name])
                for tensors in decoded
                for name, values in tensors.items()
            ) and sum(len(t) for t in decoded) == len(delta)
            del decoded
        else:
            keys = [f"{prefix}plain/shards/{i:05d}" for i in range(len(shards))]
            t, buffers = timed(lambda: plain.get_many(keys))
            ok = [_sha(b) for b in buffers] == digests
            del buffers
        seconds["fetch"][arm].append(t)
        checks["fetch"][arm].append(ok)

    arms: dict[str, Callable[[str, int], None]] = {
        "put": arm_put, "get": arm_get, "publish": arm_publish, "fetch": arm_fetch,
    }  # fmt: skip
    for rep in range(args.reps):
        order = ("store", "plain") if rep % 2 == 0 else ("plain", "store")
        for op in OPERATIONS:
            for arm in order:
                arms[op](arm, rep)
            line = "  ".join(
                f"{a} {mbps(update_bytes, seconds[op][a][-1]):7.1f} MB/s"
                for a in ("store", "plain")
            )
            print(f"[rep {rep + 1}/{args.reps}] {op:8s} {line}", flush=True)
    delete_update()
    for i in range(len(shards)):
        store.delete(f"plain/shards/{i:05d}")
    store.close()

    operations: dict[str, Any] = {}
    for op in OPERATIONS:
        rates = {a: [mbps(update_bytes, s) for s in seconds[op][a]] for a in ("store", "plain")}
        paired = [s / p for s, p in zip(rates["store"], rates["plain"], strict=True)]
        operations[op] = {
            "storeMBps": summary(rates["store"]),
            "plainMBps": summary(rates["plain"]),
            "ratio": round(
                statistics.median(rates["store"]) / statistics.median(rates["plain"]), 3
            ),
            "pairedRatios": [round(r, 3) for r in paired],
            "seconds": {a: [round(s, 3) for s in seconds[op][a]] for a in ("store", "plain")},
            "bytes": update_bytes,
            "checksOk": {
                a: all(checks[op][a]) and len(checks[op][a]) == args.reps
                for a in ("store", "plain")
            },
        }
    return {
        "updateBytes": update_bytes,
        "tensors": len(shapes),
        "shards": len(shards),
        "shardBytes": args.shard_mib * MiB,
        "encoding": "fp32",
        "partSize": part_size,
        "concurrency": workers,
        "repetitions": args.reps,
        "store": f"S3Store(part_size={part_size}, max_workers={workers})",
        "plain": (
            f"minio {_minio_version()}: put_object(part_size={part_size}, "
            f"num_parallel_uploads={workers}); get: ranged get_object of {part_size} bytes, "
            f"{workers} in flight"
        ),
        "operations": operations,
        "target": 0.9,
    }


def _sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def _minio_version() -> str:
    import minio

    return str(minio.__version__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB, 1 repetition (CI)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/transfer.json"))
    parser.add_argument("--reps", type=int, help="repetitions (default 5, --quick 1)")
    parser.add_argument(
        "--part-mib", type=int, help=f"default {DEFAULT_PART_SIZE // MiB}, --quick 5"
    )
    parser.add_argument("--shard-mib", type=int,
                        help=f"default {DEFAULT_SHARD_BYTES // MiB}, --quick 8")  # fmt: skip
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="parts in flight")
    parser.add_argument("--url", help="an S3 store URL with credentials_dir (default: own MinIO)")
    args = parser.parse_args()
    args.reps = args.reps or (1 if args.quick else 5)
    args.part_mib = args.part_mib or (5 if args.quick else DEFAULT_PART_SIZE // MiB)
    args.shard_mib = args.shard_mib or (8 if args.quick else DEFAULT_SHARD_BYTES // MiB)
    report = header("transfer", args.quick, "transfer.py")
    if args.url:
        report |= run(args, args.url)
    else:
        from tests.s3servers import start_minio

        with tempfile.TemporaryDirectory(prefix="tapestry-bench-transfer-") as tmp:
            server = start_minio(Path(tmp) / "minio")
            try:
                report |= run(args, server.url_for("bench-transfer"))
            finally:
                server.stop()
    for op, row in report["operations"].items():
        print(f"{op:8s} store/plain {row['ratio']:.3f} (target >= {report['target']})")
    write(args.out, report)


if __name__ == "__main__":
    main()
