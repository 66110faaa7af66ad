"""Participant plug-ins: your own model and data loader, named as ``"module:function"``.

A participant that does not want the built-in GPT or shard loader points the trainer at two
callables on its ``PYTHONPATH`` (typically baked into its own trainer image):

``model factory`` -- ``build(config: dict) -> torch.nn.Module``
    Called with ``ModelSpec.options`` under ``torch.manual_seed(ModelSpec.seed)`` (the
    global RNG is restored afterwards), so default PyTorch initialisation is deterministic
    and the coordinator can build the identical round-0 base. The module's
    ``forward(input_ids, targets)`` must return the mean loss as a scalar tensor. Its
    floating-point ``state_dict()`` entries are what is exchanged, so their names and
    shapes must not depend on the machine.

``loader factory`` -- ``make_loader(ctx: LoaderContext) -> BatchLoader``
    Returns an object with ``next_batch() -> (input_ids, targets)`` (int64, shape
    ``(ctx.micro_batch_size, ctx.seq_len)``), ``state_dict()`` and ``load_state_dict()``.
    It must be deterministic given ``ctx.seed`` and give rank ``ctx.rank`` its own slice of
    the global batch, so that DDP ranks never train on the same samples and a resumed run
    sees the batches the interrupted one would have seen.

Example (see ``examples/plugin/``)::

    spec = ModelSpec.plugin("tapestry_example_plugin.models:build", {"hidden": 128})
    model = build_model(spec)
    loader = build_loader(ctx, "tapestry_example_plugin.data:make_loader")
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tapestry_trainer.data import BatchLoader, LoaderContext, ShardLoader
from tapestry_trainer.inner import DistContext, micro_batch_size
from tapestry_trainer.model import build_gpt
from tapestry_trainer.specs import InnerConfig, ModelSpec


class PluginError(Exception):
    """A ``module:function`` reference cannot be resolved or returned the wrong thing."""


def resolve(ref: str) -> Callable[..., Any]:
    """Import ``"package.module:attr.path"`` and return the callable it names."""
    module_name, sep, attr_path = ref.partition(":")
    if not sep or not module_name or not attr_path:
        raise PluginError(f"plug-in reference {ref!r} must look like 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only a missing target module is "not found"; a missing dependency of it is not.
        if err.name is not None and (module_name + ".").startswith(err.name + "."):
            raise PluginError(f"module {module_name!r} not found (is it on PYTHONPATH?)") from err
        raise PluginError(f"importing module {module_name!r} failed: {err}") from err
    target: Any = module
    owner = module_name
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise PluginError(f"{owner!r} has no attribute {part!r}")
        target, owner = getattr(target, part), f"{owner}.{part}"
    if not callable(target):
        raise PluginError(f"{ref!r} is not callable (it is a {type(target).__name__})")
    return target  # type: ignore[no-any-return]


def build_model(spec: ModelSpec, *, device: torch.device | str = "cpu") -> nn.Module:
    """The built-in GPT or the plug-in model of ``spec``, initialised from ``spec.seed``."""
    if spec.gpt is not None:
        return build_gpt(spec.gpt, seed=spec.seed, device=device)
    assert spec.factory is not None  # ModelSpec guarantees exactly one of the two
    factory = resolve(spec.factory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = factory(dict(spec.options))
    if not isinstance(model, nn.Module):
        raise PluginError(
            f"{spec.factory!r} returned {type(model).__name__}, expected torch.nn.Module"
        )
    return model.to(device)


def loader_for(
    data: str,
    config: InnerConfig,
    ctx: DistContext,
    *,
    micro_batch: int | None = None,
    factory: str | None = None,
    options: Mapping[str, Any] | None = None,
    round_number: int = 0,
) -> BatchLoader:
    """This rank's loader for an inner run of ``config`` (see :func:`build_loader`);
    ``options`` reach a plug-in loader untouched as ``ctx.options``. Round
    ``round_number`` starts after the samples of the rounds before it
    (:func:`round_start`)."""
    return build_loader(
        LoaderContext(
            data=data,
            rank=ctx.rank,
            world_size=ctx.world_size,
            micro_batch_size=micro_batch_size(config, ctx, micro_batch),
            seq_len=config.seq_len,
            seed=config.seed,
            options=dict(options or {}),
            start=round_start(config, round_number),
        ),
        factory,
    )


def round_start(config: InnerConfig, round_number: int) -> int:
    """Where round ``round_number``'s batches begin in the sample stream: after the
    ``innerSteps * batchSize`` samples of each round before it."""
    return round_number * config.steps * config.batch_size


def build_loader(ctx: LoaderContext, factory: str | None = None) -> BatchLoader:
    """The built-in :class:`ShardLoader` or the plug-in loader named by ``factory``."""
    if factory is None:
        return ShardLoader(ctx)
    loader = resolve(factory)(ctx)
    if not isinstance(loader, BatchLoader):
        raise PluginError(
            f"{factory!r} returned {type(loader).__name__}, which lacks "
            "next_batch/state_dict/load_state_dict"
        )
    return loader
