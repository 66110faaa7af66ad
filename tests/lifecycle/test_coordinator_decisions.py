"""The coordinator's round decisions, branch by branch, over views built from real
protocol documents (signed and schema-checked as a store would hold them, no store)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest

from tapestry_lifecycle.coordinator import Action, RoundView, Step, decide, member_states
from tapestry_lifecycle.states import JobState, MemberState, Reason, RoundPhase
from tapestry_protocol import rejections
from tapestry_protocol.documents import (
    CloseRecord,
    CloseTrigger,
    Contribution,
    Excluded,
    Included,
    Member,
    Outcome,
    ReceiptState,
    Ref,
    Refusal,
    RoundPlan,
    RoundResult,
    rfc3339,
)
from tapestry_protocol.exchange import Verified
from tapestry_protocol.layout import Layout
from tapestry_protocol.signing import SigningKey
from tests.lifecycle.signed import DEADLINE, NOW, verified

FEDERATION = "fed"
ROUND = 3
LAYOUT = Layout(FEDERATION)
POLL = timedelta(seconds=5)
MEMBERS = ("alpha", "beta", "gamma")
MEMBER_KEYS = {name: SigningKey.generate(name).public_key_text for name in MEMBERS}

ACCEPTED = frozenset({ReceiptState.ACCEPTED})
DECLINED = frozenset({ReceiptState.DECLINED})
FAILED = frozenset({ReceiptState.ACCEPTED, ReceiptState.FAILED})


def make_plan(
    names: Iterable[str] = MEMBERS, quorum: int = 2, deadline: datetime = DEADLINE
) -> Verified[RoundPlan]:
    base = Ref(LAYOUT.base_manifest(ROUND), "b" * 64)
    plan = RoundPlan(
        FEDERATION, ROUND, base, {"preset": "tiny"},
        {"innerSteps": 4, "learningRate": 0.003, "batchSize": 8, "seqLen": 32}, "fp32",
        tuple(Member(n, MEMBER_KEYS.get(n) or MEMBER_KEYS["alpha"]) for n in names),
        quorum, rfc3339(deadline), rfc3339(NOW - timedelta(minutes=5)),
    )  # fmt: skip
    return verified(LAYOUT.plan(ROUND), plan)


def make_close(
    plan: Verified[RoundPlan],
    included: Iterable[str] = (),
    excluded: Mapping[str, str] | None = None,
    trigger: CloseTrigger = CloseTrigger.DEADLINE,
) -> Verified[CloseRecord]:
    close = CloseRecord(
        FEDERATION, ROUND, plan.sha256, trigger,
        tuple(Included(n, "c" * 64) for n in included),
        tuple(Excluded(n, r, f"{r} at close") for n, r in (excluded or {}).items()),
        rfc3339(NOW),
    )  # fmt: skip
    return verified(LAYOUT.close(ROUND), close)


def make_result(
    plan: Verified[RoundPlan],
    close: Verified[CloseRecord],
    outcome: Outcome = Outcome.SUCCEEDED,
    merged: Mapping[str, float] | None = None,
    refused: Mapping[str, str] | None = None,
    message: str = "merged",
) -> Verified[RoundResult]:
    succeeded = outcome == Outcome.SUCCEEDED
    result = RoundResult(
        FEDERATION, ROUND, outcome, message, plan.sha256, plan.document.base.sha256,
        close.sha256,
        Ref(LAYOUT.base_manifest(ROUND + 1), "d" * 64) if succeeded else None,
        None, {"optimizer": "diloco"},
        tuple(
            Contribution(n, w, 1000, "c" * 64, 0.5, {"trainLoss": 2.5})
            for n, w in (merged or {}).items()
        ),
        tuple(Refusal(n, r, f"refused: {r}") for n, r in (refused or {}).items()),
        {"tokens": 1000},
    )  # fmt: skip
    return verified(LAYOUT.result(ROUND), result)


PLAN = make_plan()
CLOSE = make_close(PLAN, included=["alpha"], excluded={"beta": rejections.LATE})
SUCCESS = make_result(PLAN, CLOSE, merged={"alpha": 1.0}, refused={"beta": rejections.LATE})
FAILURE = make_result(
    PLAN, CLOSE, Outcome.FAILED, refused={"alpha": rejections.HASH_MISMATCH}, message="no quorum"
)


@dataclass(frozen=True)
class Case:
    """One row: a view, the driver's inputs, and the step expected."""

    id: str
    view: RoundView
    action: Action
    phase: RoundPhase
    reason: Reason
    suspended: bool = False
    base_ready: bool = True
    trigger: CloseTrigger | None = None
    recheck_after: timedelta | None = None
    message: str | None = None  # a substring of the step's message


