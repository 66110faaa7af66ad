"""Fixtures: one real control plane per test session, a fresh namespace per test.

The binaries are built (or found in the cache) when the tests start running and
any selected test is marked `kube`, so a cold build does not count against a
test's pytest-timeout; collecting (`pytest --collect-only`) builds nothing.
TAPESTRY_SKIP_KUBE=1 skips these tests instead of building; without it a failed
build fails them. TAPESTRY_KUBE_KEEP=1 keeps the cluster's working directory
(logs, certs, pod files) after the session.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube.client import ApiError, KubeClient
from tests.kube.cluster import ClusterError, KubeCluster, ensure_binaries
from tests.kube.helpers import Kube

_BINARIES = pytest.StashKey[Path | ClusterError]()
_SKIP_REASON = "TAPESTRY_SKIP_KUBE=1: the Kubernetes control plane tests were switched off"


def _skip() -> bool:
    return os.environ.get("TAPESTRY_SKIP_KUBE") == "1"


def _build(config: pytest.Config) -> Path | ClusterError:
    capman = config.pluginmanager.getplugin("capturemanager")
    try:
        with capman.global_and_fixture_disabled():
            sys.stderr.write("\n")
            return ensure_binaries(sys.stderr)
    except ClusterError as err:
        return err


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """Builds before the first test runs, if a kube test is left after -k/-m deselection.

    Not during collection: `pytest --collect-only` (and a run with no kube test left)
    builds nothing."""
    config = session.config
    if config.option.collectonly or _skip() or _BINARIES in config.stash:
        return
    if any(item.get_closest_marker("kube") for item in session.items):
        config.stash[_BINARIES] = _build(config)


@pytest.fixture(scope="session")
def kube_cluster(pytestconfig: pytest.Config) -> Iterator[KubeCluster]:
    """The session's cluster: etcd, kube-apiserver, kube-controller-manager, node agent."""
    if _skip():
        pytest.skip(_SKIP_REASON)
    if _BINARIES not in pytestconfig.stash:
        pytestconfig.stash[_BINARIES] = _build(pytestconfig)
    binaries = pytestconfig.stash[_BINARIES]
    if isinstance(binaries, ClusterError):
        pytest.fail(f"cannot build the Kubernetes binaries: {binaries}", pytrace=False)
    cluster = KubeCluster(binaries)
    try:
        cluster.start()
    except ClusterError as err:
        pytest.fail(f"cannot start the test cluster: {err}", pytrace=False)
    yield cluster
    cluster.stop()
    if os.environ.get("TAPESTRY_KUBE_KEEP") != "1":
        cluster.remove()


@pytest.fixture(scope="session")
def kube_admin(kube_cluster: KubeCluster) -> KubeClient:
    """A cluster-admin (system:masters) client."""
    return kube_cluster.client()


@pytest.fixture
def kube(
    kube_cluster: KubeCluster, kube_admin: KubeClient, request: pytest.FixtureRequest
) -> Iterator[Kube]:
    """A fresh namespace (with its default ServiceAccount ready) for one test."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    kube_admin.create(
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
    )
    helper = Kube(kube_admin, kube_cluster.kubeconfig, name)
    helper.wait_for(
        f"the default ServiceAccount in namespace {name}",
        lambda: helper.get("v1", "ServiceAccount", "default"),
        lambda sa: sa is not None,
        timeout=30,
    )
    yield helper
    try:
        kube_admin.delete(f"/api/v1/namespaces/{name}")
    except ApiError as err:  # do not mask the test's own outcome
        print(f"could not delete namespace {name}: {err}", file=sys.stderr)
