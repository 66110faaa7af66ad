"""Files that survive a crash: written aside, flushed to disk, then renamed into place.

Every component writes the files it must not lose half-way (checkpoints, weights, keys,
downloads, summaries) through this module, so there is one definition of "atomic":

1. the bytes go to a temp file in the target's own directory, under a name no other
   writer uses (``.<name>.<random>.tmp``, created exclusively);
2. the temp file is flushed and fsynced;
3. it is renamed over the target (``os.replace``), or, for ``exclusive=True``, linked to
   it (``os.link``), which fails if the target exists: write-once, never overwrite;
4. the directory is fsynced, so the rename itself is on disk.

A failure anywhere before step 3 leaves the previous file untouched and removes the temp
file. Readers therefore see the old file or the new one, never a torn one.

:func:`replace_dir` does the same for a directory built aside (a shard set, a corpus).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"
_DEFAULT_MODE = 0o666  # less the umask, as for any newly created file


def temp_name(path: Path) -> Path:
    """A fresh hidden sibling of ``path``; the random part keeps concurrent writers apart."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}")


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename still holds
        pass
    finally:
        os.close(fd)


def _create_temp(path: Path, mode: int) -> tuple[Path, int]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = temp_name(path)
        try:
            return tmp, os.open(tmp, flags, mode)
        except FileExistsError:  # 64 random bits collided: draw again
            continue


@contextmanager
def atomic_file(
    path: Path | str, *, mode: int = _DEFAULT_MODE, exclusive: bool = False
) -> Iterator[BinaryIO]:
    """Yield a binary file to write; on a clean exit it becomes ``path``, durably.

    ``mode`` is the new file's permission bits (less the umask), e.g. ``0o600`` for a
    private key. With ``exclusive=True`` an existing ``path`` is never replaced:
    :class:`FileExistsError` is raised instead and nothing changes. If the block raises,
    ``path`` is left as it was and the temp file is removed.
    """
    path = Path(path)
    tmp, fd = _create_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)  # fails if `path` exists: write-once
            except FileExistsError:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(
    path: Path | str, data: bytes, *, mode: int = _DEFAULT_MODE, exclusive: bool = False
) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path, mode=mode, exclusive=exclusive) as f:
        f.write(data)


def atomic_write_text(path: Path | str, text: str, *, mode: int = _DEFAULT_MODE) -> None:
    """UTF-8 ``text`` to ``path`` through :func:`atomic_file`."""
    atomic_write(path, text.encode("utf-8"), mode=mode)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` (and ``root`` itself)."""
    for directory, _, names in os.walk(root):
        for name in names:
            fd = os.open(Path(directory) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))


def move_into_place(src: Path, dst: Path) -> None:
    """Rename the finished file ``src`` over ``dst`` (same filesystem), durably."""
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, dst)
    fsync_dir(dst.parent)


def replace_dir(built: Path, target: Path) -> None:
    """Move the directory ``built`` (made next to ``target``) into place as ``target``.

    Its contents are fsynced first, then an existing ``target`` is removed and ``built``
    renamed over it and the parent fsynced. A crash leaves either the old directory, the
    new one, or none (the caller rebuilds), never a partly written one under ``target``.
    """
    fsync_tree(built)
    if target.exists():
        shutil.rmtree(target)
    os.replace(built, target)
    fsync_dir(target.parent)
