"""bench/trainer.py --quick: the bare loop and the trainer arms train on the same tokens
to the same weights, every figure is positive, and the DDP part ran with 2 ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.harness import run_quick

ARMS = {"bare", "trainer", "trainerCheckpoints"}


@pytest.mark.torch
def test_the_trainer_benchmark_runs_quick(tmp_path: Path) -> None:
    report = run_quick("trainer.py", tmp_path / "trainer.json", timeout=120)
    size = report["size"]
    per_run = size["steps"] * size["batchSize"] * size["seqLen"]
    assert report["tokensPerRun"] == per_run

    # Same tokens, same work: every arm's run processed them and ended at the same weights.
    assert set(report["arms"]) == ARMS
    assert report["sameTokens"] is True and report["sameWeights"] is True
    for arm, figures in report["arms"].items():
        assert len(figures["runs"]) == size["repeats"], arm
        assert figures["tokensPerSecond"] > 0 and figures["tokensPerCpuSecond"] > 0, arm
        for run in figures["runs"]:
            assert run["tokens"] == per_run and run["wallSeconds"] > 0, arm
            assert run["weightsSha256"] == report["arms"]["bare"]["runs"][0]["weightsSha256"]
    assert all(r["checkpoints"] >= 1 for r in report["arms"]["trainerCheckpoints"]["runs"])
    assert all(r["checkpoints"] == 0 for r in report["arms"]["trainer"]["runs"])

    # Overhead follows its formula from the medians; targets carry a verdict each.
    bare = report["arms"]["bare"]["tokensPerSecond"]
    for arm in ("trainer", "trainerCheckpoints"):
        expected = 1 - report["arms"][arm]["tokensPerSecond"] / bare
        assert report["overhead"][arm] == pytest.approx(expected)
    assert [t["measured"]["overhead"] for t in report["targets"]] == [
        report["overhead"]["trainer"],
        report["overhead"]["trainerCheckpoints"],
    ]
    assert all(isinstance(t["met"], bool) for t in report["targets"])
    assert set(report["pairedOverhead"]) == set(report["cpuOverhead"]) == ARMS - {"bare"}
    where = report["whereTheTimeGoes"]
    assert where["bareSecondsPerStep"] > 0 and where["loaderSecondsPerBatch"] > 0
    assert where["checkpointBytes"] > 0

    # DDP: 1 and 2 ranks, the same per-rank batch, so twice the tokens per run on 2.
    ddp = report["ddp"]
    one, two = ddp["processes"]["1"], ddp["processes"]["2"]
    assert (one["worldSize"], two["worldSize"]) == (1, 2)
    assert one["tokensPerSecond"] > 0 and two["tokensPerSecond"] > 0
    ddp_tokens = ddp["steps"] * size["batchSize"] * size["seqLen"]
    assert {r["tokens"] for r in one["runs"]} == {ddp_tokens}
    assert {r["tokens"] for r in two["runs"]} == {2 * ddp_tokens}
    assert ddp["efficiency"] == pytest.approx(two["tokensPerSecond"] / (2 * one["tokensPerSecond"]))
    assert ddp["threadsPerProcess"] == 1 and ddp["cores"] >= 1
