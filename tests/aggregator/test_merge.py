"""The streaming aggregator on a real filesystem store, against a NumPy reference."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tapestry_aggregator.merge import aggregate_round
from tapestry_aggregator.strategy import Strategy, compute_weights
from tapestry_protocol import rejections
from tapestry_protocol.exchange import (
    Verified,
    load_tensors,
    publish_update,
    read_model,
)
from tapestry_protocol.shards import FloatArray
from tapestry_protocol.store.filesystem import FilesystemStore
from tests.protocol.federation import Federation, make_federation

PEOPLE = ("alice", "bob", "carol")


def _fed(tmp_path: Path, min_participants: int = 1) -> Federation:
    store = FilesystemStore(tmp_path / "store", create=True)
    return make_federation(store, participants=PEOPLE, min_participants=min_participants)


def _submit(
    fed: Federation, round_number: int, plan: Verified, base: Verified, tokens: dict[str, int]
) -> dict[str, dict[str, FloatArray]]:
    deltas = {}
    for i, who in enumerate(sorted(tokens)):
        deltas[who] = fed.delta(scale=0.1, seed=100 * round_number + i)
        publish_update(
            fed.store,
            fed.layout,
            plan,
            base,
            deltas[who],
            fed.participants[who],
            tokens=tokens[who],
            metrics={"trainLoss": 1.0 + i},
        )
    return deltas


def _reference(
    base: dict[str, FloatArray],
    deltas: dict[str, dict[str, FloatArray]],
    tokens: dict[str, int],
    strategy: Strategy,
    state: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The plain way: every delta in memory, float64 math."""
    weights = compute_weights(tokens, strategy.weighting, strategy.max_share)
    out: dict[str, Any] = {}
    for name, value in base.items():
        g = sum(weights[p] * deltas[p][name].astype(np.float64) for p in deltas)
        s = state.setdefault(name, {})
        if strategy.optimizer == "fedavg":
            out[name] = value - strategy.lr * g
        elif strategy.optimizer == "diloco":
            s["m"] = strategy.momentum * s.get("m", 0.0) + g
            out[name] = value - strategy.lr * (g + strategy.momentum * s["m"])
        else:
            s["m"] = strategy.beta1 * s.get("m", 0.0) + (1 - strategy.beta1) * g
            s["v"] = strategy.beta2 * s.get("v", 0.0) + (1 - strategy.beta2) * g * g
            out[name] = value - strategy.lr * s["m"] / (np.sqrt(s["v"]) + strategy.tau)
    return out


@pytest.mark.parametrize("optimizer", ["fedavg", "diloco", "fedadam"])
def test_two_rounds_match_the_numpy_reference(tmp_path: Path, optimizer: str) -> None:
    fed = _fed(tmp_path)
    strategy = Strategy(optimizer, max_share=0.5)
    key = fed.coordinator.public_key_text
    plan, base = fed.plan, fed.base
    expected = {n: v.astype(np.float64) for n, v in fed.tensors.items()}
    state: dict[str, dict[str, Any]] = {}
    for r in range(2):
        tokens = {"alice": 1000, "bob": 3000, "carol": 500 + r}
        deltas = _submit(fed, r, plan, base, tokens)
        result = aggregate_round(fed.store, fed.layout, r, fed.coordinator, strategy)
        assert result.document["outcome"] == "Succeeded"
        assert max(a["weight"] for a in result.document["accepted"]) <= 0.5 + 1e-9
        expected = _reference(
            {n: v.astype(np.float64) for n, v in expected.items()}, deltas, tokens, strategy, state
        )
        base = read_model(fed.store, fed.layout, result.document["nextBase"]["manifest"], key)
        merged = load_tensors(fed.store, base)
        for name, value in expected.items():
            np.testing.assert_allclose(merged[name], value, rtol=1e-5, atol=1e-6)
        if optimizer == "fedavg":
            assert result.document["optimizerState"] is None
        else:
            assert result.document["optimizerState"] is not None
        plan = fed.plan_round(r + 1, base, min_participants=2)


