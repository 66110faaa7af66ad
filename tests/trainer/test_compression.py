"""Error feedback for the lossy delta encodings: the residual's math, its files in the
work directory, and the participant carrying it from one round to the next."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tapestry_protocol import pod
from tapestry_protocol.documents import UpdateManifest
from tapestry_protocol.exchange import (
    decode_shard,
    fetch_shard,
    make_plan,
    publish_model,
    publish_plan,
    read_plan,
    read_plan_base,
    read_update,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.pod import ExitCode
from tapestry_protocol.shards import INT8_BLOCK, FloatArray, decode_delta, encode_delta, plan_shards
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store.filesystem import FilesystemStore
from tapestry_trainer import feedback, participant, plugins, privacy
from tapestry_trainer.baseline import initial_arrays
from tapestry_trainer.data import prepare_shards
from tapestry_trainer.inner import DistContext, state_arrays, train_inner
from tests.e2e.test_participant import CONFIG, SPEC
from tests.e2e.texts import write_corpora


def _delta(seed: int, size: int = 3000) -> dict[str, FloatArray]:
    rng = np.random.default_rng(seed)
    return {
        "a": rng.standard_normal(size).astype(np.float32) * 1e-3,
        "b": rng.standard_normal((7, 13)).astype(np.float32),
    }


def _decoded(values: dict[str, FloatArray], encoding: str) -> dict[str, FloatArray]:
    return {n: decode_delta(encode_delta(n, v, encoding), n, encoding) for n, v in values.items()}


# --- the residual ------------------------------------------------------------------


def test_the_residual_is_what_the_encoding_drops() -> None:
    delta = _delta(1)
    for encoding in ("bf16", "int8"):
        residual = feedback.quantisation_residual(delta, encoding)
        decoded = _decoded(delta, encoding)
        for name in delta:
            np.testing.assert_array_equal(decoded[name] + residual[name], delta[name])
            assert np.abs(residual[name]).max() > 0, (encoding, name)
    # int8: at most half a step of each block's scale (absmax / 127)
    flat = delta["a"]
    dropped = feedback.quantisation_residual(delta, "int8")["a"]
    for start in range(0, flat.size, INT8_BLOCK):
        step = np.abs(flat[start : start + INT8_BLOCK]).max() / 127
        assert np.abs(dropped[start : start + INT8_BLOCK]).max() <= step / 2 * (1 + 1e-5)
    assert all(not r.any() for r in feedback.quantisation_residual(delta, "fp32").values())


def test_with_feedback_the_error_stays_bounded_over_rounds() -> None:
    """The same delta each round: what arrives over K rounds is K deltas, off by at most
    the last residual with feedback, while without it the rounding error adds up."""
    rng = np.random.default_rng(7)
    delta = {"w": rng.standard_normal(4096).astype(np.float32) * 1e-2}
    rounds = 20
    arrived_with = np.zeros(4096)
    arrived_without = np.zeros(4096)
    residual = {"w": np.zeros(4096, dtype=np.float32)}
    for _ in range(rounds):
        sent = feedback.add(delta, residual)
        arrived_with += _decoded(sent, "int8")["w"]
        residual = feedback.quantisation_residual(sent, "int8")
        arrived_without += _decoded(delta, "int8")["w"]
    target = rounds * delta["w"].astype(np.float64)
    error_with = np.linalg.norm(arrived_with - target)
    error_without = np.linalg.norm(arrived_without - target)
    assert error_with == pytest.approx(np.linalg.norm(residual["w"]), rel=1e-3)
    assert error_with * 5 < error_without


# --- the files ---------------------------------------------------------------------


def test_a_retry_of_the_same_round_gets_the_saved_delta(tmp_path: Path) -> None:
    space = feedback.Workspace.at(tmp_path, "fed", "alice")
    assert space.carried(0, _delta(1)) is None
    first = space.release(0, "plan/base", _delta(1), "int8")
    # the retry's training may differ a little; what is sent must not
    again = space.release(0, "plan/base", _delta(2), "int8")
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    files = sorted(p.name for p in space.directory.iterdir())
    assert files == ["sent-0.json", "sent-0.npz"]
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in space.directory.iterdir())
    # made for another plan or base (the round was planned afresh): a new one
    fresh = space.release(0, "plan/other-base", _delta(2), "int8")
    np.testing.assert_array_equal(fresh["b"], _delta(2)["b"])


def test_the_next_round_carries_the_latest_earlier_residual(tmp_path: Path) -> None:
    space = feedback.Workspace.at(tmp_path, "fed", "alice")
    for r in (0, 1, 3):
        space.release(r, f"plan-{r}", _delta(r), "int8")
    carried = space.carried(5, _delta(9))
    assert carried is not None and carried.round == 3
    expected = feedback.quantisation_residual(_delta(3), "int8")
    for name in expected:
        np.testing.assert_array_equal(carried.residual[name], expected[name])
    # round 3 kept round 1 (the newest before it) and dropped round 0
    rounds = sorted(p.name for p in space.directory.glob("*.npz"))
    assert rounds == ["sent-1.npz", "sent-3.npz"]
    # a re-run of round 3 carries round 1's residual, not its own
    again = space.carried(3, _delta(9))
    assert again is not None and again.round == 1


def test_a_residual_that_does_not_fit_the_model_is_not_carried(tmp_path: Path) -> None:
    space = feedback.Workspace.at(tmp_path, "fed", "alice")
    space.release(0, "p", _delta(1), "int8")
    assert space.carried(1, {"a": _delta(1)["a"]}) is None  # a tensor fewer
    assert space.carried(1, {**_delta(1), "b": np.zeros((13, 7), np.float32)}) is None
    space.release(1, "p", _delta(1), "fp32")
    assert space.carried(2, _delta(1)) is None  # lossless: nothing was dropped


# --- through the participant's entry point -----------------------------------------


@dataclass
class Rounds:
    store: FilesystemStore
    layout: Layout
    coordinator: SigningKey
    tmp: Path

    def argv(self, round_number: int, workdir: str = "work") -> list[str]:
        return [
            "--store", str(self.tmp / "store"), "--federation", "ef",
            "--round", str(round_number), "--name", "alice",
            "--key", str(self.tmp / "keys" / "alice.key"),
            "--coordinator-key", self.coordinator.public_key_text,
            "--data", str(self.tmp / "data"), "--workdir", str(self.tmp / workdir),
        ]  # fmt: skip

    def stored(self, round_number: int) -> tuple[UpdateManifest, dict[str, FloatArray]]:
        key = self.coordinator.public_key_text
        plan = read_plan(self.store, self.layout, round_number, key)
        base = read_plan_base(self.store, self.layout, plan, key)
        update = read_update(self.store, self.layout, plan, base, "alice")
        out: dict[str, FloatArray] = {}
        for ref in update.document.shards:
            data = fetch_shard(self.store, update.directory, ref)
            out |= decode_shard(data, ref, update.document.encoding, ref.name)
        return update.document, out


@pytest.fixture
def rounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Rounds:
    """Rounds 0 and 1 planned under int8, both from the same initial model."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", pod.ERROR_FEEDBACK):
        monkeypatch.delenv(var, raising=False)
    store = FilesystemStore(tmp_path / "store", create=True)
    layout = Layout("ef")
    coordinator = SigningKey.generate("coordinator")
    alice = SigningKey.generate("alice")
    alice.save(tmp_path / "keys")
    arrays = initial_arrays(SPEC)
    groups = plan_shards([(n, a.nbytes) for n, a in arrays.items()], 64 << 10)
    for r in (0, 1):
        base = publish_model(store, layout, r, arrays, groups, coordinator, model=SPEC.to_dict())
        plan = make_plan(
            layout, r, base, model=SPEC.to_dict(), hyperparameters=CONFIG.to_dict(),
            participants={"alice": alice.public_key_text}, min_participants=1,
            deadline="2030-01-01T00:00:00Z", encoding="int8",
        )  # fmt: skip
        publish_plan(store, layout, plan, coordinator)
    prepare_shards([write_corpora(tmp_path / "text") / "alice"], tmp_path / "data")
    return Rounds(store, layout, coordinator, tmp_path)


