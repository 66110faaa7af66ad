"""What only the filesystem store has: its on-disk layout, temp files, and the one key
shape S3 allows but a directory tree cannot hold."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tapestry_protocol.store import (
    AccessDenied,
    BucketNotFound,
    FilesystemStore,
    ObjectExists,
    StoreError,
    filesystem,
)


def test_keys_are_plain_files_under_the_root(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path, create=True)
    store.put("federations/f/rounds/1/plan.json", b"{}", if_absent=True)
    assert (tmp_path / "federations/f/rounds/1/plan.json").read_bytes() == b"{}"
    assert [p.name for p in (tmp_path / ".tapestry-tmp").iterdir()] == []


def test_delete_prunes_empty_directories(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path, create=True)
    store.put("a/b/c/d", b"x")
    store.put("a/keep", b"y")
    store.delete("a/b/c/d")
    assert not (tmp_path / "a/b").exists()
    assert (tmp_path / "a/keep").exists()


def test_a_key_cannot_also_be_a_directory(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path, create=True)
    store.put("a/b", b"x")
    with pytest.raises(StoreError, match="directory of other keys") as excinfo:
        store.put("a", b"y", if_absent=True)
    assert not isinstance(excinfo.value, ObjectExists)
    with pytest.raises(StoreError, match="parent of it is already an object"):
        store.put("a/b/c", b"z")
    assert not store.exists("a")
    assert [o.key for o in store.list("")] == ["a/b"]


def test_crashed_writers_temp_files_are_invisible_and_swept(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path, create=True)
    (tmp_path / ".tapestry-tmp").mkdir()
    fresh = tmp_path / ".tapestry-tmp" / "put-fresh"
    stale = tmp_path / ".tapestry-tmp" / "put-stale"
    fresh.write_bytes(b"half a delta")
    stale.write_bytes(b"half a delta")
    old = time.time() - 2 * 24 * 3600
    os.utime(stale, (old, old))
    assert list(store.list("")) == []
    FilesystemStore(tmp_path).put("k", b"v")  # the first write sweeps files older than a day
    assert fresh.exists() and not stale.exists()


def test_opening_a_store_to_read_writes_nothing(tmp_path: Path) -> None:
    FilesystemStore(tmp_path, create=True).put("k", b"v")
    (tmp_path / ".tapestry-tmp").rmdir()
    reader = FilesystemStore(tmp_path)
    assert reader.get("k") == b"v" and [o.key for o in reader.list("")] == ["k"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_missing_root_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(BucketNotFound, match="create=True"):
        FilesystemStore(tmp_path / "nowhere")


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM])
def test_permission_denied_is_access_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """The operating system's refusal is injected where the store opens the file: a
    chmod cannot make it (root, and so many CI containers, reads mode 000 files)."""
    store = FilesystemStore(tmp_path, create=True)
    store.put("locked/k", b"x")
    real_open = open

    def refusing_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(file) == tmp_path / "locked/k":
            raise PermissionError(code, os.strerror(code), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(filesystem, "open", refusing_open, raising=False)
    with pytest.raises(AccessDenied, match="locked/k"):
        store.get("locked/k")
    with pytest.raises(AccessDenied, match="locked/k"):
        store.get_file("locked/k", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
