"""Plan-level descriptions of the model and of inner training, without torch.

A round plan carries two JSON objects that the trainer consumes: ``plan["model"]`` (a
:class:`ModelSpec`) and ``plan["hyperparameters"]`` (an :class:`InnerConfig`). Both live
here, in a module that imports neither torch nor numpy, so that the coordinator, the CLI and
the operator can write, validate and size them without the training stack.

``InnerConfig`` round-trips the plan schema's camelCase keys (``innerSteps``,
``learningRate``, ...) exactly; ``ModelSpec`` is free-form in the schema and round-trips
its own ``to_dict()`` output. Parameter counts are computed analytically, so a ``1b`` spec
can be sized without allocating it.

The command-line flags that pick a preset and set an ``InnerConfig`` are defined here too
(:func:`add_preset_argument`, :func:`add_inner_arguments`), so the standalone trainer and
``tapestry local run`` spell and default them the same way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

MlpKind = Literal["gelu", "swiglu"]
PositionKind = Literal["learned", "rope"]
NormKind = Literal["layernorm", "rmsnorm"]

# The byte tokenizer uses 256 bytes + BOS + EOS = 258 ids; presets round the embedding up to
# a multiple of 64 so that GPU matmuls get tensor-core friendly shapes. Unused rows are
# simply never targeted and their logits are pushed down within a few steps.
BYTE_VOCAB_PADDED = 320


class SpecError(ValueError):
    """A model spec or inner config is malformed; the message names the field."""


@dataclass(frozen=True)
class GPTConfig:
    """Shape of one member of the built-in GPT family (pre-norm decoder, tied embeddings)."""

    name: str = "custom"
    vocab_size: int = BYTE_VOCAB_PADDED
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    max_seq_len: int = 128
    mlp: MlpKind = "gelu"
    positions: PositionKind = "learned"
    norm: NormKind = "layernorm"
    bias: bool = False
    dropout: float = 0.0
    rope_theta: float = 10_000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if int(getattr(self, name)) < 1:
                raise SpecError(f"gpt.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise SpecError(
                f"gpt.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.positions == "rope" and (self.d_model // self.n_heads) % 2:
            raise SpecError("rotary positions need an even head dimension")
        if self.mlp not in ("gelu", "swiglu"):
            raise SpecError(f"gpt.mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.positions not in ("learned", "rope"):
            raise SpecError(f"gpt.positions must be 'learned' or 'rope', got {self.positions!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise SpecError(f"gpt.norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"gpt.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def param_count(self) -> int:
        """Number of trainable parameters of :class:`tapestry_trainer.model.GPT` (exact)."""
        d, ff, b = self.d_model, self.d_ff, int(self.bias)
        norm = d * (1 + b) if self.norm == "layernorm" else d
        attn = (d * 3 * d + 3 * d * b) + (d * d + d * b)
        if self.mlp == "gelu":
            mlp = (d * ff + ff * b) + (ff * d + d * b)
        else:
            mlp = (d * 2 * ff + 2 * ff * b) + (ff * d + d * b)
        block = 2 * norm + attn + mlp
        embeddings = self.vocab_size * d  # tied with the output head
        if self.positions == "learned":
            embeddings += self.max_seq_len * d
        return embeddings + self.n_layers * block + norm

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (6N + attention), for tokens/s -> MFU conversions."""
        t = seq_len or self.max_seq_len
        return 6 * self.param_count() + 12 * self.n_layers * self.d_model * t

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GPTConfig:
        return cls(**_checked_kwargs(cls, data, "gpt"))


# Every preset above `tiny` uses the architecture of current open models.
_MODERN: dict[str, Any] = {"mlp": "swiglu", "positions": "rope", "norm": "rmsnorm"}