@pytest.mark.torch
def test_the_residual_of_one_round_is_sent_in_the_next(rounds: Rounds) -> None:
    assert participant.main(rounds.argv(0)) == 0
    first, _ = rounds.stored(0)
    assert first.encoding == "int8"
    assert first.metrics["errorFeedback"] == "on"
    assert first.metrics["carriedResidualNorm"] == 0.0
    residual_norm = first.metrics["residualNorm"]
    assert isinstance(residual_norm, float) and residual_norm > 0

    space = feedback.Workspace.at(rounds.tmp / "work", "ef", "alice")
    sent0 = space._load(0, _like())
    residual0 = feedback.quantisation_residual(sent0, "int8")
    assert privacy.l2_norm(residual0) == pytest.approx(residual_norm, rel=1e-6)

    assert participant.main(rounds.argv(1)) == 0
    second, stored1 = rounds.stored(1)
    assert second.metrics["carriedResidualNorm"] == pytest.approx(residual_norm, rel=1e-6)
    # What round 1 sent is its own raw delta (trained again here, the same way) plus
    # round 0's residual, and what the store holds is that, quantised.
    raw1 = _raw_delta(rounds, 1)
    sent1 = space._load(1, _like())
    for name, values in sent1.items():
        np.testing.assert_allclose(values, raw1[name] + residual0[name], rtol=0, atol=1e-6)
        expected = decode_delta(encode_delta(name, values, "int8"), name, "int8")
        np.testing.assert_array_equal(stored1[name], expected)


