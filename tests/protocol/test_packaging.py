"""The operator's side runs without torch, the trainer without kopf, and nothing shadows
the standard library's `operator`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_without(blocked: list[str], code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter in which importing `blocked` fails."""
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT
    )


@pytest.mark.parametrize(
    "module",
    [
        "tapestry_protocol.exchange",
        "tapestry_aggregator.merge",
        "tapestry_cli.main",
        "tapestry_cli.inspect",
        "tapestry_protocol.store",
    ],
)
def test_coordinator_side_imports_without_torch(module: str) -> None:
    done = _run_without(["torch"], f"import {module}")
    assert done.returncode == 0, done.stderr


def test_keys_and_rounds_commands_work_without_torch(tmp_path: Path) -> None:
    code = (
        "from tapestry_cli.main import main\n"
        f"assert main(['keys', 'create', 'alice', '--out', {str(tmp_path)!r}]) == 0\n"
        f"assert main(['rounds', 'list', '--store', {str(tmp_path / 's')!r},"
        " '--federation', 'f']) == 2\n"
    )
    done = _run_without(["torch"], code)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "alice.key").exists() and (tmp_path / "alice.pub").exists()
    assert done.stdout.startswith("ed25519:")


@pytest.mark.torch  # the trainer itself needs torch
def test_trainer_imports_without_kopf() -> None:
    done = _run_without(["kopf"], "import tapestry_trainer.participant, tapestry_trainer.inner")
    assert done.returncode == 0, done.stderr


def test_operator_is_the_standard_library_module() -> None:
    """From the repository root, with the root first on sys.path, `operator` is stdlib's."""
    code = "import operator, sysconfig; print(operator.__file__, sysconfig.get_paths()['stdlib'])"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    module_file, stdlib = done.stdout.split()
    assert Path(module_file).parent == Path(stdlib)


def test_keys_create_refuses_bad_names_and_overwrites(tmp_path: Path) -> None:
    from tapestry_cli.main import main

    assert main(["keys", "create", "Not_A_Name", "--out", str(tmp_path)]) == 2
    assert main(["keys", "create", "bob", "--out", str(tmp_path)]) == 0
    assert main(["keys", "create", "bob", "--out", str(tmp_path)]) == 2  # never overwrite
