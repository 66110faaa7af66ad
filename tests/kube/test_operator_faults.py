"""The faults a round must survive, on the single-cluster example, and what the user sees
of each in `status` (and events): a participant whose Job fails, one that never reports,
manual admission (approved, and not approved in time), a round without quorum, and a
second FederationRound for a round that already has one.

Each test deploys the example on its own bucket and namespaces (`tests.kube.deployment`)
with the operator as its own process, on the session's test control plane and MinIO.
"""

from __future__ import annotations

from typing import Any

import pytest

from tapestry_protocol.documents import CloseTrigger, Outcome, ReceiptState
from tapestry_protocol.exchange import read_close, read_plan, read_receipt, read_result
from tests.kube import deployment as shared
from tests.kube.client import Obj
from tests.kube.deployment import Deployment, Setup, dump

deployment = shared.deployment  # the shared fixture: the example, deployed per Setup
pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.torch, pytest.mark.slow]

ROUND = "demo-round-0"
NO_DATA_REASON = "cannot load data"  # the trainer's USAGE exit on an empty data directory
# Ready, Reconciling, Stalled as kstatus reads them
DONE = {"Ready": "True", "Reconciling": "False", "Stalled": "False"}
FAILED = {"Ready": "False", "Reconciling": "False", "Stalled": "True"}
IDLE = {"Ready": "False", "Reconciling": "False", "Stalled": "False"}


def conditions(obj: Obj) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}


def condition_states(obj: Obj) -> dict[str, str]:
    return {t: c["status"] for t, c in conditions(obj).items()}


def members(obj: Obj) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in obj.get("status", {}).get("members", [])}


def states(obj: Obj) -> dict[str, str]:
    return {name: m["state"] for name, m in members(obj).items()}


def round_row(participant: Obj, number: int) -> dict[str, Any]:
    rows: dict[int, dict[str, Any]] = {
        r["round"]: r for r in participant.get("status", {}).get("rounds", [])
    }
    assert number in rows, dump(participant.get("status", {}))
    return rows[number]


def stalled_with(reason: str) -> Any:
    return lambda o: (
        conditions(o).get("Stalled", {}).get("status") == "True"
        and (conditions(o)["Stalled"]["reason"] == reason)
    )


def assert_failed_member(d: Deployment, done: Obj, member: str) -> None:
    """The member's failed Job as every party reports it: the round's row, the signed
    Failed receipt in the store, the Participant's status and events, the Job itself."""
    row = members(done)[member]
    assert row["state"] == "Failed", dump(done["status"])
    assert row["reason"] == "TrainingFailed" and NO_DATA_REASON in row["message"], row
    layout = d.layout
    plan = read_plan(d.store, layout, 0, d.coordinator_key)
    receipt = read_receipt(d.store, layout, plan, member, ReceiptState.FAILED).document
    assert receipt.participant == member and receipt.plan_sha256 == plan.sha256
    assert receipt.reason == "TrainingFailed" and NO_DATA_REASON in receipt.message, receipt
    participant = d.client.get(d.participant_path(member))
    assert participant["status"]["state"] == "Failed", dump(participant["status"])
    row = round_row(participant, 0)
    assert row["state"] == "Failed" and NO_DATA_REASON in row["message"], row
    warnings = [e for e in d.events(d.ns(member), member) if e[1] == "TrainingFailed"]
    assert warnings and warnings[0][0] == "Warning" and NO_DATA_REASON in warnings[0][2], warnings
    job = d.job(d.ns(member), f"{member}-r0")
    assert job is not None
    failed = {c["type"]: c for c in job["status"].get("conditions", [])}["Failed"]
    # the pod contract's USAGE exit fails the Job at once: no retry of a hopeless pod
    assert failed["reason"] == "PodFailurePolicy" and job["status"].get("failed") == 1, job


