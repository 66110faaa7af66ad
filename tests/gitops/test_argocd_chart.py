"""The chart's argocd-cm toggle (templates/argocd-health.yaml), rendered by real helm.

With `argocd.healthChecks.enabled` the chart renders Argo CD's argocd-cm with one
`resource.customizations.health.<group>_<Kind>` key per health check, each the kind's
health.lua as it is (and still a working check once rendered); without it, nothing of
Argo CD's. The same rendering is what docs/gitops.md copies into an Argo CD chart's
`configs.cm`.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.gitops.argo_lua import GROUP, REPO_ROOT, cases, kinds, load, run_health, script_path

CHART = REPO_ROOT / "charts" / "tapestry"
TEMPLATE = "templates/argocd-health.yaml"
pytestmark = pytest.mark.tools


def render(*args: str) -> list[dict[str, Any]]:
    from tests.tools import run_helm

    out = run_helm("template", "tapestry", str(CHART), "--namespace", "tapestry", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_enabled_renders_one_argocd_cm_key_per_health_check() -> None:
    (cm,) = render(
        "--set", "argocd.healthChecks.enabled=true", "--set", "argocd.namespace=gitops",
        "--show-only", TEMPLATE,
    )  # fmt: skip
    assert (cm["apiVersion"], cm["kind"]) == ("v1", "ConfigMap")
    meta = cm["metadata"]
    assert (meta["name"], meta["namespace"]) == ("argocd-cm", "gitops")
    # Argo CD reads only ConfigMaps labelled part-of argocd; uninstalling Tapestry must
    # not delete Argo CD's settings with it.
    assert meta["labels"]["app.kubernetes.io/part-of"] == "argocd"
    assert meta["annotations"]["helm.sh/resource-policy"] == "keep"
    expected = {
        f"resource.customizations.health.{GROUP}_{kind}": script_path(kind).read_text()
        for kind in kinds()
    }
    assert sorted(cm["data"]) == sorted(expected)
    for key, script in cm["data"].items():
        assert script == expected[key], f"{key} differs from its health.lua"


def test_the_rendered_scripts_are_the_checks() -> None:
    """Each rendered value, run on its kind's first case, gives that case's health."""
    (cm,) = render("--set", "argocd.healthChecks.enabled=true", "--show-only", TEMPLATE)
    for kind in kinds():
        script = cm["data"][f"resource.customizations.health.{GROUP}_{kind}"]
        for case in cases(kind):
            assert run_health(script, load(case.input_path)) == case.expected, case.id


@pytest.mark.parametrize("role", ["coordinator", "participant", "both"])
def test_disabled_by_default_renders_nothing_of_argo_cd(role: str) -> None:
    docs = render("--set", f"role={role}")
    assert docs, "the chart rendered nothing at all"
    found = [d for d in docs if d["metadata"]["name"] == "argocd-cm"]
    assert not found, found
