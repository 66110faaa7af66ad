"""Publishing and verifying protocol objects with real files: every rejection reason."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tapestry_protocol import documents, rejections
from tapestry_protocol.documents import (
    CloseTrigger,
    Included,
    Receipt,
    ReceiptState,
    RoundPlan,
    UpdateManifest,
    now_rfc3339,
)
from tapestry_protocol.exchange import (
    Verified,
    build_close,
    close_round,
    commit_document,
    committed_updates,
    decode_shard,
    fetch_shard,
    load_tensors,
    publish_close,
    publish_plan,
    publish_update,
    read_close,
    read_plan,
    read_plan_base,
    read_receipt,
    read_receipts,
    read_update,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store import ObjectExists
from tapestry_protocol.store.filesystem import FilesystemStore
from tests.protocol.federation import CLOSED_AT, Federation, make_federation


def _publish(fed: Federation, who: str = "alice", seed: int = 0) -> Verified[UpdateManifest]:
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


def _signed(fed: Federation, who: str = "alice", seed: int = 0) -> dict[str, Any]:
    """Publish `who`'s update and return its stored, signed JSON (to tamper with)."""
    published = _publish(fed, who, seed)
    signed: dict[str, Any] = json.loads(fed.store.get(published.key))
    return signed


def _read(fed: Federation, who: str = "alice") -> Verified[UpdateManifest]:
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
    assert update.document.metrics["bytesUploaded"] == sum(s.size for s in update.document.shards)
    assert update.document.tokens == 1000 and update.document.metrics["trainLoss"] == 2.5
    delta = fed.delta()
    for ref in update.document.shards:
        data = fetch_shard(fed.store, update.directory, ref)
        for name, value in decode_shard(data, ref, "fp32", ref.name).items():
            np.testing.assert_array_equal(value, delta[name])


def test_republishing_keeps_the_committed_update(fed: Federation) -> None:
    first = _publish(fed, seed=0)
    again = _publish(fed, seed=1)
    assert again.sha256 == first.sha256


def test_a_whole_float_token_count_is_read_as_an_integer(fed: Federation) -> None:
    """JSON Schema's integer admits 7.0; the typed document holds an int all the same."""
    signed = _signed(fed)
    signed["tokens"] = 7.0
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign(signed))
    tokens = _read(fed).document.tokens
    assert tokens == 7 and type(tokens) is int


def test_missing_manifest(fed: Federation) -> None:
    assert _reason(lambda: _read(fed)) == rejections.MISSING_MANIFEST


def test_unknown_schema_version(fed: Federation) -> None:
    doc = _signed(fed)
    doc["schemaVersion"] = 2
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign(doc))
    assert _reason(lambda: _read(fed)) == rejections.UNKNOWN_SCHEMA_VERSION


def test_malformed_manifest_names_the_field(fed: Federation) -> None:
    doc = _signed(fed)
    doc["tokens"] = -5
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign(doc))
    with pytest.raises(Rejected) as e:
        _read(fed)
    assert e.value.reason == rejections.MALFORMED_DOCUMENT
    assert "field tokens" in e.value.message


def test_unexpected_field_is_malformed(fed: Federation) -> None:
    doc = _signed(fed)
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
    doc = _signed(fed)
    del doc["signature"]
    _rewrite_manifest(fed, "alice", doc)
    assert _reason(lambda: _read(fed)) == rejections.MISSING_SIGNATURE


def test_forged_field_breaks_signature(fed: Federation) -> None:
    doc = _signed(fed)
    doc["tokens"] = 10**9  # claim a bigger share
    _rewrite_manifest(fed, "alice", doc)
    assert _reason(lambda: _read(fed)) == rejections.BAD_SIGNATURE


def test_signed_by_someone_else(fed: Federation) -> None:
    doc = _signed(fed)
    _rewrite_manifest(fed, "alice", SigningKey.generate("alice").sign(doc))
    assert _reason(lambda: _read(fed)) == rejections.BAD_SIGNATURE


def test_participant_not_in_plan(fed: Federation) -> None:
    assert _reason(lambda: _read(fed, "carol")) == rejections.UNKNOWN_SIGNER


