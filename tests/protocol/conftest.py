"""Fixtures for protocol tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tapestry_protocol.store.filesystem import FilesystemStore
from tests.protocol.federation import Federation, make_federation


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return make_federation(FilesystemStore(tmp_path / "store", create=True))
