"""The object-store contract, run unchanged against every backend.

`backend`/`store` (tests/store/conftest.py) are parametrized over the filesystem store,
MinIO and SeaweedFS, so a behaviour that differs between backends fails here.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import pytest

import tapestry_protocol
from tapestry_protocol.store import (
    InvalidKey,
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    RetryPolicy,
    StoreError,
    open_store,
)
from tests.s3servers import FaultProxy
from tests.store.conftest import TEST_PART_SIZE, Backend

MiB = 1 << 20
STORE_CLIENT = Path(__file__).with_name("store_client.py")
ODD_KEYS = [
    "odd/a b+c%20d?e#f=g&h;i,j'k",
    "odd/naïve-ключ-🙂",
    "odd/UPPER.lower_under~tilde",
]


def _pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-per-MiB bytes (so a misplaced part is detected)."""
    out = bytearray()
    block = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{block}".encode()).digest() * (MiB // 32)
        out[-8:] = block.to_bytes(8, "big")
        block += 1
    return bytes(out[:size])


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


# -- basic reads and writes -----------------------------------------------------------


def test_put_get_roundtrip(store: ObjectStore) -> None:
    info = store.put("rounds/1/plan.json", b'{"round": 1}')
    assert (info.key, info.size) == ("rounds/1/plan.json", 12)
    assert store.get("rounds/1/plan.json") == b'{"round": 1}'
    assert store.stat("rounds/1/plan.json").size == 12
    assert store.exists("rounds/1/plan.json")
    assert not store.exists("rounds/1/result.json")
    # A "directory" of keys is not an object, on any backend.
    for not_an_object in ("rounds", "rounds/1"):
        assert not store.exists(not_an_object)
        with pytest.raises(ObjectNotFound):
            store.get(not_an_object)


def test_empty_object(store: ObjectStore) -> None:
    store.put("empty", b"", if_absent=True)
    assert store.get("empty") == b""
    assert store.get("empty", offset=0, length=10) == b""
    assert store.stat("empty").size == 0
    assert list(store.iter_chunks("empty")) == []


@pytest.mark.parametrize("key", ODD_KEYS)
def test_odd_keys_roundtrip(store: ObjectStore, key: str) -> None:
    store.put(key, key.encode(), if_absent=True)
    assert store.get(key) == key.encode()
    assert [o.key for o in store.list("odd/")] == [key]


def test_missing_object_raises_object_not_found_naming_the_key(
    store: ObjectStore, tmp_path: Path
) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for call in (
        lambda: store.get("no/such/key"),
        lambda: store.get("no/such/key", offset=3, length=4),
        lambda: store.stat("no/such/key"),
        lambda: store.iter_chunks("no/such/key"),
        lambda: store.get_file("no/such/key", downloads / "out"),
    ):
        with pytest.raises(ObjectNotFound) as excinfo:
            call()
        assert excinfo.value.key == "no/such/key"
        assert "no/such/key" in str(excinfo.value)
    assert list(downloads.iterdir()) == []  # no partial download left behind


def test_ranged_reads(store: ObjectStore) -> None:
    data = _pattern(3 * MiB + 17)
    store.put("blob", data)
    size = len(data)
    for offset, length in [
        (0, None), (0, 1), (1, 10), (MiB - 3, 7), (size - 5, None), (size - 5, 100),
        (size, None), (size, 4), (size + 10, 4), (123_456, 2 * MiB), (7, 0),
    ]:  # fmt: skip
        expected = data[offset:] if length is None else data[offset : offset + length]
        assert store.get("blob", offset=offset, length=length) == expected, (offset, length)
    with pytest.raises(ValueError):
        store.get("blob", offset=-1)
    with pytest.raises(ValueError):
        store.get("blob", length=-1)


def test_iter_chunks_streams_exact_chunks(store: ObjectStore) -> None:
    data = _pattern(2 * MiB + 5)
    store.put("blob", data)
    chunks = list(store.iter_chunks("blob", chunk_size=MiB))
    assert [len(c) for c in chunks] == [MiB, MiB, 5]
    assert b"".join(chunks) == data
    with pytest.raises(ValueError):
        store.iter_chunks("blob", chunk_size=0)


def test_put_stream_of_unknown_length(store: ObjectStore) -> None:
    small = b"hello stream"
    store.put_stream("stream/small", io.BytesIO(small), if_absent=True)
    assert store.get("stream/small") == small
    big = _pattern(2 * TEST_PART_SIZE + 3, seed=1)  # three parts on S3
    info = store.put_stream("stream/big", io.BytesIO(big), if_absent=True)
    assert info.size == len(big)
    assert store.get("stream/big") == big
    with pytest.raises(ObjectExists):
        store.put_stream("stream/big", io.BytesIO(b"other"), if_absent=True)
    assert store.get("stream/big") == big


