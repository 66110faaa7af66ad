"""Model specs, presets, parameter counts and the learning-rate schedule (no torch needed
for most of it; the built-model comparisons use torch)."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from tapestry_trainer.specs import PRESETS, GPTConfig, InnerConfig, ModelSpec, SpecError

PLAN_SCHEMA = (
    Path(__file__).resolve().parents[2] / "protocol/tapestry_protocol/schemas/round-plan.v1.json"
)


def _built_count(config: GPTConfig) -> int:
    torch = pytest.importorskip("torch")
    from tapestry_trainer.model import GPT

    with torch.device("meta"):  # shapes only: no memory, no init
        return sum(p.numel() for p in GPT(config).parameters())


@pytest.mark.torch
@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_count_is_exact(name: str) -> None:
    assert PRESETS[name].param_count() == _built_count(PRESETS[name])


@pytest.mark.torch
@pytest.mark.parametrize(
    "variant",
    [
        {"bias": True},
        {"mlp": "swiglu"},
        {"positions": "rope"},
        {"norm": "rmsnorm", "bias": True, "mlp": "swiglu"},
    ],
)
def test_param_count_of_variants(variant: dict[str, object]) -> None:
    config = replace(PRESETS["tiny"], **variant)  # type: ignore[arg-type]
    assert config.param_count() == _built_count(config)


def test_preset_sizes_span_cpu_to_1b() -> None:
    counts = {name: config.param_count() for name, config in PRESETS.items()}
    assert 200_000 <= counts["tiny"] <= 1_000_000
    assert counts["tiny"] < counts["small"] < counts["base"] < counts["1b"]
    assert 0.9e9 <= counts["1b"] <= 1.2e9
    assert PRESETS["tiny"].flops_per_token(128) > 6 * counts["tiny"]


def test_model_spec_json_round_trip() -> None:
    for spec in (
        ModelSpec.preset("small", seed=7, dropout=0.1),
        ModelSpec.plugin("pkg.mod:build", {"hidden": 3}, seed=2),
    ):
        blob = json.loads(json.dumps(spec.to_dict()))
        assert ModelSpec.from_dict(blob) == spec
    assert ModelSpec.preset("tiny").param_count() == PRESETS["tiny"].param_count()
    assert ModelSpec.plugin("pkg.mod:build").param_count() is None


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"kind": "rnn"}, "model.kind"),
        ({"kind": "gpt", "gpt": {"d_model": 130, "n_heads": 4}}, "divisible"),
        ({"kind": "gpt", "gpt": {"n_layer": 2}}, "unknown gpt field"),
        ({"kind": "plugin", "factory": "no_colon"}, "module:function"),
    ],
)
def test_model_spec_errors(bad: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        ModelSpec.from_dict(bad)


def test_inner_config_uses_the_plan_schema_keys() -> None:
    config = InnerConfig(steps=50, lr=3e-3, batch_size=16, seq_len=128, warmup_steps=5)
    data = config.to_dict()
    assert InnerConfig.from_dict(json.loads(json.dumps(data))) == config
    schema = json.loads(PLAN_SCHEMA.read_text())["properties"]["hyperparameters"]
    assert set(data) <= set(schema["properties"])
    assert set(schema["required"]) <= set(data)
    with pytest.raises(SpecError, match="unknown hyperparameters"):
        InnerConfig.from_dict({**data, "momentum": 0.9})
    with pytest.raises(SpecError, match="batch_size"):
        InnerConfig(steps=1, lr=1.0, batch_size=0, seq_len=8)
    assert config.fingerprint() != replace(config, seed=1).fingerprint()


def test_warmup_then_cosine_schedule() -> None:
    c = InnerConfig(steps=110, lr=1.0, batch_size=1, seq_len=1, warmup_steps=10, min_lr_ratio=0.1)
    assert c.lr_at(0) == pytest.approx(0.1)
    assert c.lr_at(4) == pytest.approx(0.5)
    assert c.lr_at(9) == pytest.approx(1.0)
    assert c.lr_at(10) == pytest.approx(1.0)
    assert c.lr_at(60) == pytest.approx(0.55)  # cosine half-way: floor + (peak-floor)/2
    assert c.lr_at(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert c.lr_at(110) == pytest.approx(0.1)
    lrs = [c.lr_at(s) for s in range(10, 110)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    flat = InnerConfig(steps=5, lr=2.0, batch_size=1, seq_len=1, min_lr_ratio=1.0)
    assert {flat.lr_at(s) for s in range(5)} == {2.0}
