"""Plug-in resolution, its error messages, and the example plug-in end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tapestry_trainer.data import LoaderContext  # noqa: E402
from tapestry_trainer.inner import DistContext, state_arrays, train_inner  # noqa: E402
from tapestry_trainer.plugins import (  # noqa: E402
    PluginError,
    build_loader,
    build_model,
    loader_for,
    resolve,
)
from tapestry_trainer.specs import InnerConfig, ModelSpec  # noqa: E402

pytestmark = pytest.mark.torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plugin"


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_such_module_xyz:build", "module 'no_such_module_xyz' not found"),
        ("json.no_such_sub:build", "module 'json.no_such_sub' not found"),
        ("json:nope", "'json' has no attribute 'nope'"),
        ("json:JSONDecoder.nope", "'json.JSONDecoder' has no attribute 'nope'"),
        ("json:__name__", "'json:__name__' is not callable"),
        ("json", "must look like 'module:function'"),
    ],
)
def test_resolution_errors(ref: str, message: str) -> None:
    with pytest.raises(PluginError, match=message):
        resolve(ref)


def test_missing_dependency_is_not_reported_as_missing_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_plugin_mod.py").write_text("import not_installed_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="importing module 'broken_plugin_mod' failed"):
        resolve("broken_plugin_mod:build")


def test_factory_must_return_the_right_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "wrong_plugin_mod.py").write_text(
        "def build(config):\n    return 'not a module'\n"
        "def make_loader(ctx):\n    return object()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"expected torch\.nn\.Module"):
        build_model(ModelSpec.plugin("wrong_plugin_mod:build"))
    ctx = LoaderContext(data=".", rank=0, world_size=1, micro_batch_size=1, seq_len=8, seed=0)
    with pytest.raises(PluginError, match="lacks next_batch"):
        build_loader(ctx, "wrong_plugin_mod:make_loader")


def test_example_plugin_trains(text_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    spec = ModelSpec.plugin(
        "tapestry_example_plugin.models:build", {"dim": 16, "hidden": 32}, seed=3
    )
    model = build_model(spec)
    again = build_model(spec)  # seeded: the coordinator can rebuild the same base
    base = state_arrays(model)
    assert all((base[k] == v).all() for k, v in state_arrays(again).items())

    config = InnerConfig(steps=8, lr=1e-2, batch_size=4, seq_len=32)
    ctx = LoaderContext(
        data=str(text_dir), rank=0, world_size=1, micro_batch_size=4, seq_len=32, seed=0
    )
    loader = build_loader(ctx, "tapestry_example_plugin.data:make_loader")
    losses: list[float] = []
    result = train_inner(model, loader, config, on_step=lambda info: losses.append(info.loss))
    assert result.steps == 8 and result.final_loss < math.log(258)
    assert max(losses[-2:]) < losses[0] - 0.1  # it learnt, not just started below uniform
    local = state_arrays(model)
    assert local.keys() == base.keys()
    assert any(not (local[k] == base[k]).all() for k in base)


def test_loader_options_reach_the_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "options_plugin_mod.py").write_text(
        "class Loader:\n"
        "    def __init__(self, ctx): self.ctx = ctx\n"
        "    def next_batch(self): raise NotImplementedError\n"
        "    def state_dict(self): return {}\n"
        "    def load_state_dict(self, state): pass\n"
        "def make_loader(ctx):\n    return Loader(ctx)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = InnerConfig(steps=1, lr=1e-3, batch_size=4, seq_len=8, seed=5)
    two = DistContext(rank=1, world_size=2)
    loader = loader_for(
        "d", config, two, factory="options_plugin_mod:make_loader", options={"l": 1}
    )
    ctx = getattr(loader, "ctx")  # noqa: B009 - the plug-in's own attribute
    assert ctx.options == {"l": 1} and ctx.rank == 1 and ctx.micro_batch_size == 2
    assert ctx.data == "d" and ctx.seq_len == 8 and ctx.seed == 5
