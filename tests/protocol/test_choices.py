"""Every list of choices is defined once: the command lines and schemas take it from there.

Optimizers and weightings come from tapestry_aggregator.strategy, encodings from
tapestry_protocol.shards, presets and the inner-training flags from tapestry_trainer.specs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tapestry_aggregator.strategy import (
    CLIP_MODES,
    COMBINE_RULES,
    OPTIMIZERS,
    WEIGHTINGS,
    Strategy,
)
from tapestry_protocol import rejections
from tapestry_protocol.shards import ENCODINGS
from tapestry_trainer.specs import (
    DEFAULT_PRESET,
    PRESETS,
    InnerConfig,
    ModelSpec,
    add_inner_arguments,
    add_preset_argument,
    inner_config_from_args,
)

SCHEMAS = Path(__file__).resolve().parents[2] / "protocol/tapestry_protocol/schemas"


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def _visible_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        a.option_strings[0]: a
        for a in parser._actions
        if a.option_strings and a.help != argparse.SUPPRESS
    }


def _tapestry() -> argparse.ArgumentParser:
    from tapestry_cli.main import build_parser

    return build_parser()


@pytest.mark.parametrize(
    ("path", "flag", "choices", "default"),
    [
        (("aggregate",), "--optimizer", OPTIMIZERS, Strategy.optimizer),
        (("aggregate",), "--weighting", WEIGHTINGS, Strategy.weighting),
        (("aggregate",), "--clip", CLIP_MODES, Strategy.clip),
        (("aggregate",), "--combine", COMBINE_RULES, Strategy.combine),
        (("local", "run"), "--optimizer", OPTIMIZERS, Strategy.optimizer),
        (("local", "run"), "--clip", CLIP_MODES, Strategy.clip),
        (("local", "run"), "--combine", COMBINE_RULES, Strategy.combine),
        (("local", "run"), "--encoding", ENCODINGS, "fp32"),
        (("local", "run"), "--preset", tuple(PRESETS), DEFAULT_PRESET),
    ],
)
def test_cli_choices_are_the_definitions(
    path: tuple[str, ...], flag: str, choices: tuple[str, ...], default: str
) -> None:
    action = _option(_subparser(_tapestry(), *path), flag)
    assert action.choices is not None and tuple(action.choices) == choices
    assert action.default == default and default in choices


def test_strategy_defaults_are_valid_choices() -> None:
    assert Strategy.optimizer in OPTIMIZERS and Strategy.weighting in WEIGHTINGS
    assert Strategy.clip in CLIP_MODES and Strategy.combine in COMBINE_RULES


def _crd_node(kind: str, path: str) -> dict[str, Any]:
    """The schema node at a dotted `path` (`[]` for list items) of `kind`'s CRD."""
    from tests.operator.crd_defaults import schema

    node = schema(kind)
    for part in path.split("."):
        node = node["properties"][part.removesuffix("[]")]
        if part.endswith("[]"):
            node = node["items"]
    return node


def test_robust_aggregation_choices_are_the_crd_enums() -> None:
    clipping = _crd_node("Federation", "spec.aggregation.clipping.mode")
    assert clipping["enum"] == list(CLIP_MODES) and clipping["default"] == Strategy.clip
    rule = _crd_node("Federation", "spec.aggregation.combine.rule")
    assert rule["enum"] == list(COMBINE_RULES) and rule["default"] == Strategy.combine
    trim = _crd_node("Federation", "spec.aggregation.combine.trim")
    assert trim["default"] == Strategy.trim
    assert (trim["minimum"], trim["maximum"], trim["exclusiveMaximum"]) == (0, 0.5, True)
    assert _crd_node("Federation", "spec.aggregation.maxTokenRatio")["minimum"] == 1
    adjustments = _crd_node("FederationRound", "status.members[].adjustments")["items"]
    assert adjustments["enum"] == sorted(rejections.ADJUSTMENTS)


def _standalone() -> argparse.ArgumentParser:
    pytest.importorskip("torch")
    from tapestry_trainer.train import _parser

    return _parser()


@pytest.mark.torch
def test_trainer_and_local_runner_share_flag_names_and_defaults() -> None:
    trainer = _visible_flags(_standalone())
    local = _visible_flags(_subparser(_tapestry(), "local", "run"))
    shared = sorted(trainer.keys() & local.keys())
    for flag in ["--preset", "--inner-steps", "--lr", "--batch-size", "--seq-len"]:
        assert flag in shared
    for flag in shared:
        a, b = trainer[flag], local[flag]
        if flag == "--data":  # shards for the trainer, text folders for the runner
            continue
        assert (a.default, a.type, a.choices) == (b.default, b.type, b.choices), flag
    assert tuple(trainer["--preset"].choices or ()) == tuple(PRESETS)


