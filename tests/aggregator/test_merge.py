"""The streaming aggregator on a real filesystem store, against a NumPy reference."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tapestry_aggregator.merge import MAX_DELTA_NORM, aggregate_round
from tapestry_aggregator.strategy import Strategy, compute_weights
from tapestry_protocol import documents, rejections
from tapestry_protocol.documents import (
    ModelManifest,
    Outcome,
    ReceiptState,
    RoundPlan,
    RoundResult,
)
from tapestry_protocol.exchange import (
    Verified,
    load_tensors,
    publish_update,
    read_model,
    read_result,
)
from tapestry_protocol.jsonsafe import MAX_DOCUMENT_BYTES
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.shards import FloatArray
from tapestry_protocol.store.filesystem import FilesystemStore
from tests.protocol.federation import Federation, make_federation

PEOPLE = ("alice", "bob", "carol")


def _fed(tmp_path: Path, min_participants: int = 1) -> Federation:
    store = FilesystemStore(tmp_path / "store", create=True)
    return make_federation(store, participants=PEOPLE, min_participants=min_participants)


def _submit(
    fed: Federation,
    round_number: int,
    plan: Verified[RoundPlan],
    base: Verified[ModelManifest],
    tokens: dict[str, int],
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


def _norm(delta: dict[str, FloatArray]) -> float:
    return float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in delta.values())))


def _next_base(fed: Federation, result: Verified[RoundResult]) -> Verified[ModelManifest]:
    ref = result.document.next_base
    assert ref is not None
    return read_model(
        fed.store, fed.layout, ref.manifest, fed.coordinator.public_key_text,
        expected_sha256=ref.sha256,
    )  # fmt: skip


def _merged(fed: Federation, result: Verified[RoundResult]) -> dict[str, FloatArray]:
    return load_tensors(fed.store, _next_base(fed, result))


def _reasons(result: Verified[RoundResult]) -> dict[str, str]:
    return {r.participant: r.reason for r in result.document.rejected}


def _accepted(result: Verified[RoundResult]) -> list[str]:
    return [a.participant for a in result.document.accepted]


@pytest.mark.parametrize("optimizer", ["fedavg", "diloco", "fedadam"])
def test_two_rounds_match_the_numpy_reference(tmp_path: Path, optimizer: str) -> None:
    fed = _fed(tmp_path)
    strategy = Strategy(optimizer, max_share=0.5)
    plan, base = fed.plan, fed.base
    expected = {n: v.astype(np.float64) for n, v in fed.tensors.items()}
    state: dict[str, dict[str, Any]] = {}
    for r in range(2):
        tokens = {"alice": 1000, "bob": 3000, "carol": 500 + r}
        deltas = _submit(fed, r, plan, base, tokens)
        result = fed.aggregate(r, strategy)
        assert result.document.outcome == Outcome.SUCCEEDED
        assert max(a.weight for a in result.document.accepted) <= 0.5 + 1e-9
        for a in result.document.accepted:
            assert a.tokens == tokens[a.participant]
            assert a.delta_norm == pytest.approx(_norm(deltas[a.participant]), rel=1e-5)
        expected = _reference(
            {n: v.astype(np.float64) for n, v in expected.items()}, deltas, tokens, strategy, state
        )
        base = _next_base(fed, result)
        merged = load_tensors(fed.store, base)
        for name, value in expected.items():
            np.testing.assert_allclose(merged[name], value, rtol=1e-5, atol=1e-6)
        if optimizer == "fedavg":
            assert result.document.optimizer_state is None
        else:
            assert result.document.optimizer_state is not None
        plan = fed.plan_round(r + 1, base, min_participants=2)


def test_results_carry_no_timestamps_or_timings(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    _submit(fed, 0, fed.plan, fed.base, {"alice": 10, "bob": 20})
    result = fed.aggregate(0, Strategy())
    stored = json.loads(fed.store.get(result.key))
    assert "createdAt" not in stored and "seconds" not in stored["metrics"]
    assert "createdAt" not in json.loads(fed.store.get(_next_base(fed, result).key))
    assert result.document.metrics["participants"] == 2
    assert result.document.metrics["tokens"] == 30
    assert result.document.close_sha256 == fed.close().sha256
    assert read_result(fed.store, fed.layout, 0, fed.coordinator.public_key_text) == result


def test_aggregating_an_unclosed_round_is_refused(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    _submit(fed, 0, fed.plan, fed.base, {"alice": 10, "bob": 20})
    with pytest.raises(Rejected) as e:
        aggregate_round(fed.store, fed.layout, 0, fed.coordinator, Strategy())
    assert e.value.reason == rejections.NOT_CLOSED
    assert not fed.store.exists(fed.layout.result(0))
    assert not list(fed.store.list(fed.layout.base_dir(1)))


def test_reaggregation_is_byte_identical(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    _submit(fed, 0, fed.plan, fed.base, {"alice": 10, "bob": 20, "carol": 30})
    first = fed.aggregate(0, Strategy())
    assert aggregate_round(fed.store, fed.layout, 0, fed.coordinator, Strategy()) == first
    stored = fed.store.get(first.key)
    base_dir = fed.layout.base_dir(1)
    before = {i.key: fed.store.get(i.key) for i in fed.store.list(base_dir)}
    fed.store.delete(fed.layout.result(0))  # as if the coordinator crashed before the result
    second = aggregate_round(fed.store, fed.layout, 0, fed.coordinator, Strategy())
    after = {i.key: fed.store.get(i.key) for i in fed.store.list(base_dir)}
    assert before == after
    assert second.document.next_base == first.document.next_base
    assert second == first and fed.store.get(second.key) == stored


def test_a_late_update_after_a_crash_does_not_wedge_the_rerun(tmp_path: Path) -> None:
    """The crash left the next base committed but no result; an update that lands before
    the re-run is not in the close record, so the re-run writes the same bytes (it used
    to merge the newcomer and collide with the committed base: ObjectExists)."""
    fed = _fed(tmp_path)
    _submit(fed, 0, fed.plan, fed.base, {"alice": 10, "bob": 20})
    first = fed.aggregate(0, Strategy("diloco"))
    stored = fed.store.get(first.key)
    assert isinstance(fed.store, FilesystemStore)
    (fed.store.root / fed.layout.result(0)).unlink()  # only the result file is gone
    assert fed.store.exists(fed.layout.base_manifest(1))
    fed.publish("carol", fed.delta(seed=9), tokens=1000)  # late, and would change the merge
    second = fed.aggregate(0, Strategy("diloco"))
    assert fed.store.get(second.key) == stored
    assert second == first
    assert _accepted(second) == ["alice", "bob"]
    assert _reasons(second) == {"carol": rejections.LATE}


def test_the_merge_uses_exactly_the_closed_set(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    deltas = _submit(fed, 0, fed.plan, fed.base, {"alice": 10})
    close = fed.close()
    fed.publish("bob", fed.delta(seed=5), tokens=10)  # committed after the close
    result = aggregate_round(fed.store, fed.layout, 0, fed.coordinator, Strategy("fedavg"))
    assert result.document.outcome == Outcome.SUCCEEDED
    assert result.document.close_sha256 == close.sha256
    assert _accepted(result) == ["alice"]
    assert _reasons(result) == {"bob": rejections.LATE, "carol": rejections.LATE}
    merged = _merged(fed, result)
    for name, value in fed.tensors.items():
        np.testing.assert_allclose(merged[name], value - deltas["alice"][name], rtol=1e-6)


def test_an_included_update_replaced_after_the_close_is_refused(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    _submit(fed, 0, fed.plan, fed.base, {"alice": 10, "bob": 20})
    fed.close()
    key = fed.layout.update_manifest(0, "bob")
    doc = json.loads(fed.store.get(key))
    doc["tokens"] = 30  # bob re-signs a different manifest after the close
    fed.store.delete(key)
    fed.store.put(key, documents.encode(fed.participants["bob"].sign(doc)))
    result = aggregate_round(fed.store, fed.layout, 0, fed.coordinator, Strategy("fedavg"))
    assert _accepted(result) == ["alice"]
    assert _reasons(result)["bob"] == rejections.HASH_MISMATCH


def test_racing_aggregators_publish_one_result(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    _submit(fed, 0, fed.plan, fed.base, {"alice": 10, "bob": 20, "carol": 30})
    results: list[Verified[RoundResult]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:  # each closes the round too: the same record, or the first one, stands
            results.append(fed.aggregate(0, Strategy()))
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


def _rewrite(fed: Federation, key: str, data: bytes) -> None:
    fed.store.delete(key)
    fed.store.put(key, data)


def _corrupt_first_shard(fed: Federation, who: str) -> None:
    prefix = fed.layout.update_dir(0, who)
    key = next(i.key for i in fed.store.list(prefix) if "part-00000" in i.key)
    data = bytearray(fed.store.get(key))
    data[-1] ^= 1
    _rewrite(fed, key, bytes(data))


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
    result = fed.aggregate(0, Strategy("fedavg"))
    doc = result.document
    assert doc.outcome == Outcome.SUCCEEDED
    assert _accepted(result) == ["carol"]
    assert _reasons(result) == {"alice": rejections.HASH_MISMATCH, "bob": rejections.NON_FINITE}
    merged = _merged(fed, result)
    for name, value in fed.tensors.items():
        np.testing.assert_allclose(merged[name], value - deltas["carol"][name], rtol=1e-6)


def test_a_long_refusal_message_still_gives_a_result(tmp_path: Path) -> None:
    """A refusal quotes what was wrong; one participant's long string must not make the
    result too big for its schema (every re-run would fail the same way)."""
    fed = _fed(tmp_path)
    alice = fed.publish("alice", fed.delta(seed=1))
    fed.publish("bob", fed.delta(seed=2))
    doc = json.loads(fed.store.get(alice.key))
    doc["metrics"]["note"] = "x" * 20_000  # longer than a metric may be
    _rewrite(fed, alice.key, documents.encode(fed.participants["alice"].sign(doc)))
    result = fed.aggregate(0, Strategy("fedavg"))
    assert result.document.outcome == Outcome.SUCCEEDED
    assert _accepted(result) == ["bob"]
    assert _reasons(result) == {"alice": rejections.MALFORMED_DOCUMENT, "carol": rejections.LATE}
    refusal = next(r for r in result.document.rejected if r.participant == "alice")
    assert "metrics.note" in refusal.message and len(refusal.message) == 4096


def test_an_extreme_train_loss_cannot_break_the_result(tmp_path: Path) -> None:
    """The largest trainLoss an update may carry; the weighted mean must stay in range
    (0.043 * 1e300 / 0.043 rounds to just above 1e300)."""
    fed = _fed(tmp_path)
    assert compute_weights({"alice": 43, "bob": 957})["alice"] == 0.043
    fed.publish("alice", fed.delta(seed=1), tokens=43, metrics={"trainLoss": 1e300})
    fed.publish("bob", fed.delta(seed=2), tokens=957, metrics={"trainLoss": "n/a"})
    result = fed.aggregate(0, Strategy("fedavg"))
    assert result.document.outcome == Outcome.SUCCEEDED
    assert result.document.metrics["trainLoss"] == 1e300


def _in_shard(fed: Federation, index: int) -> str:
    """A tensor stored in shard `index` of the base (and of every delta)."""
    return fed.base.document.groups[index][0]


def test_refusals_name_the_shard_object(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    nan = fed.delta(seed=1)
    nan[_in_shard(fed, 1)].reshape(-1)[0] = np.inf
    fed.publish("alice", nan)
    fed.publish("bob", fed.delta(seed=2))
    result = fed.aggregate(0, Strategy("fedavg"))
    refusal = next(r for r in result.document.rejected if r.participant == "alice")
    assert refusal.reason == rejections.NON_FINITE
    assert fed.layout.update_dir(0, "alice") + "part-00001-" in refusal.message
    assert _in_shard(fed, 1) in refusal.message


def test_a_huge_finite_delta_is_refused_and_the_result_stays_signable(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    huge = {n: np.full_like(v, 1e30) for n, v in fed.delta(seed=1).items()}
    assert all(np.isfinite(v).all() for v in huge.values())
    fed.publish("alice", huge, tokens=10**6)
    kept = fed.delta(seed=2)
    fed.publish("bob", kept, tokens=10)
    result = fed.aggregate(0, Strategy("diloco"))
    assert result.document.outcome == Outcome.SUCCEEDED
    assert _accepted(result) == ["bob"]
    refusal = result.document.rejected[0]
    assert (refusal.participant, refusal.reason) == ("alice", rejections.DELTA_TOO_LARGE)
    assert "part-00000-" in refusal.message and f"{MAX_DELTA_NORM:g}" in refusal.message
    (bob,) = result.document.accepted
    assert bob.weight == 1.0 and np.isfinite(bob.delta_norm)
    again = read_result(fed.store, fed.layout, 0, fed.coordinator.public_key_text)
    assert again == result
    merged = _merged(fed, result)
    assert all(np.isfinite(v).all() for v in merged.values())


def test_an_oversized_manifest_is_refused_without_reading_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = _fed(tmp_path)
    fed.publish("bob", fed.delta(seed=2), tokens=10)
    key = fed.layout.update_manifest(0, "alice")
    fed.store.put(key, b"{" + b" " * (MAX_DOCUMENT_BYTES + 10) + b"}")
    reads: list[int | None] = []
    get = fed.store.get

    def recording_get(k: str, *, offset: int = 0, length: int | None = None) -> bytes:
        if k == key:
            reads.append(length)
        return get(k, offset=offset, length=length)

    monkeypatch.setattr(fed.store, "get", recording_get)
    result = fed.aggregate(0, Strategy("fedavg"))
    assert result.document.outcome == Outcome.SUCCEEDED and _accepted(result) == ["bob"]
    refusal = result.document.rejected[0]
    assert (refusal.participant, refusal.reason) == ("alice", rejections.MALFORMED_DOCUMENT)
    assert "larger than the 16 MiB" in refusal.message
    assert reads and all(n == MAX_DOCUMENT_BYTES + 1 for n in reads)  # never the whole object


def test_quorum_not_met_fails_the_round_with_reasons(tmp_path: Path) -> None:
    fed = _fed(tmp_path, min_participants=2)
    _submit(fed, 0, fed.plan, fed.base, {"alice": 10})
    fed.receipt("bob", ReceiptState.FAILED, "Crashed", "exit code 1")
    result = fed.aggregate(0, Strategy())
    doc = result.document
    assert doc.outcome == Outcome.FAILED and doc.next_base is None
    assert doc.optimizer_state is None and doc.accepted == ()
    assert "quorum of 2" in doc.message
    assert _reasons(result) == {
        "alice": rejections.NO_QUORUM,  # valid, but not merged
        "bob": rejections.TRAINING_FAILED,
        "carol": rejections.LATE,
    }
    messages = {r.participant: r.message for r in doc.rejected}
    assert "exit code 1" in messages["bob"]
    assert fed.layout.update_dir(0, "alice") in messages["alice"]
    assert not list(fed.store.list(fed.layout.base_dir(1)))
    assert read_result(fed.store, fed.layout, 0, fed.coordinator.public_key_text) == result


def test_a_quorum_lost_mid_stream_lists_the_unmerged_updates(tmp_path: Path) -> None:
    fed = _fed(tmp_path, min_participants=2)
    _submit(fed, 0, fed.plan, fed.base, {"alice": 10, "carol": 30})
    nan = fed.delta(seed=7)
    nan[_in_shard(fed, 2)].reshape(-1)[-1] = np.nan
    fed.publish("bob", nan, tokens=20)
    result = fed.aggregate(0, Strategy())
    assert result.document.outcome == Outcome.SUCCEEDED  # two remain: the quorum holds
    assert _accepted(result) == ["alice", "carol"]
    fed2 = _fed(tmp_path / "two", min_participants=3)
    _submit(fed2, 0, fed2.plan, fed2.base, {"alice": 10, "carol": 30})
    fed2.publish("bob", nan, tokens=20)
    failed = fed2.aggregate(0, Strategy())
    assert failed.document.outcome == Outcome.FAILED
    assert _reasons(failed) == {
        "alice": rejections.NO_QUORUM,
        "bob": rejections.NON_FINITE,
        "carol": rejections.NO_QUORUM,
    }
    # Shards of the abandoned pass may remain, but nothing is committed.
    assert not fed2.store.exists(fed2.layout.base_manifest(1))
    assert not fed2.store.exists(fed2.layout.optimizer_manifest(1))


# --- the optimizer-state chain ---------------------------------------------------------


def _two_rounds(
    tmp_path: Path, first: Strategy
) -> tuple[Federation, Verified[ModelManifest], dict[str, dict[str, FloatArray]]]:
    """Round 0 aggregated with `first`; round 1 planned, updated and closed."""
    fed = _fed(tmp_path)
    _submit(fed, 0, fed.plan, fed.base, {"alice": 10, "bob": 20})
    result = fed.aggregate(0, first)
    base = _next_base(fed, result)
    plan = fed.plan_round(1, base)
    deltas = _submit(fed, 1, plan, base, {"alice": 10, "bob": 20})
    fed.close(1)
    return fed, base, deltas


def _refused(fed: Federation, strategy: Strategy) -> Rejected:
    with pytest.raises(Rejected) as e:
        aggregate_round(fed.store, fed.layout, 1, fed.coordinator, strategy)
    assert not fed.store.exists(fed.layout.result(1))
    return e.value


def test_a_missing_optimizer_state_fails_the_aggregation(tmp_path: Path) -> None:
    fed, _, _ = _two_rounds(tmp_path, Strategy("diloco"))
    for info in list(fed.store.list(fed.layout.optimizer_dir(1))):
        fed.store.delete(info.key)
    error = _refused(fed, Strategy("diloco"))
    assert error.reason == rejections.MISSING_OPTIMIZER_STATE
    assert fed.layout.optimizer_manifest(1) in error.message


def test_a_tampered_optimizer_state_fails_the_aggregation(tmp_path: Path) -> None:
    fed, _, _ = _two_rounds(tmp_path, Strategy("diloco"))
    key = fed.layout.optimizer_manifest(1)
    doc = json.loads(fed.store.get(key))
    doc["metadata"]["round"] = 7
    _rewrite(fed, key, documents.encode(doc))  # the signature no longer holds
    assert _refused(fed, Strategy("diloco")).reason == rejections.MISSING_OPTIMIZER_STATE
    # Re-signed by the coordinator, it still is not the state round 0's result names.
    _rewrite(fed, key, documents.encode(fed.coordinator.sign(doc)))
    assert _refused(fed, Strategy("diloco")).reason == rejections.MISSING_OPTIMIZER_STATE


def test_a_missing_previous_result_fails_a_stateful_aggregation(tmp_path: Path) -> None:
    fed, _, _ = _two_rounds(tmp_path, Strategy("diloco"))
    fed.store.delete(fed.layout.result(0))
    assert _refused(fed, Strategy("diloco")).reason == rejections.MISSING_OPTIMIZER_STATE
    # FedAvg keeps no state and needs no chain.
    result = aggregate_round(fed.store, fed.layout, 1, fed.coordinator, Strategy("fedavg"))
    assert result.document.outcome == Outcome.SUCCEEDED


def test_a_corrupt_optimizer_shard_fails_the_aggregation(tmp_path: Path) -> None:
    fed, _, _ = _two_rounds(tmp_path, Strategy("diloco"))
    directory = fed.layout.optimizer_dir(1)
    key = next(i.key for i in fed.store.list(directory) if "part-00001-" in i.key)
    data = bytearray(fed.store.get(key))
    data[-1] ^= 1
    _rewrite(fed, key, bytes(data))
    with pytest.raises(Rejected) as e:
        aggregate_round(fed.store, fed.layout, 1, fed.coordinator, Strategy("diloco"))
    assert e.value.reason == rejections.HASH_MISMATCH and "part-00001-" in e.value.message
    assert not fed.store.exists(fed.layout.result(1))


def test_the_state_carries_over_and_switching_optimizer_starts_fresh(tmp_path: Path) -> None:
    fed, base, deltas = _two_rounds(tmp_path, Strategy("diloco"))
    before = load_tensors(fed.store, base)
    # Switching optimizer never reads the old state: deleting it changes nothing.
    for info in list(fed.store.list(fed.layout.optimizer_dir(1))):
        fed.store.delete(info.key)
    adam = Strategy("fedadam")
    result = aggregate_round(fed.store, fed.layout, 1, fed.coordinator, adam)
    assert result.document.outcome == Outcome.SUCCEEDED
    expected = _reference(
        {n: v.astype(np.float64) for n, v in before.items()}, deltas,
        {"alice": 10, "bob": 20}, adam, {},
    )  # fmt: skip
    merged = _merged(fed, result)
    for name, value in expected.items():
        np.testing.assert_allclose(merged[name], value, rtol=1e-5, atol=1e-6)
