"""bench/joining.py --quick: every arm trained on the same tokens and scored on every eval
set, the communication figures following their formula, and a target verdict for each."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.bench.harness import run_quick
from tests.e2e.texts import write_corpora

ARMS = {"diloco", "fedavg", "local", "central", "adapted"}


@pytest.mark.torch
def test_the_joining_benchmark_runs_quick(tmp_path: Path) -> None:
    data = write_corpora(tmp_path / "text")
    report = run_quick("joining.py", tmp_path / "joining.json", "--data", str(data),
                       "--workdir", str(tmp_path / "work"), timeout=300)  # fmt: skip
    names = report["participants"]
    size = report["size"]
    assert names == ["alice", "bob"] and len(size["seeds"]) == 1
    sets = {*names, "pooled"}

    # All arms, each scored on every eval set (the adapted models on their own set only).
    assert set(report["arms"]) == ARMS
    for arm, figures in report["arms"].items():
        assert set(figures["final"]) == (set(names) if arm == "adapted" else sets), arm
        for where, curve in figures["curve"].items():
            assert len(curve) == size["rounds"] + 1, (arm, where)
            assert curve[-1] == figures["final"][where]
            for point in curve:
                assert math.isfinite(point["mean"]) and point["mean"] > 0, (arm, where)
    initial = report["arms"]["diloco"]["curve"]["pooled"][0]["mean"]
    assert report["arms"]["central"]["curve"]["pooled"][0]["mean"] == initial  # same init

    # Equal compute: the four arms process the same tokens, R x H x B x seqLen x P.
    per_arm = (size["rounds"] * size["innerSteps"] * size["batchSize"] * size["seqLen"]
               * len(names))  # fmt: skip
    assert report["tokensPerArm"] == dict.fromkeys(
        ("diloco", "fedavg", "local", "central"), per_arm
    )
    run = report["runs"][0]
    steps = size["rounds"] * size["innerSteps"]
    assert run["central"]["steps"] == steps and run["diloco"]["steps"] == steps * len(names)
    assert report["adaptSteps"] == math.ceil(size["innerSteps"] / 10)

    # Communication: 2M per participant per round against 2M per participant per step.
    comm = report["communication"]
    m = comm["modelBytes"]
    assert m > 0 and m % 4 == 0
    assert comm["diloco"] == comm["fedavg"] == 2 * m * len(names) * size["rounds"]
    assert comm["central"] == comm["diloco"] * size["innerSteps"]
    assert comm["ratio"] == size["innerSteps"]

    # One verdict per target, consistent with its measured figures.
    targets = report["targets"]
    assert len(targets) == 4 and all(isinstance(t["met"], bool) for t in targets)
    beats, gap, adapted, ratio = targets
    shared = report["arms"]["diloco"]["final"]["pooled"]["mean"]
    assert beats["measured"]["shared"] == shared
    assert beats["met"] == all(shared < v for v in beats["measured"]["localOnly"].values())
    central = report["arms"]["central"]["final"]["pooled"]["mean"]
    assert gap["measured"]["gap"] == pytest.approx((shared - central) / central)
    assert gap["met"] == (gap["measured"]["gap"] <= 0.04)
    own = adapted["measured"]
    assert adapted["met"] == all(own[n]["adapted"] < own[n]["local"] for n in names)
    assert ratio["met"] is True
