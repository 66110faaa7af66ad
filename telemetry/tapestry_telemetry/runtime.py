"""Per-process telemetry: set up from the standard `OTEL_*` environment, flush on exit.

A process calls `setup` once (the operator) or uses `process` around its work (the
short-lived trainer and aggregator, so their last spans and metrics are exported even
when they fail). Nothing is exported unless an OTLP endpoint is configured
(`OTEL_EXPORTER_OTLP_ENDPOINT`, or the signal's own `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
/ `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`); then spans and metrics go out over OTLP/HTTP
(protobuf). The operator also serves its metrics in Prometheus text on `/metrics`.
`OTEL_METRICS_EXPORTER` (`otlp`, `prometheus`, `none`, or a comma-separated list) picks
which of those two paths a process's metrics take, so that one Prometheus does not
receive the same series twice; unset, both are used where configured. Without any of
these, the SDK is not even imported: spans and instruments are the API's no-ops.

The providers are this module's own, not the API's globals, so a process (or a test)
can set up again after `shutdown`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import metadata
from types import FrameType
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace

from tapestry_telemetry import catalog
from tapestry_telemetry.catalog import Instrument, MetricDef, Service

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

SCOPE = "tapestry"
METRICS_PORT_ENV = "TAPESTRY_METRICS_PORT"
DEFAULT_METRICS_PORT = 9464
PROMETHEUS_HOST_ENV = "OTEL_EXPORTER_PROMETHEUS_HOST"  # the SDK's name for the bind address
DEFAULT_PROMETHEUS_HOST = "0.0.0.0"
SHUTDOWN_TIMEOUT_MS = 10_000
METRICS_EXPORTER_ENV = "OTEL_METRICS_EXPORTER"  # the OpenTelemetry SDK's own name


class MetricsExporter(StrEnum):
    """The values of `OTEL_METRICS_EXPORTER` Tapestry knows (the OpenTelemetry spec's)."""

    OTLP = "otlp"  # push to the OTLP endpoint
    PROMETHEUS = "prometheus"  # serve /metrics on the metrics port
    NONE = "none"  # neither


# OTEL_* settings that must not be copied into the pods the operator creates: the
# service name is each process's own, headers may hold credentials (they would show in
# the Job's spec), certificate and key paths name files of the operator's pod, and the
# operator's choice of metrics path is its own (a short-lived pod cannot be scraped:
# it always pushes over OTLP).
_NOT_PASSED_ON = ("OTEL_SERVICE_NAME", "OTEL_EXPORTER_PROMETHEUS_", METRICS_EXPORTER_ENV)
_NOT_PASSED_ON_SUFFIXES = ("_HEADERS", "_CERTIFICATE", "_CLIENT_KEY", "_CLIENT_CERTIFICATE")


def version() -> str:
    try:
        return metadata.version("tapestry")
    except metadata.PackageNotFoundError:
        return "0.0.0"


# --- instruments ------------------------------------------------------------------------


class Metrics:
    """One instrument per metric of the catalogue, created from one meter.

    With telemetry off the meter is the API's no-op meter: recording costs a call."""

    def __init__(self, meter: otel_metrics.Meter) -> None:
        self.round_duration: otel_metrics.Histogram = _create(meter, catalog.ROUND_DURATION)
        self.round_number: otel_metrics._Gauge = _create(meter, catalog.ROUND_NUMBER)
        self.round_members: otel_metrics._Gauge = _create(meter, catalog.ROUND_MEMBERS)
        self.round_updates: otel_metrics.Counter = _create(meter, catalog.ROUND_UPDATES)
        self.participant_rounds: otel_metrics.Counter = _create(meter, catalog.PARTICIPANT_ROUNDS)
        self.store_io: otel_metrics.Counter = _create(meter, catalog.STORE_IO)
        self.aggregation_duration: otel_metrics.Histogram = _create(
            meter, catalog.AGGREGATION_DURATION
        )
        self.aggregation_throughput: otel_metrics._Gauge = _create(
            meter, catalog.AGGREGATION_THROUGHPUT
        )
        self.training_duration: otel_metrics.Histogram = _create(meter, catalog.TRAINING_DURATION)
        self.training_step_duration: otel_metrics.Histogram = _create(
            meter, catalog.TRAINING_STEP_DURATION
        )
        self.training_loss: otel_metrics._Gauge = _create(meter, catalog.TRAINING_LOSS)
        self.training_throughput: otel_metrics._Gauge = _create(meter, catalog.TRAINING_THROUGHPUT)
        self.training_tokens: otel_metrics.Counter = _create(meter, catalog.TRAINING_TOKENS)
        self.reconcile_duration: otel_metrics.Histogram = _create(meter, catalog.RECONCILE_DURATION)
        self.reconcile_errors: otel_metrics.Counter = _create(meter, catalog.RECONCILE_ERRORS)


def _create(meter: otel_metrics.Meter, d: MetricDef) -> Any:
    if d.instrument == Instrument.COUNTER:
        return meter.create_counter(d.name, unit=d.unit, description=d.description)
    if d.instrument == Instrument.GAUGE:
        return meter.create_gauge(d.name, unit=d.unit, description=d.description)
    return meter.create_histogram(
        d.name, unit=d.unit, description=d.description,
        explicit_bucket_boundaries_advisory=[float(b) for b in d.buckets] or None,
    )  # fmt: skip


# --- state ------------------------------------------------------------------------------


@dataclass
class _State:
    service: Service | None = None
    tracer: trace.Tracer = field(default_factory=trace.NoOpTracer)
    metrics: Metrics = field(default_factory=lambda: Metrics(otel_metrics.NoOpMeter(SCOPE)))
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    prometheus: Any = None  # the HTTP server serving /metrics
    prometheus_port: int = 0


_state = _State()
_lock = threading.Lock()
_registered = False  # shutdown() registered with atexit


def tracer() -> trace.Tracer:
    """The process's tracer (a no-op one until `setup` enables tracing)."""
    return _state.tracer


def metrics() -> Metrics:
    """The process's instruments (no-ops until `setup` enables a metric export)."""
    return _state.metrics


def tracing_enabled() -> bool:
    return _state.tracer_provider is not None


def metrics_enabled() -> bool:
    return _state.meter_provider is not None


def prometheus_port() -> int:
    """The port `/metrics` is served on (0: not served)."""
    return _state.prometheus_port


# --- configuration from the environment -------------------------------------------------


def metrics_exporters(environ: Mapping[str, str] = os.environ) -> frozenset[MetricsExporter]:
    """The metrics paths `OTEL_METRICS_EXPORTER` names. Unset or empty: both, each where
    it is configured (an OTLP endpoint, a metrics port); `none`: neither."""
    text = environ.get(METRICS_EXPORTER_ENV, "").strip().lower()
    if not text:
        return frozenset({MetricsExporter.OTLP, MetricsExporter.PROMETHEUS})
    names = [n.strip() for n in text.split(",")]
    known = [str(e) for e in MetricsExporter]
    wrong = [n for n in names if n not in known]
    if wrong:
        raise ValueError(
            f"{METRICS_EXPORTER_ENV} must be a comma-separated list of "
            f"{', '.join(known)}; got {', '.join(repr(n) for n in wrong)}"
        )
    chosen = frozenset(MetricsExporter(n) for n in names)
    if MetricsExporter.NONE in chosen and len(chosen) > 1:
        raise ValueError(f"{METRICS_EXPORTER_ENV}: 'none' cannot be combined, got {text!r}")
    return chosen - {MetricsExporter.NONE}


def _signal_endpoint(signal_name: str, environ: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP URL of one signal ('traces' or 'metrics'), or None when it is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    upper = signal_name.upper()
    if signal_name == "metrics":
        if MetricsExporter.OTLP not in _metrics_exporters_or_default(environ):
            return None
    else:
        exporters = environ.get(f"OTEL_{upper}_EXPORTER", "otlp").lower()
        if "otlp" not in {e.strip() for e in exporters.split(",")}:
            return None
    own = environ.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT", "").strip()
    if own:
        return own
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    return f"{base.rstrip('/')}/v1/{signal_name}" if base else None


def _metrics_exporters_or_default(environ: Mapping[str, str]) -> frozenset[MetricsExporter]:
    """`metrics_exporters`, or the default (with a warning) when the setting is wrong:
    a short-lived process goes on with its work (the operator refuses it at startup)."""
    try:
        return metrics_exporters(environ)
    except ValueError as e:
        log.warning("%s; using the default", e)
        return metrics_exporters({})


def metrics_port_from_env(environ: Mapping[str, str] = os.environ) -> int:
    """`TAPESTRY_METRICS_PORT` (default 9464; 0 switches `/metrics` off)."""
    text = environ.get(METRICS_PORT_ENV, "").strip()
    if not text:
        return DEFAULT_METRICS_PORT
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"{METRICS_PORT_ENV} must be a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{METRICS_PORT_ENV} must be between 0 and 65535, got {port}")
    return port


def pod_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The operator's `OTEL_*` settings that the pods it creates inherit, so each party's
    trainers and aggregators export to that party's own collector."""
    out = {}
    for name, value in sorted(environ.items()):
        if not name.startswith("OTEL_") or name.startswith(_NOT_PASSED_ON):
            continue
        if name.endswith(_NOT_PASSED_ON_SUFFIXES):
            continue
        out[name] = value
    return out


def resource_attributes(
    service: Service, federation: str | None = None, participant: str | None = None
) -> dict[str, str]:
    attributes = {
        "service.name": str(service),
        "service.namespace": "tapestry",
        "service.version": version(),
        "service.instance.id": str(uuid.uuid4()),
    }
    if federation:
        attributes[catalog.FEDERATION] = federation
    if participant:
        attributes[catalog.PARTICIPANT] = participant
    return attributes


# --- setup and shutdown -----------------------------------------------------------------


def setup(
    service: Service,
    *,
    federation: str | None = None,
    participant: str | None = None,
    prometheus_port: int = 0,
    environ: Mapping[str, str] | None = None,
    span_exporter: SpanExporter | None = None,
    metric_readers: Sequence[MetricReader] = (),
) -> None:
    """Configure this process's telemetry (replacing an earlier setup).

    `prometheus_port` > 0 serves Prometheus text on that port (`/metrics`, bound to
    `OTEL_EXPORTER_PROMETHEUS_HOST`, default 0.0.0.0) unless `OTEL_METRICS_EXPORTER`
    leaves `prometheus` out; OTLP metrics likewise need `otlp` in it (or it unset).
    `span_exporter` and `metric_readers` add exporters besides the environment's (tests
    use the SDK's in-memory ones)."""
    environ = os.environ if environ is None else environ
    shutdown()
    traces_url = _signal_endpoint("traces", environ)
    metrics_url = _signal_endpoint("metrics", environ)
    if MetricsExporter.PROMETHEUS not in _metrics_exporters_or_default(environ):
        prometheus_port = 0
    if not (traces_url or metrics_url or prometheus_port or span_exporter or metric_readers):
        return  # off: the API's no-ops, and no SDK import
    protocol = environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    if (traces_url or metrics_url) and protocol != "http/protobuf":
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s: only http/protobuf is supported", protocol)
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create(resource_attributes(service, federation, participant))
    with _lock:
        state = _State(service=service)
        readers = list(metric_readers)
        if prometheus_port:  # first: a port in use fails the setup before anything starts
            server, reader = _prometheus(prometheus_port, environ)
            state.prometheus, state.prometheus_port = server, prometheus_port
            readers.append(reader)
        if traces_url or span_exporter is not None:
            state.tracer_provider = _tracer_provider(resource, traces_url, span_exporter)
            state.tracer = state.tracer_provider.get_tracer(SCOPE, version())
        if metrics_url:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=metrics_url)))
        if readers:
            from opentelemetry.sdk.metrics import MeterProvider

            state.meter_provider = MeterProvider(
                metric_readers=readers, resource=resource, shutdown_on_exit=False
            )
            state.metrics = Metrics(state.meter_provider.get_meter(SCOPE, version()))
        global _state, _registered
        _state = state
        if not _registered:
            atexit.register(shutdown)
            _registered = True


