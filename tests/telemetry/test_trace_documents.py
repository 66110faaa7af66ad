"""The trace context in signed documents: the plan's and the update manifest's
`traceparent` survive signing and verification, and the schema bounds them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tapestry_protocol import documents, rejections
from tapestry_protocol.exchange import publish_update, read_update
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.store.filesystem import FilesystemStore
from tapestry_telemetry import tracing
from tests.protocol.federation import Federation, make_federation


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return make_federation(FilesystemStore(tmp_path / "store", create=True))


def test_an_update_carries_the_trace_context_it_was_made_in(fed: Federation) -> None:
    made_in = tracing.new_traceparent()
    publish_update(
        fed.store, fed.layout, fed.plan, fed.base, fed.delta(), fed.participants["alice"],
        tokens=10, metrics={"trainLoss": 2.0}, traceparent=made_in,
    )  # fmt: skip
    update = read_update(fed.store, fed.layout, fed.plan, fed.base, "alice")
    assert update.document.traceparent == made_in


def test_an_update_without_one_has_none(fed: Federation) -> None:
    publish_update(
        fed.store, fed.layout, fed.plan, fed.base, fed.delta(), fed.participants["bob"],
        tokens=10, metrics={},
    )  # fmt: skip
    update = read_update(fed.store, fed.layout, fed.plan, fed.base, "bob")
    assert update.document.traceparent is None
    assert "traceparent" not in update.document.to_json()


def test_an_oversized_traceparent_is_refused_by_the_schema(fed: Federation) -> None:
    update = read_update_json(fed)
    update["traceparent"] = "0" * 129
    with pytest.raises(Rejected) as refused:
        documents.validate(update, documents.Kind.UPDATE, "manifest.json")
    assert refused.value.reason == rejections.MALFORMED_DOCUMENT
    assert "field traceparent" in refused.value.message


def read_update_json(fed: Federation) -> dict[str, object]:
    publish_update(
        fed.store, fed.layout, fed.plan, fed.base, fed.delta(), fed.participants["alice"],
        tokens=10, metrics={}, traceparent=tracing.new_traceparent(),
    )  # fmt: skip
    key = fed.layout.update_manifest(0, "alice")
    return documents.parse(fed.store.get(key), documents.Kind.UPDATE, key)
