"""S3-only behaviour on real servers: credentials, TLS, retries through a faulty network,
a server crash mid-upload. Each test runs on MinIO and SeaweedFS unless it says why not.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from minio import Minio
from minio.error import S3Error

from tapestry_protocol.store import (
    FAST_RETRY,
    AccessDenied,
    BucketNotFound,
    ObjectExists,
    ObjectStore,
    RetryPolicy,
    S3Credentials,
    StoreError,
    StoreUnavailable,
    open_store,
)
from tapestry_protocol.store.s3 import S3Store
from tests.ports import free_port
from tests.s3servers import (
    FaultProxy,
    S3Server,
    make_tls_certs,
    skip_if_s3_disabled,
    start_minio,
    start_seaweedfs,
)
from tests.store.conftest import TEST_PART_SIZE

pytestmark = pytest.mark.s3
MiB = 1 << 20
SERVERS = ["minio", "seaweedfs"]
STARTERS = {"minio": start_minio, "seaweedfs": start_seaweedfs}
#: Fails fast if a permanent error were (wrongly) retried.
SLOW_RETRY = RetryPolicy(attempts=3, base_delay=5.0, max_delay=5.0)


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> S3Server:
    return request.getfixturevalue(f"{request.param}_server")  # type: ignore[no-any-return]


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _via(proxy: FaultProxy, server: S3Server, prefix: str, **options: object) -> S3Store:
    """A store on the `contract` bucket that reaches `server` through `proxy`."""
    options.setdefault("retry", FAST_RETRY)
    options.setdefault("part_size", TEST_PART_SIZE)
    store = open_store(
        f"s3://contract/{prefix}?endpoint={proxy.endpoint}",
        credentials=server.credentials,
        **options,  # type: ignore[arg-type]
    )
    assert isinstance(store, S3Store)
    return store


def _random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for offset in range(0, size, MiB):
            block = os.urandom(min(MiB, size - offset))
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


# -- credentials ----------------------------------------------------------------------


def test_wrong_credentials_raise_access_denied_naming_key_and_bucket(
    server: S3Server, prefix: str
) -> None:
    server.open("contract").close()
    bad = S3Credentials(server.access_key, "not-the-secret")
    store = open_store(
        f"s3://contract/{prefix}?endpoint={server.endpoint}", credentials=bad, retry=SLOW_RETRY
    )
    started = time.monotonic()
    for call in (
        lambda: store.put("rounds/1/plan.json", b"x", if_absent=True),
        lambda: store.get("rounds/1/plan.json"),
        lambda: store.stat("rounds/1/plan.json"),
    ):
        with pytest.raises(AccessDenied) as excinfo:
            call()
        message = str(excinfo.value)
        assert excinfo.value.key == "rounds/1/plan.json"
        assert "rounds/1/plan.json" in message and "'contract'" in message
        assert "not-the-secret" not in message
    with pytest.raises(AccessDenied):
        list(store.list("rounds/"))
    assert time.monotonic() - started < 5, "a permanent error must not be retried"


def test_credentials_from_directory_and_environment(
    server: S3Server, prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"s3://contract/{prefix}?endpoint={server.endpoint}"
    with open_store(url, credentials_dir=server.credentials_dir, create=True) as store:
        store.put("from-dir", b"1")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "TAPESTRY_S3_CREDENTIALS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TAPESTRY_S3_ACCESS_KEY", server.access_key)
    monkeypatch.setenv("TAPESTRY_S3_SECRET_KEY", server.secret_key)
    caplog.set_level(logging.DEBUG)
    with open_store(url, retry=FAST_RETRY) as store:
        assert store.get("from-dir") == b"1"
        text = f"{store!r} {store} {store.url} {S3Credentials.from_env()!r}"
        with pytest.raises(StoreError) as excinfo:
            store.get("missing")
    assert server.secret_key not in text + str(excinfo.value) + caplog.text


def test_missing_bucket_raises_bucket_not_found(server: S3Server) -> None:
    store = open_store(
        f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}?endpoint={server.endpoint}",
        credentials=server.credentials,
        retry=SLOW_RETRY,
    )
    for call in (
        lambda: store.get("k"),
        lambda: store.put("k", b"x", if_absent=True),
        lambda: list(store.list("")),
    ):
        with pytest.raises(BucketNotFound, match="does not exist"):
            call()


def test_non_empty_bucket_cannot_be_deleted(server: S3Server) -> None:
    with server.open("keep-me") as store:
        store.put("k", b"x")
    client = Minio(
        server.endpoint.split("://")[1], server.access_key, server.secret_key, secure=False
    )
    with pytest.raises(S3Error) as excinfo:
        client.remove_bucket("keep-me")
    assert excinfo.value.code == "BucketNotEmpty"


# -- retries through a faulty network -------------------------------------------------


def test_connection_resets_are_retried(server: S3Server, prefix: str) -> None:
    proxy = FaultProxy(server.endpoint, ["reset", "reset"])
    try:
        with _via(proxy, server, prefix) as store:
            store.put("k", b"payload", if_absent=True)
            assert store.get("k") == b"payload"
        assert proxy.connections >= 3
    finally:
        proxy.close()


def test_503_is_retried(server: S3Server, prefix: str) -> None:
    proxy = FaultProxy(server.endpoint, ["503", "503", "503"])
    try:
        with _via(proxy, server, prefix, retry=RetryPolicy(attempts=5, base_delay=0.01)) as store:
            store.put("k", b"payload", if_absent=True)
            assert store.get("k") == b"payload"
        assert proxy.connections >= 4
    finally:
        proxy.close()


def test_retries_are_bounded(server: S3Server, prefix: str) -> None:
    proxy = FaultProxy(server.endpoint, ["reset"] * 100)
    try:
        policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)
        with _via(proxy, server, prefix, retry=policy) as store:
            with pytest.raises(StoreUnavailable, match="gave up after 3 attempts") as excinfo:
                store.put("rounds/7/result.json", b"x")
            assert excinfo.value.key == "rounds/7/result.json"
        assert proxy.connections == 3
    finally:
        proxy.close()


def test_unreachable_endpoint_is_unavailable() -> None:
    store = open_store(
        f"s3://contract?endpoint=http://127.0.0.1:{free_port()}",
        credentials=S3Credentials("a", "b"),
        retry=RetryPolicy(attempts=2, base_delay=0.01),
    )
    with pytest.raises(StoreUnavailable, match=r"plan\.json"):
        store.get("plan.json")


def test_download_cut_midway_resumes(server: S3Server, prefix: str, tmp_path: Path) -> None:
    data = os.urandom(3 * TEST_PART_SIZE + 123)
    with server.open("contract", prefix, part_size=TEST_PART_SIZE) as direct:
        direct.put("blob", data)
    # Each read path gets its own proxy, so every one of them is cut (and must resume);
    # faults on a shared proxy would all be spent by whichever call came first.
    # iter_chunks: cut twice mid-body (resumes from where it broke), then in the headers.
    proxy = FaultProxy(server.endpoint, ["cut:3000000", "cut:7000000", "cut:100"])
    try:
        with _via(proxy, server, prefix) as store:
            assert b"".join(store.iter_chunks("blob", chunk_size=MiB)) == data
        assert proxy.faults == []
        assert proxy.connections >= 4
    finally:
        proxy.close()
    # get_file: the stat and then the ranged GETs share the pool; the first two
    # connections are cut mid-range (mid-body or in the headers) and must be re-fetched.
    proxy = FaultProxy(server.endpoint, ["cut:3000000", "cut:2000000"])
    try:
        with _via(proxy, server, prefix) as store:
            store.get_file("blob", tmp_path / "blob")
            assert (tmp_path / "blob").read_bytes() == data
        assert proxy.faults == []
        assert proxy.connections >= 3  # two cut, at least one more for the re-fetch
    finally:
        proxy.close()
    # get: one ranged GET, cut mid-body.
    proxy = FaultProxy(server.endpoint, ["cut:1000000"])
    try:
        with _via(proxy, server, prefix) as store:
            assert store.get("blob", offset=10, length=5 * MiB) == data[10 : 10 + 5 * MiB]
        assert proxy.faults == []
        assert proxy.connections >= 2
    finally:
        proxy.close()


@pytest.mark.parametrize("size", [1000, TEST_PART_SIZE * 2 + 1], ids=["single", "multipart"])
def test_lost_response_to_a_winning_conditional_put_still_wins(
    server: S3Server, prefix: str, size: int
) -> None:
    """The commit request took effect but its answer was lost: the retry sees 412 (or
    NoSuchUpload) and must recognise its own write instead of reporting ObjectExists."""
    proxy = FaultProxy(server.endpoint)
    # The commit request: PutObject, or CompleteMultipartUpload ("POST ...?uploadId=").
    key_path = f"/contract/{prefix}/manifest.json".encode()
    proxy.swallow_once = lambda line: line.startswith(
        (b"PUT " + key_path + b" HTTP", b"POST " + key_path + b"?uploadId=")
    )
    data = os.urandom(size)
    try:
        with _via(proxy, server, prefix) as store:
            info = store.put("manifest.json", data, if_absent=True)
            assert proxy.swallowed == 1
            assert info.size == size
            assert store.get("manifest.json") == data
            with pytest.raises(ObjectExists):
                store.put("manifest.json", b"second", if_absent=True)
    finally:
        proxy.close()


@pytest.mark.parametrize(
    ("server_name", "mode"),
    # Not SeaweedFS+native: its CompleteMultipartUpload is not atomic (docs/object-store.md).
    [("minio", "native"), ("minio", "single-put"), ("seaweedfs", "single-put")],
)
def test_both_conditional_commit_paths_race_correctly(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    server_name: str,
    mode: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    """`auto` picks one commit path per server; each must be correct wherever forced."""
    server: S3Server = request.getfixturevalue(f"{server_name}_server")
    src = tmp_path / "big"
    _random_file(src, 2 * TEST_PART_SIZE + 7)
    url = server.url_for("contract", prefix) + f"&conditional_multipart={mode}"
    with (
        open_store(url, create=True, retry=FAST_RETRY, part_size=TEST_PART_SIZE) as store,
        ThreadPoolExecutor(3) as pool,
    ):
        assert isinstance(store, S3Store)
        assert store._conditional_multipart == mode
        # Count which commit path each put takes: the forced one, and only it.
        calls = {"_put_streamed": 0, "_put_multipart": 0}
        for method in calls:
            real = getattr(store, method)

            def counted(*args: object, _real: Any = real, _method: str = method) -> Any:
                calls[_method] += 1  # under the GIL; exact enough for this count
                return _real(*args)

            monkeypatch.setattr(store, method, counted)
        for trial in range(3):
            key = f"shard-{trial}"
            barrier = threading.Barrier(3)

            def attempt(_: int, key: str = key, barrier: threading.Barrier = barrier) -> bool:
                barrier.wait()
                try:
                    store.put_file(key, src, if_absent=True)
                except ObjectExists:
                    return False
                return True

            assert sorted(pool.map(attempt, range(3))) == [False, False, True]
            assert store.get(key) == src.read_bytes()
        expected = "_put_multipart" if mode == "native" else "_put_streamed"
        assert calls == {**dict.fromkeys(calls, 0), expected: 9}


# -- crashes --------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVERS)
@pytest.mark.parametrize("size", [12 * MiB, 60 * MiB], ids=["single", "multipart"])
def test_server_killed_mid_upload_never_exposes_a_partial_object(
    name: str, size: int, tmp_path: Path
) -> None:
    """SIGKILL the server while an upload is in flight; after a restart the key is
    absent or complete (here: absent, as the commit never happened)."""
    skip_if_s3_disabled()
    server = STARTERS[name](tmp_path / name)
    src = tmp_path / "upload.bin"
    digest = _random_file(src, size)
    proxy = FaultProxy(server.endpoint)
    crossed = threading.Event()
    proxy.on_bytes_up = lambda total: crossed.set() if total > size // 2 else None
    errors: list[BaseException] = []
    try:
        # Part size above the object size makes the 12 MiB case a single PUT.
        part = 16 * MiB if size < 16 * MiB else TEST_PART_SIZE
        store = _via(proxy, server, "crash", part_size=part, max_workers=2)
        server.open("contract").close()

        def upload() -> None:
            try:
                store.put_file("deltas/shard", src, if_absent=True)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=upload)
        thread.start()
        assert crossed.wait(60), "upload never got half way"
        server.kill()
        thread.join(60)
        assert errors and isinstance(errors[0], StoreError), errors
        server.start()
        with server.open("contract", "crash") as after:
            if after.exists("deltas/shard"):  # allowed only if complete
                after.get_file("deltas/shard", tmp_path / "back")
                assert hashlib.sha256((tmp_path / "back").read_bytes()).hexdigest() == digest
            assert [o.key for o in after.list("")] in ([], ["deltas/shard"])
            after.put_file("deltas/shard", src, if_absent=True)
            assert after.stat("deltas/shard").size == size
    finally:
        proxy.close()
        server.stop()


# -- TLS ------------------------------------------------------------------------------


def test_tls_with_custom_ca(tmp_path: Path) -> None:
    """MinIO over HTTPS with a throwaway CA: trusted via ca_file, refused without it."""
    skip_if_s3_disabled()
    certs = make_tls_certs(tmp_path / "certs")
    server = start_minio(tmp_path / "minio", certs_dir=certs)
    try:
        assert server.endpoint.startswith("https://")
        with server.open("secure", "p") as store:
            store.put("k", b"over tls", if_absent=True)
            assert store.get("k") == b"over tls"
        untrusted: ObjectStore = open_store(
            f"s3://secure/p?endpoint={server.endpoint}",
            credentials=server.credentials,
            retry=SLOW_RETRY,
        )
        started = time.monotonic()
        with pytest.raises(StoreError, match="TLS") as excinfo:
            untrusted.get("k")
        assert not isinstance(excinfo.value, StoreUnavailable)
        assert time.monotonic() - started < 5, "a certificate error must not be retried"
    finally:
        server.stop()
