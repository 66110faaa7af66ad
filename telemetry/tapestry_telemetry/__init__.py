"""Tapestry's OpenTelemetry traces and metrics: the names (`catalog`), the per-process
setup from the standard `OTEL_*` environment (`runtime`), the round's trace context
(`tracing`) and the store's byte counters (`store`).

It imports nothing of ours but the protocol (for the store interface), so the
operator, the trainer and the aggregator can all use it.
"""

from tapestry_telemetry.catalog import METRICS, SPANS, MetricDef, Service, SpanName
from tapestry_telemetry.runtime import (
    DEFAULT_METRICS_PORT,
    METRICS_EXPORTER_ENV,
    METRICS_PORT_ENV,
    Metrics,
    MetricsExporter,
    flush,
    metrics,
    metrics_enabled,
    metrics_exporters,
    metrics_port_from_env,
    pod_environment,
    process,
    prometheus_port,
    setup,
    shutdown,
    tracer,
    tracing_enabled,
)

__all__ = [
    "DEFAULT_METRICS_PORT",
    "METRICS",
    "METRICS_EXPORTER_ENV",
    "METRICS_PORT_ENV",
    "SPANS",
    "MetricDef",
    "Metrics",
    "MetricsExporter",
    "Service",
    "SpanName",
    "flush",
    "metrics",
    "metrics_enabled",
    "metrics_exporters",
    "metrics_port_from_env",
    "pod_environment",
    "process",
    "prometheus_port",
    "setup",
    "shutdown",
    "tracer",
    "tracing_enabled",
]
