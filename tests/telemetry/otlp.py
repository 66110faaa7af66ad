"""A small OTLP/HTTP receiver for tests: what the processes really exported.

It listens on 127.0.0.1, accepts `POST /v1/traces`, `/v1/metrics` and `/v1/logs` in
protobuf (optionally gzip-compressed), decodes them with opentelemetry-proto and keeps
every span and metric data point with its resource. Point `OTEL_EXPORTER_OTLP_ENDPOINT`
at `receiver.endpoint`.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return _attributes(v.kvlist_value.values)
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def _attributes(values: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in values if isinstance(kv, KeyValue)}


@dataclass(frozen=True)
class SpanRecord:
    service: str
    resource: dict[str, Any]
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    attributes: dict[str, Any]
    links: list[tuple[str, str, dict[str, Any]]]
    status_code: int  # 0 unset, 1 ok, 2 error
    start_ns: int
    end_ns: int

    @property
    def ids(self) -> tuple[str, str]:
        return self.trace_id, self.span_id


def one_span(spans: Iterable[SpanRecord], name: str, **attributes: object) -> SpanRecord:
    """The only span called `name` with these attribute values; fails naming what it found."""
    found = [
        s for s in spans
        if s.name == name and all(s.attributes.get(k) == v for k, v in attributes.items())
    ]  # fmt: skip
    assert len(found) == 1, f"{len(found)} spans {name} {attributes}: {found}"
    return found[0]


@dataclass(frozen=True)
class PointRecord:
    """One data point of one metric, as exported."""

    service: str
    resource: dict[str, Any]
    name: str
    unit: str
    kind: str  # sum, gauge, histogram, ...
    attributes: dict[str, Any]
    value: float  # the sum's or gauge's value; a histogram's count


@dataclass
class OtlpReceiver:
    """`with OtlpReceiver() as receiver:` ... `receiver.spans()`, `receiver.points()`."""

    spans_received: list[SpanRecord] = field(default_factory=list)
    points_received: list[PointRecord] = field(default_factory=list)
    requests: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "the receiver is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> Self:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding", "") == "gzip":
                    body = gzip.decompress(body)
                try:
                    reply = receiver._receive(self.path, body)
                except Exception as e:  # a malformed export is the exporter's bug: say so
                    self.send_error(400, str(e))
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _receive(self, path: str, body: bytes) -> bytes:
        with self._lock:
            self.requests += 1
        if path.endswith("/v1/traces"):
            traces = ExportTraceServiceRequest.FromString(body)
            spans = list(self._spans(traces))
            with self._lock:
                self.spans_received.extend(spans)
            reply: bytes = ExportTraceServiceResponse().SerializeToString()
            return reply
        if path.endswith("/v1/metrics"):
            metrics = ExportMetricsServiceRequest.FromString(body)
            points = list(self._points(metrics))
            with self._lock:
                self.points_received.extend(points)
            answer: bytes = ExportMetricsServiceResponse().SerializeToString()
            return answer
        if path.endswith("/v1/logs"):
            return b""
        raise ValueError(f"no OTLP signal at {path}")

    @staticmethod
    def _spans(request: ExportTraceServiceRequest) -> Iterator[SpanRecord]:
        for rs in request.resource_spans:
            resource = _attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    yield SpanRecord(
                        str(resource.get("service.name", "")), resource, s.trace_id.hex(),
                        s.span_id.hex(), s.parent_span_id.hex(), s.name,
                        _attributes(s.attributes),
                        [(ln.trace_id.hex(), ln.span_id.hex(), _attributes(ln.attributes))
                         for ln in s.links],
                        s.status.code, s.start_time_unix_nano, s.end_time_unix_nano,
                    )  # fmt: skip

    @staticmethod
    def _points(request: ExportMetricsServiceRequest) -> Iterator[PointRecord]:
        for rm in request.resource_metrics:
            resource = _attributes(rm.resource.attributes)
            service = str(resource.get("service.name", ""))
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data") or ""
                    data = getattr(m, kind)
                    for p in data.data_points:
                        if kind == "histogram":
                            value = float(p.count)
                        else:
                            field_name = p.WhichOneof("value")
                            value = float(getattr(p, field_name)) if field_name else 0.0
                        yield PointRecord(
                            service, resource, m.name, m.unit, kind, _attributes(p.attributes),
                            value,
                        )  # fmt: skip

    def spans(self) -> list[SpanRecord]:
        with self._lock:
            return list(self.spans_received)

    def points(self) -> list[PointRecord]:
        with self._lock:
            return list(self.points_received)

    def wait_for(
        self, what: str, done: Callable[[OtlpReceiver], bool], timeout: float = 120.0
    ) -> None:
        """Poll until `done(self)`; fail saying what was received otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(self):
                return
            time.sleep(0.5)
        names = sorted({(s.service, s.name) for s in self.spans()})
        metrics = sorted({(p.service, p.name) for p in self.points()})
        raise AssertionError(
            f"timed out after {timeout:.0f}s waiting for {what}; spans {names}, metrics {metrics}"
        )
