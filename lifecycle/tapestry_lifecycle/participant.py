"""A participant's side of one round: discover, admit, answer, train, report.

`observe_plan` reads what the store holds for this participant; `decide` gives the one
next step. The operator launches an Indexed Job where the local runner starts torchrun;
both write the same signed receipts through `tapestry_protocol.exchange`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from tapestry_lifecycle.states import JobState, MemberState, Reason
from tapestry_protocol import rejections
from tapestry_protocol.documents import ReceiptState, RoundPlan, RoundResult, parse_time
from tapestry_protocol.exchange import (
    Verified,
    read_plan,
    read_plan_base,
    read_receipts,
    read_result,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.store import ObjectStore


class Admission(StrEnum):
    """How a participant admits a plan: by itself, or after a person approves it."""

    AUTOMATIC = "Automatic"
    MANUAL = "Manual"


class Approval(StrEnum):
    """A recorded decision on one round (manual admission)."""

    PENDING = "Pending"
    APPROVED = "Approved"
    DENIED = "Denied"


@dataclass(frozen=True)
class PlanView:
    """What the store says of one round, for participant `name`, at `now`."""

    name: str
    now: datetime
    plan: Verified[RoundPlan] | None = None
    refusal: str = ""  # why the plan or its base does not verify ("" when it does)
    receipts: frozenset[ReceiptState] = frozenset()
    uploaded: bool = False
    result: Verified[RoundResult] | None = None
    training: JobState = JobState.ABSENT
    training_message: str = ""
    approval: Approval = Approval.PENDING
    # what its own receipts say, as (reason, message): a finished round keeps reporting
    # why it was declined or failed after the Job that failed is gone
    answers: Mapping[ReceiptState, tuple[str, str]] = field(default_factory=dict)


class Do(StrEnum):
    IGNORE = "Ignore"  # nothing to do with this plan, ever
    DECLINE = "Decline"  # write a Declined receipt
    AWAIT_APPROVAL = "AwaitApproval"
    ACCEPT = "Accept"  # write the Accepted receipt, then train
    TRAIN = "Train"  # launch the training (again, after a lost Job)
    WAIT = "Wait"
    REPORT_FAILED = "ReportFailed"  # write a Failed receipt
    DONE = "Done"


@dataclass(frozen=True)
class Next:
    """The next step, the member state to show, and why."""

    do: Do
    state: MemberState
    reason: Reason
    message: str
    weight: float | None = None


def decide(view: PlanView, admission: Admission) -> Next:
    """The participant's next step for one round."""
    if view.plan is None:
        if view.refusal:
            return Next(Do.IGNORE, MemberState.PLANNED, Reason.PLAN_REFUSED, view.refusal)
        return Next(Do.WAIT, MemberState.PLANNED, Reason.WAITING_FOR_MEMBERS, "no plan yet")
    plan = view.plan.document
    if view.name not in plan.names:
        return Next(Do.IGNORE, MemberState.PLANNED, Reason.NOT_A_MEMBER, "not named in the plan")
    if view.result is not None:
        verdict = _verdict(view.name, view.result.document)
        if verdict.state != MemberState.LATE or not view.receipts & _ANSWERED_NO:
            return verdict
        # It answered no, but only as the round closed (e.g. at the deadline): its own
        # signed receipt says more than "late".
    if ReceiptState.FAILED in view.receipts:
        _, message = view.answers.get(ReceiptState.FAILED, ("", ""))
        return Next(
            Do.DONE, MemberState.FAILED, Reason.TRAINING_FAILED, message or view.training_message
        )
    if ReceiptState.DECLINED in view.receipts:
        reason, message = view.answers.get(ReceiptState.DECLINED, ("", ""))
        why = _known(reason, Reason.PLAN_REFUSED)
        return Next(Do.DONE, MemberState.DECLINED, why, message or "declined")
    if view.uploaded:
        return Next(Do.WAIT, MemberState.UPLOADED, Reason.UPLOADED, "waiting for the result")
    if ReceiptState.ACCEPTED not in view.receipts:
        return _admit(view, plan, admission)
    if view.training == JobState.FAILED:
        return Next(
            Do.REPORT_FAILED, MemberState.FAILED, Reason.TRAINING_FAILED,
            view.training_message or "training failed",
        )  # fmt: skip
    if view.training == JobState.SUCCEEDED:
        return Next(
            Do.REPORT_FAILED, MemberState.FAILED, Reason.TRAINING_FAILED,
            "training finished without committing an update",
        )  # fmt: skip
    if view.training == JobState.RUNNING:
        return Next(Do.WAIT, MemberState.TRAINING, Reason.TRAINING, "training")
    return Next(Do.TRAIN, MemberState.TRAINING, Reason.TRAINING, "starting training")


