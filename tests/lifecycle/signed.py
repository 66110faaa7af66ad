"""Signed, schema-valid protocol documents for the decision tests (no store needed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tapestry_protocol.documents import D, encode, validate
from tapestry_protocol.exchange import COORDINATOR, Verified
from tapestry_protocol.shards import sha256_hex
from tapestry_protocol.signing import SigningKey

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
DEADLINE = NOW + timedelta(hours=1)
SIGNER = SigningKey.generate(COORDINATOR)


def verified(key: str, document: D) -> Verified[D]:
    """The document as a reader returns it: signed, valid against its schema, with the
    sha256 of the bytes a store would hold."""
    raw = SIGNER.sign(document.to_json())
    validate(raw, document.KIND, key)
    return Verified(key, document, sha256_hex(encode(raw)))
