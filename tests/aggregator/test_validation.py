"""The validation floor: the coordinator's held-out set scores each delta before the merge.

Two kinds of test. The threshold and refusal logic runs on the small NumPy federation of
the protocol tests with a NumPy scorer (pure logic, fast). The rest runs the real thing:
a tiny GPT trained for a few steps, honest deltas from real inner training, attacks made
from them, the torch scorer on a held-out shard set, the real `aggregate_round` and the
`tapestry aggregate` command on a filesystem store.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from tapestry_aggregator.merge import RoundInputs, aggregate_round, collect_inputs
from tapestry_aggregator.strategy import Strategy
from tapestry_aggregator.validation import Score, Scorer, score_updates
from tapestry_protocol import rejections
from tapestry_protocol.documents import CloseTrigger, Outcome, RoundResult
from tapestry_protocol.exchange import (
    COORDINATOR,
    Verified,
    close_round,
    make_plan,
    publish_model,
    publish_plan,
    publish_update,
    read_result,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.shards import FloatArray, plan_shards
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store.filesystem import FilesystemStore
from tapestry_trainer.specs import InnerConfig, ModelSpec
from tests.cli.conftest import assert_error, tapestry
from tests.protocol.federation import CLOSED_AT, Federation, make_federation

if TYPE_CHECKING:
    from tapestry_trainer.scoring import HeldOutScorer

MARGIN = 0.05
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models; shared cores


# --------------------------------------------------------------------------- pure logic


def _sum_of_squares(tensors: Mapping[str, FloatArray]) -> float:
    """A stand-in loss: lower when the weights move towards zero."""
    return float(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in tensors.values()))


def _numpy_round(tmp_path: Path, deltas: dict[str, dict[str, FloatArray]]) -> Federation:
    people = tuple(sorted(deltas))
    fed = make_federation(FilesystemStore(tmp_path / "store", create=True), participants=people)
    for who, delta in deltas.items():
        fed.publish(who, delta)
    fed.close()
    return fed


def _inputs(fed: Federation, strategy: Strategy | None = None) -> RoundInputs:
    return collect_inputs(
        fed.store, fed.layout, 0, fed.coordinator.public_key_text, strategy or Strategy()
    )


def test_the_margin_is_the_line_between_merged_and_refused(tmp_path: Path) -> None:
    """Loss at most base + margin passes; above it, WorseOnValidation naming both losses
    and the margin; every scored member's figures come back, refused ones included."""
    fed = make_federation(FilesystemStore(tmp_path / "s", create=True))
    base = fed.tensors
    base_loss = _sum_of_squares(base)
    towards = {n: (0.1 * v).astype(np.float32) for n, v in base.items()}  # base - d shrinks
    away = {n: (-0.1 * v).astype(np.float32) for n, v in base.items()}  # grows by 21 %
    people = {"alice": towards, "bob": away, "carol": away}
    fed = _numpy_round(tmp_path, people)
    inputs = _inputs(fed)
    worse = _sum_of_squares({n: v - away[n] for n, v in base.items()}) - base_loss
    margin = worse * 1.0001  # bob and carol are just inside it
    scores = score_updates(fed.store, inputs, _sum_of_squares, margin)
    assert sorted(inputs.updates) == ["alice", "bob", "carol"]
    assert scores["alice"].loss < base_loss == scores["alice"].base_loss
    inputs = _inputs(fed)
    scores = score_updates(fed.store, inputs, _sum_of_squares, worse * 0.9999)
    assert sorted(inputs.updates) == ["alice"]
    refusals = inputs.refusals
    assert {n: r.reason for n, r in refusals.items()} == {
        "bob": rejections.WORSE_ON_VALIDATION,
        "carol": rejections.WORSE_ON_VALIDATION,
    }
    message = refusals["bob"].message
    assert f"{scores['bob'].loss:.6g}" in message and f"{base_loss:.6g}" in message
    assert f"margin {worse * 0.9999:g}" in message
    assert set(scores) == {"alice", "bob", "carol"}
    assert all(isinstance(s, Score) for s in scores.values())