PRESETS: dict[str, GPTConfig] = {
    # Trains in seconds on two CPU cores: the demo and the test suite use it.
    "tiny": GPTConfig(name="tiny"),
    "small": GPTConfig(
        name="small",
        d_model=384,
        n_layers=6,
        n_heads=6,
        d_ff=1024,
        max_seq_len=512,
        **_MODERN,
    ),
    "base": GPTConfig(
        name="base",
        d_model=768,
        n_layers=12,
        n_heads=12,
        d_ff=2048,
        max_seq_len=1024,
        **_MODERN,
    ),
    # GPT-2-medium-sized (24 x 1024, 16 heads): one GPU's worth, for throughput runs.
    "350m": GPTConfig(
        name="350m",
        d_model=1024,
        n_layers=24,
        n_heads=16,
        d_ff=3456,
        max_seq_len=1024,
        **_MODERN,
    ),
    "1b": GPTConfig(
        name="1b",
        d_model=2048,
        n_layers=20,
        n_heads=16,
        d_ff=5632,
        max_seq_len=2048,
        **_MODERN,
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """What the plan says to build: a built-in GPT, or a participant plug-in factory.

    Exactly one of ``gpt`` and ``factory`` is set. ``factory`` is a ``"module:function"``
    string resolved by :mod:`tapestry_trainer.plugins`; ``options`` is handed to it as its
    only argument. ``seed`` makes initialisation deterministic for both kinds, so the
    coordinator and every participant can rebuild the same round-0 weights.
    """

    gpt: GPTConfig | None = None
    factory: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.gpt is None) == (self.factory is None):
            raise SpecError("a model spec needs exactly one of 'gpt' and 'factory'")
        if self.gpt is not None and self.options:
            raise SpecError("'options' only apply to a plug-in factory")
        if self.factory is not None and ":" not in self.factory:
            raise SpecError(f"factory must look like 'module:function', got {self.factory!r}")

    @classmethod
    def preset(cls, name: str, *, seed: int = 0, **overrides: Any) -> ModelSpec:
        """A built-in preset (one of :data:`PRESETS`), optionally altered."""
        if name not in PRESETS:
            raise SpecError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(gpt=replace(PRESETS[name], **overrides), seed=seed)

    @classmethod
    def plugin(
        cls, factory: str, options: Mapping[str, Any] | None = None, *, seed: int = 0
    ) -> ModelSpec:
        return cls(factory=factory, options=dict(options or {}), seed=seed)

    def to_dict(self) -> dict[str, Any]:
        if self.gpt is not None:
            return {"kind": "gpt", "gpt": asdict(self.gpt), "seed": self.seed}
        return {
            "kind": "plugin",
            "factory": self.factory,
            "options": dict(self.options),
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        kind = data.get("kind")
        seed = int(data.get("seed", 0))
        if kind == "gpt":
            _reject_unknown(data, {"kind", "gpt", "seed"}, "model")
            return cls(gpt=GPTConfig.from_dict(data["gpt"]), seed=seed)
        if kind == "plugin":
            _reject_unknown(data, {"kind", "factory", "options", "seed"}, "model")
            return cls(
                factory=str(data["factory"]), options=dict(data.get("options", {})), seed=seed
            )
        raise SpecError(f"model.kind must be 'gpt' or 'plugin', got {kind!r}")

    def param_count(self) -> int | None:
        """Analytic count for the built-in family; None for plug-ins (unknown until built)."""
        return self.gpt.param_count() if self.gpt is not None else None


# camelCase keys of plan["hyperparameters"] (round-plan.v1.json) -> InnerConfig fields.
_PLAN_KEYS = {
    "innerSteps": "steps",
    "learningRate": "lr",
    "batchSize": "batch_size",
    "seqLen": "seq_len",
    "warmupSteps": "warmup_steps",
    "weightDecay": "weight_decay",
    "gradClip": "grad_clip",
    "minLearningRateRatio": "min_lr_ratio",
    "seed": "seed",
    "checkpointEvery": "checkpoint_every",
}


@dataclass(frozen=True)
class InnerConfig:
    """Hyperparameters of one participant's inner run (H AdamW steps from the base).

    ``batch_size`` is the global batch in sequences, summed over all ranks, so the result
    does not depend on how many GPUs a participant has. ``grad_clip`` 0 disables clipping;
    ``checkpoint_every`` 0 disables local checkpoints. The learning rate warms up linearly
    for ``warmup_steps`` and then follows a cosine down to ``lr * min_lr_ratio``.
    """

    steps: int
    lr: float
    batch_size: int
    seq_len: int
    warmup_steps: int = 0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1
    seed: int = 0
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise SpecError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "seed", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise SpecError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise SpecError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise SpecError("weight_decay and grad_clip must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise SpecError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based ``step``: linear warmup, then cosine to the floor."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        floor = self.lr * self.min_lr_ratio
        return floor + 0.5 * (self.lr - floor) * (1.0 + math.cos(math.pi * progress))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        """The plan's camelCase form (``plan["hyperparameters"]``)."""
        return {key: getattr(self, attr) for key, attr in _PLAN_KEYS.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InnerConfig:
        _reject_unknown(data, set(_PLAN_KEYS), "hyperparameters")
        return cls(**{_PLAN_KEYS[k]: v for k, v in data.items()})

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON form: a checkpoint only resumes the same config."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------- command lines

#: The preset a command line builds when none is named.
DEFAULT_PRESET = "tiny"

#: Defaults of the flags below where InnerConfig has none (or, for checkpoints, another
#: one); every other flag defaults to InnerConfig's own field default.
FLAG_DEFAULTS: dict[str, Any] = {
    "steps": 40,
    "lr": 3e-3,
    "batch_size": 16,
    "seq_len": 128,
    "checkpoint_every": 10,
}

# InnerConfig field -> (flag, hidden older spellings, help). The standalone trainer and the
# local runner both take these, so each setting has one name and one default.
_INNER_FLAGS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "steps": ("--inner-steps", ("--steps",), "inner AdamW steps (H, per round)"),
    "lr": ("--lr", (), "peak inner learning rate"),
    "batch_size": ("--batch-size", (), "global batch in sequences, summed over all ranks"),
    "seq_len": ("--seq-len", (), "tokens per sequence"),
    "warmup_steps": (
        "--warmup-steps",
        ("--warmup",),
        "linear warmup steps (default: a tenth of the inner steps, at least 1)",
    ),
    "weight_decay": ("--weight-decay", (), "AdamW weight decay of the matrices"),
    "grad_clip": ("--grad-clip", (), "clip gradients to this global norm, 0: off"),
    "min_lr_ratio": ("--min-lr-ratio", (), "the cosine ends at lr times this"),
    "seed": ("--seed", (), "model initialisation, data order and dropout"),
    "checkpoint_every": ("--checkpoint-every", (), "local checkpoint every N steps, 0: off"),
}


def default_warmup(steps: int) -> int:
    """Warmup when none is given: a tenth of the steps, at least one (a fresh optimizer
    starts every round, so some warmup always helps)."""
    return max(1, steps // 10)


def flag_default(name: str) -> Any:
    """The command-line default of InnerConfig field ``name`` (None for warmup: derived)."""
    if name in FLAG_DEFAULTS:
        return FLAG_DEFAULTS[name]
    if name == "warmup_steps":
        return None
    return next(f.default for f in fields(InnerConfig) if f.name == name)


def _dest(name: str) -> str:
    return _INNER_FLAGS[name][0].removeprefix("--").replace("-", "_")


def model_spec_arg(value: str) -> ModelSpec:
    """argparse type of ``--model-spec``: a ModelSpec as JSON text or a JSON file's path."""
    from pathlib import Path

    try:
        text = value if value.lstrip().startswith("{") else Path(value).read_text()
        return ModelSpec.from_dict(json.loads(text))
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:  # JSON, SpecError, missing fields
        raise argparse.ArgumentTypeError(f"not a model spec: {e}") from None


def add_preset_argument(
    parser: argparse._ActionsContainer, *, aliases: tuple[str, ...] = ()
) -> None:
    """``--preset NAME`` (choices: :data:`PRESETS`) on an argparse parser or group;
    ``aliases`` are accepted but not shown."""
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=list(PRESETS),
        help="built-in model (default: %(default)s)",
    )
    for alias in aliases:
        parser.add_argument(
            alias, dest="preset", choices=list(PRESETS), default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )  # fmt: skip


def add_inner_arguments(parser: argparse._ActionsContainer) -> None:
    """The flags that set an :class:`InnerConfig`, read back by :func:`inner_config_from_args`."""
    types = {f.name: f.type for f in fields(InnerConfig)}
    for name, (flag, aliases, text) in _INNER_FLAGS.items():
        kind: type[int] | type[float] = float if types[name] in ("float", float) else int
        default = flag_default(name)
        shown = text if default is None else f"{text} (default: %(default)s)"
        parser.add_argument(flag, type=kind, default=default, help=shown)
        for alias in aliases:
            parser.add_argument(
                alias, dest=_dest(name), type=kind, default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )  # fmt: skip


def inner_config_from_args(args: argparse.Namespace) -> InnerConfig:
    """The :class:`InnerConfig` that :func:`add_inner_arguments`' flags describe."""
    values = {name: getattr(args, _dest(name)) for name in _INNER_FLAGS}
    if values["warmup_steps"] is None:
        values["warmup_steps"] = default_warmup(values["steps"])
    return InnerConfig(**values)


def _reject_unknown(data: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"unknown {where} field(s): {', '.join(unknown)}")


def _checked_kwargs(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    _reject_unknown(data, {f.name for f in fields(cls)}, where)
    return dict(data)
