"""S3 backend (MinIO, SeaweedFS, AWS, Ceph, any S3 endpoint) through the `minio` SDK.

How the contract is met:

- Conditional create is `If-None-Match: *` on the request that makes the object visible:
  the PutObject for small objects, the CompleteMultipartUpload for large ones (also sent
  on CreateMultipartUpload, where MinIO refuses a taken key before any part is sent). The
  server decides atomically, so exactly one concurrent writer gets 2xx, the others 412.
  SeaweedFS does not evaluate it atomically on CompleteMultipartUpload, so there a large
  conditional create is one streamed PutObject instead (see `conditional_multipart`).
- Every write carries a random write id in user metadata. When a conditional write is
  retried after a lost response (the first try may have succeeded), a 412 or NoSuchUpload
  is resolved by reading the id back: ours means we won. Without this a retried winner
  would report ObjectExists and nobody would own the commit.
- Multipart uploads read parts sequentially and send at most `max_workers` in parallel,
  so memory is bounded by (max_workers + 2) * part_size whatever the object size. An
  upload that dies before completion is invisible (S3 never exposes a partial object).
- Ranged downloads pin the version they read with `If-Match: <etag>`, so a download
  never stitches together two different objects.
- The SDK's own retries are disabled (urllib3 retries=False); `retry.Retrier` does all
  retrying with one bounded, jittered policy and one error classification.

The SDK's high-level put_object cannot send `If-None-Match` on CompleteMultipartUpload,
so the multipart calls use the SDK's request layer (`_execute` and friends) directly;
requirements pin minio to the 7.2 series for that reason.
"""

from __future__ import annotations

import base64
import builtins
import functools
import hashlib
import io
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, cast, get_args
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit
from xml.etree import ElementTree

import certifi
import urllib3
from minio import Minio
from minio import time as s3time
from minio.credentials.credentials import Credentials
from minio.credentials.providers import Provider, StaticProvider
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import DictType
from minio.signer import sign_v4_s3
from urllib3.exceptions import HTTPError, MaxRetryError, SSLError

from ._localfile import atomic_download
from .base import (
    DEFAULT_CHUNK,
    AccessDenied,
    BucketNotFound,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StoreError,
    StoreUnavailable,
    check_chunk_size,
    check_range,
    validate_key,
    validate_prefix,
)
from .retry import Retrier, RetryPolicy, T, log
from .tls import tls_failure

MiB = 1 << 20
#: S3 limits: every part but the last is at least 5 MiB; at most 10,000 parts.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
#: S3's largest single PutObject; bounds the SeaweedFS conditional-create path.
MAX_SINGLE_PUT = 5 << 30
DEFAULT_PART_SIZE = 16 * MiB
DEFAULT_WORKERS = 4
WRITE_ID_HEADER = "x-amz-meta-tapestry-write-id"
#: File-name pairs accepted in a credentials directory (e.g. a mounted Kubernetes Secret).
CREDENTIAL_FILES = (("accessKey", "secretKey"), ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))

_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "OperationAborted",
    "XMinioServerNotInitialized",
}
_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
}
_AWS_ENDPOINT = "https://s3.amazonaws.com"
_URL_PARAMS = ("endpoint", "region", "ca_file", "credentials_dir", "conditional_multipart")
ConditionalMultipart = Literal["auto", "native", "single-put"]


class _UploadGone(StoreError):
    """NoSuchUpload: the multipart upload was completed or aborted already."""


class _RangeChanged(StoreError):
    """If-Match failed on a read: the object was replaced while we were reading it."""


