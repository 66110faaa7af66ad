"""bench/compression.py --quick: the four encodings trained on the same batches, bytes
from the protocol's own encoder, and a verdict per target consistent with its figures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.bench.harness import run_quick
from tests.e2e.texts import write_corpora


@pytest.mark.torch
def test_the_compression_benchmark_runs_quick(tmp_path: Path) -> None:
    data = write_corpora(tmp_path / "text")
    report = run_quick("compression.py", tmp_path / "compression.json", "--data", str(data),
                       "--workdir", str(tmp_path / "work"), timeout=120)  # fmt: skip
    arms = report["arms"]
    assert list(arms) == ["fp32", "bf16", "int8", "int8+ef", "codebook+ef"]
    names, rounds = report["participants"], report["size"]["rounds"]

    # Bytes: fp32 is 4 bytes a value; bf16 half; int8 a quarter plus a scale per 256.
    fp32 = arms["fp32"]["bytesPerParticipantPerRound"]
    assert arms["bf16"]["bytesVsFp32"] == pytest.approx(0.5, abs=0.01)
    assert arms["int8"]["bytesVsFp32"] == pytest.approx(0.25 * (1 + 4 / 256), abs=0.01)
    assert (
        arms["int8+ef"]["bytesPerParticipantPerRound"]
        == arms["int8"]["bytesPerParticipantPerRound"]
    )
    assert fp32 > 0 and arms["fp32"]["bytesVsFp32"] == 1.0
    # codebook: a byte a value plus 256 levels per tensor (the tiny model's are small)
    assert 0.25 < arms["codebook+ef"]["bytesVsFp32"] < 0.35

    # Every arm starts from the same model and is scored after every round.
    run = report["runs"][0]
    initial = {arm: run[arm]["curve"][0]["pooled"] for arm in arms}
    assert len(set(initial.values())) == 1
    for arm, figures in arms.items():
        assert len(run[arm]["curve"]) == rounds + 1 and len(run[arm]["bytes"]) == rounds
        assert set(figures["final"]) == {*names, "pooled"}
        assert all(math.isfinite(v["mean"]) for v in figures["final"].values()), arm
    # Error feedback carried a residual every round, for every participant.
    for arm in ("int8+ef", "codebook+ef"):
        norms = run[arm]["residualNorm"]
        assert len(norms) == rounds and all(set(r) == set(names) for r in norms)
        assert all(v > 0 for r in norms for v in r.values())
    assert "residualNorm" not in run["int8"]

    size_target, loss_target = report["targets"]
    assert size_target["met"] == (arms["int8+ef"]["bytesVsFp32"] <= 0.26)
    gap = arms["int8+ef"]["pooledLossVsFp32"]
    assert loss_target["measured"]["pooledLossVsFp32"] == gap
    assert loss_target["met"] == (abs(gap) <= 0.01)
