"""Crash-safe file writes: temp file per writer, fsync, rename; nothing torn, nothing left."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tapestry_protocol.files import (
    atomic_file,
    atomic_write,
    atomic_write_text,
    move_into_place,
    replace_dir,
)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write(target, b"one")
    assert target.read_bytes() == b"one"
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    atomic_write_text(target, "drei ü")
    assert target.read_text(encoding="utf-8") == "drei ü"
    assert _leftovers(tmp_path) == []


def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    class Boom(Exception):
        pass

    with pytest.raises(Boom), atomic_file(target) as f:
        f.write(b"new but half")
        f.flush()
        raise Boom
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_a_failure_before_the_first_file_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "new.bin") as f:
        f.write(b"x")
        raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_do_not_share_temp_files(tmp_path: Path) -> None:
    """Each writer has its own temp file: all are open at once, none clobbers another,
    and the target ends up as exactly one writer's complete bytes."""
    target = tmp_path / "shared.bin"
    writers = 8
    payloads = [bytes([i]) * (64 << 10) for i in range(writers)]
    all_open = threading.Barrier(writers)
    temps: list[set[str]] = []
    lock = threading.Lock()

    def write(i: int) -> None:
        with atomic_file(target) as f:
            f.write(payloads[i][: len(payloads[i]) // 2])
            all_open.wait(timeout=30)  # every writer holds its temp file now
            with lock:
                temps.append(set(_leftovers(tmp_path)))
            all_open.wait(timeout=30)
            f.write(payloads[i][len(payloads[i]) // 2 :])

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(seen) == writers for seen in temps)  # eight distinct temp names
    assert target.read_bytes() in payloads
    assert _leftovers(tmp_path) == []


_REWRITER = """
import sys
from tapestry_protocol.files import atomic_write
for _ in range(200):
    atomic_write(sys.argv[1], bytes([int(sys.argv[2])]) * 4096)
"""


def test_concurrent_processes_never_tear_the_file(tmp_path: Path) -> None:
    target = tmp_path / "shared.bin"
    procs = [
        subprocess.Popen([sys.executable, "-c", _REWRITER, str(target), str(i)]) for i in range(4)
    ]
    reads = 0
    while any(p.poll() is None for p in procs):
        if target.exists():
            data = target.read_bytes()
            assert len(data) == 4096 and len(set(data)) == 1, "a torn file was visible"
            reads += 1
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert len(target.read_bytes()) == 4096
    assert _leftovers(tmp_path) == []


def test_exclusive_never_replaces(tmp_path: Path) -> None:
    target = tmp_path / "k.key"
    atomic_write(target, b"first", exclusive=True, mode=0o600)
    with pytest.raises(FileExistsError) as info:
        atomic_write(target, b"second", exclusive=True, mode=0o600)
    assert info.value.filename == str(target)  # names the file, not the temp file
    assert target.read_bytes() == b"first"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key"]


def test_mode_follows_the_umask_by_default(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644


def test_replace_dir_swaps_a_built_directory_in(tmp_path: Path) -> None:
    target = tmp_path / "set"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    built = tmp_path / ".set.build"
    (built / "sub").mkdir(parents=True)
    (built / "sub" / "a.txt").write_text("new")
    replace_dir(built, target)
    assert not built.exists()
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["sub", "sub/a.txt"]


def test_move_into_place(tmp_path: Path) -> None:
    src = tmp_path / "scratch" / "x.deb"
    src.parent.mkdir()
    src.write_bytes(b"deb")
    move_into_place(src, tmp_path / "x.deb")
    assert (tmp_path / "x.deb").read_bytes() == b"deb" and not src.exists()
