"""The participant entry point, in-process: the sign of the delta end to end, and clear
failures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the participant trains with torch")

from tapestry_aggregator.merge import aggregate_round  # noqa: E402
from tapestry_aggregator.strategy import Strategy  # noqa: E402
from tapestry_protocol.exchange import (  # noqa: E402
    COORDINATOR,
    load_tensors,
    make_plan,
    publish_model,
    publish_plan,
    read_model,
)
from tapestry_protocol.layout import Layout  # noqa: E402
from tapestry_protocol.shards import plan_shards  # noqa: E402
from tapestry_protocol.signing import SigningKey  # noqa: E402
from tapestry_protocol.store.filesystem import FilesystemStore  # noqa: E402
from tapestry_trainer import participant, plugins  # noqa: E402
from tapestry_trainer.baseline import initial_arrays  # noqa: E402
from tapestry_trainer.data import LoaderContext, prepare_shards  # noqa: E402
from tapestry_trainer.inner import (  # noqa: E402
    load_state_arrays,
    micro_batch_size,
    state_arrays,
    train_inner,
)
from tapestry_trainer.specs import InnerConfig, ModelSpec  # noqa: E402
from tests.e2e.texts import write_corpora  # noqa: E402

pytestmark = pytest.mark.torch

SPEC = ModelSpec.preset("tiny", seed=3, n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=32)
CONFIG = InnerConfig(steps=3, lr=1e-2, batch_size=4, seq_len=32, warmup_steps=1)


def test_delta_is_base_minus_local() -> None:
    base = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    local = {"w": np.array([0.5, 2.5], dtype=np.float32)}
    np.testing.assert_array_equal(participant.compute_delta(base, local)["w"], [0.5, -0.5])
    with pytest.raises(participant.ParticipantError, match="differ from the base"):
        participant.compute_delta(base, {"v": local["w"]})


@pytest.fixture
def round0(tmp_path: Path) -> dict[str, object]:
    store = FilesystemStore(tmp_path / "store", create=True)
    layout = Layout("sign")
    coordinator = SigningKey.generate(COORDINATOR)
    alice = SigningKey.generate("alice")
    alice.save(tmp_path / "keys")
    arrays = initial_arrays(SPEC)
    groups = plan_shards([(n, a.nbytes) for n, a in arrays.items()], 64 << 10)
    base = publish_model(store, layout, 0, arrays, groups, coordinator, model=SPEC.to_dict())
    publish_plan(
        store,
        layout,
        make_plan(
            layout,
            0,
            base,
            model=SPEC.to_dict(),
            hyperparameters=CONFIG.to_dict(),
            participants={"alice": alice.public_key_text},
            min_participants=1,
            deadline="2030-01-01T00:00:00Z",
        ),
        coordinator,
    )
    data = prepare_shards([write_corpora(tmp_path / "text") / "alice"], tmp_path / "data")
    return {
        "store": store,
        "layout": layout,
        "coordinator": coordinator,
        "arrays": arrays,
        "argv": [
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
            str(data.parent),
            "--workdir",
            str(tmp_path / "work"),
        ],
    }


def test_fedavg_of_one_participant_lands_on_its_local_model(
    round0: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pins the sign through the whole pipeline: base - lr * (base - local) = local."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert participant.main(round0["argv"]) == 0  # type: ignore[arg-type]

    model = plugins.build_model(SPEC)
    load_state_arrays(model, round0["arrays"])  # type: ignore[arg-type]
    data = round0["argv"][round0["argv"].index("--data") + 1]  # type: ignore[attr-defined]
    from tapestry_trainer.inner import DistContext

    loader = plugins.build_loader(
        LoaderContext(
            data=data,
            rank=0,
            world_size=1,
            micro_batch_size=micro_batch_size(CONFIG, DistContext()),
            seq_len=CONFIG.seq_len,
            seed=CONFIG.seed,
        )
    )
    train_inner(model, loader, CONFIG)
    local = state_arrays(model)

    store, layout = round0["store"], round0["layout"]
    coordinator = round0["coordinator"]
    result = aggregate_round(store, layout, 0, coordinator, Strategy("fedavg"))  # type: ignore[arg-type]
    assert result.document["outcome"] == "Succeeded"
    new_base = load_tensors(
        store,
        read_model(  # type: ignore[arg-type]
            store,
            layout,
            result.document["nextBase"]["manifest"],  # type: ignore[arg-type]
            coordinator.public_key_text,
        ),
    )  # type: ignore[attr-defined]
    moved = False
    for name, value in local.items():
        np.testing.assert_allclose(new_base[name], value, rtol=1e-5, atol=1e-6)
        moved |= not np.allclose(value, round0["arrays"][name])  # type: ignore[index]
    assert moved, "training did not change the model"


def test_wrong_coordinator_key_is_refused_clearly(
    round0: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = list(round0["argv"])  # type: ignore[call-overload]
    argv[argv.index("--coordinator-key") + 1] = SigningKey.generate("x").public_key_text
    assert participant.main(argv) == 1
    assert "BadSignature" in capsys.readouterr().err


def test_missing_options_are_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in os.environ if v.startswith("TAPESTRY_")]:
        monkeypatch.delenv(var)
    assert participant.main(["--store", "/nowhere"]) == 2
    err = capsys.readouterr().err
    assert "--federation" in err and "--key" in err


def test_not_invited(round0: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:
    argv = list(round0["argv"])  # type: ignore[call-overload]
    argv[argv.index("--name") + 1] = "mallory"
    assert participant.main(argv) == 1
    assert "not a participant" in capsys.readouterr().err


def test_corrupt_base_is_refused_before_training(
    round0: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    store = round0["store"]
    base_dir = round0["layout"].base_dir(0)  # type: ignore[attr-defined]
    shard = next(i.key for i in store.list(base_dir) if i.key.endswith(".safetensors"))  # type: ignore[attr-defined]
    data = bytearray(store.get(shard))  # type: ignore[attr-defined]
    data[100] ^= 0xFF
    store.delete(shard)  # type: ignore[attr-defined]
    store.put(shard, bytes(data))  # type: ignore[attr-defined]
    assert participant.main(round0["argv"]) == 1  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "HashMismatch" in err and "refusing round 0" in err
