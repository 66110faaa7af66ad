"""The four JSON documents of the protocol, validated against versioned schemas.

`RoundPlan` (coordinator), `UpdateManifest` (participant), `ModelManifest` (a base or
optimizer state, coordinator) and `RoundResult` (aggregator). The schemas live in
`schemas/<kind>.v<N>.json`; every read validates and names the field at fault.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

from tapestry_protocol import rejections
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.signing import canonical_json

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
KINDS = {
    "RoundPlan": "round-plan",
    "UpdateManifest": "update-manifest",
    "ModelManifest": "model-manifest",
    "RoundResult": "round-result",
}

_formats = jsonschema.FormatChecker()


@_formats.checks("date-time", raises=ValueError)
def _is_datetime(value: object) -> bool:
    if isinstance(value, str):
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@cache
def schema(kind: str, version: int = SCHEMA_VERSION) -> dict[str, Any]:
    text = (
        resources.files("tapestry_protocol")
        .joinpath(f"schemas/{KINDS[kind]}.v{version}.json")
        .read_text()
    )
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _field_path(error: jsonschema.ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return path.lstrip(".") or "(document)"


def validate(document: dict[str, Any], kind: str, where: str) -> None:
    """Raise Rejected naming the first field that breaks the schema."""
    version = document.get("schemaVersion")
    if document.get("kind") != kind:
        raise Rejected(
            rejections.MALFORMED_DOCUMENT,
            f"{where}: kind is {document.get('kind')!r}, expected {kind!r}",
        )
    if version not in SUPPORTED_VERSIONS:
        raise Rejected(
            rejections.UNKNOWN_SCHEMA_VERSION,
            f"{where}: schemaVersion {version!r} is not supported "
            f"(this reader knows {sorted(SUPPORTED_VERSIONS)})",
        )
    validator = jsonschema.Draft202012Validator(schema(kind, version), format_checker=_formats)
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        raise Rejected(
            rejections.MALFORMED_DOCUMENT, f"{where}: field {_field_path(error)}: {error.message}"
        )


def parse(data: bytes, kind: str, where: str) -> dict[str, Any]:
    """Decode and validate a stored document."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Rejected(rejections.MALFORMED_DOCUMENT, f"{where} is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise Rejected(rejections.MALFORMED_DOCUMENT, f"{where} is not a JSON object")
    validate(document, kind, where)
    return document


def encode(document: dict[str, Any]) -> bytes:
    """The stored bytes of a document (canonical JSON plus a newline)."""
    return canonical_json(document) + b"\n"


def check_identity(
    document: dict[str, Any],
    where: str,
    *,
    federation: str,
    round_number: int,
    participant: str | None = None,
) -> None:
    """A document must say it belongs exactly where it was found (anti-replay)."""
    if document["federation"] != federation:
        raise Rejected(
            rejections.WRONG_FEDERATION,
            f"{where} belongs to federation {document['federation']!r}, not {federation!r}",
        )
    if document["round"] != round_number:
        raise Rejected(
            rejections.WRONG_ROUND,
            f"{where} belongs to round {document['round']}, not round {round_number}",
        )
    if participant is not None and document.get("participant") != participant:
        raise Rejected(
            rejections.WRONG_PARTICIPANT,
            f"{where} names participant {document.get('participant')!r}, not {participant!r}",
        )