def test_bad_bytes_are_refused_with_their_own_reason(tmp_path: Path) -> None:
    """A delta with NaN, or a shard whose bytes changed after the manifest, is refused as
    the merge would refuse it, never scored; a scorer that gives NaN means worse."""
    fed = make_federation(FilesystemStore(tmp_path / "s", create=True))
    good = fed.delta(scale=0.01, seed=1)
    nan = {n: v.copy() for n, v in good.items()}
    nan["l0.w"][0, 0] = np.nan
    fed = _numpy_round(tmp_path, {"alice": good, "bob": nan, "carol": good})
    carol = fed.layout.update_dir(0, "carol")
    shard = sorted(o.key for o in fed.store.list(carol) if o.key.endswith(".safetensors"))[0]
    path = tmp_path / "store" / shard
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    inputs = _inputs(fed)
    scored: list[int] = []

    def scorer(tensors: Mapping[str, FloatArray]) -> float:
        scored.append(1)
        return _sum_of_squares(tensors)

    scores = score_updates(fed.store, inputs, scorer, margin=10.0)  # alice passes
    reasons = {n: r.reason for n, r in inputs.refusals.items()}
    assert reasons == {"bob": rejections.NON_FINITE, "carol": rejections.HASH_MISMATCH}
    assert set(scores) == {"alice"} and len(scored) == 2  # the base and alice


def test_nan_loss_is_worse_and_bad_settings_are_clear_errors(tmp_path: Path) -> None:
    fed = _numpy_round(tmp_path, {"alice": make_federation(
        FilesystemStore(tmp_path / "x", create=True)).delta(seed=2)})  # fmt: skip
    calls: list[int] = []

    def nan_for_candidates(tensors: Mapping[str, FloatArray]) -> float:
        calls.append(1)
        return 1.0 if len(calls) == 1 else float("nan")

    inputs = _inputs(fed)
    scores = score_updates(fed.store, inputs, nan_for_candidates, MARGIN)
    assert scores["alice"].loss == float("inf")
    assert inputs.refusals["alice"].reason == rejections.WORSE_ON_VALIDATION
    with pytest.raises(ValueError, match="scores a held-out loss of nan"):
        score_updates(fed.store, _inputs(fed), lambda t: float("nan"), MARGIN)
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        score_updates(fed.store, _inputs(fed), _sum_of_squares, -0.1)


def test_a_margin_without_a_scorer_is_a_clear_error(tmp_path: Path) -> None:
    fed = make_federation(FilesystemStore(tmp_path / "s", create=True))
    fed.publish("alice", fed.delta())
    fed.close()
    with pytest.raises(ValueError, match=r"validation margin \(0\.05\) but no scorer"):
        aggregate_round(
            fed.store, fed.layout, 0, fed.coordinator, Strategy(validation_margin=MARGIN)
        )
    assert not fed.store.exists(fed.layout.result(0))


# --------------------------------------------------------------------------- the real thing


@dataclass
class Demo:
    """A tiny GPT trained a little (the base), honest deltas from two participants'
    inner training, and the coordinator's held-out set (disjoint from their training)."""

    spec: ModelSpec
    config: InnerConfig
    base: dict[str, FloatArray]
    honest: dict[str, dict[str, FloatArray]]
    heldout: Path


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread: None) -> None:
    """Tiny models: one intra-op thread is as fast, and far faster on shared cores."""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    from tapestry_trainer import plugins
    from tapestry_trainer.data import prepare_shards
    from tapestry_trainer.inner import DistContext, load_state_arrays, state_arrays, train_inner
    from tapestry_trainer.specs import InnerConfig, ModelSpec
    from tests.trainer.conftest import write_text

    root = tmp_path_factory.mktemp("demo")
    texts = {n: write_text(root / "text" / n, 2, 300, seed=i) for i, n in enumerate(("a", "b"))}
    for name, text in texts.items():
        prepare_shards([text], root / "data" / name, val_fraction=0.1, block_tokens=512)
    # The pooled held-out split: the same blocks each participant holds out.
    prepare_shards(list(texts.values()), root / "heldout", val_fraction=0.1, block_tokens=512)
    spec = ModelSpec.preset("tiny", d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32)
    warm = InnerConfig(steps=30, lr=3e-3, batch_size=8, seq_len=32, warmup_steps=2)
    model = plugins.build_model(spec)
    train_inner(model, plugins.loader_for(str(root / "data/a"), warm, DistContext()), warm)
    base = state_arrays(model)
    config = InnerConfig(steps=10, lr=3e-3, batch_size=8, seq_len=32, warmup_steps=1, seed=3)
    honest = {}
    for who, data in (("alice", "a"), ("bob", "b")):
        local = plugins.build_model(spec)
        load_state_arrays(local, base)
        loader = plugins.loader_for(str(root / "data" / data), config, DistContext())
        train_inner(local, loader, config)
        trained = state_arrays(local)
        honest[who] = {n: (base[n] - trained[n]).astype(np.float32) for n in base}
    return Demo(spec, config, base, honest, root / "heldout")


def _norm(delta: Mapping[str, FloatArray]) -> float:
    return float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()))
    )