def answered(**answers: frozenset[ReceiptState]) -> dict[str, frozenset[ReceiptState]]:
    return dict(answers)


CASES = [
    # --- a result ends the round, whatever else is true --------------------------------
    Case(
        "result-succeeded-is-done",
        RoundView(NOW, PLAN, close=CLOSE, result=SUCCESS, aggregator=JobState.SUCCEEDED),
        Action.DONE, RoundPhase.SUCCEEDED, Reason.SUCCEEDED, message="merged",
    ),
    Case(
        "result-succeeded-wins-over-suspend",
        RoundView(NOW, PLAN, close=CLOSE, result=SUCCESS),
        Action.DONE, RoundPhase.SUCCEEDED, Reason.SUCCEEDED, suspended=True,
    ),
    Case(
        "result-failed-is-stalled",
        RoundView(NOW, PLAN, close=CLOSE, result=FAILURE, aggregator=JobState.SUCCEEDED),
        Action.STALLED, RoundPhase.FAILED, Reason.NO_QUORUM, message="no quorum",
    ),
    Case(
        "result-failed-wins-over-a-failed-aggregator",
        RoundView(NOW, PLAN, close=CLOSE, result=FAILURE, aggregator=JobState.FAILED),
        Action.STALLED, RoundPhase.FAILED, Reason.NO_QUORUM,
    ),
    # --- suspend holds the round until it is closed ------------------------------------
    Case(
        "suspended-before-the-plan",
        RoundView(NOW),
        Action.WAIT, RoundPhase.SUSPENDED, Reason.SUSPENDED, suspended=True,
        message="spec.suspend",
    ),
    Case(
        "suspended-while-training",
        RoundView(NOW, PLAN, answers=answered(alpha=ACCEPTED)),
        Action.WAIT, RoundPhase.SUSPENDED, Reason.SUSPENDED, suspended=True,
    ),
    Case(
        "suspended-past-the-deadline-does-not-close",
        RoundView(DEADLINE + timedelta(hours=1), PLAN),
        Action.WAIT, RoundPhase.SUSPENDED, Reason.SUSPENDED, suspended=True,
    ),
    Case(
        "suspended-after-the-close-still-aggregates",
        RoundView(NOW, PLAN, close=CLOSE),
        Action.AGGREGATE, RoundPhase.AGGREGATING, Reason.CLOSED, suspended=True,
    ),
    # --- closed: the aggregator -------------------------------------------------------
    Case(
        "closed-aggregator-absent-aggregates",
        RoundView(NOW, PLAN, close=CLOSE),
        Action.AGGREGATE, RoundPhase.AGGREGATING, Reason.CLOSED,
    ),
    Case(
        "closed-aggregator-running-waits",
        RoundView(NOW, PLAN, close=CLOSE, aggregator=JobState.RUNNING),
        Action.WAIT, RoundPhase.AGGREGATING, Reason.AGGREGATING, recheck_after=POLL,
    ),
    Case(
        "closed-aggregator-succeeded-waits-for-the-result-to-show",
        RoundView(NOW, PLAN, close=CLOSE, aggregator=JobState.SUCCEEDED),
        Action.WAIT, RoundPhase.AGGREGATING, Reason.AGGREGATING, recheck_after=POLL,
    ),
    Case(
        "closed-aggregator-failed-is-stalled-with-its-message",
        RoundView(
            NOW, PLAN, close=CLOSE, aggregator=JobState.FAILED,
            aggregator_message="BackoffLimitExceeded: exit 2",
        ),
        Action.STALLED, RoundPhase.FAILED, Reason.AGGREGATOR_FAILED,
        message="BackoffLimitExceeded: exit 2",
    ),
    Case(
        "closed-aggregator-failed-without-a-message",
        RoundView(NOW, PLAN, close=CLOSE, aggregator=JobState.FAILED),
        Action.STALLED, RoundPhase.FAILED, Reason.AGGREGATOR_FAILED,
        message="the aggregator failed",
    ),
    Case(
        "closed-wins-over-the-deadline",
        RoundView(DEADLINE + timedelta(hours=1), PLAN, close=CLOSE, aggregator=JobState.RUNNING),
        Action.WAIT, RoundPhase.AGGREGATING, Reason.AGGREGATING, recheck_after=POLL,
    ),
    # --- no plan yet ------------------------------------------------------------------
    Case(
        "no-plan-base-not-ready-is-pending",
        RoundView(NOW),
        Action.WAIT, RoundPhase.PENDING, Reason.WAITING_FOR_BASE, base_ready=False,
        recheck_after=POLL, message="previous round",
    ),
    Case(
        "no-plan-base-ready-publishes",
        RoundView(NOW),
        Action.PUBLISH_PLAN, RoundPhase.TRAINING, Reason.PLAN_PUBLISHED,
    ),
    # --- following the members --------------------------------------------------------
    Case(
        "everyone-answered-closes-all-reported",
        RoundView(
            NOW, PLAN,
            answers=answered(alpha=ACCEPTED, beta=DECLINED, gamma=FAILED),
            uploaded=frozenset({"alpha"}),
        ),
        Action.CLOSE, RoundPhase.AGGREGATING, Reason.CLOSED,
        trigger=CloseTrigger.ALL_REPORTED, message="every member",
    ),
    Case(
        "everyone-uploaded-closes-all-reported-before-the-deadline",
        RoundView(NOW, PLAN, uploaded=frozenset(MEMBERS)),
        Action.CLOSE, RoundPhase.AGGREGATING, Reason.CLOSED, trigger=CloseTrigger.ALL_REPORTED,
    ),
    Case(
        "an-upload-counts-even-with-a-failed-receipt",
        RoundView(
            NOW, PLAN,
            answers=answered(alpha=FAILED, beta=FAILED, gamma=DECLINED),
            uploaded=frozenset({"alpha", "beta"}),
        ),
        Action.CLOSE, RoundPhase.AGGREGATING, Reason.CLOSED, trigger=CloseTrigger.ALL_REPORTED,
    ),
    Case(
        "declines-and-failures-lose-the-quorum",
        RoundView(NOW, PLAN, answers=answered(alpha=DECLINED, beta=FAILED, gamma=ACCEPTED)),
        Action.CLOSE, RoundPhase.AGGREGATING, Reason.CLOSED,
        trigger=CloseTrigger.QUORUM_LOST, message="only 1 members can still report",
    ),
    Case(
        "two-declines-with-quorum-one-still-waits",
        RoundView(
            NOW, make_plan(quorum=1), answers=answered(alpha=DECLINED, beta=DECLINED),
        ),
        Action.WAIT, RoundPhase.TRAINING, Reason.WAITING_FOR_MEMBERS, recheck_after=POLL,
        message="0/3 updates, quorum 1",
    ),
    Case(
        "the-deadline-closes",
        RoundView(
            DEADLINE + timedelta(seconds=1), PLAN,
            answers=answered(alpha=ACCEPTED, beta=ACCEPTED), uploaded=frozenset({"alpha"}),
        ),
        Action.CLOSE, RoundPhase.AGGREGATING, Reason.CLOSED, trigger=CloseTrigger.DEADLINE,
        message="has passed",
    ),
    Case(
        "the-deadline-closes-at-the-very-second",
        RoundView(DEADLINE, PLAN),
        Action.CLOSE, RoundPhase.AGGREGATING, Reason.CLOSED, trigger=CloseTrigger.DEADLINE,
    ),
    Case(
        "otherwise-waits-a-poll",
        RoundView(
            NOW, PLAN, answers=answered(alpha=ACCEPTED, beta=ACCEPTED),
            uploaded=frozenset({"alpha"}),
        ),
        Action.WAIT, RoundPhase.TRAINING, Reason.WAITING_FOR_MEMBERS, recheck_after=POLL,
        message="1/3 updates, quorum 2",
    ),
    Case(
        "otherwise-waits-no-longer-than-the-deadline",
        RoundView(DEADLINE - timedelta(seconds=2), PLAN),
        Action.WAIT, RoundPhase.TRAINING, Reason.WAITING_FOR_MEMBERS,
        recheck_after=timedelta(seconds=2),
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decide(case: Case) -> None:
    step = decide(case.view, suspended=case.suspended, base_ready=case.base_ready, poll=POLL)
    assert (step.action, step.phase, step.reason) == (case.action, case.phase, case.reason)
    assert step.trigger == case.trigger
    assert step.recheck_after == case.recheck_after
    if case.message is not None:
        assert case.message in step.message
    assert step.message  # conditions and events always get a sentence


def test_every_action_and_trigger_is_covered_by_a_row() -> None:
    actions = {c.action for c in CASES}
    assert actions == set(Action)
    triggers = {c.trigger for c in CASES} - {None}
    assert triggers == set(CloseTrigger) - {CloseTrigger.MANUAL}  # manual: `aggregate --close`


def test_a_wait_while_training_never_sleeps_past_the_deadline() -> None:
    for left in (timedelta(milliseconds=1), timedelta(seconds=4), timedelta(minutes=30)):
        step = decide(RoundView(DEADLINE - left, PLAN), suspended=False, base_ready=True, poll=POLL)
        assert step.action == Action.WAIT
        assert step.recheck_after is not None
        assert timedelta(0) < step.recheck_after <= min(POLL, left)


def test_base_readiness_does_not_matter_once_the_plan_is_out() -> None:
    view = RoundView(NOW, PLAN, answers=answered(alpha=ACCEPTED))
    steps = {decide(view, suspended=False, base_ready=ready, poll=POLL) for ready in (True, False)}
    assert len(steps) == 1
    assert isinstance(next(iter(steps)), Step)


# --- member_states ------------------------------------------------------------------


@dataclass(frozen=True)
class MemberCase:
    """What the store says of member `alpha`, and the state it is shown in."""

    id: str
    expected: MemberState
    answers: frozenset[ReceiptState] = frozenset()
    uploaded: bool = False
    excluded: str | None = None  # the close record's reason
    refused: str | None = None  # the result's reason
    merged: bool = False


MEMBER_CASES = [
    MemberCase("no-answer-is-planned", MemberState.PLANNED),
    MemberCase("accepted-receipt", MemberState.ACCEPTED, ACCEPTED),
    MemberCase("declined-receipt", MemberState.DECLINED, DECLINED),
    MemberCase("failed-receipt", MemberState.FAILED, FAILED),
    MemberCase("uploaded", MemberState.UPLOADED, ACCEPTED, uploaded=True),
    MemberCase("uploaded-without-a-receipt", MemberState.UPLOADED, uploaded=True),
    MemberCase("an-upload-beats-a-failed-receipt", MemberState.UPLOADED, FAILED, uploaded=True),
    MemberCase(
        "an-upload-beats-a-declined-receipt", MemberState.UPLOADED, DECLINED, uploaded=True
    ),
    MemberCase("late-at-the-close", MemberState.LATE, ACCEPTED, excluded=rejections.LATE),
    MemberCase(
        "late-in-the-result", MemberState.LATE, ACCEPTED,
        excluded=rejections.LATE, refused=rejections.LATE,
    ),
    MemberCase(
        "uploaded-after-the-close-is-late", MemberState.LATE, ACCEPTED, uploaded=True,
        excluded=rejections.LATE, refused=rejections.LATE,
    ),
    MemberCase(
        "declined-at-the-close", MemberState.DECLINED, DECLINED,
        excluded=rejections.DECLINED, refused=rejections.DECLINED,
    ),
    MemberCase(
        "failed-at-the-close", MemberState.FAILED, FAILED,
        excluded=rejections.TRAINING_FAILED, refused=rejections.TRAINING_FAILED,
    ),
    MemberCase(
        "declined-as-the-round-closed-is-declined-not-late", MemberState.DECLINED, DECLINED,
        excluded=rejections.LATE, refused=rejections.LATE,
    ),
    MemberCase(
        "failed-as-the-round-closed-is-failed-not-late", MemberState.FAILED, FAILED,
        excluded=rejections.LATE, refused=rejections.LATE,
    ),
    MemberCase(
        "rejected-by-the-merge", MemberState.REJECTED, ACCEPTED, uploaded=True,
        refused=rejections.HASH_MISMATCH,
    ),
    MemberCase("merged", MemberState.MERGED, ACCEPTED, uploaded=True, merged=True),
]  # fmt: skip


def _member_view(case: MemberCase) -> RoundView:
    close = result = None
    if case.excluded is not None or case.refused is not None or case.merged:
        excluded = {"alpha": case.excluded} if case.excluded else {}
        included = ["alpha"] if case.uploaded and not case.excluded else []
        close = make_close(PLAN, included, excluded)
    if close is not None and (case.refused is not None or case.merged):
        result = make_result(
            PLAN, close,
            merged={"alpha": 1.0} if case.merged else {},
            refused={"alpha": case.refused} if case.refused else {},
        )  # fmt: skip
    return RoundView(
        NOW, PLAN, answers={"alpha": case.answers},
        uploaded=frozenset({"alpha"}) if case.uploaded else frozenset(),
        close=close, result=result,
    )  # fmt: skip


@pytest.mark.parametrize("case", MEMBER_CASES, ids=[c.id for c in MEMBER_CASES])
def test_member_states(case: MemberCase) -> None:
    states = member_states(_member_view(case))
    assert states["alpha"] == case.expected
    assert states["beta"] == states["gamma"] == MemberState.PLANNED
    assert list(states) == list(MEMBERS)


def test_every_member_state_but_training_is_shown_by_the_coordinator() -> None:
    shown = {c.expected for c in MEMBER_CASES}
    # Training is the participant's own view of its Job; the coordinator sees receipts.
    assert shown == set(MemberState) - {MemberState.TRAINING}


def test_no_plan_no_members() -> None:
    assert member_states(RoundView(NOW)) == {}
    assert member_states(RoundView(NOW, answers={"alpha": ACCEPTED})) == {}


def test_a_whole_round_in_one_view() -> None:
    plan = make_plan(names=[*MEMBERS, "delta"], quorum=1)
    close = make_close(
        plan, included=["alpha", "beta"],
        excluded={"gamma": rejections.DECLINED, "delta": rejections.LATE},
    )  # fmt: skip
    result = make_result(
        plan, close, merged={"alpha": 1.0},
        refused={"beta": rejections.NON_FINITE, "gamma": rejections.DECLINED,
                 "delta": rejections.LATE},
    )  # fmt: skip
    view = RoundView(
        NOW, plan,
        answers={"alpha": ACCEPTED, "beta": ACCEPTED, "gamma": DECLINED, "delta": ACCEPTED},
        uploaded=frozenset({"alpha", "beta"}), close=close, result=result,
    )  # fmt: skip
    assert member_states(view) == {
        "alpha": MemberState.MERGED,
        "beta": MemberState.REJECTED,
        "gamma": MemberState.DECLINED,
        "delta": MemberState.LATE,
    }
    step = decide(view, suspended=False, base_ready=True, poll=POLL)
    assert step.action == Action.DONE
