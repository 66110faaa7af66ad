"""Object store: the one channel between Tapestry parties.

`open_store(url)` picks the backend from the URL:

- `/abs/path`, `rel/path` or `file:///abs/path` -> FilesystemStore
- `s3://bucket/prefix?endpoint=http://127.0.0.1:9000` -> S3Store (endpoint defaults to
  $TAPESTRY_S3_ENDPOINT, then $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, then AWS)
- `http(s)://host:port/bucket/prefix` -> S3Store, path-style, endpoint from the URL

S3 URLs accept the query parameters `endpoint`, `region`, `ca_file`, `credentials_dir` and
`conditional_multipart` (auto|native|single-put); keyword options override them.
Credentials never go in URLs: they come from the `credentials` option, a credentials
directory (`accessKey`/`secretKey` files), or the environment
(TAPESTRY_S3_ACCESS_KEY/TAPESTRY_S3_SECRET_KEY, then AWS_*). See docs/object-store.md.
"""

from __future__ import annotations

import os
from typing import cast
from urllib.parse import unquote, urlsplit

from .base import (
    AccessDenied,
    BucketNotFound,
    InvalidKey,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StoreError,
    StoreUnavailable,
    validate_key,
)
from .filesystem import FilesystemStore
from .retry import FAST_RETRY, RetryPolicy
from .s3 import (
    DEFAULT_PART_SIZE,
    DEFAULT_WORKERS,
    ConditionalMultipart,
    DirectoryCredentials,
    S3Credentials,
    S3Location,
    S3Store,
)

__all__ = [
    "FAST_RETRY",
    "AccessDenied",
    "BucketNotFound",
    "DirectoryCredentials",
    "FilesystemStore",
    "InvalidKey",
    "ObjectExists",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "RetryPolicy",
    "S3Credentials",
    "S3Location",
    "S3Store",
    "StoreError",
    "StoreUnavailable",
    "open_store",
    "validate_key",
]

_SCHEMES = "/abs/path, file:///abs/path, s3://bucket/prefix?endpoint=... or http(s)://host/bucket"


def open_store(
    url: str | os.PathLike[str],
    *,
    create: bool = False,
    credentials: S3Credentials | None = None,
    credentials_dir: str | os.PathLike[str] | None = None,
    region: str | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    retry: RetryPolicy | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    max_workers: int = DEFAULT_WORKERS,
) -> ObjectStore:
    """Open the store a URL names; `create=True` makes the bucket or directory if missing.

    Raises ValueError when the URL or an option is malformed, saying what is wrong.
    """
    text = os.fspath(url)
    scheme = urlsplit(text).scheme
    if scheme in ("", "file"):
        # Tuning options (retry, part_size, max_workers) are ignored here, so callers can
        # pass the same ones for any URL; connection options mean a confused caller.
        s3_only = {
            "credentials": credentials,
            "credentials_dir": credentials_dir,
            "region": region,
            "ca_file": ca_file,
        }
        given = sorted(name for name, value in s3_only.items() if value is not None)
        if given:
            raise ValueError(f"option(s) {', '.join(given)} only apply to S3 stores, not {text}")
        return FilesystemStore(_filesystem_root(text), create=create)
    if scheme not in ("s3", "http", "https"):
        raise ValueError(f"unsupported store URL scheme {scheme!r} in {text}; use {_SCHEMES}")
    location = S3Location.parse(text)
    creds_dir = credentials_dir or location.params.get("credentials_dir")
    if credentials is None and not creds_dir:
        creds_dir = os.environ.get("TAPESTRY_S3_CREDENTIALS_DIR") or None
        credentials = None if creds_dir else S3Credentials.from_env()
    store = S3Store(
        location,
        credentials=credentials,
        # A directory is followed as it changes (a rotated Secret needs no restart).
        credentials_dir=creds_dir if credentials is None else None,
        region=region or location.params.get("region") or _env_region(),
        ca_file=ca_file or location.params.get("ca_file") or None,
        retry=retry,
        part_size=part_size,
        max_workers=max_workers,
        # S3Store checks the value and says what is allowed.
        conditional_multipart=cast(
            ConditionalMultipart, location.params.get("conditional_multipart", "auto")
        ),
    )
    if create:
        try:
            store.create_bucket()
        except BaseException:
            store.close()
            raise
    return store


def _filesystem_root(text: str) -> str:
    if not text.startswith("file:"):
        return text
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise ValueError(f"file URLs must be absolute, like file:///abs/path; got {text}")
    if parts.query or parts.fragment:
        raise ValueError(f"file URLs take no query or fragment; got {text}")
    return unquote(parts.path)


def _env_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