def _attacks(demo: Demo) -> dict[str, dict[str, FloatArray]]:
    """A sign-flipped honest delta and a random direction of ten times its norm."""
    alice = demo.honest["alice"]
    rng = np.random.default_rng(7)
    noise = {n: rng.standard_normal(v.shape).astype(np.float32) for n, v in alice.items()}
    scale = 10 * _norm(alice) / _norm(noise)
    return {
        "mallory": {n: (-v).astype(np.float32) for n, v in alice.items()},
        "trudy": {n: (v * scale).astype(np.float32) for n, v in noise.items()},
    }


@dataclass
class Round:
    store: FilesystemStore
    layout: Layout
    coordinator: SigningKey


def _demo_round(root: Path, demo: Demo, deltas: Mapping[str, Mapping[str, FloatArray]]) -> Round:
    """Round 0 of federation `f` on a filesystem store at root/store: the demo base, a
    plan with its spec and hyperparameters, the deltas as signed updates, closed; the
    coordinator's key in root/keys."""
    store = FilesystemStore(root / "store", create=True)
    layout = Layout("f")
    coordinator = SigningKey.generate(COORDINATOR)
    coordinator.save(root / "keys")
    keys = {who: SigningKey.generate(who) for who in deltas}
    groups = plan_shards([(n, a.nbytes) for n, a in demo.base.items()], 16 << 10)
    spec = demo.spec.to_dict()
    base = publish_model(store, layout, 0, demo.base, groups, coordinator, model=spec)
    plan = make_plan(
        layout, 0, base, model=spec, hyperparameters=demo.config.to_dict(),
        participants={who: k.public_key_text for who, k in keys.items()},
        min_participants=1, deadline="2030-01-01T00:00:00Z",
    )  # fmt: skip
    signed = publish_plan(store, layout, plan, coordinator)
    for who, delta in deltas.items():
        publish_update(store, layout, signed, base, delta, keys[who], tokens=2560, metrics={})
    close_round(store, layout, signed, coordinator, CloseTrigger.ALL_REPORTED, CLOSED_AT)
    return Round(store, layout, coordinator)


def _scorer(demo: Demo) -> HeldOutScorer:
    from tapestry_trainer.scoring import HeldOutScorer

    return HeldOutScorer(
        demo.spec, demo.heldout,
        seq_len=demo.config.seq_len, batch_size=demo.config.batch_size,
    )  # fmt: skip


def _aggregate(r: Round, demo: Demo, margin: float | None = MARGIN) -> Verified[RoundResult]:
    strategy = Strategy("fedavg", validation_margin=margin)
    scorer: Scorer | None = _scorer(demo) if margin is not None else None
    return aggregate_round(r.store, r.layout, 0, r.coordinator, strategy, scorer=scorer)


@pytest.mark.torch
def test_worse_deltas_are_refused_and_honest_ones_merged(tmp_path: Path, demo: Demo) -> None:
    """Sign-flipped and random-direction deltas make the held-out loss worse by far more
    than the margin and are refused (WorseOnValidation); the honest ones lower it and are
    merged, each contribution recording its own and the base's held-out loss."""
    r = _demo_round(tmp_path, demo, {**demo.honest, **_attacks(demo)})
    result = _aggregate(r, demo).document
    assert result.outcome == Outcome.SUCCEEDED
    assert {x.participant: x.reason for x in result.rejected} == {
        "mallory": rejections.WORSE_ON_VALIDATION,
        "trudy": rejections.WORSE_ON_VALIDATION,
    }
    assert [a.participant for a in result.accepted] == ["alice", "bob"]
    base_loss = _scorer(demo)(demo.base)
    for a in result.accepted:
        assert a.policy["baseValidationLoss"] == base_loss
        loss = a.policy["validationLoss"]
        assert isinstance(loss, float) and loss < base_loss - 0.1  # honest training helps
    for x in result.rejected:
        assert f"margin {MARGIN:g}" in x.message and f"{base_loss:.6g}" in x.message

    # Without the floor the same round merges all four (the test can fail).
    undefended = _aggregate(_demo_round(tmp_path / "plain", demo, {**demo.honest,
                                        **_attacks(demo)}), demo, None)  # fmt: skip
    assert len(undefended.document.accepted) == 4


@pytest.mark.torch
def test_the_scores_and_the_result_are_deterministic(tmp_path: Path, demo: Demo) -> None:
    """A re-run of the closed round (in a copy of the store, as after a crash) scores the
    same bytes the same and writes the same result, byte for byte."""
    r = _demo_round(tmp_path / "one", demo, {**demo.honest, **_attacks(demo)})
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    one = _aggregate(r, demo)
    two_store = FilesystemStore(tmp_path / "two" / "store")
    two = _aggregate(Round(two_store, r.layout, r.coordinator), demo)
    assert one.sha256 == two.sha256
    assert r.store.get(r.layout.result(0)) == two_store.get(r.layout.result(0))


