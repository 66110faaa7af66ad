"""The telemetry package's pure parts, with the SDK's in-memory exporters and its real
Prometheus translation: names, setup from the environment, the round's span ids,
spans around actions, store byte counts, and the flush of short-lived processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import tapestry_telemetry as telemetry
from tapestry_operator import __main__ as operator_main
from tapestry_operator import builders
from tapestry_protocol import pod
from tapestry_protocol.store import FilesystemStore
from tapestry_telemetry import catalog, runtime, tracing
from tapestry_telemetry.catalog import METRICS, Instrument, Service, SpanName
from tapestry_telemetry.store import metered
from tests.ports import free_port
from tests.telemetry.otlp import OtlpReceiver

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry.setup(Service.OPERATOR, environ={}, span_exporter=exporter)
    yield exporter
    telemetry.shutdown()


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    memory = InMemoryMetricReader()
    telemetry.setup(Service.TRAINER, environ={}, metric_readers=[memory])
    yield memory
    telemetry.shutdown()


def _record_every_metric() -> None:
    instruments = telemetry.metrics()
    for d in METRICS:
        instrument = getattr(instruments, d.name.removeprefix("tapestry.").replace(".", "_")
                             .removeprefix("operator_"))  # fmt: skip
        attributes = dict.fromkeys(d.attributes, "x")
        if d.instrument == Instrument.COUNTER:
            instrument.add(1, attributes)
        elif d.instrument == Instrument.GAUGE:
            instrument.set(1.5, attributes)
        else:
            instrument.record(0.5, attributes)


def test_every_metric_gets_its_documented_prometheus_name() -> None:
    """The names dashboards query are what the real translation produces."""
    port = free_port()
    env = {runtime.PROMETHEUS_HOST_ENV: "127.0.0.1"}
    telemetry.setup(Service.OPERATOR, prometheus_port=port, environ=env)
    try:
        _record_every_metric()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        telemetry.shutdown()
    families = {
        line.split()[2] for line in text.decode().splitlines() if line.startswith("# TYPE ")
    }
    for d in METRICS:
        assert d.prometheus in families, f"{d.name} is not exported as {d.prometheus}"
    assert "process_resident_memory_bytes" in families


def test_the_catalogue_follows_the_conventions() -> None:
    names = [d.name for d in METRICS]
    assert len(set(names)) == len(names)
    for d in METRICS:
        assert d.name.startswith("tapestry."), d.name
        assert catalog.ROUND not in d.attributes, f"{d.name}: a round number is no label"
        assert d.by, f"{d.name} names no process that emits it"
        if d.instrument == Instrument.HISTOGRAM:
            assert d.unit == "s" and d.buckets == tuple(sorted(d.buckets)), d.name
    assert len(set(telemetry.SPANS)) == len(telemetry.SPANS)


def test_nothing_is_set_up_or_even_imported_without_an_endpoint() -> None:
    code = textwrap.dedent("""
        import sys
        import tapestry_telemetry as t
        from tapestry_telemetry import tracing
        t.setup(t.Service.TRAINER, environ={})
        with tracing.phase(tracing.SpanName.TRAINING, tracing.new_traceparent()):
            t.metrics().training_tokens.add(5, {})
        assert not t.tracing_enabled() and not t.metrics_enabled()
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("environ", "traces", "metrics"),
    [
        ({}, None, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces",
         "http://c:4318/v1/metrics"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x"}, "http://t/x", None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_METRICS_EXPORTER": "none"},
         "http://c/v1/traces", None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_SDK_DISABLED": "true"}, None, None),
    ],
)  # fmt: skip
def test_otlp_endpoints_come_from_the_standard_environment(
    environ: dict[str, str], traces: str | None, metrics: str | None
) -> None:
    assert runtime._signal_endpoint("traces", environ) == traces
    assert runtime._signal_endpoint("metrics", environ) == metrics


