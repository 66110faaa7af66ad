"""The Go-built test tools (tests/tools.py) work as the other tests rely on."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, Counter, start_http_server

from tests.tools import (
    REPO,
    HelmError,
    KStatus,
    Prometheus,
    PrometheusError,
    ToolError,
    ensure_tools,
    kstatus,
    run_helm,
)

pytestmark = pytest.mark.tools


def _pin(tool: str, module: str) -> str:
    """The version tests/testbin/tools/<tool>/go.mod requires of `module`."""
    text = (REPO / "tests" / "testbin" / "tools" / tool / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)", text, re.MULTILINE)
    assert match, f"{module} is not pinned in tools/{tool}/go.mod"
    return match.group(1)


def test_a_missing_tool_fails_with_the_scripts_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAPESTRY_TOOLS_ASSETS", str(tmp_path))
    with pytest.raises(ToolError, match="lacks: helm prometheus"):
        ensure_tools("helm", "prometheus")


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


# -- Prometheus ------------------------------------------------------------------------


@pytest.fixture
def exporter_target() -> Iterator[tuple[str, Counter]]:
    """A prometheus_client /metrics server on a free loopback port, and its counter."""
    registry = CollectorRegistry()
    counter = Counter("tools_demo_requests", "Requests served", ["code"], registry=registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    yield f"127.0.0.1:{server.server_address[1]}", counter
    server.shutdown()
    thread.join(5)


def test_prometheus_scrapes_a_target(exporter_target: tuple[str, Counter]) -> None:
    target, counter = exporter_target
    counter.labels(code="200").inc(3)
    counter.labels(code="500").inc()
    started = time.time()
    with Prometheus([target]) as prom:
        assert prom.wait_for_series(f'up{{job="scrape", instance="{target}"}} == 1')
        series = prom.wait_for_series('tools_demo_requests_total{code="200"}')
        assert [(s["metric"]["job"], float(s["value"][1])) for s in series] == [("scrape", 3)]
        assert float(prom.query("sum(tools_demo_requests_total)")[0]["value"][1]) == 4
        assert float(prom.query("1 + 1")[0]["value"][1]) == 2  # a scalar result
        ranged = prom.query_range(
            'tools_demo_requests_total{code="500"}', started - 60, time.time() + 1, 1
        )
        assert ranged and {float(v) for _, v in ranged[0]["values"]} == {1}


def test_prometheus_picks_up_added_targets(exporter_target: tuple[str, Counter]) -> None:
    target, counter = exporter_target
    counter.labels(code="201").inc(7)
    with Prometheus() as prom:
        assert prom.query("tools_demo_requests_total") == []
        prom.add_targets([f"http://{target}/metrics"], job="late", labels={"team": "tools"})
        series = prom.wait_for_series('tools_demo_requests_total{job="late", team="tools"}')
        assert float(series[0]["value"][1]) == 7


def test_prometheus_reports_a_bad_expression() -> None:
    with Prometheus() as prom, pytest.raises(PrometheusError, match="parse error") as err:
        prom.query("sum(")
    assert err.value.args[0].startswith("bad_data: ")


def test_otlp_push_becomes_series_with_translated_names() -> None:
    """What an OTLP metric is called in Prometheus; the assertion messages print the
    names, so this test doubles as the reference for dashboards and alerts."""
    with Prometheus() as prom:
        resource = Resource.create(
            {
                "service.name": "tools-test",
                "service.instance.id": "pod-0",
                "deployment.environment.name": "ci",
            }
        )
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=prom.otlp_metrics_endpoint),
            export_interval_millis=3_600_000,  # only force_flush exports
        )
        provider = MeterProvider(resource=resource, metric_readers=[reader])
        meter = provider.get_meter("tests.tools")
        meter.create_counter("tapestry.test.received", unit="By").add(
            1024, {"tapestry.phase": "upload"}
        )
        meter.create_histogram("tapestry.test.duration", unit="s").record(0.5)
        meter.create_counter("tapestry.test.retries", unit="{retry}").add(2)
        meter.create_up_down_counter("tapestry.test.queue.bytes", unit="By").add(5)
        meter.create_gauge("tapestry.test.utilization", unit="1").set(0.25)
        meter.create_counter("tapestry.test.steps", unit="1").add(4)
        meter.create_histogram("tapestry.test.latency", unit="ms").record(12)
        assert provider.force_flush(30_000)
        provider.shutdown()

        received = prom.wait_for_series('{job="tools-test", __name__=~"tapestry_test_.*"}')
        names = sorted({s["metric"]["__name__"] for s in received})
        expected = [
            "tapestry_test_duration_seconds_bucket",
            "tapestry_test_duration_seconds_count",
            "tapestry_test_duration_seconds_sum",
            "tapestry_test_latency_milliseconds_bucket",
            "tapestry_test_latency_milliseconds_count",
            "tapestry_test_latency_milliseconds_sum",
            "tapestry_test_queue_bytes",
            "tapestry_test_received_bytes_total",
            "tapestry_test_retries_total",
            "tapestry_test_steps_total",
            "tapestry_test_utilization_ratio",
        ]
        assert names == expected, f"OTLP metrics arrived as {names}"

        counter = prom.query("tapestry_test_received_bytes_total")
        labels = counter[0]["metric"]
        assert float(counter[0]["value"][1]) == 1024
        assert labels["job"] == "tools-test" and labels["instance"] == "pod-0", labels
        assert labels["tapestry_phase"] == "upload", labels
        assert "deployment_environment_name" not in labels, labels
        count = prom.query("tapestry_test_duration_seconds_count")
        assert float(count[0]["value"][1]) == 1
        info = prom.query('target_info{job="tools-test"}')
        assert info and info[0]["metric"]["deployment_environment_name"] == "ci", info
