"""The transfer benchmark's quick run on the session MinIO: every arm of every operation
ran and moved exactly the update's bytes (sizes and sha256 checked by the script)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.harness import run_quick
from tests.s3servers import S3Server

pytestmark = pytest.mark.s3


def test_quick_run_moves_the_same_bytes_in_every_arm(
    minio_server: S3Server, tmp_path: Path
) -> None:
    url = minio_server.url_for("bench-transfer")
    report = run_quick("transfer.py", tmp_path / "transfer.json", "--url", url, timeout=120)
    assert report["repetitions"] == 1
    assert report["shards"] > 1  # several shards, each bigger than a part: multipart
    assert report["shardBytes"] > report["partSize"]
    assert set(report["operations"]) == {"put", "get", "publish", "fetch"}
    for op, row in report["operations"].items():
        assert row["bytes"] == report["updateBytes"], op
        assert row["checksOk"] == {"store": True, "plain": True}, op
        for arm in ("store", "plain"):
            assert len(row["seconds"][arm]) == 1, (op, arm)
            assert row[f"{arm}MBps"]["median"] > 0, (op, arm)
        assert row["ratio"] > 0, op
