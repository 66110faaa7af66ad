"""Publishing and verifying protocol objects with real files: every rejection reason."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tapestry_protocol import documents, rejections
from tapestry_protocol.exchange import (
    Verified,
    commit_document,
    decode_shard,
    fetch_shard,
    load_tensors,
    publish_plan,
    publish_update,
    read_plan,
    read_plan_base,
    read_update,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store import ObjectExists
from tests.protocol.federation import Federation, make_federation


def _publish(fed: Federation, who: str = "alice", seed: int = 0) -> Verified:
    return publish_update(
        fed.store,
        fed.layout,
        fed.plan,
        fed.base,
        fed.delta(seed=seed),
        fed.participants[who],
        tokens=1000,
        metrics={"trainLoss": 2.5},
    )


def _read(fed: Federation, who: str = "alice") -> Verified:
    return read_update(fed.store, fed.layout, fed.plan, fed.base, who)


def _reason(call: Callable[[], Any]) -> str:
    with pytest.raises(Rejected) as e:
        call()
    assert e.value.message
    return e.value.reason


def _rewrite_manifest(fed: Federation, who: str, document: dict[str, Any]) -> None:
    key = fed.layout.update_manifest(0, who)
    fed.store.delete(key)
    fed.store.put(key, documents.encode(document))


def test_base_round_trip_is_exact(fed: Federation) -> None:
    coordinator = fed.coordinator.public_key_text
    base = read_plan_base(
        fed.store, fed.layout, read_plan(fed.store, fed.layout, 0, coordinator), coordinator
    )
    assert base.sha256 == fed.base.sha256
    loaded = load_tensors(fed.store, base)
    assert sorted(loaded) == sorted(fed.tensors)
    for name, value in fed.tensors.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_update_round_trip_verifies(fed: Federation) -> None:
    published = _publish(fed)
    update = _read(fed)
    assert update.sha256 == published.sha256
    assert update.document["metrics"]["bytesUploaded"] == sum(s.size for s in update.shards)
    delta = fed.delta()
    for ref in update.shards:
        data = fetch_shard(fed.store, update.directory, ref)
        for name, value in decode_shard(data, ref, "fp32", ref.name).items():
            np.testing.assert_array_equal(value, delta[name])


def test_republishing_keeps_the_committed_update(fed: Federation) -> None:
    first = _publish(fed, seed=0)
    again = _publish(fed, seed=1)
    assert again.sha256 == first.sha256


def test_missing_manifest(fed: Federation) -> None:
    assert _reason(lambda: _read(fed)) == rejections.MISSING_MANIFEST


def test_unknown_schema_version(fed: Federation) -> None:
    doc = _publish(fed).document
    doc["schemaVersion"] = 2
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign(doc))
    assert _reason(lambda: _read(fed)) == rejections.UNKNOWN_SCHEMA_VERSION


def test_malformed_manifest_names_the_field(fed: Federation) -> None:
    doc = _publish(fed).document
    doc["tokens"] = -5
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign(doc))
    with pytest.raises(Rejected) as e:
        _read(fed)
    assert e.value.reason == rejections.MALFORMED_DOCUMENT
    assert "field tokens" in e.value.message


def test_unexpected_field_is_malformed(fed: Federation) -> None:
    doc = _publish(fed).document
    doc["bonus"] = 1
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign(doc))
    with pytest.raises(Rejected) as e:
        _read(fed)
    assert e.value.reason == rejections.MALFORMED_DOCUMENT and "bonus" in e.value.message


def test_not_json(fed: Federation) -> None:
    _publish(fed)
    key = fed.layout.update_manifest(0, "alice")
    fed.store.delete(key)
    fed.store.put(key, b"{truncated")
    assert _reason(lambda: _read(fed)) == rejections.MALFORMED_DOCUMENT


def test_missing_signature(fed: Federation) -> None:
    doc = _publish(fed).document
    del doc["signature"]
    _rewrite_manifest(fed, "alice", doc)
    assert _reason(lambda: _read(fed)) == rejections.MISSING_SIGNATURE


def test_forged_field_breaks_signature(fed: Federation) -> None:
    doc = _publish(fed).document
    doc["tokens"] = 10**9  # claim a bigger share
    _rewrite_manifest(fed, "alice", doc)
    assert _reason(lambda: _read(fed)) == rejections.BAD_SIGNATURE


def test_signed_by_someone_else(fed: Federation) -> None:
    doc = _publish(fed).document
    _rewrite_manifest(fed, "alice", SigningKey.generate("alice").sign(doc))
    assert _reason(lambda: _read(fed)) == rejections.BAD_SIGNATURE


def test_participant_not_in_plan(fed: Federation) -> None:
    assert _reason(lambda: _read(fed, "carol")) == rejections.UNKNOWN_SIGNER


def test_replay_under_another_name(fed: Federation) -> None:
    doc = _publish(fed, "alice").document
    fed.store.put(fed.layout.update_manifest(0, "bob"), documents.encode(doc))
    assert _reason(lambda: _read(fed, "bob")) == rejections.WRONG_PARTICIPANT


def test_replay_into_another_round(fed: Federation) -> None:
    doc = _publish(fed).document
    plan1 = fed.plan_round(1, fed.base)
    fed.store.put(fed.layout.update_manifest(1, "alice"), documents.encode(doc))
    reason = _reason(lambda: read_update(fed.store, fed.layout, plan1, fed.base, "alice"))
    assert reason == rejections.WRONG_ROUND


def test_replay_into_another_federation(fed: Federation) -> None:
    doc = _publish(fed).document
    other = Layout("other")
    plan = Verified(other.plan(0), {**fed.plan.document, "federation": "other"}, fed.plan.sha256)
    fed.store.put(other.update_manifest(0, "alice"), documents.encode(doc))
    reason = _reason(lambda: read_update(fed.store, other, plan, fed.base, "alice"))
    assert reason == rejections.WRONG_FEDERATION


def test_update_for_another_plan(fed: Federation) -> None:
    doc = _publish(fed).document
    doc["plan"] = {"sha256": "0" * 64}
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign(doc))
    assert _reason(lambda: _read(fed)) == rejections.WRONG_PLAN


def test_update_from_another_base(fed: Federation) -> None:
    doc = _publish(fed).document
    doc["base"] = {"sha256": "1" * 64}
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign(doc))
    assert _reason(lambda: _read(fed)) == rejections.WRONG_BASE


def test_missing_and_extra_shards_in_the_manifest(fed: Federation) -> None:
    doc = _publish(fed).document
    shards = doc["shards"]
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign({**doc, "shards": shards[:-1]}))
    assert _reason(lambda: _read(fed)) == rejections.MISSING_SHARD
    extra = [*shards, {**shards[-1], "name": f"part-{len(shards):05d}-{'a' * 16}.safetensors"}]
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign({**doc, "shards": extra}))
    assert _reason(lambda: _read(fed)) == rejections.EXTRA_SHARD


def test_shards_regrouped_differently_from_the_base(fed: Federation) -> None:
    doc = _publish(fed).document
    shards = [dict(s) for s in doc["shards"]]
    shards[0]["tensors"], shards[1]["tensors"] = shards[1]["tensors"], shards[0]["tensors"]
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign({**doc, "shards": shards}))
    assert _reason(lambda: _read(fed)) == rejections.TENSOR_MISMATCH


def _first_shard(fed: Federation) -> tuple[Verified, str]:
    _publish(fed)
    update = _read(fed)
    return update, update.directory + update.shards[0].name


def test_absent_shard_object(fed: Federation) -> None:
    update, key = _first_shard(fed)
    fed.store.delete(key)
    ref = update.shards[0]
    assert _reason(lambda: fetch_shard(fed.store, update.directory, ref)) == (
        rejections.MISSING_SHARD
    )


def test_truncated_shard(fed: Federation) -> None:
    update, key = _first_shard(fed)
    data = fed.store.get(key)
    fed.store.delete(key)
    fed.store.put(key, data[:-4])
    ref = update.shards[0]
    assert _reason(lambda: fetch_shard(fed.store, update.directory, ref)) == (
        rejections.SIZE_MISMATCH
    )


def test_corrupted_shard(fed: Federation) -> None:
    update, key = _first_shard(fed)
    data = bytearray(fed.store.get(key))
    data[-1] ^= 0xFF
    fed.store.delete(key)
    fed.store.put(key, bytes(data))
    ref = update.shards[0]
    assert _reason(lambda: fetch_shard(fed.store, update.directory, ref)) == (
        rejections.HASH_MISMATCH
    )


def test_shard_with_other_tensors_than_listed(fed: Federation) -> None:
    update, _ = _first_shard(fed)
    ref0, ref1 = update.shards[0], update.shards[1]
    data = fetch_shard(fed.store, update.directory, ref1)
    assert _reason(lambda: decode_shard(data, ref0, "fp32", "x")) == rejections.TENSOR_MISMATCH


def test_plan_checks(fed: Federation) -> None:
    coordinator = fed.coordinator.public_key_text
    assert _reason(lambda: read_plan(fed.store, fed.layout, 7, coordinator)) == (
        rejections.MISSING_MANIFEST
    )
    impostor = SigningKey.generate("coordinator").public_key_text
    assert _reason(lambda: read_plan(fed.store, fed.layout, 0, impostor)) == (
        rejections.BAD_SIGNATURE
    )


def test_plans_and_manifests_are_write_once(fed: Federation) -> None:
    plan = dict(fed.plan.document)
    plan["minParticipants"] = 2
    with pytest.raises(ObjectExists):
        publish_plan(fed.store, fed.layout, plan, fed.coordinator)
    # The same bytes again is an idempotent success.
    assert commit_document(fed.store, fed.plan.key, fed.plan.document).sha256 == fed.plan.sha256


@pytest.mark.parametrize("encoding", ["bf16", "int8"])
def test_compressed_updates_round_trip(tmp_path: Any, encoding: str) -> None:
    from tapestry_protocol.store.filesystem import FilesystemStore

    fed = make_federation(FilesystemStore(tmp_path, create=True), encoding=encoding)
    published = _publish(fed)
    full = sum(a.nbytes for a in fed.tensors.values())
    assert published.document["metrics"]["bytesUploaded"] < full
    update = _read(fed)
    delta = fed.delta()
    for ref in update.shards:
        data = fetch_shard(fed.store, update.directory, ref)
        for name, value in decode_shard(data, ref, encoding, ref.name).items():
            np.testing.assert_allclose(value, delta[name], atol=0.01 * 0.05)


def test_stored_documents_are_canonical_json(fed: Federation) -> None:
    raw = fed.store.get(fed.plan.key)
    assert json.loads(raw) == fed.plan.document
    assert raw == documents.encode(json.loads(raw))