@pytest.mark.torch
def test_the_scorer_measures_what_the_report_measures(demo: Demo) -> None:
    """The scorer's figure is `evaluate` on the held-out split (the local runner's report
    figure), and it keeps no candidate between calls."""
    from tapestry_trainer.baseline import evaluate_arrays

    scorer = _scorer(demo)
    expected = evaluate_arrays(demo.spec, demo.base, [str(demo.heldout)], demo.config)
    assert scorer(demo.base) == expected[0]
    assert scorer.model.weights == {}


@pytest.mark.torch
@pytest.mark.slow
def test_aggregate_command_with_validation_data(tmp_path: Path, demo: Demo) -> None:
    """`tapestry aggregate --validation-data DIR --validation-margin M` on a filesystem
    store refuses the sign-flipped update; a margin without data, or data that is not a
    shard set, is one line and exit status 2."""
    _demo_round(tmp_path, demo, {"alice": demo.honest["alice"], **_attacks(demo)})
    args = ["aggregate", "--store", "store", "--federation", "f", "--round", "0",
            "--key", "keys/coordinator.key", "--optimizer", "fedavg",
            "--validation-margin"]  # fmt: skip

    def aggregate(*extra: str) -> subprocess.CompletedProcess[str]:
        return tapestry(*args, *extra, cwd=tmp_path, env=ONE_THREAD)

    assert_error(
        aggregate("0.05"),
        "error: a validation margin needs the coordinator's held-out set: "
        "give --validation-data DIR",
    )
    bad = aggregate("0.05", "--validation-data", "nope")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: validation data: ") and bad.stderr.count("\n") == 1
    done = aggregate("0.05", "--validation-data", str(demo.heldout))
    assert done.returncode == 0, done.stderr
    store = FilesystemStore(tmp_path / "store")
    key = (tmp_path / "keys" / "coordinator.pub").read_text().strip()
    result = read_result(store, Layout("f"), 0, key).document
    rejected = {x.participant: x.reason for x in result.rejected}
    assert rejected == {"mallory": "WorseOnValidation", "trudy": "WorseOnValidation"}
    assert result.strategy["validation_margin"] == 0.05
    assert [a.participant for a in result.accepted] == ["alice"]


@pytest.mark.torch
def test_the_local_runs_held_out_set_is_no_participants_training_data(tmp_path: Path) -> None:
    """`tapestry local run --validation-margin` scores on every participant's held-out
    split, pooled: the same tokens, none of them in anyone's training split."""
    from tapestry_cli.local import HELD_OUT, pooled_held_out
    from tapestry_trainer.data import load_index, prepare_shards
    from tests.trainer.conftest import write_text

    texts = [write_text(tmp_path / "text" / n, 2, 400, seed=i) for i, n in enumerate("ab")]
    mine = [prepare_shards([t], tmp_path / t.name, val_fraction=HELD_OUT).parent for t in texts]
    pooled = pooled_held_out(texts, tmp_path / "pooled")

    def tokens(data: Path, split: str) -> list[int]:
        files = load_index(data)["splits"][split]
        return [t for f in files for t in np.fromfile(data / f["file"], "<u2").tolist()]

    held_out = tokens(pooled, "validation")
    assert len(held_out) > 1000
    assert held_out == tokens(mine[0], "validation") + tokens(mine[1], "validation")


@pytest.mark.torch
def test_plug_in_models_and_loaders_are_scored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plug-in model (the example's LSTM) on batches drawn once from a plug-in loader:
    the figure is the model's own mean loss on those batches, the same on every call."""
    import torch

    from tapestry_trainer import plugins
    from tapestry_trainer.data import LoaderContext
    from tapestry_trainer.inner import state_arrays
    from tapestry_trainer.scoring import HeldOutScorer
    from tests.trainer.conftest import write_text

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples/plugin"))
    data = write_text(tmp_path / "text", 1, 100)
    spec = ModelSpec.plugin("tapestry_example_plugin.models:build", {"dim": 8, "hidden": 16})
    loader = "tapestry_example_plugin.data:make_loader"
    scorer = HeldOutScorer(spec, data, seq_len=16, batch_size=4, loader=loader, batches=3)
    model = plugins.build_model(spec).eval()
    weights = state_arrays(model)
    ctx = LoaderContext(str(data), 0, 1, 4, 16, seed=0, split="validation")
    source = plugins.build_loader(ctx, loader)
    with torch.no_grad():
        expected = sum(float(model(*source.next_batch())) for _ in range(3)) / 3
    assert scorer(weights) == pytest.approx(expected, rel=1e-6)
    assert scorer(weights) == scorer(weights)
    worse = {n: (v + 0.5).astype(np.float32) for n, v in weights.items()}
    assert scorer(worse) > scorer(weights)
