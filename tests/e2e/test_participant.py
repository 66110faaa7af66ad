"""The participant entry point, in-process: the sign of the delta end to end, and clear
failures."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from tapestry_aggregator.merge import aggregate_round
from tapestry_aggregator.strategy import Strategy
from tapestry_protocol.documents import CloseTrigger, Outcome
from tapestry_protocol.exchange import (
    COORDINATOR,
    close_round,
    load_tensors,
    make_plan,
    publish_model,
    publish_plan,
    read_model,
    read_plan,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.pod import ExitCode
from tapestry_protocol.shards import (
    FloatArray,
    plan_shards,
)
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store.filesystem import FilesystemStore
from tapestry_trainer import participant
from tapestry_trainer.baseline import initial_arrays, train_local_only
from tapestry_trainer.data import prepare_shards
from tapestry_trainer.specs import InnerConfig, ModelSpec
from tests.e2e.texts import write_corpora

pytestmark = pytest.mark.torch

SPEC = ModelSpec.preset("tiny", seed=3, n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=32)
CONFIG = InnerConfig(steps=3, lr=1e-2, batch_size=4, seq_len=32, warmup_steps=1)


def test_delta_is_base_minus_local() -> None:
    base = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    local = {"w": np.array([0.5, 2.5], dtype=np.float32)}
    np.testing.assert_array_equal(participant.compute_delta(base, local)["w"], [0.5, -0.5])
    with pytest.raises(participant.ParticipantError, match="differ from the base"):
        participant.compute_delta(base, {"v": local["w"]})


@dataclass
class Round0:
    store: FilesystemStore
    layout: Layout
    coordinator: SigningKey
    arrays: dict[str, FloatArray]
    data: Path
    workdir: Path
    argv: list[str]


@pytest.fixture
def round0(tmp_path: Path) -> Round0:
    store = FilesystemStore(tmp_path / "store", create=True)
    layout = Layout("sign")
    coordinator = SigningKey.generate(COORDINATOR)
    alice = SigningKey.generate("alice")
    alice.save(tmp_path / "keys")
    arrays = initial_arrays(SPEC)
    groups = plan_shards([(n, a.nbytes) for n, a in arrays.items()], 64 << 10)
    base = publish_model(store, layout, 0, arrays, groups, coordinator, model=SPEC.to_dict())
    plan = make_plan(
        layout,
        0,
        base,
        model=SPEC.to_dict(),
        hyperparameters=CONFIG.to_dict(),
        participants={"alice": alice.public_key_text},
        min_participants=1,
        deadline="2030-01-01T00:00:00Z",
    )
    publish_plan(store, layout, plan, coordinator)
    data = prepare_shards([write_corpora(tmp_path / "text") / "alice"], tmp_path / "data").parent
    argv = [
        "--store",
        str(tmp_path / "store"),
        "--federation",
        "sign",
        "--round",
        "0",
        "--name",
        "alice",
        "--key",
        str(tmp_path / "keys" / "alice.key"),
        "--coordinator-key",
        coordinator.public_key_text,
        "--data",
        str(data),
        "--workdir",
        str(tmp_path / "work"),
    ]
    return Round0(store, layout, coordinator, arrays, data, tmp_path, argv)


def test_fedavg_of_one_participant_lands_on_its_local_model(
    round0: Round0, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pins the sign through the whole pipeline: base - lr * (base - local) = local."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert participant.main(round0.argv) == 0
    local = train_local_only(SPEC, CONFIG, str(round0.data), 1, round0.workdir / "again")

    key = round0.coordinator.public_key_text
    plan = read_plan(round0.store, round0.layout, 0, key)
    close = close_round(
        round0.store, round0.layout, plan, round0.coordinator, CloseTrigger.ALL_REPORTED,
        datetime(2030, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    assert [i.participant for i in close.document.included] == ["alice"]
    result = aggregate_round(round0.store, round0.layout, 0, round0.coordinator, Strategy("fedavg"))
    assert result.document.outcome == Outcome.SUCCEEDED
    assert result.document.next_base is not None
    manifest = result.document.next_base.manifest
    new_base = load_tensors(round0.store, read_model(round0.store, round0.layout, manifest, key))
    moved = False
    for name, value in local.items():
        np.testing.assert_allclose(new_base[name], value, rtol=1e-5, atol=1e-6)
        moved |= not np.allclose(value, round0.arrays[name])
    assert moved, "training did not change the model"


def test_wrong_coordinator_key_is_refused_clearly(
    round0: Round0, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = list(round0.argv)
    argv[argv.index("--coordinator-key") + 1] = SigningKey.generate("x").public_key_text
    assert participant.main(argv) == ExitCode.REFUSED
    assert "BadSignature" in capsys.readouterr().err


def test_missing_options_are_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in os.environ if v.startswith("TAPESTRY_")]:
        monkeypatch.delenv(var)
    assert participant.main(["--store", "/nowhere"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "--federation" in err and "--key" in err


def test_not_invited(round0: Round0, capsys: pytest.CaptureFixture[str]) -> None:
    argv = list(round0.argv)
    argv[argv.index("--name") + 1] = "mallory"
    assert participant.main(argv) == ExitCode.REFUSED
    assert "not a participant" in capsys.readouterr().err


def test_corrupt_base_is_refused_before_training(
    round0: Round0, capsys: pytest.CaptureFixture[str]
) -> None:
    base_dir = round0.layout.base_dir(0)
    shard = next(i.key for i in round0.store.list(base_dir) if i.key.endswith(".safetensors"))
    data = bytearray(round0.store.get(shard))
    data[100] ^= 0xFF
    round0.store.delete(shard)
    round0.store.put(shard, bytes(data))
    assert participant.main(round0.argv) == ExitCode.REFUSED
    err = capsys.readouterr().err
    assert "HashMismatch" in err and "refusing round 0" in err