@dataclass(frozen=True)
class S3Credentials:
    """Access key pair. The secret never appears in repr/str, logs or URLs."""

    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> S3Credentials:
        """Read `accessKey`/`secretKey` files (a Kubernetes Secret mounted as a volume)."""
        directory = Path(path)
        for access_name, secret_name in CREDENTIAL_FILES:
            access, secret = directory / access_name, directory / secret_name
            if access.is_file() and secret.is_file():
                token = directory / "sessionToken"
                return cls(
                    access.read_text().strip(),
                    secret.read_text().strip(),
                    token.read_text().strip() if token.is_file() else None,
                )
        names = " or ".join(f"{a}+{s}" for a, s in CREDENTIAL_FILES)
        raise StoreError(f"credentials directory {directory} has no {names} files")

    def provider(self) -> Provider:
        """The SDK's view of these credentials."""
        return StaticProvider(self.access_key, self.secret_key, self.session_token)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Credentials | None:
        """TAPESTRY_S3_CREDENTIALS_DIR, TAPESTRY_S3_ACCESS_KEY/SECRET_KEY, then AWS_*."""
        env = os.environ if environ is None else environ
        if env.get("TAPESTRY_S3_CREDENTIALS_DIR"):
            return cls.from_dir(env["TAPESTRY_S3_CREDENTIALS_DIR"])
        for access, secret, token in (
            ("TAPESTRY_S3_ACCESS_KEY", "TAPESTRY_S3_SECRET_KEY", "TAPESTRY_S3_SESSION_TOKEN"),
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
        ):
            if env.get(access) and env.get(secret):
                return cls(env[access], env[secret], env.get(token) or None)
            if env.get(access) or env.get(secret):
                raise StoreError(f"{access} and {secret} must be set together")
        return None