@pytest.mark.parametrize(
    ("value", "chosen"),
    [
        ("", {"otlp", "prometheus"}),  # unset: each path where it is configured
        ("prometheus", {"prometheus"}),
        (" OTLP , prometheus", {"otlp", "prometheus"}),
        ("none", set()),
    ],
)
def test_the_metrics_exporters_come_from_otel_metrics_exporter(
    value: str, chosen: set[str]
) -> None:
    assert telemetry.metrics_exporters({telemetry.METRICS_EXPORTER_ENV: value}) == chosen


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("prometheus,console", "must be a comma-separated list of otlp, prometheus, none; "
         "got 'console'"),
        ("none,otlp", "'none' cannot be combined, got 'none,otlp'"),
    ],
)  # fmt: skip
def test_a_wrong_metrics_exporter_is_refused_clearly(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        telemetry.metrics_exporters({telemetry.METRICS_EXPORTER_ENV: value})


def test_the_operator_refuses_a_wrong_metrics_exporter_at_startup(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(telemetry.METRICS_EXPORTER_ENV, "prometheus,console")
    assert operator_main.main(["--metrics-port", "0", "--log-format", "text"]) == 2
    assert "OTEL_METRICS_EXPORTER must be a comma-separated list" in caplog.text


def _served(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("exporter", ["prometheus", "otlp", "otlp,prometheus"])
def test_the_operator_s_metrics_take_only_the_chosen_path_while_traces_go_over_otlp(
    exporter: str,
) -> None:
    """One Prometheus receiving both paths would count the operator twice: with
    OTEL_METRICS_EXPORTER the metrics go out one way, the spans still over OTLP."""
    port = free_port()
    with OtlpReceiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            telemetry.METRICS_EXPORTER_ENV: exporter,
            runtime.PROMETHEUS_HOST_ENV: "127.0.0.1",
        }
        telemetry.setup(Service.OPERATOR, prometheus_port=port, environ=env)
        try:
            telemetry.metrics().reconcile_errors.add(1, {catalog.RESOURCE: "federations"})
            with telemetry.tracer().start_as_current_span("a-span"):
                pass
            served = _served(port)
        finally:
            telemetry.shutdown()  # flushes both signals to the receiver
        pushed = {p.name for p in receiver.points()}
        assert [s.name for s in receiver.spans()] == ["a-span"]
    assert served == ("prometheus" in exporter)
    assert (catalog.RECONCILE_ERRORS.name in pushed) == ("otlp" in exporter), pushed


def test_metrics_port_setting() -> None:
    assert telemetry.metrics_port_from_env({}) == 9464
    assert telemetry.metrics_port_from_env({"TAPESTRY_METRICS_PORT": "0"}) == 0
    with pytest.raises(ValueError, match="TAPESTRY_METRICS_PORT must be a port number"):
        telemetry.metrics_port_from_env({"TAPESTRY_METRICS_PORT": "http"})


def test_pods_inherit_the_operators_settings_but_not_its_credentials_or_name() -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_RESOURCE_ATTRIBUTES": "k8s.cluster.name=de",
        "OTEL_SERVICE_NAME": "tapestry-operator",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer s3cr3t",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x=y",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": "/etc/ca.pem",
        "OTEL_EXPORTER_PROMETHEUS_HOST": "0.0.0.0",
        "OTEL_METRICS_EXPORTER": "prometheus",  # the operator's path; pods always push
        "HOME": "/root",
    }
    assert telemetry.pod_environment(environ) == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_RESOURCE_ATTRIBUTES": "k8s.cluster.name=de",
    }


def test_a_pods_own_trace_context_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's settings and the trace context are merged under the pod's
    environment: what the pod sets itself wins."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    ours = tracing.new_traceparent()
    env = builders._with_telemetry({"A": "1"}, ours)
    assert env == {"A": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                   pod.TRACEPARENT: ours}  # fmt: skip
    theirs = tracing.new_traceparent()
    assert builders._with_telemetry({pod.TRACEPARENT: theirs}, ours)[pod.TRACEPARENT] == theirs