@pytest.mark.parametrize(
    "deployment",
    [Setup(bucket="faults", no_data=frozenset({"de"}), round_defaults={"quorum": 2})],
    indirect=True,
    ids=["de-without-data"],
)
def test_a_failed_job_is_reported_and_the_quorum_completes_the_round(
    deployment: Deployment,
) -> None:
    """`de`'s data volume is an empty directory: its trainer exits with USAGE, the Job
    fails at once, and `de` is Failed with the trainer's reason everywhere, while `es`
    and `it` make the quorum of 2. A second FederationRound for round 0, applied while
    the first trains, is refused and changes nothing."""
    d = deployment
    d.wait(
        d.round_path(ROUND), lambda o: bool(o.get("status", {}).get("planSha256")),
        f"{ROUND} to publish its plan",
    )  # fmt: skip
    d.apply_round("demo-round-0-again", 0)
    duplicate = d.wait(
        d.round_path("demo-round-0-again"), stalled_with("DuplicateRound"),
        "demo-round-0-again to be refused as a duplicate",
    )  # fmt: skip
    assert duplicate["status"]["phase"] == "Failed"
    assert condition_states(duplicate) == FAILED
    assert ROUND in conditions(duplicate)["Stalled"]["message"], duplicate["status"]
    assert "members" not in duplicate["status"] and "planSha256" not in duplicate["status"]

    done = d.wait_round(ROUND, "Succeeded")
    status = done["status"]
    assert states(done) == {"de": "Failed", "es": "Merged", "it": "Merged"}, dump(status)
    assert status["progress"] == "2/3"
    assert condition_states(done) == DONE
    assert_failed_member(d, done, "de")
    result = read_result(d.store, d.layout, 0, d.coordinator_key).document
    assert result.outcome == Outcome.SUCCEEDED
    assert sorted(a.participant for a in result.accepted) == ["es", "it"]

    # The refused duplicate stays refused, says why in an event, and ran nothing.
    duplicate = d.client.get(d.round_path("demo-round-0-again"))
    assert stalled_with("DuplicateRound")(duplicate), dump(duplicate["status"])
    events = d.events(d.coordinator_ns, "demo-round-0-again")
    assert ("Warning", "DuplicateRound") in {(t, r) for t, r, _ in events}, events
    assert all(ROUND in m for _, r, m in events if r == "DuplicateRound"), events
    jobs = d.client.get(f"/apis/batch/v1/namespaces/{d.coordinator_ns}/jobs")["items"]
    assert sorted(j["metadata"]["name"] for j in jobs) == ["demo-bootstrap", "demo-r0-aggregate"]


@pytest.mark.parametrize(
    "deployment",
    [Setup(bucket="faults", no_data=frozenset({"de"}), round_defaults={"quorum": 3})],
    indirect=True,
    ids=["quorum-3-de-without-data"],
)
def test_a_round_without_quorum_stalls_with_a_reason(deployment: Deployment) -> None:
    """Quorum 3 of 3 and `de`'s Job fails: the round cannot succeed. It closes, the
    aggregator records a Failed result, and the FederationRound is Failed with
    Stalled=True and the reason, which kstatus and Argo CD read as failed."""
    d = deployment
    failed = d.wait_round(ROUND, "Failed")
    status = failed["status"]
    assert condition_states(failed) == FAILED
    stalled = conditions(failed)["Stalled"]
    assert stalled["reason"] == "NoQuorum" and "quorum" in stalled["message"].lower(), stalled
    assert conditions(failed)["Ready"]["reason"] == "NoQuorum"
    assert status["result"]["outcome"] == "Failed" and "nextBase" not in status["result"]
    assert members(failed)["de"]["state"] == "Failed", dump(status)
    assert NO_DATA_REASON in members(failed)["de"]["message"]
    layout = d.layout
    result = read_result(d.store, layout, 0, d.coordinator_key).document
    assert result.outcome == Outcome.FAILED and result.next_base is None, result
    close = read_close(d.store, layout, 0, d.coordinator_key).document
    assert close.trigger in (CloseTrigger.QUORUM_LOST, CloseTrigger.ALL_REPORTED), close


