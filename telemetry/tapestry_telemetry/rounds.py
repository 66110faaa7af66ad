"""A round's telemetry, for both drivers of the round lifecycle (the operator and
`tapestry local run`): the round's and each participant's span contexts, the long
spans emitted when their end is first observed, and the round metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime

from opentelemetry.trace import SpanContext

from tapestry_protocol.documents import Outcome, Receipt, RoundPlan, RoundResult, parse_time
from tapestry_protocol.exchange import Verified
from tapestry_telemetry import catalog, tracing
from tapestry_telemetry.catalog import SpanName
from tapestry_telemetry.runtime import metrics


def round_context(plan: Verified[RoundPlan]) -> SpanContext:
    """The round span's context (the plan's traceparent): every span's ancestor."""
    return tracing.round_span_context(plan.document.traceparent, plan.sha256)


def participant_context(plan: Verified[RoundPlan], member: str) -> SpanContext:
    """`member`'s span in the round: ids derived from the plan's trace context, the same
    on every visit; the parent of its receipts, its training Job and the trainer."""
    return tracing.participant_span_context(plan.document.traceparent, plan.sha256, member)


def training_traceparent(plan: Verified[RoundPlan], member: str) -> str | None:
    """The `TRACEPARENT` of `member`'s training: its own span when this process exports
    traces, else the round's context (a trainer exporting elsewhere still joins it)."""
    from tapestry_telemetry.runtime import tracing_enabled

    if tracing_enabled():
        return tracing.format_traceparent(participant_context(plan, member))
    return plan.document.traceparent


def record_members(federation: str, round_number: int, states: Iterable[str],
                   every_state: Iterable[str]) -> None:  # fmt: skip
    """The round's number, and how many members are in each state (0 for the others)."""
    instruments = metrics()
    instruments.round_number.set(round_number, {catalog.FEDERATION: federation})
    counts = Counter(states)
    for state in every_state:
        attributes = {catalog.FEDERATION: federation, catalog.MEMBER_STATE: state}
        instruments.round_members.set(counts.get(state, 0), attributes)


def round_over(
    federation: str,
    plan: Verified[RoundPlan],
    result: RoundResult | None,
    ended: datetime,
    message: str = "",
) -> None:
    """The first sight of a round's result (or of its terminal failure, `result` None):
    the round span from the plan's issuedAt to `ended`, its duration, and the verdict
    on each member (counted by member: the coordinator's own view of contributions)."""
    started = parse_time(plan.document.issued_at)
    outcome = str(result.outcome) if result is not None else str(Outcome.FAILED)
    tracing.emit(
        SpanName.ROUND, round_context(plan), parent=None, start=started, end=ended,
        attributes={
            catalog.FEDERATION: federation,
            catalog.ROUND: plan.document.round,
            catalog.ROUND_OUTCOME: outcome,
        },
        error=None if outcome == Outcome.SUCCEEDED else (message or outcome),
    )  # fmt: skip
    instruments = metrics()
    labels = {catalog.FEDERATION: federation, catalog.ROUND_OUTCOME: outcome}
    instruments.round_duration.record(max(0.0, (ended - started).total_seconds()), labels)
    if result is None:
        return
    verdicts = [(a.participant, catalog.VERDICT_ACCEPTED, "") for a in result.accepted]
    verdicts += [(r.participant, catalog.VERDICT_REJECTED, r.reason) for r in result.rejected]
    for member, verdict, reason in sorted(verdicts):
        instruments.round_updates.add(
            1,
            {
                catalog.FEDERATION: federation,
                catalog.PARTICIPANT: member,
                catalog.UPDATE_VERDICT: verdict,
                catalog.REJECTION_REASON: reason,
            },
        )


def participant_over(
    federation: str,
    member: str,
    plan: Verified[RoundPlan],
    state: str,
    receipts: Iterable[Verified[Receipt]],
    ended: datetime,
    failed: bool,
) -> None:
    """The first sight of the end of `member`'s training of a round: its span, from its
    first receipt until `ended` (none if it never answered)."""
    times = [parse_time(r.document.created_at) for r in receipts]
    if not times:
        return
    tracing.emit(
        SpanName.PARTICIPANT_ROUND, participant_context(plan, member),
        parent=round_context(plan), start=min(times), end=ended,
        attributes={
            catalog.FEDERATION: federation,
            catalog.ROUND: plan.document.round,
            catalog.PARTICIPANT: member,
            catalog.MEMBER_STATE: state,
        },
        error=state if failed else None,
    )  # fmt: skip


def participant_verdict(federation: str, member: str, state: str) -> None:
    """A round `member` finished, counted once by its final state."""
    attributes = {
        catalog.FEDERATION: federation,
        catalog.PARTICIPANT: member,
        catalog.MEMBER_STATE: state,
    }
    metrics().participant_rounds.add(1, attributes)


def action_attributes(
    federation: str, round_number: int, member: str | None = None, **extra: str
) -> Mapping[str, str | int]:
    """The attributes of a span around one action of a round."""
    out: dict[str, str | int] = {catalog.FEDERATION: federation, catalog.ROUND: round_number}
    if member is not None:
        out[catalog.PARTICIPANT] = member
    return {**out, **extra}


# Member states (`tapestry_lifecycle.states.MemberState` values) in which a
# participant's training of a round is over (its span ends), and those that are its
# final verdict on the round (counted once).
TRAINING_OVER = frozenset({"Uploaded", "Merged", "Rejected", "Late", "Declined", "Failed"})
FINAL = TRAINING_OVER - {"Uploaded"}
UNSUCCESSFUL = frozenset({"Late", "Declined", "Failed"})