@pytest.mark.torch
def test_older_trainer_spellings_still_parse() -> None:
    args = _standalone().parse_args(
        ["--data", "d", "--model", "small", "--steps", "5", "--warmup", "2"]
    )
    assert (args.preset, args.inner_steps, args.warmup_steps) == ("small", 5, 2)
    config = inner_config_from_args(args)
    assert (config.steps, config.warmup_steps) == (5, 2)


def test_model_spec_is_json_text_or_a_file(tmp_path: Path) -> None:
    from tapestry_trainer.specs import model_spec_arg

    spec = ModelSpec.preset("tiny", seed=3)
    text = json.dumps(spec.to_dict())
    (tmp_path / "spec.json").write_text(text)
    assert model_spec_arg(text) == spec == model_spec_arg(str(tmp_path / "spec.json"))
    for bad in ["{", str(tmp_path / "absent.json"), '{"kind": "gpt"}']:
        with pytest.raises(argparse.ArgumentTypeError):
            model_spec_arg(bad)


def test_inner_flags_default_to_what_the_local_runner_always_used() -> None:
    parser = argparse.ArgumentParser()
    add_preset_argument(parser)
    add_inner_arguments(parser)
    args = parser.parse_args([])
    assert args.preset == "tiny"
    assert inner_config_from_args(args) == InnerConfig(
        steps=40, lr=3e-3, batch_size=16, seq_len=128, warmup_steps=4, checkpoint_every=10
    )
    few = inner_config_from_args(parser.parse_args(["--inner-steps", "4"]))
    assert few.warmup_steps == 1  # never zero
    tuned = parser.parse_args(["--warmup-steps", "0", "--weight-decay", "0", "--seed", "7"])
    assert inner_config_from_args(tuned).warmup_steps == 0
    assert inner_config_from_args(tuned).weight_decay == 0.0


def test_every_inner_config_field_has_a_flag() -> None:
    parser = argparse.ArgumentParser()
    add_inner_arguments(parser)
    dests = {a.dest for a in parser._actions}
    for f in dataclasses.fields(InnerConfig):
        assert (f.name if f.name != "steps" else "inner_steps") in dests, f.name


# -- schemas --------------------------------------------------------------------------


def _schemas() -> dict[str, Any]:
    return {p.name: json.loads(p.read_text()) for p in sorted(SCHEMAS.glob("*.json"))}


def _resolve(node: Any, here: str, schemas: dict[str, Any]) -> Any:
    """Follow `$ref`s (`file.json#/json/pointer` or `#/pointer`) to the schema they name."""
    seen = 0
    while isinstance(node, dict) and "$ref" in node:
        target, _, pointer = node["$ref"].partition("#")
        here = target or here
        node = schemas[here]
        for part in filter(None, pointer.split("/")):
            node = node[part]
        seen += 1
        assert seen < 20, "a $ref cycle"
    return node


def _properties_named(
    name: str, node: Any, here: str, schemas: dict[str, Any]
) -> Iterator[tuple[str, Any]]:
    """(file, resolved schema) of every property called `name`, anywhere."""
    if isinstance(node, dict):
        props = node.get("properties")
        if isinstance(props, dict) and name in props:
            yield here, _resolve(props[name], here, schemas)
        for value in node.values():
            yield from _properties_named(name, value, here, schemas)
    elif isinstance(node, list):
        for value in node:
            yield from _properties_named(name, value, here, schemas)


@pytest.mark.parametrize(
    ("name", "definition", "required"),
    [("encoding", ENCODINGS, True), ("optimizer", OPTIMIZERS, False)],
)
def test_schema_enums_are_the_definitions(
    name: str, definition: tuple[str, ...], required: bool
) -> None:
    schemas = _schemas()
    found = [
        (file, schema)
        for file, document in schemas.items()
        for file, schema in _properties_named(name, document, file, schemas)
    ]
    if required:
        assert found, f"no schema has an {name!r} property"
    for file, schema in found:
        if "enum" in schema:
            assert schema["enum"] == list(definition), file
        else:
            assert not required, f"{name} in {file} is not an enum: {schema}"
