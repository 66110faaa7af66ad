"""The one interface every part uses to talk to the object store.

The store is the only channel between coordinator and participants, so its contract is
small and strict: objects are immutable once written, `put(..., if_absent=True)` is the
commit primitive (exactly one concurrent writer wins), and a reader never sees a torn
object. Backends (filesystem, S3) must honour the same contract; one test suite checks
all of them (tests/store/test_contract.py). docs/object-store.md describes it in full.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

#: Longest key accepted, in UTF-8 bytes (S3's object-name limit).
MAX_KEY_BYTES = 1024
#: Key segments starting with this are reserved for backend bookkeeping (temp files).
RESERVED_SEGMENT_PREFIX = ".tapestry-"


class StoreError(Exception):
    """Base class of every object-store failure. Always names the key at fault."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ObjectNotFound(StoreError):
    """The key does not exist (HTTP 404 / ENOENT)."""


class ObjectExists(StoreError):
    """A conditional create lost: the key was already written (HTTP 412 / EEXIST)."""


class AccessDenied(StoreError):
    """Credentials are wrong or lack permission for this key or bucket (HTTP 403)."""


class StoreUnavailable(StoreError):
    """The store could not be reached or kept failing after bounded retries."""


class BucketNotFound(StoreError):
    """The bucket (or filesystem root) itself is missing: a configuration error.

    Deliberately not an ObjectNotFound, so `exists()` fails loudly on a misconfigured
    store instead of reporting every key as absent.
    """


class InvalidKey(StoreError, ValueError):
    """The key breaks the key rules (see `validate_key`); no backend would accept it."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a stat/list/put returns. `etag` changes whenever the content changes."""

    key: str
    size: int
    etag: str = ""


def validate_key(key: str) -> str:
    """Return `key` if every backend can store it under the same name, else InvalidKey.

    The rules are the intersection of S3 object names and portable file paths, so a key
    that works on the local filesystem store also works on S3 and vice versa.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"key must be a non-empty string, got {key!r}", None)
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKey(f"key is longer than {MAX_KEY_BYTES} bytes: {key[:80]!r}...", key)
    if key.startswith("/") or key.endswith("/"):
        raise InvalidKey(f"key must not start or end with '/': {key!r}", key)
    if any(ord(c) < 0x20 or c in "\x7f\\" for c in key):
        raise InvalidKey(f"key contains a control character or backslash: {key!r}", key)
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey(f"key has an empty, '.' or '..' segment: {key!r}", key)
        if segment.startswith(RESERVED_SEGMENT_PREFIX):
            raise InvalidKey(
                f"key segments starting with {RESERVED_SEGMENT_PREFIX!r} are reserved: {key!r}",
                key,
            )
    return key


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if it could start a valid key ('' lists everything)."""
    if not prefix:
        return prefix
    # A prefix may end mid-segment or with '/'; check it as the start of some valid key.
    try:
        validate_key(prefix[:-1] if prefix.endswith("/") else prefix + "x")
    except InvalidKey as exc:
        raise InvalidKey(f"no valid key can start with prefix {prefix!r}", prefix) from exc
    return prefix


DEFAULT_CHUNK = 8 << 20


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


def check_range(offset: int, length: int | None) -> None:
    """Reject negative ranges up front, the same way on every backend."""
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"invalid byte range: offset={offset}, length={length}")


class ObjectStore(abc.ABC):
    """Write-once object storage addressed by '/'-separated keys.

    Every method validates its key with `validate_key` and raises only StoreError
    subclasses (plus ValueError for bad arguments). Stores are thread-safe, and usable as
    a context manager that calls `close()`.
    """

    url: str

    @abc.abstractmethod
    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        """Store `data` under `key`; with `if_absent`, raise ObjectExists if it is taken.

        Readers see either no object or all of `data`, never a part of it.
        """

    @abc.abstractmethod
    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> ObjectInfo:
        """Upload a local file, streaming (multipart, parallel parts for large files)."""

    @abc.abstractmethod
    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """Read the object, or the byte range [offset, offset+length).

        Like slicing: a range past the end is cut short (b"" when offset >= size).
        """

    @abc.abstractmethod
    def get_file(self, key: str, path: Path) -> ObjectInfo:
        """Download into a local file (parallel ranged reads for large objects).

        `path` is replaced atomically, so it never holds a partial download.
        """

    @abc.abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        """Stream the object in chunks without holding it all in memory."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and etag of the object; ObjectNotFound if absent."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in lexicographic key order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object (idempotent: deleting a missing key is not an error)."""

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def put_stream(self, key: str, stream: BinaryIO, *, if_absent: bool = False) -> ObjectInfo:
        """Store everything read from `stream` (default: buffers it; backends may stream)."""
        return self.put(key, stream.read(), if_absent=if_absent)

    def close(self) -> None:  # noqa: B027 - optional hook, deliberately not abstract
        """Release connections and threads; the default store holds none."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
