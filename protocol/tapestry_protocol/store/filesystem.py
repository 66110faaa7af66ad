"""A local-directory object store with the same contract as S3.

Used by `tapestry local` and unit tests, so it must be as strict as S3, not a sketch:

- Keys map to files under the root (`a/b/c` -> `<root>/a/b/c`); `validate_key` already
  rejects '..', absolute and reserved names, so no key can leave the root.
- Every write goes to a private temp file under `<root>/.tapestry-tmp/`, is fsynced, and
  is then published in one atomic step: `link()` for `if_absent` (the kernel refuses an
  existing name, so exactly one concurrent writer wins) and `rename()` otherwise. A
  reader therefore sees no file or a complete one, never a torn write.
- One limitation S3 does not have: a key cannot also be a "directory" of other keys
  (`a` and `a/b` cannot both exist); such a put fails with StoreError.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

from ._localfile import atomic_download
from .base import (
    DEFAULT_CHUNK,
    RESERVED_SEGMENT_PREFIX,
    AccessDenied,
    BucketNotFound,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StoreError,
    check_chunk_size,
    check_range,
    validate_key,
    validate_prefix,
)

_TMP_DIR = RESERVED_SEGMENT_PREFIX + "tmp"
_COPY_BUFFER = 1 << 20
#: Temp files older than this were left by a crashed writer and are swept on open.
_STALE_TMP_SECONDS = 24 * 3600
#: How often a publish retries when a concurrent delete prunes the parent directory.
_PUBLISH_TRIES = 8


def _etag(st: os.stat_result) -> str:
    """Changes whenever the file is replaced; cheap (no hashing of the content)."""
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


class FilesystemStore(ObjectStore):
    """Objects as files under `root`; see the module docstring for the guarantees."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(root).absolute()
        self.url = self.root.as_uri()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise BucketNotFound(
                f"filesystem store root {self.root} does not exist or is not a directory "
                "(create it, or open the store with create=True)"
            )
        self._tmp = self.root / _TMP_DIR
        self._tmp_ready = False

    def __repr__(self) -> str:
        return f"FilesystemStore({self.url!r})"

    # -- writing -------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        return self._publish(key, lambda f: f.write(data), if_absent)

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> ObjectInfo:
        with open(path, "rb") as src:
            return self._publish(key, lambda f: shutil.copyfileobj(src, f, _COPY_BUFFER), if_absent)

    def put_stream(self, key: str, stream: BinaryIO, *, if_absent: bool = False) -> ObjectInfo:
        return self._publish(key, lambda f: shutil.copyfileobj(stream, f, _COPY_BUFFER), if_absent)

    def _publish(self, key: str, fill: Callable[[BinaryIO], object], if_absent: bool) -> ObjectInfo:
        final = self._path(key)
        tmp = self._temp_dir() / f"put-{uuid.uuid4().hex}"
        try:
            with open(tmp, "xb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
                st = os.fstat(f.fileno())
            self._link_into_place(key, tmp, final, if_absent)
        finally:
            with suppress(FileNotFoundError):
                tmp.unlink()
        _fsync_dir(final.parent)
        return ObjectInfo(key, st.st_size, _etag(st))

    def _link_into_place(self, key: str, tmp: Path, final: Path, if_absent: bool) -> None:
        for _ in range(_PUBLISH_TRIES):
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError) as exc:
                raise StoreError(
                    f"cannot store {key!r}: a parent of it is already an object "
                    "(the filesystem store cannot hold both 'a' and 'a/b')",
                    key,
                ) from exc
            try:
                if if_absent:
                    os.link(tmp, final)
                else:
                    os.replace(tmp, final)
                return
            except FileNotFoundError:
                continue  # a concurrent delete pruned the now-empty parent; recreate it
            except (FileExistsError, IsADirectoryError) as exc:
                if final.is_dir():
                    raise StoreError(
                        f"cannot store {key!r}: it is a directory of other keys on the "
                        "filesystem store (it cannot hold both 'a' and 'a/b')",
                        key,
                    ) from exc
                raise ObjectExists(f"object {key!r} already exists in {self.url}", key) from exc
            except OSError as exc:
                raise self._error(exc, key, "publish") from exc
        raise StoreError(f"cannot store {key!r}: its directory keeps disappearing", key)

    # -- reading -------------------------------------------------------------------

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        check_range(offset, length)
        with self._open(key) as f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    def get_file(self, key: str, path: Path) -> ObjectInfo:
        with self._open(key) as src, atomic_download(path) as dst:
            st = os.fstat(src.fileno())
            shutil.copyfileobj(src, dst, _COPY_BUFFER)
        return ObjectInfo(key, st.st_size, _etag(st))

    def iter_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        check_chunk_size(chunk_size)
        return _chunks(self._open(key), chunk_size)

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise self._not_found(key) from exc
        except OSError as exc:
            raise self._error(exc, key, "stat") from exc
        if not _is_file(st):
            raise self._not_found(key)
        return ObjectInfo(key, st.st_size, _etag(st))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        # Start at the deepest directory the prefix fully names, filter the rest by name.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        return self._walk(base, prefix)

    def _walk(self, rel_dir: str, prefix: str) -> Iterator[ObjectInfo]:
        directory = self.root / rel_dir if rel_dir else self.root
        try:
            with os.scandir(directory) as it:
                entries = [e for e in it if not e.name.startswith(RESERVED_SEGMENT_PREFIX)]
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise self._error(exc, rel_dir, "list") from exc
        # Every key under directory `d` starts with `d/`, so sorting directories by
        # name + "/" yields the keys in plain lexicographic order, like S3 listings.
        named = [
            ((f"{rel_dir}/{e.name}" if rel_dir else e.name), e.is_dir(follow_symlinks=False), e)
            for e in entries
        ]
        named.sort(key=lambda t: t[0] + "/" if t[1] else t[0])
        for key, is_dir, entry in named:
            if is_dir:
                if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                    yield from self._walk(key, prefix)
            elif key.startswith(prefix):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # deleted while listing
                if _is_file(st):
                    yield ObjectInfo(key, st.st_size, _etag(st))

    # -- deleting ------------------------------------------------------------------

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        except OSError as exc:
            raise self._error(exc, key, "delete") from exc
        # Prune now-empty parents so the tree does not fill with empty directories.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    # -- helpers -------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise self._not_found(key) from exc
        except OSError as exc:
            raise self._error(exc, key, "read") from exc
        return f

    def _not_found(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"no object {key!r} in {self.url}", key)

    def _error(self, exc: OSError, key: str, what: str) -> StoreError:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return AccessDenied(f"{what} {key!r} in {self.url}: permission denied", key)
        return StoreError(f"{what} {key!r} in {self.url} failed: {exc}", key)

    def _temp_dir(self) -> Path:
        """Made, and swept of a crashed writer's leftovers, on the first write: opening a
        store only to read it (a read-only mount, say) writes nothing."""
        if not self._tmp_ready:
            self._tmp.mkdir(exist_ok=True)
            self._sweep_stale_temp_files()
            self._tmp_ready = True
        return self._tmp

    def _sweep_stale_temp_files(self) -> None:
        cutoff = time.time() - _STALE_TMP_SECONDS
        with os.scandir(self._tmp) as it:
            for entry in it:
                with suppress(OSError):
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)


def _is_file(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def _chunks(f: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    with f:
        while chunk := f.read(chunk_size):
            yield chunk


def _fsync_dir(path: Path) -> None:
    """Make a just-published directory entry durable (a crash must not lose a commit)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