def test_replay_under_another_name(fed: Federation) -> None:
    doc = _signed(fed, "alice")
    fed.store.put(fed.layout.update_manifest(0, "bob"), documents.encode(doc))
    assert _reason(lambda: _read(fed, "bob")) == rejections.WRONG_PARTICIPANT


def test_replay_into_another_round(fed: Federation) -> None:
    doc = _signed(fed)
    plan1 = fed.plan_round(1, fed.base)
    fed.store.put(fed.layout.update_manifest(1, "alice"), documents.encode(doc))
    reason = _reason(lambda: read_update(fed.store, fed.layout, plan1, fed.base, "alice"))
    assert reason == rejections.WRONG_ROUND


def test_replay_into_another_federation(fed: Federation) -> None:
    doc = _signed(fed)
    other = Layout("other")
    plan = Verified(
        other.plan(0), dataclasses.replace(fed.plan.document, federation="other"), fed.plan.sha256
    )
    fed.store.put(other.update_manifest(0, "alice"), documents.encode(doc))
    reason = _reason(lambda: read_update(fed.store, other, plan, fed.base, "alice"))
    assert reason == rejections.WRONG_FEDERATION


def test_update_for_another_plan(fed: Federation) -> None:
    doc = _signed(fed)
    doc["plan"] = {"sha256": "0" * 64}
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign(doc))
    assert _reason(lambda: _read(fed)) == rejections.WRONG_PLAN


def test_update_from_another_base(fed: Federation) -> None:
    doc = _signed(fed)
    doc["base"] = {"sha256": "1" * 64}
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign(doc))
    assert _reason(lambda: _read(fed)) == rejections.WRONG_BASE


def test_missing_and_extra_shards_in_the_manifest(fed: Federation) -> None:
    doc = _signed(fed)
    shards = doc["shards"]
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign({**doc, "shards": shards[:-1]}))
    assert _reason(lambda: _read(fed)) == rejections.MISSING_SHARD
    extra = [*shards, {**shards[-1], "name": f"part-{len(shards):05d}-{'a' * 16}.safetensors"}]
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign({**doc, "shards": extra}))
    assert _reason(lambda: _read(fed)) == rejections.EXTRA_SHARD


def test_shards_regrouped_differently_from_the_base(fed: Federation) -> None:
    doc = _signed(fed)
    shards = [dict(s) for s in doc["shards"]]
    shards[0]["tensors"], shards[1]["tensors"] = shards[1]["tensors"], shards[0]["tensors"]
    _rewrite_manifest(fed, "alice", fed.participants["alice"].sign({**doc, "shards": shards}))
    assert _reason(lambda: _read(fed)) == rejections.TENSOR_MISMATCH


def _first_shard(fed: Federation) -> tuple[Verified[UpdateManifest], str]:
    _publish(fed)
    update = _read(fed)
    return update, update.directory + update.document.shards[0].name


def test_absent_shard_object(fed: Federation) -> None:
    update, key = _first_shard(fed)
    fed.store.delete(key)
    ref = update.document.shards[0]
    assert _reason(lambda: fetch_shard(fed.store, update.directory, ref)) == (
        rejections.MISSING_SHARD
    )


def test_truncated_shard(fed: Federation) -> None:
    update, key = _first_shard(fed)
    data = fed.store.get(key)
    fed.store.delete(key)
    fed.store.put(key, data[:-4])
    ref = update.document.shards[0]
    assert _reason(lambda: fetch_shard(fed.store, update.directory, ref)) == (
        rejections.SIZE_MISMATCH
    )


def test_corrupted_shard(fed: Federation) -> None:
    update, key = _first_shard(fed)
    data = bytearray(fed.store.get(key))
    data[-1] ^= 0xFF
    fed.store.delete(key)
    fed.store.put(key, bytes(data))
    ref = update.document.shards[0]
    assert _reason(lambda: fetch_shard(fed.store, update.directory, ref)) == (
        rejections.HASH_MISMATCH
    )


def test_shard_with_other_tensors_than_listed(fed: Federation) -> None:
    update, _ = _first_shard(fed)
    ref0, ref1 = update.document.shards[0], update.document.shards[1]
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
    plan = dataclasses.replace(fed.plan.document, min_participants=2)
    with pytest.raises(ObjectExists):
        publish_plan(fed.store, fed.layout, plan, fed.coordinator)
    # The same bytes again is an idempotent success.
    again = commit_document(fed.store, fed.plan.key, fed.plan.document, fed.coordinator)
    assert again.sha256 == fed.plan.sha256