_ANSWERED_NO = frozenset({ReceiptState.FAILED, ReceiptState.DECLINED})


def _known(reason: str, default: Reason) -> Reason:
    """A reason read back from a receipt, if it is one of ours."""
    try:
        return Reason(reason)
    except ValueError:
        return default


def _admit(view: PlanView, plan: RoundPlan, admission: Admission) -> Next:
    if view.refusal:  # the plan verifies but its base does not
        return Next(Do.DECLINE, MemberState.DECLINED, Reason.PLAN_REFUSED, view.refusal)
    if view.now >= parse_time(plan.deadline):
        return Next(
            Do.DECLINE, MemberState.DECLINED, Reason.DEADLINE_PASSED,
            f"the deadline {plan.deadline} passed before training could start",
        )  # fmt: skip
    if view.approval == Approval.DENIED:  # a denied round is refused in either mode
        return Next(Do.DECLINE, MemberState.DECLINED, Reason.APPROVAL_DENIED, "approval denied")
    if admission == Admission.MANUAL and view.approval == Approval.PENDING:
        return Next(
            Do.AWAIT_APPROVAL, MemberState.PLANNED, Reason.AWAITING_APPROVAL,
            f"round {plan.round} waits for approval",
        )  # fmt: skip
    return Next(Do.ACCEPT, MemberState.ACCEPTED, Reason.ADMITTED, "admitted")


def _verdict(name: str, result: RoundResult) -> Next:
    for a in result.accepted:
        if a.participant == name:
            return Next(
                Do.DONE, MemberState.MERGED, Reason.MERGED, f"merged with weight {a.weight:.4f}",
                weight=a.weight,
            )  # fmt: skip
    for r in result.rejected:
        if r.participant == name:
            state = {
                rejections.LATE: MemberState.LATE,
                rejections.DECLINED: MemberState.DECLINED,
                rejections.TRAINING_FAILED: MemberState.FAILED,
            }.get(r.reason, MemberState.REJECTED)
            if state == MemberState.REJECTED:  # the merge's reason says what was wrong
                return Next(Do.DONE, state, Reason.REJECTED, f"{r.reason}: {r.message}")
            reason = Reason.TRAINING_FAILED if state == MemberState.FAILED else Reason.REJECTED
            return Next(Do.DONE, state, reason, r.message)  # the state says the reason
    return Next(Do.DONE, MemberState.REJECTED, Reason.REJECTED, "not in the result")


def observe_plan(
    store: ObjectStore,
    layout: Layout,
    round_number: int,
    name: str,
    coordinator_key: str,
    now: datetime,
    *,
    training: JobState = JobState.ABSENT,
    training_message: str = "",
    approval: Approval = Approval.PENDING,
) -> PlanView:
    """Read and verify the round's plan and this participant's own objects (blocking)."""
    try:
        plan = read_plan(store, layout, round_number, coordinator_key)
    except Rejected as e:
        if e.reason == rejections.MISSING_MANIFEST:
            return PlanView(name, now)
        return PlanView(name, now, refusal=f"{e.reason}: {e.message}")
    refusal = ""
    try:
        read_plan_base(store, layout, plan, coordinator_key)
    except Rejected as e:
        refusal = f"{e.reason}: {e.message}"
    if name not in plan.document.names:
        return PlanView(name, now, plan)
    answers = read_receipts(store, layout, plan, name)
    uploaded = store.exists(layout.update_manifest(round_number, name))
    result = None
    if store.exists(layout.result(round_number)):
        result = read_result(store, layout, round_number, coordinator_key)
    return PlanView(
        name, now, plan, refusal, frozenset(answers), uploaded, result, training,
        training_message, approval,
        {s: (r.document.reason, r.document.message) for s, r in answers.items()},
    )  # fmt: skip
