"""Unit tests of the store's pure functions: key rules, URL parsing, credentials, retries."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tapestry_protocol.store import (
    AccessDenied,
    FilesystemStore,
    InvalidKey,
    ObjectNotFound,
    RetryPolicy,
    S3Credentials,
    S3Location,
    S3Store,
    StoreError,
    StoreUnavailable,
    open_store,
    validate_key,
)
from tapestry_protocol.store.base import validate_prefix
from tapestry_protocol.store.retry import Retrier

# -- keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["a", "federations/f/rounds/00001/plan.json", "a b/c+d%e", "ключ/🙂", ".hidden/x", "a.."],
)
def test_valid_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "key",
    ["", "/a", "a/", "a//b", "a/./b", "a/../b", "..", "a\\b", "a\x00", "a\x7f", "a\nb",
     ".tapestry-tmp", "x/.tapestry-y/z", "é" * 513],
)  # fmt: skip
def test_invalid_keys(key: str) -> None:
    with pytest.raises(InvalidKey):
        validate_key(key)


def test_invalid_key_is_also_a_value_error() -> None:
    with pytest.raises(ValueError):
        validate_key("../escape")


@pytest.mark.parametrize("prefix", ["", "a", "a/", "a/b", "rounds/000", "x/..y"])
def test_valid_prefixes(prefix: str) -> None:
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["/", "/a", "../", "a/../", "a//"])
def test_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(InvalidKey, match="prefix"):
        validate_prefix(prefix)


# -- URLs -----------------------------------------------------------------------------


def test_s3_url_with_endpoint() -> None:
    loc = S3Location.parse("s3://bucket/some/prefix/?endpoint=http://127.0.0.1:9000", {})
    assert (loc.endpoint, loc.bucket, loc.prefix) == (
        "http://127.0.0.1:9000",
        "bucket",
        "some/prefix",
    )
    assert loc.url == "s3://bucket/some/prefix?endpoint=http://127.0.0.1:9000"
    assert S3Location.parse(loc.url, {}) == loc


def test_s3_url_endpoint_defaults() -> None:
    assert S3Location.parse("s3://bkt", {}).endpoint == "https://s3.amazonaws.com"
    env = {"TAPESTRY_S3_ENDPOINT": "https://minio.example:9000", "AWS_ENDPOINT_URL": "http://x"}
    assert S3Location.parse("s3://bkt", env).endpoint == "https://minio.example:9000"
    assert S3Location.parse("s3://bkt", {"AWS_ENDPOINT_URL": "http://x:1"}).endpoint == "http://x:1"


def test_path_style_http_url() -> None:
    loc = S3Location.parse("https://s3.example.org:8443/tapestry/feds/a?region=eu-west-1", {})
    assert (loc.endpoint, loc.bucket, loc.prefix) == (
        "https://s3.example.org:8443",
        "tapestry",
        "feds/a",
    )
    assert loc.params == {"region": "eu-west-1"}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://AK:hunter2@bucket", "contains credentials"),
        ("s3://bucket?endpont=http://x", "unknown parameter"),
        ("s3://Bad_Bucket?endpoint=http://x", "not a valid bucket name"),
        ("s3://bucket?endpoint=127.0.0.1:9000", "endpoint must look like"),
        ("s3://bucket?endpoint=http://host/path", "must not have a path"),
        ("http://host:9000/bucket?endpoint=http://x", "only goes with s3://"),
    ],
)
def test_bad_s3_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as excinfo:
        S3Location.parse(url, {})
    assert "hunter2" not in str(excinfo.value)


def test_open_store_filesystem_forms(tmp_path: Path) -> None:
    root = tmp_path / "store"
    for url in (str(root), root.as_uri(), f"file://localhost{root}"):
        store = open_store(url, create=True)
        assert isinstance(store, FilesystemStore)
        assert store.root == root
        assert store.url == root.as_uri()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/x", "unsupported store URL scheme"),
        ("file://otherhost/x", "must be absolute"),
        ("file:///x?y=1", "no query"),
    ],
)
def test_open_store_rejects_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)


def test_open_store_rejects_s3_options_for_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only apply to S3"):
        open_store(tmp_path, ca_file="/ca.pem")


def test_open_store_missing_filesystem_root(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "missing")


def test_open_store_s3_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAPESTRY_S3_CREDENTIALS_DIR", raising=False)
    monkeypatch.setenv("TAPESTRY_S3_ACCESS_KEY", "ak")
    monkeypatch.setenv("TAPESTRY_S3_SECRET_KEY", "sk-secret")
    store = open_store("http://127.0.0.1:1/bucket/pre?conditional_multipart=single-put")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == ("bucket", "pre/")
    assert "sk-secret" not in repr(store) + str(store) + store.url
    # The URL parameter reaches the store, and decides the commit path without a probe
    # (port 1 would refuse the probe).
    assert store._conditional_multipart == "single-put"
    assert store._has_native_conditional_multipart() is False
    native = open_store("http://127.0.0.1:1/bucket?conditional_multipart=native")
    assert isinstance(native, S3Store)
    assert native._conditional_multipart == "native"
    assert native._has_native_conditional_multipart() is True
    auto = open_store("http://127.0.0.1:1/bucket")
    assert isinstance(auto, S3Store)
    assert auto._conditional_multipart == "auto"
    with pytest.raises(ValueError, match="conditional_multipart"):
        open_store("s3://bucket?endpoint=http://h:1&conditional_multipart=maybe")
    with pytest.raises(ValueError, match="part_size"):
        open_store("s3://bucket?endpoint=http://h:1", part_size=1024)


# -- credentials ----------------------------------------------------------------------


def test_credentials_never_show_the_secret() -> None:
    creds = S3Credentials("AKIA", "very-secret", "token-secret")
    assert "secret" not in repr(creds) + str(creds)
    assert "AKIA" in repr(creds)


def test_credentials_from_kubernetes_style_directory(tmp_path: Path) -> None:
    (tmp_path / "accessKey").write_text("ak\n")
    (tmp_path / "secretKey").write_text("sk\n")
    assert S3Credentials.from_dir(tmp_path) == S3Credentials("ak", "sk")
    assert S3Credentials.from_env({"TAPESTRY_S3_CREDENTIALS_DIR": str(tmp_path)}) == (
        S3Credentials("ak", "sk")
    )


def test_credentials_directory_with_aws_names(tmp_path: Path) -> None:
    (tmp_path / "AWS_ACCESS_KEY_ID").write_text("ak")
    (tmp_path / "AWS_SECRET_ACCESS_KEY").write_text("sk")
    assert S3Credentials.from_dir(tmp_path) == S3Credentials("ak", "sk")


def test_credentials_directory_missing_files(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="accessKey\\+secretKey"):
        S3Credentials.from_dir(tmp_path)


def test_credentials_from_env_order() -> None:
    both = {
        "TAPESTRY_S3_ACCESS_KEY": "t-ak",
        "TAPESTRY_S3_SECRET_KEY": "t-sk",
        "AWS_ACCESS_KEY_ID": "a-ak",
        "AWS_SECRET_ACCESS_KEY": "a-sk",
        "AWS_SESSION_TOKEN": "tok",
    }
    assert S3Credentials.from_env(both) == S3Credentials("t-ak", "t-sk")
    aws = {k: v for k, v in both.items() if k.startswith("AWS")}
    assert S3Credentials.from_env(aws) == S3Credentials("a-ak", "a-sk", "tok")
    assert S3Credentials.from_env({}) is None
    with pytest.raises(StoreError, match="set together"):
        S3Credentials.from_env({"AWS_ACCESS_KEY_ID": "only-half"})


# -- retries --------------------------------------------------------------------------


def test_retry_policy_backoff_is_bounded_and_jittered() -> None:
    policy = RetryPolicy(attempts=10, base_delay=0.5, max_delay=4.0)
    for failures in range(1, 10):
        cap = min(4.0, 0.5 * 2 ** (failures - 1))
        delays = [policy.delay(failures) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap / 2  # actually spread out, not constant
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def _translate(exc: BaseException, key: str | None) -> StoreError | None:
    if isinstance(exc, ConnectionResetError):
        return StoreUnavailable(f"reset on {key}", key)
    if isinstance(exc, PermissionError):
        return AccessDenied(f"denied {key}", key)
    return None


def test_retrier_retries_transient_then_succeeds() -> None:
    sleeps: list[float] = []
    retrier = Retrier(RetryPolicy(attempts=4, base_delay=1.0), _translate, sleep=sleeps.append)
    outcomes: list[BaseException | str] = [ConnectionResetError(), ConnectionResetError(), "ok"]

    def op() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    assert retrier.call("get", "k", op) == "ok"
    assert len(sleeps) == 2 and sleeps[0] <= 1.0 and sleeps[1] <= 2.0


def test_retrier_gives_up_with_the_key_named() -> None:
    sleeps: list[float] = []
    retrier = Retrier(RetryPolicy(attempts=3), _translate, sleep=sleeps.append)

    def op() -> None:
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    with pytest.raises(StoreUnavailable, match="get 'a/b': gave up after 3 attempts") as excinfo:
        retrier.call("get", "a/b", op)
    assert excinfo.value.key == "a/b"
    assert len(sleeps) == 2


def test_retrier_surfaces_permanent_errors_at_once() -> None:
    calls = []

    def op() -> None:
        calls.append(1)
        raise PermissionError("nope")

    retrier = Retrier(RetryPolicy(), _translate, sleep=lambda _: pytest.fail("slept"))
    with pytest.raises(AccessDenied, match="denied k"):
        retrier.call("put", "k", op)
    with pytest.raises(ObjectNotFound):
        retrier.call("get", "k", lambda: (_ for _ in ()).throw(ObjectNotFound("gone", "k")))
    assert len(calls) == 1


def test_retrier_reraises_foreign_exceptions_untouched() -> None:
    retrier = Retrier(RetryPolicy(), _translate)
    with pytest.raises(ZeroDivisionError):
        retrier.call("get", "k", lambda: 1 // 0)
