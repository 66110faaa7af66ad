"""A participant's round decisions, branch by branch, over views built from real
protocol documents (signed and schema-checked as a store would hold them, no store)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta

import pytest

from tapestry_lifecycle.participant import Admission, Approval, Do, Next, PlanView, decide
from tapestry_lifecycle.states import JobState, MemberState, Reason
from tapestry_protocol import rejections
from tapestry_protocol.documents import (
    Contribution,
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
ROUND = 7
LAYOUT = Layout(FEDERATION)
ME = "alpha"
OTHER = "beta"
KEYS = {n: SigningKey.generate(n).public_key_text for n in (ME, OTHER)}
ACCEPTED = frozenset({ReceiptState.ACCEPTED})
AUTO, MANUAL = Admission.AUTOMATIC, Admission.MANUAL


def make_plan(names: tuple[str, ...] = (ME, OTHER)) -> Verified[RoundPlan]:
    plan = RoundPlan(
        FEDERATION, ROUND, Ref(LAYOUT.base_manifest(ROUND), "b" * 64), {"preset": "tiny"},
        {"innerSteps": 4, "learningRate": 0.003, "batchSize": 8, "seqLen": 32}, "fp32",
        tuple(Member(n, KEYS[n]) for n in names), 1, rfc3339(DEADLINE),
        rfc3339(NOW - timedelta(minutes=5)),
    )  # fmt: skip
    return verified(LAYOUT.plan(ROUND), plan)


PLAN = make_plan()


def make_result(
    merged: Mapping[str, float] | None = None, refused: Mapping[str, str] | None = None
) -> Verified[RoundResult]:
    result = RoundResult(
        FEDERATION, ROUND, Outcome.SUCCEEDED if merged else Outcome.FAILED, "done",
        PLAN.sha256, "b" * 64, "c" * 64,
        Ref(LAYOUT.base_manifest(ROUND + 1), "d" * 64) if merged else None, None,
        {"optimizer": "fedavg"},
        tuple(
            Contribution(n, w, 500, "e" * 64, 0.25, {"trainLoss": 3.0})
            for n, w in (merged or {}).items()
        ),
        tuple(Refusal(n, r, "why it was refused") for n, r in (refused or {}).items()),
        {},
    )  # fmt: skip
    return verified(LAYOUT.result(ROUND), result)


def view(**changes: object) -> PlanView:
    """A view of the plan that names this participant, with `changes`."""
    return replace(PlanView(ME, NOW, PLAN), **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Case:
    id: str
    view: PlanView
    do: Do
    state: MemberState
    reason: Reason
    admission: Admission = AUTO
    message: str | None = None  # a substring of the step's message
    weight: float | None = None


def receipts(*states: ReceiptState) -> frozenset[ReceiptState]:
    return frozenset(states)


BASE_REFUSAL = f"{rejections.HASH_MISMATCH}: base manifest sha256 differs"
PLAN_REFUSAL = f"{rejections.BAD_SIGNATURE}: plan.json signature does not verify"

CASES = [
    # --- the plan --------------------------------------------------------------------
    Case(
        "no-plan-yet-waits", PlanView(ME, NOW),
        Do.WAIT, MemberState.PLANNED, Reason.WAITING_FOR_MEMBERS,
    ),
    Case(
        "a-refused-plan-is-ignored", PlanView(ME, NOW, refusal=PLAN_REFUSAL),
        Do.IGNORE, MemberState.PLANNED, Reason.PLAN_REFUSED, message=PLAN_REFUSAL,
    ),
    Case(
        "not-a-member-is-ignored", PlanView(ME, NOW, make_plan((OTHER,))),
        Do.IGNORE, MemberState.PLANNED, Reason.NOT_A_MEMBER,
    ),
    Case(
        "not-a-member-is-ignored-even-with-a-refused-base",
        PlanView(ME, NOW, make_plan((OTHER,)), refusal=BASE_REFUSAL),
        Do.IGNORE, MemberState.PLANNED, Reason.NOT_A_MEMBER,
    ),
    # --- the result's verdict --------------------------------------------------------
    Case(
        "merged-with-its-weight",
        view(receipts=ACCEPTED, uploaded=True, result=make_result({ME: 0.625, OTHER: 0.375})),
        Do.DONE, MemberState.MERGED, Reason.MERGED, message="0.6250", weight=0.625,
    ),
    Case(
        "declined-as-the-round-closed-shows-its-own-answer-not-late",
        view(
            receipts=receipts(ReceiptState.DECLINED),
            answers={ReceiptState.DECLINED: ("DeadlinePassed", "the deadline passed")},
            result=make_result({OTHER: 1.0}, {ME: rejections.LATE}),
        ),
        Do.DONE, MemberState.DECLINED, Reason.DEADLINE_PASSED, message="the deadline passed",
    ),
    Case(
        "rejected-as-late",
        view(receipts=ACCEPTED, result=make_result({OTHER: 1.0}, {ME: rejections.LATE})),
        Do.DONE, MemberState.LATE, Reason.REJECTED, message="why it was refused",
    ),
    Case(
        "late-even-while-its-job-still-runs",
        view(
            receipts=ACCEPTED, training=JobState.RUNNING,
            result=make_result({OTHER: 1.0}, {ME: rejections.LATE}),
        ),
        Do.DONE, MemberState.LATE, Reason.REJECTED,
    ),
    Case(
        "declined-in-the-result",
        view(
            receipts=receipts(ReceiptState.DECLINED),
            result=make_result({OTHER: 1.0}, {ME: rejections.DECLINED}),
        ),
        Do.DONE, MemberState.DECLINED, Reason.REJECTED,
    ),
    Case(
        "training-failed-in-the-result",
        view(
            receipts=receipts(ReceiptState.ACCEPTED, ReceiptState.FAILED),
            result=make_result({OTHER: 1.0}, {ME: rejections.TRAINING_FAILED}),
        ),
        Do.DONE, MemberState.FAILED, Reason.TRAINING_FAILED,
    ),
    Case(
        "rejected-by-the-merge",
        view(
            receipts=ACCEPTED, uploaded=True,
            result=make_result({OTHER: 1.0}, {ME: rejections.DELTA_TOO_LARGE}),
        ),
        Do.DONE, MemberState.REJECTED, Reason.REJECTED,
        message=f"{rejections.DELTA_TOO_LARGE}: why it was refused",
    ),
    Case(
        "missing-from-the-result",
        view(receipts=ACCEPTED, uploaded=True, result=make_result({OTHER: 1.0})),
        Do.DONE, MemberState.REJECTED, Reason.REJECTED, message="not in the result",
    ),
    # --- its own receipts and upload ---------------------------------------------------
    Case(
        "a-failed-receipt-is-done",
        view(
            receipts=receipts(ReceiptState.ACCEPTED, ReceiptState.FAILED),
            training=JobState.FAILED, training_message="OOMKilled",
        ),
        Do.DONE, MemberState.FAILED, Reason.TRAINING_FAILED, message="OOMKilled",
    ),
    Case(
        "a-declined-receipt-is-done",
        view(receipts=receipts(ReceiptState.DECLINED)),
        Do.DONE, MemberState.DECLINED, Reason.PLAN_REFUSED,
    ),
    Case(
        "uploaded-waits-for-the-result",
        view(receipts=ACCEPTED, uploaded=True, training=JobState.SUCCEEDED),
        Do.WAIT, MemberState.UPLOADED, Reason.UPLOADED,
    ),
    # --- admission ------------------------------------------------------------------
    Case(
        "manual-and-pending-awaits-approval", view(),
        Do.AWAIT_APPROVAL, MemberState.PLANNED, Reason.AWAITING_APPROVAL, MANUAL,
        message=f"round {ROUND}",
    ),
    Case(
        "manual-and-denied-declines", view(approval=Approval.DENIED),
        Do.DECLINE, MemberState.DECLINED, Reason.APPROVAL_DENIED, MANUAL,
    ),
    Case(
        "manual-and-approved-accepts", view(approval=Approval.APPROVED),
        Do.ACCEPT, MemberState.ACCEPTED, Reason.ADMITTED, MANUAL,
    ),
    Case(
        "automatic-and-denied-declines", view(approval=Approval.DENIED),
        Do.DECLINE, MemberState.DECLINED, Reason.APPROVAL_DENIED, AUTO,
    ),
    Case(
        "the-deadline-passed-before-accepting", view(now=DEADLINE),
        Do.DECLINE, MemberState.DECLINED, Reason.DEADLINE_PASSED, message="passed",
    ),
    Case(
        "the-deadline-passed-before-approval", view(now=DEADLINE, approval=Approval.APPROVED),
        Do.DECLINE, MemberState.DECLINED, Reason.DEADLINE_PASSED, MANUAL,
    ),
    Case(
        "a-refused-base-declines", view(refusal=BASE_REFUSAL),
        Do.DECLINE, MemberState.DECLINED, Reason.PLAN_REFUSED, message=BASE_REFUSAL,
    ),
    Case(
        "a-refused-base-declines-without-waiting-for-approval", view(refusal=BASE_REFUSAL),
        Do.DECLINE, MemberState.DECLINED, Reason.PLAN_REFUSED, MANUAL,
    ),
    Case(
        "automatic-accepts", view(),
        Do.ACCEPT, MemberState.ACCEPTED, Reason.ADMITTED,
    ),
    Case(
        "automatic-ignores-a-pending-approval", view(approval=Approval.PENDING),
        Do.ACCEPT, MemberState.ACCEPTED, Reason.ADMITTED,
    ),
    # --- training ----------------------------------------------------------------------
    Case(
        "accepted-without-a-job-trains", view(receipts=ACCEPTED),
        Do.TRAIN, MemberState.TRAINING, Reason.TRAINING,
    ),
    Case(
        "accepted-trains-even-if-approval-is-withdrawn",
        view(receipts=ACCEPTED, approval=Approval.PENDING),
        Do.TRAIN, MemberState.TRAINING, Reason.TRAINING, MANUAL,
    ),
    Case(
        "job-running-waits", view(receipts=ACCEPTED, training=JobState.RUNNING),
        Do.WAIT, MemberState.TRAINING, Reason.TRAINING,
    ),
    Case(
        "job-failed-reports-its-message",
        view(
            receipts=ACCEPTED, training=JobState.FAILED,
            training_message="BackoffLimitExceeded: exit code 3 (refused)",
        ),
        Do.REPORT_FAILED, MemberState.FAILED, Reason.TRAINING_FAILED,
        message="BackoffLimitExceeded: exit code 3 (refused)",
    ),
    Case(
        "job-failed-without-a-message",
        view(receipts=ACCEPTED, training=JobState.FAILED),
        Do.REPORT_FAILED, MemberState.FAILED, Reason.TRAINING_FAILED, message="training failed",
    ),
    Case(
        "job-succeeded-without-an-upload-reports-failure",
        view(receipts=ACCEPTED, training=JobState.SUCCEEDED),
        Do.REPORT_FAILED, MemberState.FAILED, Reason.TRAINING_FAILED,
        message="without committing an update",
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decide(case: Case) -> None:
    step = decide(case.view, case.admission)
    assert (step.do, step.state, step.reason) == (case.do, case.state, case.reason)
    assert step.weight == case.weight
    if case.message is not None:
        assert case.message in step.message


def test_every_step_is_covered_by_a_row() -> None:
    assert {c.do for c in CASES} == set(Do)
    assert {c.state for c in CASES} == set(MemberState)


def test_a_denied_round_is_never_accepted_in_either_mode() -> None:
    """deniedRounds refuse a round whatever the admission mode (the CRD's promise), and
    the coordinator hears it at once through a Declined receipt."""
    for admission in Admission:
        step = decide(view(approval=Approval.DENIED), admission)
        assert step.do == Do.DECLINE, admission
        assert step.state == MemberState.DECLINED


def test_the_result_settles_the_round_whatever_else_is_observed() -> None:
    result = make_result({ME: 1.0})
    for training in JobState:
        for answers in (frozenset(), ACCEPTED, receipts(*ReceiptState)):
            for uploaded in (False, True):
                got = decide(
                    view(receipts=answers, uploaded=uploaded, training=training, result=result),
                    MANUAL,
                )
                assert got == Next(
                    Do.DONE, MemberState.MERGED, Reason.MERGED, "merged with weight 1.0000",
                    weight=1.0,
                )  # fmt: skip


def test_admission_happens_only_before_the_accepted_receipt() -> None:
    """Once accepted, neither the deadline nor the approval list stops a Job that runs."""
    late = view(receipts=ACCEPTED, now=DEADLINE + timedelta(hours=1), training=JobState.RUNNING)
    for approval in Approval:
        for admission in Admission:
            step = decide(replace(late, approval=approval), admission)
            assert (step.do, step.state) == (Do.WAIT, MemberState.TRAINING)