def test_reaggregation_is_byte_identical(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    _submit(fed, 0, fed.plan, fed.base, {"alice": 10, "bob": 20, "carol": 30})
    first = aggregate_round(fed.store, fed.layout, 0, fed.coordinator, Strategy())
    assert aggregate_round(fed.store, fed.layout, 0, fed.coordinator, Strategy()) == first
    base_dir = fed.layout.base_dir(1)
    before = {i.key: fed.store.get(i.key) for i in fed.store.list(base_dir)}
    fed.store.delete(fed.layout.result(0))  # as if the coordinator crashed before the result
    second = aggregate_round(fed.store, fed.layout, 0, fed.coordinator, Strategy())
    after = {i.key: fed.store.get(i.key) for i in fed.store.list(base_dir)}
    assert before == after
    assert second.document["nextBase"] == first.document["nextBase"]


def test_racing_aggregators_publish_one_result(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    _submit(fed, 0, fed.plan, fed.base, {"alice": 10, "bob": 20, "carol": 30})
    results: list[Verified] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(aggregate_round(fed.store, fed.layout, 0, fed.coordinator, Strategy()))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.sha256 for r in results}) == 1
    assert [i.key for i in fed.store.list(fed.layout.round_prefix(0)) if "result" in i.key] == [
        fed.layout.result(0)
    ]


def _corrupt_first_shard(fed: Federation, who: str) -> None:
    prefix = fed.layout.update_dir(0, who)
    key = next(i.key for i in fed.store.list(prefix) if "part-00000" in i.key)
    data = bytearray(fed.store.get(key))
    data[-1] ^= 1
    fed.store.delete(key)
    fed.store.put(key, bytes(data))


def test_bad_deltas_are_rejected_and_the_round_goes_on(tmp_path: Path) -> None:
    fed = _fed(tmp_path, min_participants=1)
    tokens = {"alice": 10, "bob": 20, "carol": 30}
    deltas = _submit(fed, 0, fed.plan, fed.base, {"alice": 10})
    _corrupt_first_shard(fed, "alice")
    nan = fed.delta(seed=7)
    nan[sorted(nan)[-1]][0] = np.nan  # in the last shard: found mid-stream
    publish_update(
        fed.store,
        fed.layout,
        fed.plan,
        fed.base,
        nan,
        fed.participants["bob"],
        tokens=tokens["bob"],
        metrics={},
    )
    deltas["carol"] = fed.delta(seed=9)
    publish_update(
        fed.store,
        fed.layout,
        fed.plan,
        fed.base,
        deltas["carol"],
        fed.participants["carol"],
        tokens=30,
        metrics={},
    )
    result = aggregate_round(fed.store, fed.layout, 0, fed.coordinator, Strategy("fedavg"))
    doc = result.document
    assert doc["outcome"] == "Succeeded"
    assert [a["participant"] for a in doc["accepted"]] == ["carol"]
    reasons = {r["participant"]: r["reason"] for r in doc["rejected"]}
    assert reasons == {"alice": rejections.HASH_MISMATCH, "bob": rejections.NON_FINITE}
    merged = load_tensors(
        fed.store,
        read_model(
            fed.store, fed.layout, doc["nextBase"]["manifest"], fed.coordinator.public_key_text
        ),
    )
    for name, value in fed.tensors.items():
        np.testing.assert_allclose(merged[name], value - deltas["carol"][name], rtol=1e-6)


def test_quorum_not_met_fails_the_round_with_reasons(tmp_path: Path) -> None:
    fed = _fed(tmp_path, min_participants=2)
    _submit(fed, 0, fed.plan, fed.base, {"alice": 10})
    result = aggregate_round(
        fed.store, fed.layout, 0, fed.coordinator, Strategy(), failed={"bob": "exit code 1"}
    )
    doc = result.document
    assert doc["outcome"] == "Failed" and doc["nextBase"] is None
    assert "quorum of 2" in doc["message"]
    reasons = {r["participant"]: r["reason"] for r in doc["rejected"]}
    assert reasons == {"bob": rejections.TRAINING_FAILED, "carol": rejections.MISSING_MANIFEST}
    assert not list(fed.store.list(fed.layout.base_dir(1)))
