"""`tapestry aggregate` from the command line: a round must be closed, `--close` closes it."""

from __future__ import annotations

from pathlib import Path

from tapestry_protocol.exchange import publish_update
from tapestry_protocol.store.filesystem import FilesystemStore
from tests.cli.conftest import assert_error, tapestry
from tests.protocol.federation import make_federation

ARGS = ["aggregate", "--store", "store", "--federation", "f", "--round", "0"]


def _committed_round(root: Path) -> None:
    """Round 0 with alice's update committed, not yet closed; the coordinator key in keys/."""
    store = FilesystemStore(root / "store", create=True)
    fed = make_federation(store, "f")
    alice = fed.participants["alice"]
    publish_update(store, fed.layout, fed.plan, fed.base, fed.delta(), alice, tokens=10, metrics={})
    fed.coordinator.save(root / "keys")


def test_aggregate_an_open_round(tmp_path: Path) -> None:
    _committed_round(tmp_path)
    done = tapestry(*ARGS, "--key", "keys/coordinator.key", cwd=tmp_path)
    assert_error(
        done,
        "error: round 0 cannot be aggregated: NotClosed: round 0 is not closed "
        "(--close closes it now, with the updates committed so far)",
    )
    closed = tapestry(*ARGS, "--key", "keys/coordinator.key", "--close", cwd=tmp_path)
    assert closed.returncode == 0, closed.stderr
    assert "'outcome': 'Succeeded'" in closed.stderr


def test_aggregate_with_a_missing_key_file(tmp_path: Path) -> None:
    done = tapestry(*ARGS, "--key", "nope.key", cwd=tmp_path)
    assert_error(done, "error: cannot read signing key nope.key: No such file or directory")