def _raw_delta(rounds: Rounds, round_number: int) -> dict[str, FloatArray]:
    """The delta the participant trains in a round (base = the initial model here)."""
    base = initial_arrays(SPEC)
    model = plugins.build_model(SPEC)
    loader = plugins.loader_for(
        str(rounds.tmp / "data"), CONFIG, DistContext(), round_number=round_number
    )
    train_inner(model, loader, CONFIG)
    return participant.compute_delta(base, state_arrays(model))


def _like() -> dict[str, FloatArray]:
    return initial_arrays(SPEC)


@pytest.mark.torch
def test_a_retried_upload_sends_the_same_bytes(rounds: Rounds) -> None:
    """A process that died after the shards but before the manifest: the retry trains
    again (its checkpoint gone, other data here, so another delta) and still uploads the
    very bytes of the first try, the delta kept in the work directory."""
    assert participant.main(rounds.argv(0)) == 0
    first, _ = rounds.stored(0)
    rounds.store.delete(rounds.layout.update_manifest(0, "alice"))  # as if never committed
    shutil.rmtree(rounds.tmp / "work" / "checkpoints", ignore_errors=True)
    shutil.rmtree(rounds.tmp / "data")
    prepare_shards([rounds.tmp / "text" / "bob"], rounds.tmp / "data")
    assert participant.main(rounds.argv(0)) == 0
    second, _ = rounds.stored(0)
    assert [s.sha256 for s in second.shards] == [s.sha256 for s in first.shards]


@pytest.mark.torch
def test_turned_off_nothing_is_kept_or_carried(
    rounds: Rounds, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert participant.main([*rounds.argv(0), "--no-error-feedback"]) == 0
    monkeypatch.setenv(pod.ERROR_FEEDBACK, "false")
    assert participant.main(rounds.argv(1)) == 0
    for r in (0, 1):
        manifest, _ = rounds.stored(r)
        assert manifest.metrics["errorFeedback"] == "off"
        assert "residualNorm" not in manifest.metrics
    assert not (rounds.tmp / "work" / feedback.DIRECTORY).exists()


@pytest.mark.torch
def test_a_lost_residual_is_said_in_the_log(
    rounds: Rounds, capsys: pytest.CaptureFixture[str]
) -> None:
    """Round 1 in a fresh work directory (an emptyDir pod): the round goes on from a zero
    residual, and the log says why and what keeps it."""
    assert participant.main(rounds.argv(0)) == 0
    capsys.readouterr()
    assert participant.main(rounds.argv(1, workdir="other-pod")) == 0
    err = capsys.readouterr().err
    assert "error-feedback residual of round 0 is not in" in err
    assert "spec.workspace" in err
    manifest, _ = rounds.stored(1)
    assert manifest.metrics["carriedResidualNorm"] == 0.0


@pytest.mark.torch
def test_a_bad_switch_is_a_usage_error(
    rounds: Rounds, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(pod.ERROR_FEEDBACK, "maybe")
    assert participant.main(rounds.argv(0)) == ExitCode.USAGE
    assert "TAPESTRY_ERROR_FEEDBACK must be true or false, not 'maybe'" in capsys.readouterr().err
    verdict = rounds.tmp / "verdict.json"
    assert participant.main([*rounds.argv(0), "--verdict", str(verdict)]) == ExitCode.USAGE
    assert json.loads(verdict.read_text())["exitCode"] == ExitCode.USAGE