class DirectoryCredentials(Provider):
    """Credentials from a directory, re-read whenever its files change.

    A mounted Kubernetes Secret is updated by atomically swapping its `..data` symlink,
    so the files' identity (device, inode, mtime, size, through the links) changes
    while a pod keeps running: each request compares it (a few stat calls) and re-reads
    on a change, so a rotated key is used without a restart. A half-updated directory
    (files missing, or changing while read) keeps the last good pair.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp, self._current = self._read()  # StoreError if there is nothing to read

    def current(self) -> S3Credentials:
        """The pair now in the directory (cached while the files are unchanged)."""
        if self._stamp_now() != self._stamp:
            self.reload()
        return self._current

    def reload(self) -> bool:
        """Re-read the directory now; True if the access key or secret changed."""
        with self._lock:
            try:
                stamp, credentials = self._read()
            except (StoreError, OSError) as exc:
                log.warning("keeping the credentials read before from %s: %s", self.path, exc)
                return False
            changed = credentials != self._current
            self._stamp, self._current = stamp, credentials
        if changed:
            log.info("credentials in %s changed: access key %s", self.path, credentials.access_key)
        return changed

    def retrieve(self) -> Credentials:
        c = self.current()
        return Credentials(c.access_key, c.secret_key, c.session_token)

    def _stamp_now(self) -> tuple[tuple[int, int, int, int] | None, ...]:
        stamps: list[tuple[int, int, int, int] | None] = []
        for access_name, secret_name in CREDENTIAL_FILES:
            for name in (access_name, secret_name):
                try:
                    st = os.stat(self.path / name)
                except OSError:
                    stamps.append(None)
                else:
                    stamps.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        try:
            st = os.stat(self.path / "sessionToken")
            stamps.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append(None)
        return tuple(stamps)

    def _read(self) -> tuple[tuple[tuple[int, int, int, int] | None, ...], S3Credentials]:
        """A consistent read: the files did not change between two stamps around it."""
        for _ in range(5):
            before = self._stamp_now()
            credentials = S3Credentials.from_dir(self.path)
            if self._stamp_now() == before:
                return before, credentials
        raise StoreError(f"credentials directory {self.path} kept changing while being read")


@dataclass(frozen=True)
class S3Location:
    """Where a store lives: parsed from a store URL, rendered back without secrets."""

    endpoint: str
    bucket: str
    prefix: str = ""
    params: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, url: str, environ: Mapping[str, str] | None = None) -> S3Location:
        """Parse `s3://bucket/prefix?endpoint=...` or `http(s)://host:port/bucket/prefix`."""
        env = os.environ if environ is None else environ
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise ValueError(
                f"store URL {_redact(url)} contains credentials; URLs end up in logs, so pass "
                "them via TAPESTRY_S3_ACCESS_KEY/TAPESTRY_S3_SECRET_KEY, AWS_* or a "
                "credentials directory instead"
            )
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(params) - set(_URL_PARAMS))
        if unknown:
            raise ValueError(
                f"store URL {url} has unknown parameter(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(_URL_PARAMS)}"
            )
        if parts.scheme == "s3":
            bucket, path = parts.netloc, parts.path
            endpoint = (
                params.pop("endpoint", "")
                or env.get("TAPESTRY_S3_ENDPOINT")
                or env.get("AWS_ENDPOINT_URL_S3")
                or env.get("AWS_ENDPOINT_URL")
                or _AWS_ENDPOINT
            )
        elif parts.scheme in ("http", "https"):
            if "endpoint" in params:
                raise ValueError(f"store URL {url}: 'endpoint' only goes with s3:// URLs")
            endpoint = f"{parts.scheme}://{parts.netloc}"
            bucket, _, path = parts.path.lstrip("/").partition("/")
        else:
            raise ValueError(f"not an S3 store URL: {url}")
        return cls(_check_endpoint(endpoint), _check_bucket(bucket, url), path.strip("/"), params)

    @property
    def url(self) -> str:
        """Canonical `s3://bucket/prefix?endpoint=...` form (round-trips through parse)."""
        query = urlencode({"endpoint": self.endpoint, **self.params}, safe=":/")
        prefix = f"/{quote(self.prefix)}" if self.prefix else ""
        return f"s3://{self.bucket}{prefix}?{query}"


class S3Store(ObjectStore):
    """An ObjectStore on one bucket (and optional key prefix) of an S3 endpoint."""

    def __init__(
        self,
        location: S3Location,
        *,
        credentials: S3Credentials | None,
        region: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        retry: RetryPolicy | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        max_workers: int = DEFAULT_WORKERS,
        conditional_multipart: ConditionalMultipart = "auto",
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        credentials_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """`conditional_multipart` says how a large `if_absent` put commits: "native" is
        If-None-Match on CompleteMultipartUpload, "single-put" one streamed PutObject
        (for servers that do not evaluate the former atomically), "auto" picks "single-put"
        for SeaweedFS and "native" for everything else.

        `credentials_dir` (instead of `credentials`) follows a directory of key files as
        it changes (see DirectoryCredentials): a rotated key needs no new store."""
        if credentials is not None and credentials_dir is not None:
            raise ValueError("pass credentials or credentials_dir, not both")
        modes = get_args(ConditionalMultipart)
        if conditional_multipart not in modes:
            raise ValueError(
                f"conditional_multipart must be one of {', '.join(modes)}, "
                f"not {conditional_multipart!r}"
            )
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3 minimum)")
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        if location.prefix:
            validate_prefix(location.prefix)
        self.location = location
        self.bucket = location.bucket
        self.prefix = location.prefix + "/" if location.prefix else ""
        self.url = location.url
        self.part_size = part_size
        self.max_workers = max_workers
        self._directory = DirectoryCredentials(credentials_dir) if credentials_dir else None
        provider = self._directory or (credentials.provider() if credentials else None)
        self._credentials = credentials
        self._conditional_multipart = conditional_multipart
        self._native_conditional_multipart: bool | None = None
        endpoint = urlsplit(location.endpoint)
        if ca_file is not None and not Path(ca_file).is_file():
            raise ValueError(f"ca_file {ca_file} does not exist")
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=max_workers + 2,
            cert_reqs="CERT_REQUIRED",
            ca_certs=str(ca_file or os.environ.get("SSL_CERT_FILE") or certifi.where()),
            retries=False,  # retry.Retrier is the one place that retries
        )
        is_aws = endpoint.hostname is not None and endpoint.hostname.endswith("amazonaws.com")
        self._client = Minio(
            endpoint.netloc,
            credentials=provider,
            secure=endpoint.scheme == "https",
            # Self-hosted servers rarely check the region; naming one saves a
            # GetBucketLocation round trip (pass `region` for one configured with a region).
            region=region or (None if is_aws else "us-east-1"),
            http_client=self._http,
        )
        self._retrier = Retrier(retry or RetryPolicy(), self._translate)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    def close(self) -> None:
        self._http.clear()

    # -- bucket --------------------------------------------------------------------

    def create_bucket(self) -> None:
        """Create the bucket if it does not exist (for tests and local runs)."""

        def op() -> None:
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._call("create bucket", None, op)

    # -- writing -------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        """In memory already, so the parts are slices of `data`, sent without copies."""
        name = self._name(key)
        size = len(data)
        if self._must_stream(size, if_absent):
            return self._put_streamed(key, name, io.BytesIO(data))
        part_size = self._part_size_for(size)
        if size <= part_size:
            return self._put_single(key, name, data, if_absent)
        view = memoryview(data).cast("B")
        parts = (view[o : o + part_size] for o in range(0, size, part_size))
        return self._put_multipart(key, name, parts, if_absent)

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> ObjectInfo:
        with open(path, "rb") as f:
            return self._upload(key, f, os.fstat(f.fileno()).st_size, if_absent)

    def put_stream(self, key: str, stream: BinaryIO, *, if_absent: bool = False) -> ObjectInfo:
        return self._upload(key, stream, None, if_absent)

    def _upload(self, key: str, stream: BinaryIO, size: int | None, if_absent: bool) -> ObjectInfo:
        name = self._name(key)
        if self._must_stream(size, if_absent):
            return self._put_streamed(key, name, stream)
        part_size = self._part_size_for(size)
        first = _read_full(stream, part_size)
        second = _read_full(stream, part_size) if len(first) == part_size else b""
        if not second:
            return self._put_single(key, name, first, if_absent)
        parts = _chain_parts([first, second], stream, part_size)
        del first, second
        return self._put_multipart(key, name, parts, if_absent)

    def _must_stream(self, size: int | None, if_absent: bool) -> bool:
        """A write-once object that may need several parts, on a server whose multipart
        complete is not atomically conditional, goes the streamed way."""
        return (
            if_absent
            and (size is None or size > self.part_size)
            and not self._has_native_conditional_multipart()
        )

    def _has_native_conditional_multipart(self) -> bool:
        """Does CompleteMultipartUpload evaluate If-None-Match atomically on this server?

        SeaweedFS (4.x) checks it before assembling the object, outside the per-object
        lock its PutObject uses, so concurrent completes can all succeed; the tests race
        it and see several winners. Known by the Server header, asked once per store.
        """
        if self._conditional_multipart != "auto":
            return self._conditional_multipart == "native"
        if self._native_conditional_multipart is None:
            response = self._call("probe bucket for", None, self._probe_bucket)
            server = response.headers.get("Server", "")
            self._native_conditional_multipart = not server.startswith("SeaweedFS")
        return self._native_conditional_multipart

    def _probe_bucket(self) -> urllib3.BaseHTTPResponse:
        """HeadBucket; a 403 answer names its server too. A least-privilege identity (a
        member's: no ListBucket, see store/access.py) is refused HeadBucket."""
        try:
            return self._client._execute("HEAD", self.bucket)
        except S3Error as exc:
            if exc.response is not None and exc.response.status == 403:
                return exc.response
            raise

    def _put_streamed(self, key: str, name: str, stream: BinaryIO) -> ObjectInfo:
        """Conditional create of a large object in ONE PutObject, streamed from disk.

        For servers whose conditional PutObject is atomic but whose conditional
        CompleteMultipartUpload is not. Limited to 5 GiB (the S3 single-PUT limit); the
        payload is hashed in a first pass so the request stays signed and verifiable.
        """
        write_id, write_headers = self._write_headers(if_absent=True)
        with _seekable(stream) as (body, start, size, sha256):
            if size > MAX_SINGLE_PUT:
                raise StoreError(
                    f"put {key!r}: {size} bytes is over the {MAX_SINGLE_PUT} byte single-PUT "
                    f"limit, and {self.location.endpoint} has no atomic conditional multipart "
                    "upload (conditional_multipart=single-put)",
                    key,
                )
            headers = {
                **write_headers,
                "Content-Length": str(size),
                "x-amz-content-sha256": sha256,
            }

            def op() -> str:
                body.seek(start)
                return self._signed_put(name, headers, body)

            try:
                etag = self._call("put", key, op)
            except ObjectExists:
                return self._won_anyway(key, name, write_id)
        return ObjectInfo(key, size, etag)

    def _signed_put(self, name: str, headers: dict[str, str], body: BinaryIO) -> str:
        """PutObject with a streamed body (the SDK's request layer wants bytes)."""
        region = self._client._get_region(self.bucket)
        url = self._client._base_url.build(
            method="PUT", region=region, bucket_name=self.bucket, object_name=name
        )
        date = s3time.utcnow()
        request: DictType = {**headers, "Host": url.netloc, "x-amz-date": s3time.to_amz_date(date)}
        creds = self._directory.current() if self._directory else self._credentials
        if creds is not None:
            if creds.session_token:
                request["X-Amz-Security-Token"] = creds.session_token
            request = sign_v4_s3(
                method="PUT",
                url=url,
                region=region,
                headers=request,
                credentials=Credentials(creds.access_key, creds.secret_key, creds.session_token),
                content_sha256=headers["x-amz-content-sha256"],
                date=date,
            )
        response = self._http.urlopen("PUT", urlunsplit(url), body=body, headers=request)
        if response.status != 200:
            if response.data and b"<Error" in response.data:
                raise S3Error.fromxml(response)
            raise ServerError(f"PUT failed with HTTP status {response.status}", response.status)
        return str(response.headers.get("etag", "")).strip('"')

    def _part_size_for(self, size: int | None) -> int:
        """The configured part size, grown (in whole MiB) if 10,000 parts would not fit."""
        if size is None or size <= self.part_size * MAX_PARTS:
            return self.part_size
        per_part = -(-size // MAX_PARTS)
        return -(-per_part // MiB) * MiB

    @staticmethod
    def _write_headers(if_absent: bool) -> tuple[str, dict[str, str]]:
        """A fresh write id (to recognise our own write after a lost response) and the
        headers that carry it, conditional when `if_absent`."""
        write_id = uuid.uuid4().hex
        headers = {"Content-Type": "application/octet-stream", WRITE_ID_HEADER: write_id}
        if if_absent:
            headers["If-None-Match"] = "*"
        return write_id, headers

    def _put_single(self, key: str, name: str, data: bytes, if_absent: bool) -> ObjectInfo:
        write_id, headers = self._write_headers(if_absent)
        try:
            result = self._call(
                "put", key, lambda: self._client._put_object(self.bucket, name, data, dict(headers))
            )
        except ObjectExists:
            return self._won_anyway(key, name, write_id)
        return ObjectInfo(key, len(data), result.etag or "")

    def _put_multipart(
        self, key: str, name: str, parts: Iterator[bytes | memoryview], if_absent: bool
    ) -> ObjectInfo:
        # If-None-Match on the start too lets MinIO refuse a taken key before any part.
        write_id, headers = self._write_headers(if_absent)
        upload_id = self._call(
            "start multipart upload",
            key,
            lambda: self._client._create_multipart_upload(self.bucket, name, dict(headers)),
        )
        try:
            etags, size = self._upload_parts(key, name, upload_id, parts)
            return self._complete(key, name, upload_id, etags, size, write_id, if_absent)
        except BaseException:
            self._abort(key, name, upload_id)
            raise

    def _upload_parts(
        self, key: str, name: str, upload_id: str, parts: Iterator[bytes | memoryview]
    ) -> tuple[list[str], int]:
        """Send parts with at most `max_workers` in flight; return their etags and size."""
        slots = threading.BoundedSemaphore(self.max_workers)
        failed = threading.Event()
        futures: list[Future[str]] = []
        size = 0

        def send(number: int, data: bytes | memoryview) -> str:
            # The SDK hashes and sends any buffer; its annotation says bytes.
            body = cast(bytes, data)
            try:
                return self._call(
                    f"upload part {number} of",
                    key,
                    lambda: self._client._upload_part(
                        self.bucket, name, body, None, upload_id, number
                    ),
                )
            except BaseException:
                failed.set()
                raise
            finally:
                slots.release()

        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="s3-put") as pool:
            for number, data in enumerate(parts, 1):
                if number > MAX_PARTS:
                    raise StoreError(f"put {key!r}: more than {MAX_PARTS} parts", key)
                slots.acquire()
                if failed.is_set():
                    slots.release()
                    break
                size += len(data)
                futures.append(pool.submit(send, number, data))
            etags = [f.result() for f in futures]
        return etags, size

    def _complete(
        self,
        key: str,
        name: str,
        upload_id: str,
        etags: list[str],
        size: int,
        write_id: str,
        if_absent: bool,
    ) -> ObjectInfo:
        root = ElementTree.Element("CompleteMultipartUpload")
        for number, etag in enumerate(etags, 1):
            part = ElementTree.SubElement(root, "Part")
            ElementTree.SubElement(part, "PartNumber").text = str(number)
            ElementTree.SubElement(part, "ETag").text = f'"{etag}"'
        body = ElementTree.tostring(root)
        headers = {
            "Content-Type": "application/xml",
            "Content-MD5": base64.b64encode(hashlib.md5(body).digest()).decode(),
        }
        if if_absent:
            headers["If-None-Match"] = "*"

        def op() -> str:
            response = self._client._execute(
                "POST",
                self.bucket,
                name,
                body=body,
                headers=dict(headers),
                query_params={"uploadId": upload_id},
            )
            result = ElementTree.fromstring(response.data)
            if result.tag.endswith("Error"):  # S3 may answer 200 with an error body
                raise S3Error(
                    response,
                    result.findtext("Code"),
                    result.findtext("Message"),
                    name,
                    None,
                    None,
                    self.bucket,
                    name,
                )
            return (result.findtext(f"{_S3_NS}ETag") or result.findtext("ETag") or "").strip('"')

        try:
            etag = self._call("complete multipart upload of", key, op)
        except (ObjectExists, _UploadGone) as exc:
            info = self._won_anyway(key, name, write_id)
            if isinstance(exc, _UploadGone):
                log.info("complete %r: an earlier try succeeded (response was lost)", key)
            return info
        return ObjectInfo(key, size, etag)

    def _won_anyway(self, key: str, name: str, write_id: str) -> ObjectInfo:
        """After a 412/NoSuchUpload: did an earlier, lost-response try of ours commit?"""
        meta = self._call("stat", key, lambda: self._client.stat_object(self.bucket, name))
        if meta.metadata is not None and meta.metadata.get(WRITE_ID_HEADER) == write_id:
            return ObjectInfo(key, meta.size or 0, meta.etag or "")
        raise ObjectExists(f"object {key!r} already exists in {self.url}", key)

    def _abort(self, key: str, name: str, upload_id: str) -> None:
        """Best effort: a left-over upload is invisible and expires by bucket lifecycle."""
        try:
            self._call(
                "abort multipart upload of",
                key,
                lambda: self._client._abort_multipart_upload(self.bucket, name, upload_id),
            )
        except StoreError as exc:
            log.warning("could not abort multipart upload of %r: %s", key, exc)

    # -- reading -------------------------------------------------------------------

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        check_range(offset, length)
        name = self._name(key)
        if length == 0:
            self.stat(key)
            return b""

        def op() -> bytes:
            try:
                response = self._client.get_object(
                    self.bucket, name, offset=offset, length=length or 0
                )
            except S3Error as exc:
                if exc.code == "InvalidRange":  # offset at or past the end
                    return b""
                raise
            try:
                return response.read()
            finally:
                _release(response)

        return self._call("get", key, op)

    def get_file(self, key: str, path: Path) -> ObjectInfo:
        info = self.stat(key)
        name = self._name(key)
        step = self.part_size
        ranges = [(o, min(step, info.size - o)) for o in range(0, info.size, step)]
        with atomic_download(path) as f:
            if len(ranges) <= 1:
                for offset, length in ranges:
                    self._download_range(key, name, info.etag, f.fileno(), offset, length)
                return info
            f.truncate(info.size)
            with ThreadPoolExecutor(self.max_workers, thread_name_prefix="s3-get") as pool:
                futures = [
                    pool.submit(self._download_range, key, name, info.etag, f.fileno(), o, n)
                    for o, n in ranges
                ]
                done, pending = wait(futures, return_when=FIRST_EXCEPTION)
                for future in pending:
                    future.cancel()
                for future in done:
                    future.result()
        return info

    def _download_range(
        self, key: str, name: str, etag: str, fd: int, offset: int, length: int
    ) -> None:
        """Copy [offset, offset+length) of the object version `etag` into `fd`."""

        def op() -> None:
            response = self._open(key, name, offset, length, etag)
            try:
                written = 0
                for chunk in response.stream(MiB):
                    os.pwrite(fd, chunk, offset + written)
                    written += len(chunk)
                if written != length:
                    raise urllib3.exceptions.IncompleteRead(written, length - written)
            finally:
                _release(response)

        self._call("get", key, op)

    def _open(
        self, key: str, name: str, offset: int, length: int, etag: str
    ) -> urllib3.BaseHTTPResponse:
        """A streaming GET of a range of one exact object version."""
        try:
            return self._client.get_object(
                self.bucket,
                name,
                offset=offset,
                length=length,
                request_headers={"If-Match": f'"{etag}"'} if etag else None,
            )
        except S3Error as exc:
            if exc.code == "PreconditionFailed":
                raise _RangeChanged(f"{key!r} was replaced while it was being read", key) from exc
            raise

    def iter_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        check_chunk_size(chunk_size)
        name = self._name(key)
        response = self._call("get", key, lambda: self._client.get_object(self.bucket, name))
        return self._chunks(key, name, response, chunk_size)

    def _chunks(
        self, key: str, name: str, response: urllib3.BaseHTTPResponse, chunk_size: int
    ) -> Iterator[bytes]:
        """Yield the body; on a transient failure, resume where it broke off."""
        size = int(response.headers.get("content-length", "-1"))
        etag = (response.headers.get("etag") or "").strip('"')
        position, failures = 0, 0
        try:
            while size < 0 or position < size:
                try:
                    chunk = _read_full(response, chunk_size)
                except Exception as exc:
                    failures += 1
                    self._retrier.after_failure(exc, failures, "get", key)
                    _release(response)
                    response = self._call(
                        "get", key, functools.partial(self._open, key, name, position, 0, etag)
                    )
                    continue
                if not chunk:
                    if size >= 0:
                        raise StoreUnavailable(f"get {key!r}: body ended early", key)
                    return
                position += len(chunk)
                failures = 0
                yield chunk
        finally:
            _release(response)

    def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)
        meta = self._call("stat", key, lambda: self._client.stat_object(self.bucket, name))
        return ObjectInfo(key, meta.size or 0, meta.etag or "")

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """List and sort client-side.

        S3 promises UTF-8 byte order, but SeaweedFS lists depth-first ('a/b' before
        'a-c'), and resuming its pagination after a failure by start-after could then
        skip keys. So a listing is read whole (restarting from scratch on a transient
        failure) and sorted: memory is O(keys under the prefix), which for Tapestry's
        per-round prefixes is small.
        """
        validate_prefix(prefix)
        full = self.prefix + prefix
        return iter(self._call("list", prefix, lambda: self._list_all(full)))

    def _list_all(self, full_prefix: str) -> builtins.list[ObjectInfo]:
        found = [
            ObjectInfo(obj.object_name[len(self.prefix) :], obj.size or 0, obj.etag or "")
            for obj in self._client.list_objects(self.bucket, prefix=full_prefix, recursive=True)
            # some servers list directory markers
            if obj.object_name and not obj.object_name.endswith("/")
        ]
        found.sort(key=lambda info: info.key)  # code point order == UTF-8 byte order
        return found

    # -- deleting ------------------------------------------------------------------

    def delete(self, key: str) -> None:
        name = self._name(key)
        self._call("delete", key, lambda: self._client.remove_object(self.bucket, name))

    # -- helpers -------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _call(self, what: str, key: str | None, op: Callable[[], T]) -> T:
        try:
            return self._retrier.call(what, key, op)
        except AccessDenied:
            # A key rotated in the credentials directory may be refused before its files
            # show the change (or the other way round): re-read once, retry if it changed.
            if self._directory is None or not self._directory.reload():
                raise
            return self._retrier.call(what, key, op)

    def _translate(self, exc: BaseException, key: str | None) -> StoreError | None:
        """Map an SDK/transport exception to a StoreError naming the key and bucket."""
        if isinstance(exc, MaxRetryError) and exc.reason is not None:
            exc = exc.reason
        where = f"{key!r} in bucket {self.bucket!r} at {self.location.endpoint}"
        if isinstance(exc, S3Error):
            status = exc.response.status if exc.response is not None else 0
            return self._from_status(status, exc.code or "", exc.message or "", key, where)
        if isinstance(exc, ServerError):
            return self._from_status(exc.status_code, "", str(exc), key, where)
        if isinstance(exc, InvalidResponseError):  # a non-XML answer, e.g. from a proxy
            return self._from_status(exc._code, "", "non-XML response", key, where)
        if isinstance(exc, SSLError):  # final: a wrong CA, expiry or host name, named
            ca_certs = self._http.connection_pool_kw.get("ca_certs")
            return tls_failure(exc, self.location.endpoint, ca_certs, where, key)
        if isinstance(exc, (HTTPError, ConnectionError, TimeoutError)):
            return StoreUnavailable(f"{where}: {type(exc).__name__}: {exc}", key)
        return None

    def _from_status(
        self, status: int, code: str, message: str, key: str | None, where: str
    ) -> StoreError:
        detail = f"{code or status}: {message}" if message else (code or str(status))
        if code == "NoSuchBucket":
            return BucketNotFound(
                f"bucket {self.bucket!r} does not exist at {self.location.endpoint} "
                f"(accessing {key!r})",
                key,
            )
        if code == "NoSuchUpload":
            return _UploadGone(f"{where}: {detail}", key)
        if status == 404 or code == "NoSuchKey":
            return ObjectNotFound(f"no object {where}", key)
        if status == 403 or code in _DENIED_CODES:
            hint = (
                "no credentials are configured"
                if self._credentials is None and self._directory is None
                else "check the access key, secret key and bucket policy"
            )
            return AccessDenied(f"access denied to {where} ({detail}); {hint}", key)
        if status == 412 or code == "PreconditionFailed":
            return ObjectExists(f"object {where} already exists", key)
        if status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES:
            return StoreUnavailable(f"{where}: {detail}", key)
        return StoreError(f"{where}: {detail}", key)


def _read_full(stream: BinaryIO | urllib3.BaseHTTPResponse, size: int) -> bytes:
    """Read exactly `size` bytes unless the stream ends first (read() may return less)."""
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


@contextmanager
def _seekable(stream: BinaryIO) -> Iterator[tuple[BinaryIO, int, int, str]]:
    """(body, start offset, size, sha256 hex) of a stream, spooled to disk if needed."""
    digest = hashlib.sha256()
    if getattr(stream, "seekable", lambda: False)():
        start = stream.tell()
        while chunk := stream.read(MiB):
            digest.update(chunk)
        yield stream, start, stream.tell() - start, digest.hexdigest()
        return
    with tempfile.TemporaryFile() as spool:
        while chunk := stream.read(MiB):
            digest.update(chunk)
            spool.write(chunk)
        yield spool, 0, spool.tell(), digest.hexdigest()


def _chain_parts(first: list[bytes], stream: BinaryIO, part_size: int) -> Iterator[bytes]:
    yield from first
    first.clear()  # do not pin the first parts in memory for the whole upload
    while part := _read_full(stream, part_size):
        yield part


def _release(response: urllib3.BaseHTTPResponse) -> None:
    response.close()
    response.release_conn()


def _check_endpoint(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"S3 endpoint must look like http://host:port or https://host, got {endpoint!r}"
        )
    if parts.path.strip("/") or parts.query:
        raise ValueError(f"S3 endpoint must not have a path or query, got {endpoint!r}")
    return f"{parts.scheme}://{parts.netloc}"


def _check_bucket(bucket: str, url: str) -> str:
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(
            f"store URL {url}: {bucket!r} is not a valid bucket name "
            "(3-63 characters: lowercase letters, digits, '.', '-')"
        )
    return bucket


def _redact(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()
