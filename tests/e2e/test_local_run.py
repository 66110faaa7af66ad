"""`tapestry local run` end to end through a real MinIO server: 2 participants x 2
rounds on a tiny model, a crashed participant, and `tapestry rounds` on the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.texts import write_corpora
from tests.s3servers import S3Server

pytestmark = [pytest.mark.s3, pytest.mark.torch, pytest.mark.slow]

TINY = ["--preset", "tiny", "--inner-steps", "4", "--batch-size", "4", "--seq-len", "64"]


def _tapestry(
    args: list[str], env: dict[str, str], timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tapestry_cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def _env(server: S3Server) -> dict[str, str]:
    creds = server.credentials
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": creds.access_key,
        "AWS_SECRET_ACCESS_KEY": creds.secret_key,
        "COLUMNS": "200",
    }


def test_two_participants_two_rounds_through_minio(minio_server: S3Server, tmp_path: Path) -> None:
    data = write_corpora(tmp_path / "text")
    url = minio_server.url_for("e2e")
    env = _env(minio_server)
    run = _tapestry(
        [
            "local",
            "run",
            "--participants",
            "2",
            "--rounds",
            "2",
            *TINY,
            "--data",
            str(data),
            "--store",
            url,
            "--workdir",
            str(tmp_path / "w"),
        ],
        env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "round 0: Succeeded" in run.stdout and "round 1: Succeeded" in run.stdout
    assert "validation loss" in run.stdout and "local-only alice" in run.stdout
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert set(summary["losses"]["shared (federated)"]) == {"alice", "bob"}
    for losses in summary["losses"].values():
        assert all(0 < v < 5.6 for v in losses.values())  # below a uniform byte model

    store = minio_server.open("e2e")
    keys = [i.key for i in store.list("federations/local/")]
    assert "federations/local/rounds/000001/result.json" in keys
    assert any(k.startswith("federations/local/bases/000002/part-") for k in keys)

    public = (tmp_path / "w" / "keys" / "coordinator.pub").read_text().strip()
    listed = _tapestry(
        ["rounds", "list", "--store", url, "--federation", "local", "--coordinator-key", public],
        env,
    )
    assert listed.returncode == 0, listed.stderr
    assert "Succeeded" in listed.stdout and "verified" in listed.stdout
    shown = _tapestry(
        [
            "rounds",
            "show",
            "1",
            "--store",
            url,
            "--federation",
            "local",
            "--coordinator-key",
            public,
        ],
        env,
    )
    assert shown.returncode == 0, shown.stderr
    assert "accepted" in shown.stdout and "alice" in shown.stdout and "bob" in shown.stdout

    again = _tapestry(
        [
            "local",
            "run",
            "--participants",
            "2",
            "--rounds",
            "2",
            *TINY,
            "--data",
            str(data),
            "--store",
            url,
            "--workdir",
            str(tmp_path / "w"),
            "--no-baseline",
        ],
        env,
    )
    assert again.returncode == 0, again.stderr
    assert "round 1: Succeeded" in again.stdout  # re-verified, not retrained


def test_a_crashed_participant_is_reported_and_the_round_goes_on(tmp_path: Path) -> None:
    data = write_corpora(tmp_path / "text")
    env = {**os.environ, "COLUMNS": "200"}
    workdir = tmp_path / "w"
    # bob's signing key is damaged after the first run: his process fails.
    prepared = _tapestry(
        [
            "local",
            "run",
            "--participants",
            "2",
            "--rounds",
            "0",
            "--data",
            str(data),
            "--workdir",
            str(workdir),
            "--no-baseline",
            *TINY,
        ],
        env,
    )
    assert prepared.returncode == 0, prepared.stderr
    (workdir / "keys" / "bob.key").write_text("not a key")
    run = _tapestry(
        [
            "local",
            "run",
            "--participants",
            "2",
            "--rounds",
            "1",
            "--no-baseline",
            "--data",
            str(data),
            "--workdir",
            str(workdir),
            *TINY,
        ],
        env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "bob failed" in run.stdout and "not a PEM private key" in run.stdout
    assert "round 0: Succeeded" in run.stdout and "bob (TrainingFailed)" in run.stdout


def test_bad_input_gets_clear_errors(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    missing = _tapestry(
        ["local", "run", "--data", str(tmp_path / "absent"), "--workdir", str(tmp_path / "w")], env
    )
    assert missing.returncode == 2 and "is not a directory" in missing.stderr
    unreachable = _tapestry(
        [
            "local",
            "run",
            "--participants",
            "2",
            "--rounds",
            "1",
            *TINY,
            "--data",
            str(write_corpora(tmp_path / "text")),
            "--store",
            "s3://b?endpoint=http://127.0.0.1:1",
            "--workdir",
            str(tmp_path / "w2"),
        ],
        {**env, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
        timeout=300,
    )
    assert unreachable.returncode == 2 and "cannot use store" in unreachable.stderr
