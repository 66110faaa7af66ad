"""The aggregation benchmark's quick run: every cell has every measure, and two streaming
merges of the same round write the same bytes (never timings)."""

from __future__ import annotations

from pathlib import Path

from tests.bench.harness import run_quick


def test_quick_grid_has_every_measure(tmp_path: Path) -> None:
    report = run_quick("aggregate.py", tmp_path / "aggregate.json", timeout=120)
    rows = report["rows"]
    assert [(r["store"], r["participants"], r["modelMiB"]) for r in rows] == [("fs", 2, 16)]
    for row in rows:
        assert row["deltaBytes"] == 2 * 16 << 20
        for kind in ("read", "streaming", "naive"):
            m = row[kind]
            assert m["seconds"] > 0 and m["peakRssMiB"] > 0 and m["cpuSeconds"] >= 0
            assert {"gbPerS", "coresUsed", "gbPerSPerCore"} <= set(m)
        assert len(row["read"]["runs"]) == len(row["streaming"]["runs"]) == 2
        assert row["sameOutputs"] is True
        hashes = {r["outputsSha256"] for r in row["streaming"]["runs"]}
        assert len(hashes) == 1 and len(hashes.pop()) == 64
        assert row["rssTargetMiB"] == 4 + 512
        categories = row["profile"]["profile"]["cpuSecondsByCategory"]
        assert "hashing (sha256)" in categories and sum(categories.values()) > 0