def test_get_file_replaces_destination_atomically(
    store: ObjectStore, backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _pattern(MiB + 1)
    store.put("blob", data)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    dest = downloads / "dest.bin"
    dest.write_bytes(b"old content")
    # A download that fails partway leaves the old content and no temp file behind.
    if backend.server is None:
        real_copy = shutil.copyfileobj

        def copy_then_fail(src: BinaryIO, dst: BinaryIO, length: int = 0) -> None:
            dst.write(src.read(1000))
            raise OSError("disk on fire")

        monkeypatch.setattr(shutil, "copyfileobj", copy_then_fail)
        with pytest.raises(OSError, match="disk on fire"):
            store.get_file("blob", dest)
        monkeypatch.setattr(shutil, "copyfileobj", real_copy)
    else:
        # Every connection is cut after 100 kB: the stat fits, the body never does.
        proxy = FaultProxy(backend.server.endpoint, ["cut:100000"] * 20)
        try:
            with (
                open_store(
                    backend.url.replace(backend.server.endpoint, proxy.endpoint),
                    retry=RetryPolicy(attempts=1),
                    part_size=TEST_PART_SIZE,
                ) as cut,
                pytest.raises(StoreError),
            ):
                cut.get_file("blob", dest)
            assert proxy.connections >= 1
        finally:
            proxy.close()
    assert dest.read_bytes() == b"old content"
    assert [p.name for p in downloads.iterdir()] == ["dest.bin"]
    info = store.get_file("blob", dest)
    assert info.size == len(data)
    assert dest.read_bytes() == data
    assert [p.name for p in downloads.iterdir()] == ["dest.bin"]


# -- write-once semantics -------------------------------------------------------------


def test_if_absent_refuses_existing_key_and_keeps_content(
    store: ObjectStore, tmp_path: Path
) -> None:
    store.put("manifest.json", b"first", if_absent=True)
    with pytest.raises(ObjectExists) as excinfo:
        store.put("manifest.json", b"second", if_absent=True)
    assert excinfo.value.key == "manifest.json"
    assert "manifest.json" in str(excinfo.value)
    src = tmp_path / "f"
    src.write_bytes(b"third")
    with pytest.raises(ObjectExists):
        store.put_file("manifest.json", src, if_absent=True)
    assert store.get("manifest.json") == b"first"


def test_if_absent_refuses_existing_key_for_multipart(store: ObjectStore, tmp_path: Path) -> None:
    store.put("shard", b"small original", if_absent=True)
    src = tmp_path / "big"
    src.write_bytes(_pattern(TEST_PART_SIZE + 1))
    with pytest.raises(ObjectExists):
        store.put_file("shard", src, if_absent=True)
    assert store.get("shard") == b"small original"


def test_plain_put_overwrites(store: ObjectStore) -> None:
    first = store.put("k", b"one")
    second = store.put("k", b"two!")
    assert store.get("k") == b"two!"
    assert first.etag != second.etag
    assert store.stat("k").etag == second.etag


def test_delete_is_idempotent_and_frees_the_key(store: ObjectStore) -> None:
    store.put("a/b/c", b"x", if_absent=True)
    store.delete("a/b/c")
    assert not store.exists("a/b/c")
    store.delete("a/b/c")
    store.delete("never/existed")
    store.put("a/b/c", b"y", if_absent=True)
    assert store.get("a/b/c") == b"y"
    assert [o.key for o in store.list("")] == ["a/b/c"]


def _race(store: ObjectStore, prefix: str, payloads: list[bytes], trials: int) -> None:
    """Writers with these payloads race to create each key; exactly one must win."""
    writers = len(payloads)
    with ThreadPoolExecutor(writers) as pool:
        for trial in range(trials):
            key = f"{prefix}/{trial}"
            barrier = threading.Barrier(writers)

            def attempt(i: int, key: str = key, barrier: threading.Barrier = barrier) -> bool:
                barrier.wait()
                try:
                    store.put(key, payloads[i], if_absent=True)
                except ObjectExists:
                    return False
                return True

            won = list(pool.map(attempt, range(writers)))
            assert won.count(True) == 1, f"trial {trial}: winners {won}"
            assert store.get(key) == payloads[won.index(True)]


def test_exclusive_create_race_threads(store: ObjectStore) -> None:
    _race(store, "race", [f"writer-{i}".encode() for i in range(4)], trials=40)


def test_exclusive_create_race_multipart(store: ObjectStore) -> None:
    """Large conditional writes race at CompleteMultipartUpload on S3."""
    payloads = [_pattern(TEST_PART_SIZE + 1024, seed=i) for i in range(3)]
    _race(store, "race-mp", payloads, trials=5)


def _client_env() -> dict[str, str]:
    protocol_root = str(Path(tapestry_protocol.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": protocol_root}


def test_exclusive_create_race_processes(backend: Backend) -> None:
    writers, trials = 4, 25
    procs = [
        subprocess.Popen(
            [sys.executable, str(STORE_CLIENT), "race", backend.url, f"writer-{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_client_env(),
        )
        for i in range(writers)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        with backend.open() as store:
            for trial in range(trials):
                key = f"race-proc/{trial}"
                order = procs[trial % writers :] + procs[: trial % writers]
                for p in order:
                    assert p.stdin is not None
                    p.stdin.write(key + "\n")
                    p.stdin.flush()
                results = [p.stdout.readline().strip() for p in procs if p.stdout]
                assert sorted(results) == ["lost"] * (writers - 1) + ["won"], results
                assert store.get(key) == f"writer-{results.index('won')}".encode()
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
            p.wait(30)


def test_writer_killed_mid_upload_leaves_no_object(backend: Backend) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(STORE_CLIENT), "slow", backend.url, "deltas/shard-0"],
        stdout=subprocess.PIPE, text=True, env=_client_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        # Let it push a few parts (multipart on S3) before the crash.
        threading.Event().wait(1.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    with backend.open() as store:
        assert not store.exists("deltas/shard-0")
        assert list(store.list("")) == []
        store.put("deltas/shard-0", b"retry after crash", if_absent=True)
        assert store.get("deltas/shard-0") == b"retry after crash"


# -- listing --------------------------------------------------------------------------


def test_list_is_lexicographic_and_prefix_exact(store: ObjectStore) -> None:
    keys = ["a-c", "a/b", "a/b0", "a/c/d", "a0", "ab", "u/z", "u/é", "u/\U0001f642"]
    for key in reversed(keys):
        store.put(key, key.encode())
    assert [o.key for o in store.list("")] == sorted(keys)
    assert [o.key for o in store.list("a/")] == ["a/b", "a/b0", "a/c/d"]
    assert [o.key for o in store.list("a/b")] == ["a/b", "a/b0"]
    assert [o.key for o in store.list("a")] == ["a-c", "a/b", "a/b0", "a/c/d", "a0", "ab"]
    assert [o.key for o in store.list("a/c/")] == ["a/c/d"]
    assert list(store.list("nothing/")) == []
    sizes = {o.key: o.size for o in store.list("u/")}
    assert sizes == {"u/z": 3, "u/é": 4, "u/\U0001f642": 6}


def test_list_many_keys_paginates(store: ObjectStore) -> None:
    keys = [f"updates/p{i:04d}/manifest.json" for i in range(1100)]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda k: store.put(k, k.encode()), keys))
    store.put("updates-other", b"x")
    listed = [o.key for o in store.list("updates/")]
    assert listed == keys
    assert [o.key for o in store.list("updates/p10")] == keys[1000:1100]
    assert sum(1 for _ in store.list("")) == 1101


# -- keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "a/../b", "..", "a/./b", "a//b", "trailing/", "back\\slash", "nul\x00",
     ".tapestry-tmp/x", "a/.tapestry-x", "x" * 1025],
)  # fmt: skip
def test_invalid_keys_are_rejected_everywhere(store: ObjectStore, key: str) -> None:
    for call in (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.stat(key),
        lambda: store.delete(key),
        lambda: store.iter_chunks(key),
    ):
        with pytest.raises(InvalidKey):
            call()
    assert list(store.list("")) == []


def test_list_rejects_escaping_prefix(store: ObjectStore) -> None:
    for prefix in ("/", "../", "a/../"):
        with pytest.raises(InvalidKey):
            list(store.list(prefix))


# -- large objects --------------------------------------------------------------------


def test_large_object_parallel_multipart_roundtrip(store: ObjectStore, tmp_path: Path) -> None:
    """> 100 MiB through put_file/get_file/iter_chunks with bounded memory."""
    size = 101 * MiB + 12_345
    src = tmp_path / "big.bin"
    expected = hashlib.sha256()
    with open(src, "wb") as f:
        for i in range(0, size, MiB):
            block = os.urandom(min(MiB, size - i))
            expected.update(block)
            f.write(block)

    tracemalloc.start()
    try:
        info = store.put_file("bases/1/part-00000.safetensors", src, if_absent=True)
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        dest = tmp_path / "back.bin"
        assert store.get_file("bases/1/part-00000.safetensors", dest).size == size
        _, get_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        streamed = hashlib.sha256()
        for chunk in store.iter_chunks("bases/1/part-00000.safetensors", chunk_size=4 * MiB):
            streamed.update(chunk)
        _, iter_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert info.size == size
    assert store.stat("bases/1/part-00000.safetensors").size == size
    assert _sha256_file(dest) == expected.hexdigest()
    assert streamed.hexdigest() == expected.hexdigest()
    # Bounded by a few parts in flight, far below the object size.
    assert put_peak < 48 * MiB, put_peak
    assert get_peak < 48 * MiB, get_peak
    assert iter_peak < 24 * MiB, iter_peak
    with open(src, "rb") as f:
        f.seek(TEST_PART_SIZE - 10)
        across_parts = f.read(20)
    assert store.get("bases/1/part-00000.safetensors", offset=TEST_PART_SIZE - 10, length=20) == (
        across_parts
    )