def test_traceparents_round_trip_and_malformed_ones_are_none() -> None:
    text = tracing.new_traceparent()
    parsed = tracing.parse_traceparent(text)
    assert parsed is not None and tracing.format_traceparent(parsed) == text
    assert parsed.trace_flags.sampled
    for bad in (None, "", "00-zz-yy-01", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"):
        assert tracing.parse_traceparent(bad) is None


def test_a_participants_span_ids_are_fixed_by_the_plan() -> None:
    plan = tracing.new_traceparent()
    de = tracing.participant_span_context(plan, "sha", "de")
    assert de == tracing.participant_span_context(plan, "sha", "de")  # every visit
    es = tracing.participant_span_context(plan, "sha", "es")
    root = tracing.round_span_context(plan, "sha")
    assert de.trace_id == es.trace_id == root.trace_id
    assert len({de.span_id, es.span_id, root.span_id}) == 3
    assert tracing.format_traceparent(root) == plan
    # A plan without a trace context gets ids from its hash, stable as well.
    assert tracing.round_span_context(None, "sha") == tracing.round_span_context(None, "sha")
    assert tracing.round_span_context(None, "sha") != tracing.round_span_context(None, "other")


def test_emitted_spans_have_the_ids_fixed_in_advance(spans: InMemorySpanExporter) -> None:
    plan = tracing.new_traceparent()
    root = tracing.round_span_context(plan, "sha")
    member = tracing.participant_span_context(plan, "sha", "de")
    start = datetime(2030, 1, 1, tzinfo=UTC)
    tracing.emit(
        SpanName.PARTICIPANT_ROUND, member, parent=root, start=start,
        end=start + timedelta(seconds=30), attributes={catalog.PARTICIPANT: "de"},
    )  # fmt: skip
    tracing.emit(
        SpanName.ROUND, root, parent=None, start=start, end=start + timedelta(minutes=2),
        error="NoQuorum",
    )  # fmt: skip
    (participant, round_span) = spans.get_finished_spans()
    assert participant.context is not None and round_span.context is not None
    assert participant.context.span_id == member.span_id
    assert participant.context.trace_id == root.trace_id
    assert participant.parent is not None and participant.parent.span_id == root.span_id
    assert round_span.parent is None
    assert (round_span.context.trace_id, round_span.context.span_id) == (
        root.trace_id,
        root.span_id,
    )
    assert round_span.end_time is not None and round_span.start_time is not None
    assert round_span.end_time - round_span.start_time == 120 * 10**9
    assert round_span.status.status_code == StatusCode.ERROR
    with pytest.raises(ValueError, match="same trace"):
        other = tracing.round_span_context(tracing.new_traceparent(), "x")
        tracing.emit(SpanName.PARTICIPANT_ROUND, member, parent=other, start=start, end=start)


def test_phases_nest_and_say_what_failed(spans: InMemorySpanExporter) -> None:
    parent = tracing.new_traceparent()
    with tracing.phase(SpanName.TRAINING, parent, {catalog.PARTICIPANT: "de"}):
        with tracing.phase(SpanName.TRAINING_FETCH):
            pass
        own = tracing.current_traceparent()
        with pytest.raises(KeyError), tracing.phase(SpanName.TRAINING_UPLOAD):
            raise KeyError("a secret value")
    fetch, upload, training = spans.get_finished_spans()
    parsed = tracing.parse_traceparent(parent)
    assert parsed is not None and training.parent is not None and training.context is not None
    assert training.parent.span_id == parsed.span_id
    assert fetch.parent is not None and fetch.parent.span_id == training.context.span_id
    assert own == tracing.format_traceparent(training.context)
    assert upload.status.status_code == StatusCode.ERROR
    assert upload.attributes is not None and upload.attributes[catalog.ERROR_TYPE] == "KeyError"
    assert "secret" not in str(upload.status.description) and not upload.events
    assert training.status.status_code == StatusCode.UNSET


def test_without_tracing_a_phase_passes_the_context_it_continues_on() -> None:
    telemetry.shutdown()
    parent = tracing.new_traceparent()
    with tracing.phase(SpanName.TRAINING, parent):
        assert tracing.current_traceparent() == parent


def test_the_store_counts_bytes_both_ways(tmp_path: Path, reader: InMemoryMetricReader) -> None:
    store = metered(FilesystemStore(tmp_path, create=True), "demo")
    store.put("a/b", b"x" * 100)
    assert store.get("a/b") == b"x" * 100
    assert b"".join(store.iter_chunks("a/b", 30)) == b"x" * 100
    store.get("a/b", length=10)
    data = reader.get_metrics_data()
    assert data is not None
    points = {
        p.attributes[catalog.NETWORK_IO_DIRECTION]: p.value  # type: ignore[union-attr]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == catalog.STORE_IO.name
        for p in m.data.data_points
        if p.attributes is not None
    }
    assert points == {catalog.TRANSMIT: 100, catalog.RECEIVE: 210}
    telemetry.shutdown()
    plain = FilesystemStore(tmp_path)
    assert metered(plain, "demo") is plain  # metrics off: no wrapper at all


_EXPORTING_PROCESS = """
import os, sys, time
import tapestry_telemetry as t
from tapestry_telemetry import tracing
with t.process(t.Service.AGGREGATOR, federation="demo"):
    with tracing.phase(tracing.SpanName.AGGREGATION, None):
        t.metrics().aggregation_duration.record(1.0, {"tapestry.federation": "demo"})
        if sys.argv[1] == "raise":
            raise RuntimeError("the merge broke")
        print("ready", flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize("how", ["raise", "sigterm"])
def test_a_short_lived_process_flushes_when_it_fails(how: str) -> None:
    with OtlpReceiver() as receiver:
        env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "60000",  # nothing goes out before the exit
            "OTEL_METRIC_EXPORT_INTERVAL": "60000",
            "PYTHONPATH": str(ROOT),
        }
        child = subprocess.Popen(
            [sys.executable, "-c", _EXPORTING_PROCESS, how], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        if how == "sigterm":
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)
        assert child.returncode == (1 if how == "raise" else 128 + signal.SIGTERM)
        (span,) = receiver.spans()
        assert span.name == SpanName.AGGREGATION and span.status_code == 2
        assert span.service == Service.AGGREGATOR and span.resource[catalog.FEDERATION] == "demo"
        assert span.resource["service.instance.id"]
        names = {p.name for p in receiver.points()}
        assert catalog.AGGREGATION_DURATION.name in names


def test_the_round_states_are_the_lifecycles() -> None:
    """The states that end a participant's span are member states of the lifecycle."""
    from tapestry_lifecycle.states import MemberState
    from tapestry_telemetry import rounds

    known = {str(s) for s in MemberState}
    assert known >= rounds.TRAINING_OVER and rounds.UNSUCCESSFUL <= rounds.FINAL
    assert known - rounds.TRAINING_OVER == {"Planned", "Accepted", "Training"}
