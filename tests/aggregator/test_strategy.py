"""Weights and outer optimizers against float64 NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

from tapestry_aggregator.strategy import Strategy, compute_weights, outer_step
from tapestry_protocol.shards import FloatArray


def test_token_weights_are_proportional() -> None:
    assert compute_weights({"a": 100, "b": 300}) == {"a": 0.25, "b": 0.75}


def test_equal_weights() -> None:
    assert compute_weights({"a": 1, "b": 1000}, "equal") == {"a": 0.5, "b": 0.5}


def test_cap_redistributes_the_excess_proportionally() -> None:
    weights = compute_weights({"big": 800, "a": 100, "b": 100}, max_share=0.5)
    assert weights["big"] == pytest.approx(0.5)
    assert weights["a"] == pytest.approx(0.25) and weights["b"] == pytest.approx(0.25)
    assert sum(weights.values()) == pytest.approx(1.0)


def test_cap_cascades_when_redistribution_overflows() -> None:
    weights = compute_weights({"a": 600, "b": 300, "c": 60, "d": 40}, max_share=0.3)
    assert weights["a"] == pytest.approx(0.3) and weights["b"] == pytest.approx(0.3)
    assert weights["c"] == pytest.approx(0.4 * 0.6) and weights["d"] == pytest.approx(0.4 * 0.4)
    assert max(weights.values()) <= 0.3 + 1e-12


def test_infeasible_cap_means_equal_shares() -> None:
    assert compute_weights({"a": 9, "b": 1}, max_share=0.4) == {"a": 0.5, "b": 0.5}


def test_no_participants_no_weights() -> None:
    assert compute_weights({}) == {}


def test_fedavg_with_lr_one_is_the_average_of_the_locals() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal(50).astype(np.float32)
    locals_ = [base - rng.standard_normal(50).astype(np.float32) for _ in range(3)]
    grad = np.mean([base - loc for loc in locals_], axis=0).astype(np.float32)
    new, state = outer_step(Strategy("fedavg"), base, grad, {})
    np.testing.assert_allclose(new, np.mean(locals_, axis=0), rtol=1e-5, atol=1e-6)
    assert state == {}


def test_diloco_matches_torch_style_nesterov_reference() -> None:
    rng = np.random.default_rng(1)
    strategy = Strategy("diloco")
    param = rng.standard_normal(20)
    buf = np.zeros(20)
    p32 = param.astype(np.float32)
    state: dict[str, FloatArray] = {}
    for _ in range(3):
        g = rng.standard_normal(20)
        buf = 0.9 * buf + g
        param = param - 0.7 * (g + 0.9 * buf)
        p32, state = outer_step(strategy, p32, g.astype(np.float32), state)
    np.testing.assert_allclose(p32, param, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state["momentum"], buf, rtol=1e-5, atol=1e-5)


def test_fedadam_matches_reference() -> None:
    rng = np.random.default_rng(2)
    strategy = Strategy("fedadam", learning_rate=0.05)
    param, m, v = rng.standard_normal(10), np.zeros(10), np.zeros(10)
    p32 = param.astype(np.float32)
    state: dict[str, FloatArray] = {}
    for _ in range(2):
        g = rng.standard_normal(10)
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        param = param - 0.05 * m / (np.sqrt(v) + 1e-3)
        p32, state = outer_step(strategy, p32, g.astype(np.float32), state)
    np.testing.assert_allclose(p32, param, rtol=1e-5, atol=1e-5)


def test_strategy_validation_and_json() -> None:
    with pytest.raises(ValueError, match="unknown outer optimizer"):
        Strategy("sgd")
    with pytest.raises(ValueError, match="max_share"):
        Strategy(max_share=1.5)
    with pytest.raises(ValueError, match="unknown strategy fields"):
        Strategy.from_json({"optimiser": "fedavg"})
    s = Strategy("diloco", max_share=0.5)
    assert Strategy.from_json(s.to_json()) == Strategy("diloco", learning_rate=0.7, max_share=0.5)
