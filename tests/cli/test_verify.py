"""`tapestry verify` as a user runs it: tables and exit 0 for an intact federation, one
`error:` line naming the object and exit 2 for a tampered one, the same report as JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tapestry_protocol import rejections
from tapestry_protocol.signing import SigningKey
from tests.cli.conftest import assert_error, cells, tapestry
from tests.protocol.test_verify import FEDERATION, History, build_history


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return build_history(tmp_path_factory.mktemp("cli-history") / "store")


def _verify(history: History, cwd: Path, *extra: str, store: Path | None = None) -> list[str]:
    return [
        "verify", "--store", str(store or history.root), "--federation", FEDERATION, *extra
    ]  # fmt: skip


def _tampered(history: History, tmp_path: Path, key: str) -> Path:
    """A copy of the store with one byte of `key` flipped: the last digit of the year it
    was created, so that the JSON stays valid and only the signature can tell."""
    copy = tmp_path / "store"
    shutil.copytree(history.root, copy)
    data = bytearray((copy / key).read_bytes())
    data[data.index(b'"createdAt":"') + len(b'"createdAt":"') + 3] ^= 0x01
    (copy / key).write_bytes(bytes(data))
    return copy


def test_an_intact_federation_prints_each_round_and_exits_0(
    history: History, tmp_path: Path
) -> None:
    done = tapestry(*_verify(history, tmp_path, "--coordinator-key", history.coordinator_key),
                    cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    rows = cells(done.stdout)
    assert ["alice", "merged", "0.3333", "100", ""] in rows
    assert ["bob", "merged", "0.6667", "200", ""] in rows
    assert ["alice", "merged", "1.0000", "100", ""] in rows  # round 2, alone
    assert any(r[:2] == ["carol", rejections.WRONG_BASE] for r in rows)
    assert any(r[:2] == ["bob", rejections.DECLINED] for r in rows)
    for r in range(3):
        assert f"round {r} — Succeeded — base {history.layout.base_manifest(r)}" in done.stdout
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("verified 3 rounds, 63 objects; latest base ")
    assert history.layout.base_manifest(3) in last


def test_json_report(history: History, tmp_path: Path) -> None:
    key_file = tmp_path / "coordinator.pub"
    key_file.write_text(history.coordinator_key + "\n")
    done = tapestry(*_verify(history, tmp_path, "--coordinator-key", str(key_file), "--json"),
                    cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verified"] is True and report["failure"] is None
    assert report["roundsCompleted"] == 3 and report["objects"] == 63
    weights = {c["participant"]: c["weight"] for c in report["rounds"][0]["contributors"]}
    assert weights == pytest.approx({"alice": 1 / 3, "bob": 2 / 3})
    assert report["latestBase"]["manifest"] == history.layout.base_manifest(3)


def test_a_flipped_byte_is_one_error_line_and_exit_2(history: History, tmp_path: Path) -> None:
    key = history.layout.update_manifest(1, "alice")
    store = _tampered(history, tmp_path, key)
    args = _verify(history, tmp_path, store=store)
    done = tapestry(*args, cwd=tmp_path, env={"TAPESTRY_COORDINATOR_KEY": history.coordinator_key})
    assert_error(
        done,
        f"error: federation {FEDERATION}: verification failed at {key}: BadSignature: "
        "UpdateManifest signature by 'alice' does not verify",
    )
    assert "round 0 — Succeeded" in done.stdout  # verified before the failure
    assert "round 1" not in done.stdout and "verified" not in done.stdout

    as_json = tapestry(*args, "--json", cwd=tmp_path,
                       env={"TAPESTRY_COORDINATOR_KEY": history.coordinator_key})  # fmt: skip
    assert as_json.returncode == 2
    report = json.loads(as_json.stdout)
    assert report["verified"] is False
    assert report["failure"]["key"] == key
    assert report["failure"]["reason"] == rejections.BAD_SIGNATURE
    assert as_json.stderr == done.stderr


def test_a_wrong_coordinator_key_fails_at_round_0s_plan(history: History, tmp_path: Path) -> None:
    other = SigningKey.generate("coordinator").public_key_text
    done = tapestry(*_verify(history, tmp_path, "--coordinator-key", other), cwd=tmp_path)
    assert_error(
        done,
        f"error: federation {FEDERATION}: verification failed at {history.layout.plan(0)}: "
        "BadSignature: RoundPlan signature by 'coordinator' does not verify",
    )


def test_the_coordinator_key_is_required(history: History, tmp_path: Path) -> None:
    done = tapestry(*_verify(history, tmp_path), cwd=tmp_path)
    assert_error(
        done,
        "error: verify needs the coordinator's public key: --coordinator-key ed25519:... or a "
        ".pub file (or $TAPESTRY_COORDINATOR_KEY)",
    )


def test_a_prefix_with_no_federation_names_the_missing_base(
    history: History, tmp_path: Path
) -> None:
    args = _verify(history, tmp_path, "--coordinator-key", history.coordinator_key)
    done = tapestry(*args, "--prefix", "elsewhere", cwd=tmp_path)
    assert_error(
        done,
        f"error: federation {FEDERATION}: verification failed at "
        f"elsewhere/federations/{FEDERATION}/bases/000000/manifest.json: MissingManifest: "
        "the federation has no first base",
    )
