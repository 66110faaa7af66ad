"""The scale-out benchmark's quick run: K = 1, 2, 3 parts, each in its own process, write
the same result, next base and optimizer state, and every phase is recorded."""

from __future__ import annotations

from pathlib import Path

from tests.bench.harness import run_quick


def test_quick_parts_give_identical_outputs(tmp_path: Path) -> None:
    report = run_quick("scaleout.py", tmp_path / "scaleout.json", "--parts", "1,2,3", timeout=120)
    runs = report["runs"]
    assert [r["parts"] for r in runs] == [1, 2, 3]
    assert report["identical"] is True
    assert len({r["outputsSha256"] for r in runs}) == 1
    for run in runs:
        assert [p["part"] for p in run["perPart"]] == list(range(run["parts"]))
        assert run["partsPhaseSeconds"] > 0 and run["commitSeconds"] > 0
        assert all(p["peakRssMiB"] > 0 for p in run["perPart"])
        assert "commit" in run["perPart"][0]  # part 0 commits
        assert all("commit" not in p for p in run["perPart"][1:])
