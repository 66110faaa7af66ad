"""The built-in GPT: deterministic init, the loss contract, causality, variants."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from tapestry_trainer.model import build_gpt  # noqa: E402
from tapestry_trainer.specs import PRESETS  # noqa: E402

pytestmark = pytest.mark.torch

TINY = replace(PRESETS["tiny"], n_layers=2, max_seq_len=32)


def test_init_is_deterministic_and_independent_of_global_rng() -> None:
    torch.manual_seed(123)
    a = build_gpt(TINY, seed=5).state_dict()
    torch.manual_seed(456)
    b = build_gpt(TINY, seed=5).state_dict()
    c = build_gpt(TINY, seed=6).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tok_emb.weight"], c["tok_emb.weight"])


def test_stable_parameter_names_and_tied_head() -> None:
    names = list(build_gpt(TINY).state_dict())
    assert names[:2] == ["tok_emb.weight", "pos_emb.weight"]
    assert "blocks.1.attn.qkv.weight" in names and "norm.weight" in names
    assert not any("head" in n for n in names)  # the output head is the embedding


def test_initial_loss_is_near_uniform() -> None:
    model = build_gpt(TINY)
    x = torch.randint(0, 258, (4, 33), generator=torch.Generator().manual_seed(0))
    loss = model(x[:, :-1], x[:, 1:])
    assert loss.ndim == 0
    assert abs(float(loss.detach()) - math.log(TINY.vocab_size)) < 0.1


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"positions": "rope", "mlp": "swiglu", "norm": "rmsnorm", "bias": True},
    ],
)
def test_attention_is_causal(variant: dict[str, object]) -> None:
    model = build_gpt(replace(TINY, **variant)).eval()  # type: ignore[arg-type]
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % 256
    with torch.no_grad():
        lx, ly = model.logits(x), model.logits(y)
    assert torch.allclose(lx[:, :12], ly[:, :12], atol=1e-6)
    assert not torch.allclose(lx[:, 12:], ly[:, 12:])


def test_backward_reaches_every_parameter_and_length_is_checked() -> None:
    model = build_gpt(replace(TINY, positions="rope", mlp="swiglu"))
    x = torch.randint(0, 256, (2, 17))
    model(x[:, :-1], x[:, 1:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="max_seq_len"):
        model.logits(torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long))
