"""One trace per round, built by processes that come and go.

The coordinator makes the round's trace context when it publishes the plan and puts
it in the signed plan (`traceparent`, W3C Trace Context). The spans of the round are
then made by an operator whose daemons visit a round many times and may restart at
any point, and by short-lived trainer and aggregator pods. So the two long spans (the
round's own span and each participant's span) are not held open in memory: their
ids are fixed in advance and each is emitted once, when its end is observed, with its
start time read back from the store:

- the round span (`tapestry.round`) has exactly the trace id and span id of the plan's
  `traceparent`; it starts at the plan's `issuedAt` and is emitted when the
  coordinator first sees the round's result;
- a participant's span (`tapestry.participant.round`) has a span id derived from the
  plan's traceparent and the participant's name, so every visit (and the Job's
  `TRACEPARENT`) knows it before it exists; it starts at the participant's first
  receipt and is emitted when its training is over.

Everything else is a short span around one action (publish, receipt, Job creation,
training, upload, merge), a child of the round's or the participant's span context.
docs/observability.md draws the tree.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import secrets
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from tapestry_telemetry.catalog import ERROR_TYPE, SpanName
from tapestry_telemetry.runtime import flush, tracer

Attributes = Mapping[str, AttributeValue]

_PROPAGATOR = TraceContextTextMapPropagator()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_FORCED: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "tapestry_forced_ids", default=None
)


@functools.cache
def id_generator() -> Any:
    """The SDK's random ids, except while `emit` gives a span the ids fixed for it in
    advance (imported only when tracing is on: the SDK costs nothing when off)."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class Ids(RandomIdGenerator):
        def generate_span_id(self) -> int:
            forced = _FORCED.get()
            return forced[1] if forced else super().generate_span_id()

        def generate_trace_id(self) -> int:
            forced = _FORCED.get()
            return forced[0] if forced else super().generate_trace_id()

    return Ids()


def new_traceparent() -> str:
    """A fresh, sampled trace context for a round's plan."""
    trace_id = int.from_bytes(secrets.token_bytes(16)) or 1
    span_id = int.from_bytes(secrets.token_bytes(8)) or 1
    return format_traceparent(SpanContext(trace_id, span_id, False, _SAMPLED))


def parse_traceparent(traceparent: str | None) -> SpanContext | None:
    """The span context a `traceparent` names, or None when it is absent or malformed."""
    if not traceparent:
        return None
    ctx = _PROPAGATOR.extract({"traceparent": traceparent})
    span_context = trace.get_current_span(ctx).get_span_context()
    return span_context if span_context.is_valid else None


def format_traceparent(span_context: SpanContext) -> str:
    flags = int(span_context.trace_flags)
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{flags:02x}"


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\0".join(parts).encode()).digest()


def round_span_context(plan_traceparent: str | None, plan_sha256: str) -> SpanContext:
    """The round span's ids: the plan's traceparent, or (a plan without one) ids derived
    from the plan's hash, so they are the same on every visit."""
    parsed = parse_traceparent(plan_traceparent)
    if parsed is not None:
        return SpanContext(parsed.trace_id, parsed.span_id, True, TraceFlags(parsed.trace_flags))
    digest = _digest("round", plan_sha256)
    trace_id = int.from_bytes(digest[:16]) or 1
    span_id = int.from_bytes(digest[16:24]) or 1
    return SpanContext(trace_id, span_id, True, _SAMPLED)


def participant_span_context(
    plan_traceparent: str | None, plan_sha256: str, participant: str
) -> SpanContext:
    """The ids of `participant`'s span in the round: same trace, a derived span id."""
    root = round_span_context(plan_traceparent, plan_sha256)
    digest = _digest("participant", format_traceparent(root), participant)
    return SpanContext(
        root.trace_id, int.from_bytes(digest[:8]) or 1, True, TraceFlags(root.trace_flags)
    )  # fmt: skip


def parent_context(parent: SpanContext | str | None) -> Context:
    """An OpenTelemetry context whose current span is `parent` (a new trace if None)."""
    if isinstance(parent, str):
        parent = parse_traceparent(parent)
    if parent is None or not parent.is_valid:
        return Context()
    remote = SpanContext(parent.trace_id, parent.span_id, True, parent.trace_flags)
    return trace.set_span_in_context(trace.NonRecordingSpan(remote), Context())


def link_to(traceparent: str | None, attributes: Attributes | None = None) -> Link | None:
    parsed = parse_traceparent(traceparent)
    return None if parsed is None else Link(parsed, attributes)


def _ns(when: datetime) -> int:
    return int(when.timestamp() * 1e9)


def emit(
    name: SpanName,
    ids: SpanContext,
    *,
    parent: SpanContext | None,
    start: datetime,
    end: datetime,
    attributes: Attributes | None = None,
    error: str | None = None,
) -> None:
    """Record a span whose ids were fixed in advance (`round_span_context`,
    `participant_span_context`), from `start` to `end`, and export it now."""
    if parent is not None and parent.trace_id != ids.trace_id:
        raise ValueError("a span's parent must be in the same trace")
    token = _FORCED.set((ids.trace_id, ids.span_id))
    try:
        span = tracer().start_span(
            name, context=parent_context(parent), attributes=attributes,
            start_time=_ns(min(start, end)),
        )  # fmt: skip
    finally:
        _FORCED.reset(token)
    if error:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=_ns(end))
    flush()  # its end was observed once; a restart must not lose it in a buffer


CURRENT = object()  # `phase`'s default parent: the current span


@contextlib.contextmanager
def phase(
    name: SpanName,
    parent: SpanContext | str | object | None = CURRENT,
    attributes: Attributes | None = None,
    links: Sequence[Link] = (),
) -> Iterator[trace.Span]:
    """A span around one action, child of `parent` (a span context, a traceparent, None
    for a new trace, or by default the current span), current inside the block. An
    exception escaping the block marks it failed with the exception's type only: its
    message could hold data."""
    context = None if parent is CURRENT else parent_context(parent)  # type: ignore[arg-type]
    with tracer().start_as_current_span(
        name, context=context, attributes=attributes, links=list(links),
        record_exception=False, set_status_on_exception=False,
    ) as span:  # fmt: skip
        try:
            yield span
        except BaseException as e:
            span.set_attribute(ERROR_TYPE, type(e).__name__)
            span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}"))
            raise


def current_traceparent() -> str | None:
    """The current span's context as a traceparent: the span of this process when
    tracing is on, else the context it continues (the API's no-op spans carry their
    parent's), else None."""
    span_context = trace.get_current_span().get_span_context()
    return format_traceparent(span_context) if span_context.is_valid else None


def record(
    name: SpanName,
    parent: SpanContext | str | None,
    start: datetime,
    end: datetime | None = None,
    attributes: Attributes | None = None,
) -> None:
    """A span for an action that is over and succeeded (a plan published, a Job
    created), from `start` to `end` (default: now). Recorded after the fact, so an action
    that turned out to be a repeat leaves no span."""
    span = tracer().start_span(
        name, context=parent_context(parent), attributes=attributes, start_time=_ns(start)
    )
    span.end(end_time=None if end is None else _ns(end))
