"""The built-in GPT-style decoder family.

Pre-norm transformer blocks, causal self-attention through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on
GPU), a GELU or SwiGLU MLP, learned or rotary positions, LayerNorm or RMSNorm, and an output
head tied to the token embedding. Shapes come from a :class:`GPTConfig`; the named presets
(``tiny`` ... ``1b``) live in :mod:`tapestry_trainer.specs`.

``forward(input_ids, targets)`` returns the mean next-token cross-entropy, which is the
contract every model (built-in or plug-in) fulfils for the inner loop. Parameter names are
stable (``tok_emb.weight``, ``blocks.0.attn.qkv.weight``, ...) because the weight exchange
between participants and the aggregator is keyed by them.

Initialisation draws from a private CPU generator seeded by the spec's seed, in parameter
order, so the same spec yields bitwise-identical weights on any machine and device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tapestry_trainer.specs import PRESETS, GPTConfig, ModelSpec

__all__ = ["GPT", "PRESETS", "GPTConfig", "ModelSpec", "build_gpt", "init_weights"]


class RMSNorm(nn.Module):
    """Root-mean-square norm (written out: ``nn.RMSNorm`` needs a newer torch than we pin)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model)
    return nn.LayerNorm(config.d_model, bias=config.bias)


def _rope(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos/sin tables of rotary embeddings; cheap enough to recompute per forward."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (B, H, T, D); rotate pairs (x[2i], x[2i+1]) by the position's angle.
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
            for z in self.qkv(x).split(d, dim=-1)
        )
        if rope is not None:
            q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        out: Tensor = self.proj(y.transpose(1, 2).reshape(b, t, d))
        return out


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        width = 2 * config.d_ff if self.swiglu else config.d_ff
        self.fc = nn.Linear(config.d_model, width, bias=config.bias)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        h: Tensor = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        out: Tensor = self.proj(h)
        return out


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = _norm(config)
        self.attn = Attention(config)
        self.norm2 = _norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope))
        out: Tensor = x + self.drop(self.mlp(self.norm2(x)))
        return out


class GPT(nn.Module):
    """Decoder-only language model; ``forward(input_ids, targets)`` returns the mean loss."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = (
            nn.Embedding(config.max_seq_len, config.d_model)
            if config.positions == "learned"
            else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = _norm(config)

    def logits(self, input_ids: Tensor) -> Tensor:
        """Next-token logits of shape (batch, seq, vocab)."""
        _, t = input_ids.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len {self.config.max_seq_len}")
        x = self.tok_emb(input_ids)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(t, device=input_ids.device))
        else:
            rope = _rope(t, self.config.head_dim, self.config.rope_theta, input_ids.device)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope)
        return F.linear(self.norm(x), self.tok_emb.weight)

    def forward(self, input_ids: Tensor, targets: Tensor) -> Tensor:
        logits = self.logits(input_ids)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def init_weights(model: GPT, seed: int) -> None:
    """GPT-2 style init from a private generator: N(0, std), residual outputs scaled by
    1/sqrt(2L), biases zero, norm gains one. Independent of the global RNG and device."""
    config = model.config
    gen = torch.Generator(device="cpu").manual_seed(seed)
    residual_std = config.init_std / math.sqrt(2 * config.n_layers)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.ndim == 1:
            param.fill_(1.0)
        else:
            std = (
                residual_std
                if name.endswith(("attn.proj.weight", "mlp.proj.weight"))
                else (config.init_std)
            )
            param.copy_(torch.empty(param.shape).normal_(0.0, std, generator=gen))


def build_gpt(config: GPTConfig, *, seed: int = 0, device: torch.device | str = "cpu") -> GPT:
    """Allocate on ``device`` without a throw-away default init, then init from ``seed``."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    init_weights(model, seed)
    return model
