"""The chart's argocd-cm toggle next to an Argo CD installed by other means, with real
helm on the real test cluster: what docs/gitops.md says about the choice.

The chart's template (templates/argocd-health.yaml, with the chart's helpers, values and
health/ tree) is installed as a chart of its own, so that only the ConfigMap is in play.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.gitops.argo_lua import GROUP, REPO_ROOT, kinds, script_path
from tests.kube.helpers import Kube

pytestmark = [pytest.mark.kube, pytest.mark.tools]

CHART = REPO_ROOT / "charts" / "tapestry"
KEYS = {f"resource.customizations.health.{GROUP}_{kind}" for kind in kinds()}
ARGO_CM_LABELS = {"app.kubernetes.io/name": "argocd-cm", "app.kubernetes.io/part-of": "argocd"}


def argocd_only_chart(tmp_path: Path) -> Path:
    """The chart with only the argocd-cm template (and what it reads)."""
    chart = tmp_path / "tapestry"
    (chart / "templates").mkdir(parents=True)
    for name in ("Chart.yaml", "values.yaml", "values.schema.json"):
        if (CHART / name).exists():
            shutil.copy(CHART / name, chart / name)
    for name in ("_helpers.tpl", "argocd-health.yaml"):
        shutil.copy(CHART / "templates" / name, chart / "templates" / name)
    shutil.copytree(CHART / "health", chart / "health")
    return chart


def helm(kube: Kube, *args: str, check: bool = True) -> Any:
    from tests.tools import run_helm

    return run_helm(*args, "--namespace", kube.namespace, kubeconfig=kube.kubeconfig, check=check)


def argocd_cm(kube: Kube) -> dict[str, Any]:
    cm: dict[str, Any] = kube.client.get(
        f"/api/v1/namespaces/{kube.namespace}/configmaps/argocd-cm"
    )
    return cm


def argo_cd_manifest(kube: Kube, data: dict[str, str]) -> str:
    """argocd-cm as Argo CD's install manifests ship it, with an admin's settings."""
    import yaml

    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "argocd-cm",
                "namespace": kube.namespace,
                "labels": ARGO_CM_LABELS,
            },
            "data": data,
        }
    )


def install_args(chart: Path, kube: Kube) -> list[str]:
    return [str(chart), "--set", "argocd.healthChecks.enabled=true",
            "--set", f"argocd.namespace={kube.namespace}"]  # fmt: skip


def test_the_toggle_next_to_argo_cds_own_manifests(kube: Kube, tmp_path: Path) -> None:
    chart = argocd_only_chart(tmp_path)
    settings = {"url": "https://argocd.example", "statusbadge.enabled": "true"}
    kube.kubectl("apply", "-f", "-", input=argo_cd_manifest(kube, settings))

    # Helm does not install over an argocd-cm it does not own...
    refused = helm(kube, "install", "tapestry", *install_args(chart, kube), check=False)
    assert refused.returncode != 0
    assert "invalid ownership metadata" in refused.stderr, refused.stderr
    assert set(argocd_cm(kube)["data"]) == set(settings)

    # ...unless told to take it over: the health checks are added, the settings kept.
    helm(kube, "install", "tapestry", *install_args(chart, kube), "--take-ownership")
    cm = argocd_cm(kube)
    for key in KEYS:
        kind = key.rsplit("_", 1)[1]
        assert cm["data"][key] == script_path(kind).read_text(), key
    assert {k: cm["data"][k] for k in settings} == settings, sorted(cm["data"])
    assert cm["metadata"]["labels"]["app.kubernetes.io/part-of"] == "argocd"

    # Argo CD's manifests applied again (an Argo CD upgrade) and a Tapestry upgrade
    # leave each other's keys alone; uninstalling Tapestry keeps the ConfigMap.
    kube.kubectl("apply", "-f", "-", input=argo_cd_manifest(kube, settings))
    helm(kube, "upgrade", "tapestry", *install_args(chart, kube))
    assert set(argocd_cm(kube)["data"]) == KEYS | set(settings)
    helm(kube, "uninstall", "tapestry")
    assert set(argocd_cm(kube)["data"]) == KEYS | set(settings)


def test_an_argocd_cm_of_argo_cds_own_release_is_refused(kube: Kube, tmp_path: Path) -> None:
    """Argo CD installed by its own Helm chart owns argocd-cm: the toggle is refused, and
    the keys go into that chart's configs.cm instead (docs/gitops.md)."""
    chart = argocd_only_chart(tmp_path)
    kube.kubectl(
        "apply", "-f", "-", input=argo_cd_manifest(kube, {"url": "https://argocd.example"})
    )
    kube.kubectl(
        "annotate", "configmap", "argocd-cm",
        "meta.helm.sh/release-name=argo-cd", f"meta.helm.sh/release-namespace={kube.namespace}",
    )  # fmt: skip
    kube.kubectl("label", "configmap", "argocd-cm", "app.kubernetes.io/managed-by=Helm")
    refused = helm(kube, "install", "tapestry", *install_args(chart, kube), check=False)
    assert refused.returncode != 0
    assert 'current value is "argo-cd"' in refused.stderr, refused.stderr
    assert set(argocd_cm(kube)["data"]) == {"url"}
