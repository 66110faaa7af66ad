"""The Go-built test tools (tests/tools.py) work as the other tests rely on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.tools import REPO, HelmError, KStatus, ToolError, kstatus, run_helm

pytestmark = pytest.mark.tools


def _pin(tool: str, module: str) -> str:
    """The version tests/testbin/tools/<tool>/go.mod requires of `module`."""
    text = (REPO / "tests" / "testbin" / "tools" / tool / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)", text, re.MULTILINE)
    assert match, f"{module} is not pinned in tools/{tool}/go.mod"
    return match.group(1)


# -- helm ------------------------------------------------------------------------------


def test_helm_reports_the_pinned_version() -> None:
    version = run_helm("version", "--template", "{{.Version}}").stdout.strip()
    assert version == _pin("helm", "helm.sh/helm/v3")


def _chart(root: Path, template: str) -> Path:
    chart = root / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: tiny\nversion: 0.1.0\ndescription: A chart for the tool test\n"
        "icon: https://example.com/icon.png\n"
    )
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "configmap.yaml").write_text(template)
    return chart


_CONFIGMAP = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-tiny
data:
  greeting: {{ .Values.greeting | quote }}
"""


def test_helm_lints_and_renders_a_chart(tmp_path: Path) -> None:
    chart = _chart(tmp_path, _CONFIGMAP)
    lint = run_helm("lint", "--strict", str(chart))
    assert "1 chart(s) linted, 0 chart(s) failed" in lint.stdout
    rendered = run_helm("template", "demo", str(chart), "--set", "greeting=hi").stdout
    assert "name: demo-tiny" in rendered
    assert 'greeting: "hi"' in rendered


def test_helm_lint_failure_carries_helms_message(tmp_path: Path) -> None:
    chart = _chart(tmp_path, _CONFIGMAP.replace("{{ .Values.greeting | quote }}", "{{ .Values"))
    with pytest.raises(HelmError) as failed:
        run_helm("lint", str(chart))
    assert failed.value.returncode != 0
    assert "configmap.yaml" in str(failed.value)
    assert run_helm("lint", str(chart), check=False).returncode != 0


def test_helm_ignores_the_callers_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without kubeconfig= helm must not use the cluster the caller's KUBECONFIG names."""
    theirs = tmp_path / "theirs.yaml"
    theirs.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: theirs\n"
        "clusters: [{name: theirs, cluster: {server: 'https://127.0.0.1:9'}}]\n"
        "contexts: [{name: theirs, context: {cluster: theirs, user: theirs}}]\n"
        "users: [{name: theirs, user: {token: secret}}]\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(theirs))
    result = run_helm("list", check=False)
    assert result.returncode != 0
    assert "cluster unreachable" in result.stderr
    assert "127.0.0.1:9" not in result.stderr
    mine = run_helm("list", kubeconfig=theirs, check=False)
    assert "127.0.0.1:9" in mine.stderr


# -- kstatus ---------------------------------------------------------------------------


def _deployment(**status: Any) -> dict[str, Any]:
    """A Deployment as the API server returns it, at generation 2."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web",
            "namespace": "demo",
            "uid": "7f0b6b1c-2a51-4c36-9a43-2f3c4a1f0d11",
            "resourceVersion": "4242",
            "generation": 2,
            "creationTimestamp": "2026-01-10T09:00:00Z",
        },
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"},
            },
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
            },
        },
        "status": {"observedGeneration": 2, **status},
    }


ROLLED_OUT = _deployment(
    replicas=3,
    updatedReplicas=3,
    readyReplicas=3,
    availableReplicas=3,
    conditions=[
        {
            "type": "Available",
            "status": "True",
            "reason": "MinimumReplicasAvailable",
            "lastTransitionTime": "2026-01-10T09:01:00Z",
        },
        {
            "type": "Progressing",
            "status": "True",
            "reason": "NewReplicaSetAvailable",
            "lastTransitionTime": "2026-01-10T09:01:00Z",
        },
    ],
)

ROLLING = _deployment(
    replicas=4,
    updatedReplicas=1,
    readyReplicas=3,
    availableReplicas=3,
    unavailableReplicas=1,
    conditions=[
        {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
        {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"},
    ],
)

FAILED_JOB = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {
        "name": "train",
        "namespace": "demo",
        "uid": "0c2d8a7e-5b0e-4d84-9c1e-6a8f3b7e2c55",
        "generation": 1,
    },
    "spec": {
        "backoffLimit": 1,
        "completions": 1,
        "parallelism": 1,
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "train", "image": "busybox", "command": ["false"]}],
            }
        },
    },
    "status": {
        "failed": 2,
        "startTime": "2026-01-10T09:00:00Z",
        "conditions": [
            {
                "type": "FailureTarget",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            },
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            },
        ],
    },
}


def test_kstatus_judges_deployments_and_jobs() -> None:
    results = kstatus([ROLLED_OUT, ROLLING, FAILED_JOB])
    print(results)
    assert [r.status for r in results] == ["Current", "InProgress", "Failed"]
    assert "Replicas: 3" in results[0].message
    assert "Updated: 1/3" in results[1].message
    assert "failed: 2/1" in results[2].message
    assert all(isinstance(r, KStatus) for r in results)


def test_kstatus_sees_an_unobserved_generation_as_in_progress() -> None:
    stale = _deployment(**{**ROLLED_OUT["status"], "observedGeneration": 1})
    assert kstatus([stale])[0].status == "InProgress"
    assert kstatus([]) == []


def test_kstatus_rejects_what_is_not_an_object_list() -> None:
    with pytest.raises(ToolError, match="not a JSON array"):
        kstatus({"kind": "Deployment"})  # type: ignore[arg-type]
