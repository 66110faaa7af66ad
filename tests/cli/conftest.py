"""Run `tapestry` the way a user does, and build a store with one signed round."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tapestry_aggregator.merge import aggregate_round
from tapestry_aggregator.strategy import Strategy
from tapestry_protocol.documents import CloseTrigger
from tapestry_protocol.exchange import close_round, publish_update
from tapestry_protocol.store.filesystem import FilesystemStore
from tests.protocol.federation import Federation, make_federation

# Rich styles only terminals; these would make it style a pipe too.
FORCING = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


def tapestry(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real entry point, in a fresh interpreter; wide enough that no cell wraps."""
    base = {k: v for k, v in os.environ.items() if k not in FORCING}
    base.pop("TAPESTRY_COORDINATOR_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "tapestry_cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, "COLUMNS": "200", **(env or {})},
        timeout=120,
    )


def assert_error(done: subprocess.CompletedProcess[str], line: str, status: int = 2) -> None:
    """Exactly one stderr line, `line`, the exit status, and no traceback anywhere."""
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr == line + "\n", done.stderr
    assert done.returncode == status


def cells(stdout: str) -> list[list[str]]:
    """The body rows of the tables in `stdout`, cell by cell."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("│"):
            rows.append([cell.strip() for cell in line.strip("│").split("│")])
    return rows


@dataclass
class SignedRound:
    """Round 0 of federation `f`: alice and bob's updates, closed and merged."""

    root: Path
    store: Path
    fed: Federation

    @property
    def coordinator_key(self) -> str:
        return self.fed.coordinator.public_key_text


@pytest.fixture
def signed_round(tmp_path: Path) -> SignedRound:
    store = FilesystemStore(tmp_path / "store", create=True)
    fed = make_federation(store, "f")
    for i, who in enumerate(sorted(fed.participants)):
        publish_update(
            store, fed.layout, fed.plan, fed.base, fed.delta(seed=i), fed.participants[who],
            tokens=100 * (i + 1), metrics={"trainLoss": 1.0 + i},
        )  # fmt: skip
    now = datetime.now(UTC)
    close_round(store, fed.layout, fed.plan, fed.coordinator, CloseTrigger.ALL_REPORTED, now)
    aggregate_round(store, fed.layout, 0, fed.coordinator, Strategy("fedavg"))
    return SignedRound(tmp_path, tmp_path / "store", fed)