def _tracer_provider(resource: Any, url: str | None, extra: SpanExporter | None) -> TracerProvider:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from tapestry_telemetry.tracing import id_generator

    provider = TracerProvider(
        resource=resource, id_generator=id_generator(), shutdown_on_exit=False
    )
    if url:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    if extra is not None:
        provider.add_span_processor(SimpleSpanProcessor(extra))
    return provider


def _prometheus(port: int, environ: Mapping[str, str]) -> tuple[Any, MetricReader]:
    """`/metrics` on `port`: the catalogue's metrics and the process's own."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

    host = environ.get(PROMETHEUS_HOST_ENV, "").strip() or DEFAULT_PROMETHEUS_HOST
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    reader = PrometheusMetricReader(registry=registry)
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise OSError(f"cannot serve metrics on {host}:{port}: {e}") from None
    return server, reader


def flush(timeout_ms: int = SHUTDOWN_TIMEOUT_MS) -> None:
    """Export what is buffered now (spans that must not wait for the next batch)."""
    if _state.tracer_provider is not None:
        _state.tracer_provider.force_flush(timeout_ms)


def shutdown(timeout_ms: int = SHUTDOWN_TIMEOUT_MS) -> None:
    """Flush and stop every exporter; afterwards telemetry is off (idempotent)."""
    global _state
    with _lock:
        state, _state = _state, _State()
    if state.tracer_provider is not None:
        with contextlib.suppress(Exception):
            state.tracer_provider.force_flush(timeout_ms)
        with contextlib.suppress(Exception):
            state.tracer_provider.shutdown()
    if state.meter_provider is not None:
        with contextlib.suppress(Exception):
            state.meter_provider.force_flush(timeout_ms)
        with contextlib.suppress(Exception):
            state.meter_provider.shutdown(timeout_ms)
    if state.prometheus is not None:
        state.prometheus.shutdown()
        state.prometheus.server_close()


@contextlib.contextmanager
def process(
    service: Service,
    *,
    federation: str | None = None,
    participant: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Iterator[None]:
    """Telemetry for a short-lived process: set up, run the block, then flush and shut
    down, also when the block raises or the process is sent SIGTERM (which becomes
    SystemExit(143) so that the flush runs)."""
    setup(service, federation=federation, participant=participant, environ=environ)
    restore = _exit_on_sigterm()
    try:
        yield
    finally:
        restore()
        shutdown()


def _exit_on_sigterm() -> Any:
    """Turn SIGTERM into SystemExit while the block runs, if nobody else handles it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None

    def stop(signum: int, _: FrameType | None) -> None:
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)