@pytest.mark.parametrize("encoding", ["bf16", "int8", "codebook"])
def test_compressed_updates_round_trip(tmp_path: Path, encoding: str) -> None:
    fed = make_federation(FilesystemStore(tmp_path, create=True), encoding=encoding)
    published = _publish(fed)
    full = sum(a.nbytes for a in fed.tensors.values())
    uploaded = published.document.metrics["bytesUploaded"]
    assert isinstance(uploaded, int)
    if encoding == "codebook":  # a byte per value plus 1 KiB of levels per tensor
        assert uploaded < full / 4 + sum(4 * 256 + 256 for _ in fed.tensors) + 4096
    else:
        assert uploaded < full
    update = _read(fed)
    assert update.document.encoding == encoding
    delta = fed.delta()
    for ref in update.document.shards:
        data = fetch_shard(fed.store, update.directory, ref)
        for name, value in decode_shard(data, ref, encoding, ref.name).items():
            if encoding == "codebook":  # per-tensor levels: a looser bound, an exact sum
                rms = np.sqrt(np.mean((value - delta[name]) ** 2))
                assert rms <= 0.1 * np.sqrt(np.mean(delta[name] ** 2)), name
                assert np.sum(value, dtype=np.float64) == pytest.approx(
                    np.sum(delta[name], dtype=np.float64), abs=1e-4
                )
            else:
                np.testing.assert_allclose(value, delta[name], atol=0.01 * 0.05)


def test_stored_documents_are_canonical_json(fed: Federation) -> None:
    raw = fed.store.get(fed.plan.key)
    assert json.loads(raw) == fed.coordinator.sign(fed.plan.document.to_json())
    assert RoundPlan.from_json(json.loads(raw)) == fed.plan.document
    assert raw == documents.encode(json.loads(raw))


# --- receipts --------------------------------------------------------------------------

ACCEPTED, DECLINED, FAILED = ReceiptState.ACCEPTED, ReceiptState.DECLINED, ReceiptState.FAILED


def _read_receipt(fed: Federation, who: str, state: ReceiptState) -> Verified[Receipt]:
    return read_receipt(fed.store, fed.layout, fed.plan, who, state)


def _put_receipt(fed: Federation, key: str, signer: SigningKey, receipt: Receipt) -> None:
    if fed.store.exists(key):
        fed.store.delete(key)
    fed.store.put(key, documents.encode(signer.sign(receipt.to_json())))


def test_receipt_round_trip(fed: Federation) -> None:
    published = fed.receipt("alice", ACCEPTED, "Admitted", "training started")
    assert published.key == fed.layout.receipt(0, "alice", ACCEPTED)
    assert published.key.endswith("/rounds/000000/receipts/alice/accepted.json")
    read = _read_receipt(fed, "alice", ACCEPTED)
    assert read == published
    doc = read.document
    assert (doc.federation, doc.round, doc.participant, doc.plan_sha256) == (
        "demo",
        0,
        "alice",
        fed.plan.sha256,
    )
    assert (doc.state, doc.reason, doc.message) == (ACCEPTED, "Admitted", "training started")
    assert read_receipts(fed.store, fed.layout, fed.plan, "alice") == {ACCEPTED: read}
    assert read_receipts(fed.store, fed.layout, fed.plan, "bob") == {}
    assert _reason(lambda: _read_receipt(fed, "bob", ACCEPTED)) == rejections.MISSING_MANIFEST
    assert _reason(lambda: _read_receipt(fed, "carol", ACCEPTED)) == rejections.UNKNOWN_SIGNER


def test_receipts_are_write_once_per_state(fed: Federation) -> None:
    first = fed.receipt("alice", FAILED, "OOMKilled", "first")
    stored = fed.store.get(first.key)
    again = fed.receipt("alice", FAILED, "Crashed", "second")  # a restarted participant
    assert again == first and again.document.message == "first"
    assert fed.store.get(first.key) == stored
    declined = fed.receipt("alice", DECLINED, "NoCapacity", "")  # another state, another object
    assert declined.key != first.key
    assert read_receipts(fed.store, fed.layout, fed.plan, "alice") == {
        FAILED: first,
        DECLINED: declined,
    }


