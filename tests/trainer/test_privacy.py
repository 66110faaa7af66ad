"""Participant-level differential privacy: the clip, the noise's scale, the accounting
against dp_accounting, one noised release per round, and what reaches the store."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from tapestry_protocol import pod
from tapestry_protocol.documents import UpdateManifest
from tapestry_protocol.exchange import (
    decode_shard,
    fetch_shard,
    read_plan,
    read_plan_base,
    read_update,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.pod import ExitCode
from tapestry_protocol.signing import SigningKey, load_signing_key
from tapestry_trainer import participant, privacy
from tapestry_trainer.baseline import train_local_only
from tests.e2e.test_participant import CONFIG, SPEC, Round0, round0

__all__ = ["round0"]  # the fixture, shared with the participant's own tests

ROOT = Path(__file__).resolve().parents[2]


def _delta(seed: int, size: int = 50_000, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a": (scale * rng.standard_normal((size // 2,))).astype(np.float32),
        "b": (scale * rng.standard_normal((size // 100, 50))).astype(np.float32),
    }


def _reference_epsilon(multipliers: list[float], delta: float) -> float:
    """Straight from dp_accounting: one Gaussian mechanism per round, composed."""
    accountant = rdp.RdpAccountant()
    for z in multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return float(accountant.get_epsilon(delta))


# --- the mechanism ------------------------------------------------------------------


def test_noise_has_the_configured_scale() -> None:
    """Per coordinate, noised - clipped is N(0, (z*C)^2): mean ~ 0, std within 1% of z*C
    over 50,000 coordinates (the std's own sampling error is ~0.3%)."""
    settings = privacy.Settings(noise_multiplier=0.7, clip_norm=2.5)
    raw = _delta(1, scale=1e-3)  # norm ~0.22 < clip: clipping leaves it as it is
    noised = privacy.privatize(raw, settings, seed=12345)
    noise = np.concatenate([(noised[k] - raw[k]).ravel() for k in raw]).astype(np.float64)
    sigma = 0.7 * 2.5
    assert noise.size == 50_000
    assert abs(noise.mean()) < 4 * sigma / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(sigma, rel=0.01)
    # independent across coordinates: neighbours are uncorrelated
    assert abs(np.corrcoef(noise[:-1], noise[1:])[0, 1]) < 0.02
    assert [noised[k].shape for k in raw] == [raw[k].shape for k in raw]
    assert all(v.dtype == np.float32 for v in noised.values())


def test_noise_is_fresh_without_a_seed() -> None:
    settings = privacy.Settings(noise_multiplier=1.0, clip_norm=1.0)
    raw = _delta(2, size=1000)
    first, second = privacy.privatize(raw, settings), privacy.privatize(raw, settings)
    assert not np.array_equal(first["a"], second["a"])
    assert privacy.new_seed() != privacy.new_seed()
    assert privacy.new_seed().bit_length() > 200  # 256 random bits


def test_clipping_bounds_the_whole_norm() -> None:
    long = _delta(3, scale=1.0)  # norm ~224
    norm = privacy.l2_norm(long)
    assert norm > 100
    clipped = privacy.clip(long, 1.5)
    assert privacy.l2_norm(clipped) == pytest.approx(1.5, rel=1e-5)
    assert privacy.l2_norm(clipped) <= 1.5 * (1 + 1e-6)
    for k in long:  # one scale for the whole delta: the direction is kept
        np.testing.assert_allclose(clipped[k], long[k] * (1.5 / norm), rtol=1e-5)
    short = _delta(4, scale=1e-4)
    unchanged = privacy.clip(short, 1.5)
    for k in short:
        np.testing.assert_array_equal(unchanged[k], short[k])
    # the noised delta is the clipped one plus noise (noise multiplier tiny here)
    noised = privacy.privatize(long, privacy.Settings(1e-9, 1.5), seed=7)
    assert privacy.l2_norm(noised) == pytest.approx(1.5, rel=1e-4)


# --- accounting ---------------------------------------------------------------------


@pytest.mark.parametrize("rounds", [1, 2, 5, 20])
def test_epsilon_matches_dp_accounting_for_k_rounds(rounds: int) -> None:
    settings = privacy.Settings(noise_multiplier=1.1, clip_norm=1.0, delta=1e-5)
    record = privacy.account(settings, [1.1] * (rounds - 1))
    assert record.rounds == rounds
    assert record.epsilon == pytest.approx(_reference_epsilon([1.1] * rounds, 1e-5), rel=1e-9)
    assert (record.mechanism, record.accountant) == ("gaussian", "rdp")
    assert (record.noise_multiplier, record.clip_norm, record.delta) == (1.1, 1.0, 1e-5)


def test_epsilon_composes_rounds_of_different_noise() -> None:
    """A member that changed its noise between rounds: each round counts with its own."""
    record = privacy.account(privacy.Settings(2.0, 1.0), [0.8, 1.5])
    assert record.epsilon == pytest.approx(_reference_epsilon([0.8, 1.5, 2.0], 1e-5), rel=1e-9)


def test_epsilon_grows_with_rounds_and_falls_with_noise() -> None:
    by_rounds = [privacy.epsilon([1.0] * k, 1e-5) for k in (1, 2, 4, 8, 16)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == len(by_rounds)
    by_noise = [privacy.epsilon([z] * 4, 1e-5) for z in (0.5, 1.0, 2.0, 4.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == len(by_noise)
    looser = privacy.epsilon([1.0] * 4, 1e-3)
    assert looser < by_rounds[2]  # a larger delta buys a smaller epsilon


@pytest.mark.parametrize(
    ("noise", "clip", "delta", "message"),
    [
        ("0", "1", None, "noise multiplier must be a number > 0"),
        ("-1", "1", None, "noise multiplier must be a number > 0"),
        ("nan", "1", None, "noise multiplier must be a number > 0"),
        ("1", "0", None, "clip norm must be a number > 0"),
        ("1", "inf", None, "clip norm must be a number > 0"),
        ("1", "1", "0", r"delta must be in \(0, 1\)"),
        ("1", "1", "1", r"delta must be in \(0, 1\)"),
        ("1", "1", "x", "not a number"),
        ("1", None, None, "needs a clip norm too"),
        (None, "1", None, "needs a noise multiplier too"),
        (None, None, "1e-5", "needs a noise multiplier and a clip norm"),
    ],
)
def test_settings_are_validated(
    noise: str | None, clip: str | None, delta: str | None, message: str
) -> None:
    with pytest.raises(privacy.PrivacyError, match=message):
        privacy.Settings.parse(noise, clip, delta)


def test_settings_off_and_defaults() -> None:
    assert privacy.Settings.parse(None, None, None) is None
    assert privacy.Settings.parse("", "", "") is None
    assert privacy.Settings.parse("1.5", "0.1", None) == privacy.Settings(1.5, 0.1, 1e-5)


# --- one release per round ----------------------------------------------------------


def test_retry_reuses_the_same_noised_delta(tmp_path: Path) -> None:
    settings = privacy.Settings(1.0, 1.0)
    raw = _delta(5, size=2000)
    record = privacy.account(settings, [])
    first, kept = privacy.release(tmp_path, "plan/base", raw, settings, record)
    # the retry's training may differ a little; the released delta must not
    other = {k: v + 1 for k, v in raw.items()}
    again, kept_again = privacy.release(tmp_path, "plan/base", other, settings, record)
    for k in raw:
        np.testing.assert_array_equal(first[k], again[k])
    assert kept == kept_again == record
    # made for another plan or base: a new release
    fresh, _ = privacy.release(tmp_path, "plan/other-base", raw, settings, record)
    assert not np.array_equal(fresh["a"], first["a"])
    assert oct((tmp_path / privacy.RELEASE_FILE).stat().st_mode & 0o777) == "0o600"


# --- through the participant's entry point -----------------------------------------

DP = ["--dp-noise-multiplier", "0.5", "--dp-clip-norm", "0.05"]


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def _stored_delta(r0: Round0, name: str = "alice") -> tuple[UpdateManifest, dict[str, np.ndarray]]:
    """The update as the coordinator reads it from the store."""
    key = r0.coordinator.public_key_text
    plan = read_plan(r0.store, r0.layout, 0, key)
    base = read_plan_base(r0.store, r0.layout, plan, key)
    update = read_update(r0.store, r0.layout, plan, base, name)
    out: dict[str, np.ndarray] = {}
    for ref in update.document.shards:
        data = fetch_shard(r0.store, update.directory, ref)
        out |= decode_shard(data, ref, update.document.encoding, ref.name)
    return update.document, out


def test_coordinator_sees_only_the_noised_delta(
    round0: Round0, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shards in the store are the clipped raw delta plus noise of std z*C, and the
    signed manifest carries epsilon for one round as dp_accounting computes it."""
    _clean_env(monkeypatch)
    assert participant.main([*round0.argv, *DP]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    local = train_local_only(SPEC, CONFIG, str(round0.data), 1, round0.workdir / "again")
    raw = participant.compute_delta(round0.arrays, local)
    manifest, stored = _stored_delta(round0)

    assert manifest.privacy is not None
    expected = _reference_epsilon([0.5], 1e-5)
    assert manifest.privacy.epsilon == pytest.approx(expected, rel=1e-9)
    assert manifest.privacy.rounds == 1
    assert (manifest.privacy.noise_multiplier, manifest.privacy.clip_norm) == (0.5, 0.05)
    assert summary["epsilon"] == manifest.privacy.epsilon and summary["dpRounds"] == 1

    assert privacy.l2_norm(raw) > 0.05, "the raw delta should be longer than the clip"
    clipped = privacy.clip(raw, 0.05)
    noise = np.concatenate([(stored[k] - clipped[k]).ravel() for k in raw])
    assert noise.std() == pytest.approx(0.5 * 0.05, rel=0.05)
    for k in raw:
        assert not np.allclose(stored[k], raw[k], atol=1e-3), k
    assert "deltaNorm" not in manifest.metrics  # no figure of the raw delta leaves


def test_without_privacy_the_manifest_has_none(
    round0: Round0, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_env(monkeypatch)
    assert participant.main(round0.argv) == 0
    manifest, _ = _stored_delta(round0)
    assert manifest.privacy is None


def test_retried_upload_sends_the_same_noised_shards(
    round0: Round0, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that died after uploading shards but before the manifest: the retry,
    with the same work directory, uploads the very same bytes."""
    _clean_env(monkeypatch)
    assert participant.main([*round0.argv, *DP]) == 0
    first, _ = _stored_delta(round0)
    round0.store.delete(round0.layout.update_manifest(0, "alice"))  # as if never committed
    assert participant.main([*round0.argv, *DP]) == 0
    second, _ = _stored_delta(round0)
    assert [s.sha256 for s in second.shards] == [s.sha256 for s in first.shards]
    assert second.privacy == first.privacy


def test_earlier_noised_rounds_are_counted_from_signed_manifests(
    round0: Round0, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_env(monkeypatch)
    assert participant.main([*round0.argv, *DP]) == 0
    signer = load_signing_key("alice", round0.workdir / "keys" / "alice.key")
    assert privacy.earlier_noise(round0.store, round0.layout, signer, 0) == []
    assert privacy.earlier_noise(round0.store, round0.layout, signer, 1) == [0.5]
    assert privacy.earlier_noise(round0.store, round0.layout, signer, 3) == [0.5]
    record = privacy.account(privacy.Settings(0.5, 0.05), [0.5])
    assert record.rounds == 2
    assert record.epsilon == pytest.approx(_reference_epsilon([0.5, 0.5], 1e-5), rel=1e-9)
    # a manifest under alice's name that alice did not sign is not counted: it is refused
    impostor = SigningKey.generate("alice")
    with pytest.raises(privacy.PrivacyError, match="cannot count earlier noised rounds"):
        privacy.earlier_noise(round0.store, round0.layout, impostor, 1)


def test_bad_privacy_settings_are_a_usage_error(
    round0: Round0, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _clean_env(monkeypatch)
    code = participant.main([*round0.argv, "--dp-noise-multiplier", "0", "--dp-clip-norm", "1"])
    assert code == ExitCode.USAGE
    assert "noise multiplier must be a number > 0" in capsys.readouterr().err
    monkeypatch.setenv("TAPESTRY_DP_CLIP_NORM", "1")
    assert participant.main(round0.argv) == ExitCode.USAGE
    assert "needs a noise multiplier too" in capsys.readouterr().err


# --- the local runner and the benchmark --------------------------------------------


@pytest.mark.slow
def test_local_run_reports_epsilon_in_manifests_and_table(tmp_path: Path) -> None:
    from tests.e2e.texts import write_corpora

    data = write_corpora(tmp_path / "text")
    command = [
        sys.executable, "-m", "tapestry_cli", "local", "run", "--participants", "2",
        "--rounds", "2", "--preset", "tiny", "--inner-steps", "2", "--batch-size", "2",
        "--seq-len", "32", "--no-baseline", "--data", str(data), "--workdir",
        str(tmp_path / "run"), "--dp-noise-multiplier", "1.0", "--dp-clip-norm", "0.1",
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    two_rounds = _reference_epsilon([1.0, 1.0], 1e-5)
    names = sorted(summary["privacy"])
    assert len(names) == 2
    for name in names:
        row = summary["privacy"][name]
        assert (row["round"], row["rounds"]) == (1, 2)
        assert row["epsilon"] == pytest.approx(two_rounds, rel=1e-9)
        for r, rounds in ((0, 1), (1, 2)):
            key = Layout("local").update_manifest(r, name)
            manifest = json.loads((tmp_path / "run" / "store" / key).read_text())
            assert manifest["privacy"]["rounds"] == rounds
            expected = _reference_epsilon([1.0] * rounds, 1e-5)
            assert manifest["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert "differential privacy" in done.stdout and f"{two_rounds:.3g}" in done.stdout


def test_local_run_refuses_bad_privacy_flags(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "tapestry_cli", "local", "run", "--workdir", str(tmp_path),
        "--dp-noise-multiplier", "1.0", "--dp-clip-norm", "-1",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "clip norm must be a number > 0" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- from the Participant's spec to the trainer pod ---------------------------------


def test_spec_privacy_reaches_the_trainer_pod_and_its_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """spec.privacy, stored as the API server stores it (delta defaulted), becomes the
    trainer pod's TAPESTRY_DP_* variables, which the trainer reads back as the same
    settings; without spec.privacy the pod has none of them."""
    from tapestry_operator.builders import build_training_job
    from tapestry_operator.config import ParticipantConfig
    from tests.operator import crd_defaults

    body = crd_defaults.participant(
        compute={"resources": {}}, privacy={"noiseMultiplier": 1.3, "clipNorm": 0.25}
    )
    assert body["spec"]["privacy"]["delta"] == privacy.DEFAULT_DELTA  # the CRD's default
    job = build_training_job(ParticipantConfig.from_body(body), 4, body)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    names = (pod.DP_NOISE_MULTIPLIER, pod.DP_CLIP_NORM, pod.DP_DELTA)
    assert [env[n] for n in names] == ["1.3", "0.25", "1e-05"]
    for name in names:
        monkeypatch.setenv(name, env[name])
    args = participant.build_parser().parse_args([])
    assert participant._privacy_settings(args) == privacy.Settings(1.3, 0.25, 1e-5)

    plain = crd_defaults.participant(compute={"resources": {}})
    job = build_training_job(ParticipantConfig.from_body(plain), 4, plain)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert not {e["name"] for e in container["env"]} & set(names)


def test_participant_status_shows_epsilon_per_round_and_latest(
    round0: Round0, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator reads epsilon from the member's own signed manifest into the round's
    row, keeps it there, and status.privacy holds the newest cumulative figure."""
    from datetime import UTC, datetime

    from tapestry_lifecycle.participant import Do, Next, PlanView
    from tapestry_lifecycle.states import MemberState, Reason
    from tapestry_operator import participant as operator
    from tapestry_operator.config import ParticipantConfig
    from tests.operator import crd_defaults

    _clean_env(monkeypatch)
    assert participant.main([*round0.argv, *DP]) == 0
    body = crd_defaults.participant(
        "alice", federation="sign", compute={"resources": {}},
        privacy={"noiseMultiplier": 0.5, "clipNorm": 0.05},
    )  # fmt: skip
    config = ParticipantConfig.from_body(body)
    signer = load_signing_key("alice", round0.workdir / "keys" / "alice.key")
    plan = read_plan(round0.store, round0.layout, 0, round0.coordinator.public_key_text)
    view = PlanView("alice", datetime.now(UTC), plan=plan, uploaded=True)
    history: dict[int, dict[str, Any]] = {}
    row = operator._privacy_row(round0.store, config, signer, view, history)
    expected = _reference_epsilon([0.5], 1e-5)
    assert row is not None and row["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert (row["delta"], row["rounds"], row["noiseMultiplier"], row["clipNorm"]) == (
        1e-5, 1, 0.5, 0.05,
    )  # fmt: skip
    step = Next(Do.WAIT, MemberState.UPLOADED, Reason.UPLOADED, "uploaded")
    operator._remember(history, 0, step, row)
    assert history[0]["privacy"] == row
    merged = Next(Do.DONE, MemberState.MERGED, Reason.MERGED, "merged", weight=1.0)
    operator._remember(history, 0, merged)  # a later visit
    assert history[0]["privacy"] == row  # read once, kept
    assert operator._privacy_row(round0.store, config, signer, view, history) is None
    latest = operator.latest_privacy(history, None)
    assert latest == {"round": 0, "epsilon": row["epsilon"], "delta": 1e-5, "rounds": 1}
    # a newer figure already in status survives rows that aged out
    newer = {"round": 7, "epsilon": 9.0, "delta": 1e-5, "rounds": 8}
    assert operator.latest_privacy(history, newer) == newer
    assert operator.latest_privacy({}, newer) == newer
    # without spec.privacy the operator reads nothing
    off = ParticipantConfig.from_body(
        crd_defaults.participant("alice", federation="sign", compute={"resources": {}})
    )
    assert operator._privacy_row(round0.store, off, signer, view, {}) is None


@pytest.mark.slow
def test_the_privacy_benchmark_runs_quick(tmp_path: Path) -> None:
    """bench/privacy.py --quick: a run without privacy and one with, each reporting its
    pooled validation loss, the private one its epsilon as dp_accounting computes it."""
    from tests.bench.harness import run_quick
    from tests.e2e.texts import write_corpora

    data = write_corpora(tmp_path / "text")
    report = run_quick("privacy.py", tmp_path / "privacy.json", "--data", str(data),
                       "--workdir", str(tmp_path / "work"), timeout=1200)  # fmt: skip
    off, noised = report["levels"]
    assert off["noiseMultiplier"] == 0 and off["epsilon"] is None
    assert noised["noiseMultiplier"] == 1.0 and noised["rounds"] == 2
    assert noised["clipNorm"] == report["updateNorms"]["median"] > 0
    assert noised["epsilon"] == pytest.approx(_reference_epsilon([1.0, 1.0], 1e-5), rel=1e-9)
    for row in (off, noised):
        assert math.isfinite(row["validationLoss"]) and row["validationLoss"] > 0
    assert {"date", "machine", "commit", "command"} <= set(report)
