"""The chart's manifests against the real API server: every role and every example values
file renders objects the API server accepts (a server-side dry run, with its validation
and the restricted Pod Security admission of the namespaces), and `helm install` tells
each role its next command."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.chart.chart import CHART, EXAMPLE_VALUES, ROLES, helm_template
from tests.kube.client import ApiError, KubeClient
from tests.kube.cluster import KubeCluster
from tests.kube.tapestry_env import install_crds, kubectl
from tests.tools import run_helm

pytestmark = [pytest.mark.kube, pytest.mark.tools]

# prometheus-operator's kinds: their CRDs are not on the test cluster (tests/chart checks
# those objects' shape).
NOT_SERVED = {"ServiceMonitor", "PodMonitor"}
NEXT = {
    "coordinator": "kubectl apply -f examples/multi-cluster/coordinator/10-federation.yaml",
    "participant": "kubectl apply -f examples/multi-cluster/participant/10-participant.yaml",
    "both": "kubectl apply -f examples/single-cluster/",
}


@pytest.fixture
def namespaces(kube_cluster: KubeCluster) -> Iterator[tuple[str, str]]:
    """A release namespace and a watched one, both enforcing the restricted standard."""
    client: KubeClient = kube_cluster.client()
    install_crds(kube_cluster.kubeconfig)
    suffix = uuid.uuid4().hex[:6]
    names = (f"chart-release-{suffix}", f"chart-watched-{suffix}")
    for name in names:
        client.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
        }})  # fmt: skip
    yield names
    for name in names:
        try:
            client.delete(f"/api/v1/namespaces/{name}")
        except ApiError as err:
            print(f"could not delete namespace {name}: {err}")


def _dry_run(kubeconfig: Path, manifests: str) -> str:
    docs = [d for d in yaml.safe_load_all(manifests) if d and d["kind"] not in NOT_SERVED]
    assert docs
    return kubectl(kubeconfig, "apply", "--server-side", "--dry-run=server", "-f", "-",
                   input=yaml.safe_dump_all(docs))  # fmt: skip


def _overrides(release_ns: str, watched: str) -> list[str]:
    return ["--namespace", release_ns, "--set", f"watchNamespaces={{{watched}}}"]


@pytest.mark.parametrize("role", ROLES)
def test_every_role_s_manifests_pass_the_api_server_s_validation(
    kube_cluster: KubeCluster, namespaces: tuple[str, str], role: str
) -> None:
    release_ns, watched = namespaces
    values = {
        "role": role,
        "watchNamespaces": [watched],
        "networkPolicy": {"enabled": True},
        "minio": {"enabled": role != "participant"},
        "dashboards": {"enabled": True},
    }
    done = helm_template(values, namespace=release_ns)
    out = _dry_run(kube_cluster.kubeconfig, done.stdout)
    assert "(server dry run)" in out
    assert "role.rbac.authorization.k8s.io/tapestry serverside-applied" in out


@pytest.mark.parametrize("values_file", EXAMPLE_VALUES, ids=lambda p: p.name)
def test_every_example_passes_the_api_server_s_validation(
    kube_cluster: KubeCluster, namespaces: tuple[str, str], values_file: Path
) -> None:
    release_ns, watched = namespaces
    done = run_helm("template", "tapestry", str(CHART), "--values", str(values_file),
                    *_overrides(release_ns, watched))  # fmt: skip
    out = _dry_run(kube_cluster.kubeconfig, done.stdout)
    assert "deployment.apps/tapestry serverside-applied (server dry run)" in out


@pytest.mark.parametrize("role", ROLES)
def test_helm_install_tells_each_role_its_next_command(
    kube_cluster: KubeCluster, namespaces: tuple[str, str], role: str
) -> None:
    release_ns, watched = namespaces
    done = run_helm(
        "install", "tapestry", str(CHART), "--dry-run=server", "--skip-crds", "--set",
        f"role={role}", *_overrides(release_ns, watched), kubeconfig=kube_cluster.kubeconfig,
    )  # fmt: skip
    notes = done.stdout.split("NOTES:", 1)[1]
    assert f"the operator runs as {role} in namespace {release_ns}" in notes
    assert f"watching {watched}." in notes
    assert NEXT[role] in notes
    assert all(command not in notes for other, command in NEXT.items() if other != role)
