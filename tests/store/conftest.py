"""Store fixtures: one parametrized `backend` runs every contract test on all backends."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tapestry_protocol.store import FAST_RETRY, ObjectStore, open_store
from tests.s3servers import S3Server

#: Small parts so that modest test objects already take the multipart path.
TEST_PART_SIZE = 5 << 20

BACKENDS = [
    pytest.param("filesystem"),
    pytest.param("minio", marks=pytest.mark.s3),
    pytest.param("seaweedfs", marks=pytest.mark.s3),
]


@dataclass(frozen=True)
class Backend:
    """A fresh, empty store location, openable from any process by its URL."""

    name: str
    url: str
    server: S3Server | None = None

    def open(self) -> ObjectStore:
        return open_store(self.url, create=True, retry=FAST_RETRY, part_size=TEST_PART_SIZE)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    name: str = request.param
    if name == "filesystem":
        backend = Backend(name, (tmp_path / "store").as_uri())
    else:
        server: S3Server = request.getfixturevalue(f"{name}_server")
        # One bucket per server, a fresh prefix per test: isolation without bucket churn.
        prefix = f"t-{uuid.uuid4().hex[:12]}"
        backend = Backend(name, server.url_for("contract", prefix), server)
    backend.open().close()  # create the bucket or directory, as a deployment would
    return backend


@pytest.fixture
def store(backend: Backend) -> Iterator[ObjectStore]:
    with backend.open() as s:
        yield s