def test_receipt_messages_are_bounded(fed: Federation) -> None:
    receipt = fed.receipt("alice", FAILED, "Crashed", "x" * 10_000)
    assert len(receipt.document.message) == 4096
    assert _read_receipt(fed, "alice", FAILED) == receipt


def test_forged_and_misplaced_receipts_are_refused(fed: Federation) -> None:
    key = fed.layout.receipt(0, "bob", FAILED)
    forged = Receipt(
        "demo", 0, "bob", fed.plan.sha256, FAILED, "Crashed", "forged", now_rfc3339()
    )  # fmt: skip
    _put_receipt(fed, key, SigningKey.generate("bob"), forged)
    assert _reason(lambda: _read_receipt(fed, "bob", FAILED)) == rejections.BAD_SIGNATURE
    assert read_receipts(fed.store, fed.layout, fed.plan, "bob") == {}

    bob = fed.participants["bob"]
    _put_receipt(fed, key, bob, dataclasses.replace(forged, plan_sha256="0" * 64))
    assert _reason(lambda: _read_receipt(fed, "bob", FAILED)) == rejections.WRONG_PLAN
    _put_receipt(fed, key, bob, dataclasses.replace(forged, state=DECLINED))
    assert _reason(lambda: _read_receipt(fed, "bob", FAILED)) == rejections.MALFORMED_DOCUMENT
    _put_receipt(fed, key, bob, dataclasses.replace(forged, round=1))
    assert _reason(lambda: _read_receipt(fed, "bob", FAILED)) == rejections.WRONG_ROUND
    alices = fed.receipt("alice", FAILED, "Crashed", "")
    _put_receipt(fed, key, fed.participants["alice"], alices.document)
    assert _reason(lambda: _read_receipt(fed, "bob", FAILED)) == rejections.WRONG_PARTICIPANT


def test_close_round_ignores_a_forged_receipt(fed: Federation) -> None:
    forged = Receipt(
        "demo", 0, "bob", fed.plan.sha256, FAILED, "Crashed", "forged", now_rfc3339()
    )  # fmt: skip
    _put_receipt(fed, fed.layout.receipt(0, "bob", FAILED), SigningKey.generate("bob"), forged)
    _put_receipt(
        fed, fed.layout.receipt(0, "alice", DECLINED), fed.participants["bob"],
        dataclasses.replace(forged, participant="alice", state=DECLINED),
    )  # fmt: skip
    close = fed.close()
    reasons = {e.participant: e.reason for e in close.document.excluded}
    assert reasons == {"alice": rejections.LATE, "bob": rejections.LATE}
    assert all("forged" not in e.message for e in close.document.excluded)


# --- closing a round -------------------------------------------------------------------


@pytest.fixture
def crowd(tmp_path: Path) -> Federation:
    people = ("alice", "bob", "carol", "dave", "erin")
    return make_federation(FilesystemStore(tmp_path / "store", create=True), participants=people)


def test_close_round_includes_updates_and_says_why_the_others_are_out(crowd: Federation) -> None:
    alice = crowd.publish("alice", crowd.delta())
    crowd.receipt("alice", FAILED, "Crashed", "after uploading")  # a committed update stands
    crowd.receipt("bob", DECLINED, "NoCapacity", "GPUs busy")
    crowd.receipt("carol", ACCEPTED, "Admitted", "training started")
    crowd.receipt("carol", FAILED, "OOMKilled", "exit code 137")
    crowd.receipt("dave", ACCEPTED, "Admitted", "training started")  # and never uploaded
    close = crowd.close()  # erin never answered
    doc = close.document
    assert close.key == crowd.layout.close(0)
    assert (doc.federation, doc.round, doc.plan_sha256) == ("demo", 0, crowd.plan.sha256)
    assert doc.trigger == CloseTrigger.ALL_REPORTED
    assert doc.closed_at == "2030-01-01T00:00:00Z"
    assert doc.included == (Included("alice", alice.sha256),)
    excluded = {e.participant: (e.reason, e.message) for e in doc.excluded}
    assert excluded == {
        "bob": (rejections.DECLINED, "NoCapacity: GPUs busy"),
        "carol": (rejections.TRAINING_FAILED, "OOMKilled: exit code 137"),
        "dave": (rejections.LATE, "no update when the round closed at 2030-01-01T00:00:00Z"),
        "erin": (rejections.LATE, "no update when the round closed at 2030-01-01T00:00:00Z"),
    }
    assert [e.participant for e in doc.excluded] == ["bob", "carol", "dave", "erin"]
    assert read_close(crowd.store, crowd.layout, 0, crowd.coordinator.public_key_text) == close


