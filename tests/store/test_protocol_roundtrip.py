"""A multi-shard model and a signed update through every backend, byte for byte."""

from __future__ import annotations

import numpy as np

from tapestry_aggregator.strategy import Strategy
from tapestry_protocol.documents import Outcome
from tapestry_protocol.exchange import (
    decode_shard,
    fetch_shard,
    load_tensors,
    publish_update,
    read_model,
    read_plan,
    read_plan_base,
    read_update,
)
from tapestry_protocol.store import ObjectStore
from tests.protocol.federation import make_federation


def test_model_and_update_round_trip_exactly(store: ObjectStore) -> None:
    fed = make_federation(store)
    key = fed.coordinator.public_key_text
    plan = read_plan(store, fed.layout, 0, key)
    base = read_plan_base(store, fed.layout, plan, key)
    assert len(base.document.shards) >= 3
    for ref in base.document.shards:  # the stored bytes are exactly what the manifest pins
        assert len(fetch_shard(store, base.directory, ref)) == ref.size
    loaded = load_tensors(store, base)
    for name, value in fed.tensors.items():
        assert loaded[name].tobytes() == value.tobytes()

    delta = fed.delta(seed=5)
    publish_update(
        store, fed.layout, plan, base, delta, fed.participants["alice"], tokens=10, metrics={}
    )
    update = read_update(store, fed.layout, plan, base, "alice")
    for ref in update.document.shards:
        decoded = decode_shard(fetch_shard(store, update.directory, ref), ref, "fp32", ref.name)
        for name, value in decoded.items():
            assert value.tobytes() == delta[name].tobytes()

    close = fed.close(0)
    assert [i.participant for i in close.document.included] == ["alice"]
    result = fed.aggregate(0, Strategy("fedavg"))
    assert result.document.outcome == Outcome.SUCCEEDED
    assert result.document.close_sha256 == close.sha256
    next_base = result.document.next_base
    assert next_base is not None
    merged = load_tensors(store, read_model(store, fed.layout, next_base.manifest, key))
    for name, value in fed.tensors.items():
        np.testing.assert_array_equal(merged[name], value - delta[name])
