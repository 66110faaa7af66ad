"""Ed25519 signatures over canonical documents: tampering, wrong signer, key files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tapestry_protocol import documents, rejections
from tapestry_protocol.documents import Kind, Receipt, ReceiptState
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.signing import (
    SigningKey,
    canonical_json,
    load_signing_key,
    public_key_from_text,
    verify,
)


def test_signature_verifies_and_survives_key_order() -> None:
    key = SigningKey.generate("alice")
    signed = key.sign({"kind": "X", "b": 1, "a": [1, 2]})
    reordered = dict(reversed(list(signed.items())))
    verify(reordered, "alice", key.public_key_text)


def test_tampering_breaks_the_signature() -> None:
    key = SigningKey.generate("alice")
    signed = key.sign({"kind": "X", "round": 1})
    signed["round"] = 2
    with pytest.raises(Rejected) as e:
        verify(signed, "alice", key.public_key_text)
    assert e.value.reason == rejections.BAD_SIGNATURE


def test_another_signers_key_is_refused() -> None:
    alice, mallory = SigningKey.generate("alice"), SigningKey.generate("alice")
    signed = mallory.sign({"kind": "X"})
    with pytest.raises(Rejected) as e:
        verify(signed, "alice", alice.public_key_text)
    assert e.value.reason == rejections.BAD_SIGNATURE


def test_signer_name_must_match() -> None:
    key = SigningKey.generate("bob")
    with pytest.raises(Rejected) as e:
        verify(key.sign({"kind": "X"}), "alice", key.public_key_text)
    assert e.value.reason == rejections.UNKNOWN_SIGNER


def test_missing_signature() -> None:
    with pytest.raises(Rejected) as e:
        verify({"kind": "X"}, "alice", SigningKey.generate("a").public_key_text)
    assert e.value.reason == rejections.MISSING_SIGNATURE


def test_signatures_are_bound_to_the_document_kind() -> None:
    key = SigningKey.generate("alice")
    signed = key.sign({"kind": str(Kind.PLAN), "x": 1})
    signed["kind"] = str(Kind.RESULT)
    with pytest.raises(Rejected):
        verify(signed, "alice", key.public_key_text)


def test_a_typed_document_signs_as_its_wire_json() -> None:
    key = SigningKey.generate("alice")
    receipt = Receipt(
        "demo", 3, "alice", "a" * 64, ReceiptState.DECLINED, "NoCapacity", "busy",
        "2030-01-01T00:00:00Z",
    )  # fmt: skip
    signed = key.sign(receipt.to_json())
    documents.validate(signed, Kind.RECEIPT, "receipt")
    verify(signed, "alice", key.public_key_text)
    assert Receipt.from_json(signed) == receipt
    signed["state"] = str(ReceiptState.FAILED)  # the enum's wire value is covered too
    with pytest.raises(Rejected) as e:
        verify(signed, "alice", key.public_key_text)
    assert e.value.reason == rejections.BAD_SIGNATURE


def test_key_files_round_trip_with_private_permissions(tmp_path: Path) -> None:
    key = SigningKey.generate("de")
    private, public = key.save(tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    loaded = load_signing_key("de", private)
    assert loaded.public_key_text == public.read_text().strip() == key.public_key_text
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "signing.key").write_bytes(key.private_pem())
    assert load_signing_key("de", secret_dir).public_key_text == key.public_key_text
    assert "PRIVATE" not in repr(loaded)
    with pytest.raises(FileExistsError):
        key.save(tmp_path)


def test_bad_key_material_gets_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a PEM private key"):
        load_signing_key("x", b"garbage")
    with pytest.raises(ValueError, match="cannot read signing key"):
        load_signing_key("x", tmp_path / "absent.key")
    with pytest.raises(ValueError, match="must start with"):
        public_key_from_text("rsa:AAAA")
    with pytest.raises(ValueError, match="32 bytes"):
        public_key_from_text("ed25519:AAAA")


def test_canonical_json_is_stable_and_refuses_nan() -> None:
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
