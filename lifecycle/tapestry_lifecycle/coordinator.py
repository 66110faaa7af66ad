"""The coordinator's side of one round: publish, follow, close, aggregate, record.

`observe_round` reads the store once; `decide` turns what it saw into the one next
step. A driver carries the step out (the operator with a Job, the local runner with a
function call) and asks again, so a restart at any point just observes and goes on:
every step is write-once or idempotent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TypeVar

from tapestry_lifecycle.states import JobState, MemberState, Reason, RoundPhase
from tapestry_protocol import rejections
from tapestry_protocol.documents import (
    CloseRecord,
    CloseTrigger,
    ModelManifest,
    Outcome,
    ReceiptState,
    RoundPlan,
    RoundResult,
    parse_time,
)
from tapestry_protocol.exchange import (
    Verified,
    committed_updates,
    read_close,
    read_model,
    read_plan,
    read_receipts,
    read_result,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.store import ObjectStore


@dataclass(frozen=True)
class RoundView:
    """What the store says of one round (plus the driver's aggregator), at `now`."""

    now: datetime
    plan: Verified[RoundPlan] | None = None
    answers: Mapping[str, frozenset[ReceiptState]] = field(default_factory=dict)
    uploaded: frozenset[str] = frozenset()
    close: Verified[CloseRecord] | None = None
    result: Verified[RoundResult] | None = None
    aggregator: JobState = JobState.ABSENT
    aggregator_message: str = ""


class Action(StrEnum):
    WAIT = "Wait"
    PUBLISH_PLAN = "PublishPlan"
    CLOSE = "Close"
    AGGREGATE = "Aggregate"
    DONE = "Done"
    STALLED = "Stalled"


@dataclass(frozen=True)
class Step:
    """The next thing to do, why, and the phase to show meanwhile."""

    action: Action
    phase: RoundPhase
    reason: Reason
    message: str
    trigger: CloseTrigger | None = None
    recheck_after: timedelta | None = None


def member_states(view: RoundView) -> dict[str, MemberState]:
    """Every member of the plan with its state, from receipts, uploads and the result."""
    if view.plan is None:
        return {}
    states: dict[str, MemberState] = {}
    result = view.result.document if view.result else None
    merged = {a.participant for a in result.accepted} if result else set()
    refused = {r.participant: r.reason for r in result.rejected} if result else {}
    closed_out = (
        {e.participant: e.reason for e in view.close.document.excluded} if view.close else {}
    )
    for name in view.plan.document.names:
        answers = view.answers.get(name, frozenset())
        if name in merged:
            states[name] = MemberState.MERGED
        elif ReceiptState.FAILED in answers and name not in view.uploaded:
            states[name] = MemberState.FAILED  # its signed answer, even if it came late
        elif ReceiptState.DECLINED in answers and name not in view.uploaded:
            states[name] = MemberState.DECLINED
        elif rejections.LATE in (refused.get(name), closed_out.get(name)):
            states[name] = MemberState.LATE
        elif name in refused:
            states[name] = MemberState.REJECTED
        elif name in view.uploaded:
            states[name] = MemberState.UPLOADED
        elif ReceiptState.ACCEPTED in answers:
            states[name] = MemberState.ACCEPTED
        else:
            states[name] = MemberState.PLANNED
    return states


def decide(view: RoundView, *, suspended: bool, base_ready: bool, poll: timedelta) -> Step:
    """The coordinator's next step for one round."""
    if view.result is not None:
        result = view.result.document
        if result.outcome == Outcome.SUCCEEDED:
            return Step(Action.DONE, RoundPhase.SUCCEEDED, Reason.SUCCEEDED, result.message)
        return Step(Action.STALLED, RoundPhase.FAILED, Reason.NO_QUORUM, result.message)
    if suspended and view.close is None:
        return Step(Action.WAIT, RoundPhase.SUSPENDED, Reason.SUSPENDED, "spec.suspend is true")
    if view.close is not None:
        if view.aggregator == JobState.FAILED:
            return Step(
                Action.STALLED, RoundPhase.FAILED, Reason.AGGREGATOR_FAILED,
                view.aggregator_message or "the aggregator failed",
            )  # fmt: skip
        if view.aggregator in (JobState.RUNNING, JobState.SUCCEEDED):
            return Step(
                Action.WAIT, RoundPhase.AGGREGATING, Reason.AGGREGATING, "the aggregator runs",
                recheck_after=poll,
            )  # fmt: skip
        return Step(Action.AGGREGATE, RoundPhase.AGGREGATING, Reason.CLOSED, "round closed")
    if view.plan is None:
        if not base_ready:
            return Step(
                Action.WAIT, RoundPhase.PENDING, Reason.WAITING_FOR_BASE,
                "waiting for the previous round's base", recheck_after=poll,
            )  # fmt: skip
        return Step(Action.PUBLISH_PLAN, RoundPhase.TRAINING, Reason.PLAN_PUBLISHED, "publishing")
    plan = view.plan.document
    states = member_states(view)
    final = {MemberState.UPLOADED, MemberState.DECLINED, MemberState.FAILED}
    out = {MemberState.DECLINED, MemberState.FAILED}
    reported = sum(1 for s in states.values() if s in final)
    can_still_count = sum(1 for s in states.values() if s not in out)
    if reported == len(states):
        return _close(CloseTrigger.ALL_REPORTED, "every member has answered")
    if can_still_count < plan.min_participants:
        return _close(
            CloseTrigger.QUORUM_LOST,
            f"only {can_still_count} members can still report, the quorum is "
            f"{plan.min_participants}",
        )
    deadline = parse_time(plan.deadline)
    if view.now >= deadline:
        return _close(CloseTrigger.DEADLINE, f"the deadline {plan.deadline} has passed")
    uploaded = sum(1 for s in states.values() if s == MemberState.UPLOADED)
    return Step(
        Action.WAIT, RoundPhase.TRAINING, Reason.WAITING_FOR_MEMBERS,
        f"{uploaded}/{len(states)} updates, quorum {plan.min_participants}",
        recheck_after=min(poll, deadline - view.now),
    )  # fmt: skip


def _close(trigger: CloseTrigger, message: str) -> Step:
    return Step(Action.CLOSE, RoundPhase.AGGREGATING, Reason.CLOSED, message, trigger=trigger)


def round_base(
    store: ObjectStore, layout: Layout, round_number: int, coordinator_key: str
) -> Verified[ModelManifest] | None:
    """The base round r trains from, or None while it is not known yet.

    Round 0 trains from `bases/0`. Round r from round r-1's next base when r-1
    succeeded, and from r-1's own base when it failed, so one failed round does not stop
    a federation."""
    if round_number == 0:
        if not store.exists(layout.base_manifest(0)):
            return None
        return read_model(store, layout, layout.base_manifest(0), coordinator_key)
    previous = round_number - 1
    if not store.exists(layout.result(previous)):
        return None
    result = read_result(store, layout, previous, coordinator_key).document
    if result.outcome == Outcome.SUCCEEDED and result.next_base is not None:
        ref = result.next_base
    else:
        ref = read_plan(store, layout, previous, coordinator_key).document.base
    return read_model(store, layout, ref.manifest, coordinator_key, expected_sha256=ref.sha256)


def observe_round(
    store: ObjectStore,
    layout: Layout,
    round_number: int,
    coordinator_key: str,
    now: datetime,
    aggregator: JobState = JobState.ABSENT,
    aggregator_message: str = "",
) -> RoundView:
    """Read the round's objects from the store (blocking: run it off the event loop)."""
    plan = _optional(lambda: read_plan(store, layout, round_number, coordinator_key))
    if plan is None:
        return RoundView(now, aggregator=aggregator, aggregator_message=aggregator_message)
    names = plan.document.names
    uploaded = frozenset(committed_updates(store, layout, round_number, names))
    answers = {n: frozenset(read_receipts(store, layout, plan, n)) for n in names}
    close = _optional(lambda: read_close(store, layout, round_number, coordinator_key))
    result = _optional(lambda: read_result(store, layout, round_number, coordinator_key))
    return RoundView(now, plan, answers, uploaded, close, result, aggregator, aggregator_message)


T = TypeVar("T")


def _optional(read: Callable[[], T]) -> T | None:
    """A document that may not exist yet; one that exists but does not verify raises."""
    try:
        return read()
    except Rejected as e:
        if e.reason in (rejections.MISSING_MANIFEST, rejections.NOT_CLOSED):
            return None
        raise