def test_close_round_is_idempotent_and_the_first_record_stands(fed: Federation) -> None:
    fed.publish("alice", fed.delta())
    first = fed.close()
    stored = fed.store.get(first.key)
    late = fed.publish("bob", fed.delta(seed=1))  # arrives after the close
    again = close_round(
        fed.store, fed.layout, fed.plan, fed.coordinator, CloseTrigger.MANUAL,
        datetime(2031, 6, 1, tzinfo=UTC),
    )  # fmt: skip
    assert again == first
    assert fed.store.get(first.key) == stored
    assert [i.participant for i in again.document.included] == ["alice"]
    assert [(e.participant, e.reason) for e in again.document.excluded] == [
        ("bob", rejections.LATE)
    ]
    # A racing coordinator that saw bob's update too: the first record still stands.
    updates = committed_updates(fed.store, fed.layout, 0, fed.plan.document.names)
    assert updates["bob"] == late.sha256
    racing = build_close(fed.plan, updates, {}, CloseTrigger.DEADLINE, CLOSED_AT)
    assert len(racing.included) == 2
    assert publish_close(fed.store, fed.layout, racing, fed.coordinator) == first
    assert fed.store.get(first.key) == stored


def test_close_record_checks(fed: Federation) -> None:
    coordinator = fed.coordinator.public_key_text
    assert _reason(lambda: read_close(fed.store, fed.layout, 0, coordinator)) == (
        rejections.NOT_CLOSED
    )
    fed.close()
    impostor = SigningKey.generate("coordinator").public_key_text
    assert _reason(lambda: read_close(fed.store, fed.layout, 0, impostor)) == (
        rejections.BAD_SIGNATURE
    )
    key = fed.layout.close(0)
    doc = json.loads(fed.store.get(key))
    doc["excluded"] = []  # drop the exclusions: the signature no longer holds
    fed.store.delete(key)
    fed.store.put(key, documents.encode(doc))
    assert _reason(lambda: read_close(fed.store, fed.layout, 0, coordinator)) == (
        rejections.BAD_SIGNATURE
    )


def test_a_long_failure_message_still_closes_the_round(fed: Federation) -> None:
    """A receipt's message may use all its 4096 characters; the close record's excluded
    message adds the reason in front and must still fit the schema."""
    fed.publish("alice", fed.delta())
    receipt = fed.receipt("bob", FAILED, "Crashed", "y" * 5000)  # a long traceback
    assert len(receipt.document.message) == 4096
    close = fed.close()
    (bob,) = close.document.excluded
    assert bob.reason == rejections.TRAINING_FAILED
    assert bob.message.startswith("Crashed: yyy") and len(bob.message) == 4096


def test_a_shard_larger_than_the_document_limit_is_read_whole(tmp_path: Path) -> None:
    """Shards are bounded by the size their manifest states, not by the document limit:
    the default shard size (64 MiB) is far above it."""
    from tapestry_protocol.jsonsafe import MAX_DOCUMENT_BYTES
    from tapestry_protocol.shards import ShardRef, sha256_hex

    store = FilesystemStore(tmp_path)
    data = np.random.default_rng(0).bytes(MAX_DOCUMENT_BYTES + 4096)
    ref = ShardRef("part-00000-0123456789abcdef.safetensors", len(data), sha256_hex(data), ("w",))
    store.put("d/" + ref.name, data)
    assert fetch_shard(store, "d/", ref) == data
    short = dataclasses.replace(ref, size=len(data) - 1)
    assert _reason(lambda: fetch_shard(store, "d/", short)) == rejections.SIZE_MISMATCH