@pytest.mark.parametrize(
    "deployment",
    [Setup(bucket="faults", participants={"es": {"admission": {"mode": "Manual"}}})],
    indirect=True,
    ids=["es-manual"],
)
def test_manual_admission_waits_for_approval_then_trains(deployment: Deployment) -> None:
    """`es` admits rounds by hand: the plan waits in its status.awaitingApproval (round,
    base, hyperparameters, deadline) with Ready=False/AwaitingApproval and nothing runs;
    the round waits for it too. Adding round 0 to spec.admission.approvedRounds (as a
    commit to es's repository would) makes it train, and the round merges all three."""
    d = deployment
    waiting = d.wait_participant(
        "es", lambda o: bool(o.get("status", {}).get("awaitingApproval")), "to await approval"
    )
    layout = d.layout
    plan = read_plan(d.store, layout, 0, d.coordinator_key)
    assert waiting["status"]["awaitingApproval"] == {
        "round": 0,
        "baseSha256": plan.document.base.sha256,
        "hyperparameters": plan.document.hyperparameters,
        "deadline": plan.document.deadline,
    }, dump(waiting["status"])
    assert plan.document.hyperparameters["innerSteps"] == 6
    ready = conditions(waiting)["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "AwaitingApproval", ready
    assert condition_states(waiting) == IDLE
    assert waiting["status"]["state"] == "Planned" and not waiting["status"]["job"]

    # The others train; the round waits for es (the deadline is far), and es runs nothing.
    d.wait(
        d.round_path(ROUND),
        lambda o: states(o) == {"de": "Uploaded", "es": "Planned", "it": "Uploaded"},
        f"{ROUND} to have de and it uploaded",
    )
    assert d.job(d.ns("es"), "es-r0") is None
    assert not d.store.exists(layout.receipt(0, "es", ReceiptState.ACCEPTED))
    assert not d.store.exists(layout.close(0))
    still = d.client.get(d.participant_path("es"))
    assert still["status"]["awaitingApproval"]["round"] == 0, dump(still["status"])

    d.change_participant("es", {"admission": {"mode": "Manual", "approvedRounds": [0]}})
    done = d.wait_round(ROUND, "Succeeded")
    assert states(done) == dict.fromkeys(("de", "es", "it"), "Merged"), dump(done["status"])
    # es learns the verdict on its next poll of the store, a little after the round.
    es = d.wait_participant("es", lambda o: o.get("status", {}).get("state") == "Merged", "Merged")
    assert es["status"].get("awaitingApproval") is None, dump(es["status"])
    assert es["status"]["state"] == "Merged" and round_row(es, 0)["weight"] > 0
    assert condition_states(es) == DONE
    reasons = [r for _, r, _ in d.events(d.ns("es"), "es")]
    assert reasons.count("AwaitingApproval") == 1 and "Admitted" in reasons, reasons


@pytest.mark.parametrize(
    "deployment",
    [
        Setup(
            bucket="faults",
            extra_members=("fr",),
            absent=frozenset({"de"}),
            participants={"fr": {"admission": {"mode": "Manual"}}},
            round={"deadline": "1m"},
            round_defaults={"quorum": 2},
        )
    ],
    indirect=True,
    ids=["de-absent-fr-unapproved"],
)
def test_at_the_deadline_the_silent_are_late_and_the_unapproved_decline(
    deployment: Deployment,
) -> None:
    """Four members, deadline 1m, quorum 2. `de` has no Participant (nobody trains for
    it); `fr` admits by hand and is never approved; `es` and `it` train. At the deadline
    `fr` declines (DeadlinePassed) and the round closes with the two updates: Succeeded,
    `de` Late, `fr` Declined.

    The round is held (spec.suspend) from its plan until `fr` has declined: a
    participant declines when the deadline has passed, which is also when the
    coordinator closes, and whichever looks first decides whether the round lists `fr`
    as Declined or as Late. The hold orders the two; the close still happens because the
    deadline passed."""
    d = deployment
    planned = d.wait(
        d.round_path(ROUND), lambda o: bool(o.get("status", {}).get("planSha256")),
        f"{ROUND} to publish its plan",
    )  # fmt: skip
    assert planned["status"]["expected"] == 4
    d.apply_round(ROUND, 0, {"deadline": "1m", "suspend": True})
    waiting = d.wait_participant(
        "fr", lambda o: bool(o.get("status", {}).get("awaitingApproval")), "to await approval"
    )
    assert conditions(waiting)["Ready"]["reason"] == "AwaitingApproval"
    declined = d.wait_participant(
        "fr", lambda o: o.get("status", {}).get("state") == "Declined", "to decline", 180
    )
    assert declined["status"].get("awaitingApproval") is None, dump(declined["status"])
    row = round_row(declined, 0)
    assert row["reason"] == "DeadlinePassed" and "deadline" in row["message"], row
    held = d.wait(
        d.round_path(ROUND),
        lambda o: (
            states(o) == {"de": "Planned", "es": "Uploaded", "fr": "Declined", "it": "Uploaded"}
        ),
        f"{ROUND} to hold es and it uploaded, fr declined",
    )
    assert held["status"]["phase"] == "Suspended", dump(held["status"])
    layout = d.layout
    assert not d.store.exists(layout.close(0))

    d.apply_round(ROUND, 0, {"deadline": "1m", "suspend": False})
    done = d.wait_round(ROUND, "Succeeded")
    status = done["status"]
    assert states(done) == {"de": "Late", "es": "Merged", "fr": "Declined", "it": "Merged"}, dump(
        status
    )
    assert members(done)["de"]["reason"] == "Late", members(done)["de"]
    assert "DeadlinePassed" in members(done)["fr"]["message"], members(done)["fr"]
    assert status["progress"] == "2/4"
    close = read_close(d.store, layout, 0, d.coordinator_key).document
    assert close.trigger == CloseTrigger.DEADLINE, close
    assert close.closed_at >= read_plan(d.store, layout, 0, d.coordinator_key).document.deadline
    assert not d.store.exists(layout.receipt(0, "de", ReceiptState.ACCEPTED))
    fr = d.client.get(d.participant_path("fr"))
    assert fr["status"]["state"] == "Declined" and d.job(d.ns("fr"), "fr-r0") is None
    events = d.events(d.ns("fr"), "fr")
    assert [(t, r) for t, r, _ in events if r in ("AwaitingApproval", "DeadlinePassed")] == [
        ("Normal", "AwaitingApproval"),  # once, not at every look
        ("Warning", "DeadlinePassed"),
    ], events
