"""A bug is not the user's mistake: one line says so and where the traceback is (exit 1);
Ctrl-C is 130. In-process, so that a command can be made to fail on purpose."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import pytest

from tapestry_cli import main as cli


def _boom(args: argparse.Namespace) -> int:
    raise RuntimeError("boom")


def _interrupt(args: argparse.Namespace) -> int:
    raise KeyboardInterrupt


ROUNDS_LIST = ["rounds", "list", "--store", "s", "--federation", "f"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TAPESTRY_DEBUG", raising=False)
    monkeypatch.delenv("TAPESTRY_COORDINATOR_KEY", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_a_bug_is_one_line_with_the_traceback_in_a_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(cli, "_rounds_list", _boom)
    assert cli.main(ROUNDS_LIST) == 1
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    [saved] = tmp_path.glob("tapestry-traceback-*.txt")
    assert err == (
        f"internal error (a bug in tapestry): RuntimeError: boom; traceback in {saved}; "
        "re-run with TAPESTRY_DEBUG=1 to print it\n"
    )
    trace = saved.read_text()
    assert "Traceback (most recent call last)" in trace and "RuntimeError: boom" in trace


def test_a_bug_with_debug_prints_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(cli, "_rounds_list", _boom)
    monkeypatch.setenv("TAPESTRY_DEBUG", "1")
    assert cli.main(ROUNDS_LIST) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)")
    assert err.endswith("\ninternal error (a bug in tapestry): RuntimeError: boom\n")
    assert not list(tmp_path.glob("tapestry-traceback-*"))


def test_interrupted_is_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "_rounds_list", _interrupt)
    assert cli.main(ROUNDS_LIST) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_keys_create_into_a_directory_that_is_not_writable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """As root every directory is writable, so here the check is told it is not."""
    (tmp_path / "locked").mkdir()
    locked = tmp_path / "locked"
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)
    assert cli.main(["keys", "create", "alice", "--out", str(locked)]) == 2
    assert capsys.readouterr().err == f"error: --out {locked} is not writable\n"
    assert not list(locked.iterdir())
