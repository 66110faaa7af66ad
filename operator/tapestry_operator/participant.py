"""The participant role: one member's operator, in its own cluster, dialling out only
to the store.

It finds the rounds whose plans name it, verifies each plan and base, applies its
admission policy, writes its signed receipts, runs the round's training as an Indexed
Job with a headless Service, reports failures, and records the coordinator's verdict.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tapestry_lifecycle import participant as lifecycle
from tapestry_lifecycle.participant import Admission, Approval, Do, PlanView
from tapestry_lifecycle.states import MemberState, Reason
from tapestry_operator import api, builders
from tapestry_operator.conditions import Health, conditions
from tapestry_operator.config import ParticipantConfig
from tapestry_operator.coordinator import Visit
from tapestry_operator.kube import Kube, SecretMissing
from tapestry_operator.stores import store_for
from tapestry_protocol.documents import ReceiptState, UpdateManifest
from tapestry_protocol.exchange import read_document, read_receipts
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.signing import SigningKey, load_signing_key, verify
from tapestry_protocol.store import ObjectStore, StoreError
from tapestry_telemetry import catalog, rounds, tracing, tracing_enabled
from tapestry_telemetry.catalog import SpanName
from tapestry_telemetry.store import metered

_FINISHED = {Do.DONE, Do.IGNORE}


def _approval(config: ParticipantConfig, round_number: int) -> Approval:
    if round_number in config.denied:
        return Approval.DENIED
    if round_number in config.approved:
        return Approval.APPROVED
    return Approval.PENDING


def _observe(
    kube: Kube, store: ObjectStore, config: ParticipantConfig, round_number: int, now: datetime
) -> PlanView:
    job = kube.job_status(config.namespace, builders.training_job_name(config.name, round_number))
    return lifecycle.observe_plan(
        store, config.layout, round_number, config.member, config.coordinator_key, now,
        training=job.state, training_message=job.message,
        approval=_approval(config, round_number),
    )  # fmt: skip


def reconcile_participant(kube: Kube, body: dict[str, Any], now: datetime) -> Visit:
    """One visit of a Participant: the current round's next step, and the status."""
    config = ParticipantConfig.from_body(body)
    previous = body.get("status", {})
    poll = config.poll.total_seconds()

    def status(health: Health, **fields: Any) -> dict[str, Any]:
        return {
            "observedGeneration": config.generation,
            "conditions": conditions(previous.get("conditions"), health, config.generation, now),
            **fields,
        }

    try:
        pem = kube.secret_entry(config.namespace, config.signing_key.name, "signing.key")
        signer = load_signing_key(config.member, pem)
        store = metered(store_for(kube, config.namespace, config.store), config.federation)
    except (SecretMissing, ValueError) as e:
        return Visit(status(Health.working(Reason.INVALID_SPEC, str(e))), poll)
    history = {r["round"]: r for r in previous.get("rounds", [])}
    before = {r: str(row.get("state", "")) for r, row in history.items()}
    seen: list[tuple[PlanView, lifecycle.Next]] = []
    round_number = int(previous.get("currentRound", 0))
    events: list[tuple[str, str, str]] = []
    view = _observe(kube, store, config, round_number, now)
    step = lifecycle.decide(view, _admission(config))
    # Move on while this round is settled and the store has a plan for the next one.
    while step.do in _FINISHED and store.exists(config.layout.plan(round_number + 1)):
        _remember(history, round_number, step, _privacy_row(store, config, signer, view, history))
        seen.append((view, step))
        round_number += 1
        view = _observe(kube, store, config, round_number, now)
        step = lifecycle.decide(view, _admission(config))
    for _ in range(3):  # act, then look again at once
        acted = _act(kube, store, config, signer, body, view, step, events)
        if not acted:
            break
        view = _observe(kube, store, config, round_number, now)
        step = lifecycle.decide(view, _admission(config))
    if view.plan is not None:
        _remember(history, round_number, step, _privacy_row(store, config, signer, view, history))
        seen.append((view, step))
    for seen_view, seen_step in seen:
        _observe_end(store, config, seen_view, seen_step, before, now)
    _clean_history(kube, config, round_number)
    fields: dict[str, Any] = {
        "currentRound": round_number,
        "state": str(step.state),
        "job": builders.training_job_name(config.name, round_number)
        if step.state == MemberState.TRAINING
        else "",
        "rounds": [history[r] for r in sorted(history)][-max(1, config.history_limit) :],
    }
    latest = latest_privacy(history, previous.get("privacy"))
    if latest is not None:
        fields["privacy"] = latest
    if step.do == Do.AWAIT_APPROVAL and view.plan is not None:
        plan = view.plan.document
        fields["awaitingApproval"] = {
            "round": plan.round,
            "baseSha256": plan.base.sha256,
            "hyperparameters": plan.hyperparameters,
            "deadline": plan.deadline,
        }
        if (previous.get("awaitingApproval") or {}).get("round") != plan.round:
            events.append(("Normal", Reason.AWAITING_APPROVAL, step.message))  # once a round
    else:
        fields["awaitingApproval"] = None
    return Visit(status(_health(step), **fields), poll, events)


def _admission(config: ParticipantConfig) -> Admission:
    return Admission.MANUAL if config.manual else Admission.AUTOMATIC


def _act(
    kube: Kube,
    store: ObjectStore,
    config: ParticipantConfig,
    signer: SigningKey,
    body: dict[str, Any],
    view: PlanView,
    step: lifecycle.Next,
    events: list[tuple[str, str, str]],
) -> bool:
    """Carry out one step; True when it changed something worth looking at again."""
    from tapestry_protocol.exchange import publish_receipt

    plan = view.plan
    if plan is None:
        return False
    round_number = plan.document.round
    context = rounds.participant_context(plan, config.member)
    attributes = rounds.action_attributes(config.federation, round_number, config.member)
    receipt = {
        Do.DECLINE: (ReceiptState.DECLINED, step.message),
        Do.ACCEPT: (ReceiptState.ACCEPTED, "admitted"),
        Do.REPORT_FAILED: (ReceiptState.FAILED, step.message),
    }.get(step.do)
    if receipt is not None:
        state, message = receipt
        answer = {**attributes, catalog.RECEIPT_STATE: str(state)}
        with tracing.phase(SpanName.PARTICIPANT_RECEIPT, context, answer):
            publish_receipt(store, config.layout, plan, signer, state, str(step.reason), message)
        events.append(_receipt_event(state, round_number, step))
        return True
    if step.do == Do.TRAIN:
        service = builders.build_rendezvous_service(config, round_number, body)
        traceparent = rounds.training_traceparent(plan, config.member)
        job = builders.build_training_job(config, round_number, body, traceparent)
        started = datetime.now(UTC)
        kube.create(service)
        if kube.create(job):
            name = job["metadata"]["name"]
            events.append(("Normal", Reason.TRAINING, f"started Job {name}"))
            job_attrs = {**attributes, catalog.JOB: name}
            tracing.record(SpanName.PARTICIPANT_JOB, context, started, None, job_attrs)
        return True
    return False


def _receipt_event(state: ReceiptState, round_number: int, step: lifecycle.Next) -> Any:
    if state == ReceiptState.ACCEPTED:
        return ("Normal", Reason.ADMITTED, f"accepted round {round_number}")
    if state == ReceiptState.DECLINED:
        return ("Warning", step.reason, f"declined round {round_number}: {step.message}")
    return ("Warning", Reason.TRAINING_FAILED, f"round {round_number}: {step.message}")


def _observe_end(
    store: ObjectStore,
    config: ParticipantConfig,
    view: PlanView,
    step: lifecycle.Next,
    before: dict[int, str],
    now: datetime,
) -> None:
    """The visit that first sees this participant's training of a round over emits its
    span; the one that first sees its verdict on the round counts it. `before` holds the
    states the previous status recorded, so a restart neither repeats nor loses them."""
    plan = view.plan
    if plan is None or config.member not in plan.document.names:
        return
    was, state = before.get(plan.document.round, ""), str(step.state)
    if state in rounds.FINAL and was not in rounds.FINAL:
        rounds.participant_verdict(config.federation, config.member, state)
    if state in rounds.TRAINING_OVER and was not in rounds.TRAINING_OVER and tracing_enabled():
        receipts = read_receipts(store, config.layout, plan, config.member).values()
        rounds.participant_over(
            config.federation, config.member, plan, state, receipts, now,
            failed=state in rounds.UNSUCCESSFUL,
        )  # fmt: skip


def _privacy_row(
    store: ObjectStore,
    config: ParticipantConfig,
    signer: SigningKey,
    view: PlanView,
    history: dict[int, dict[str, Any]],
) -> dict[str, Any] | None:
    """The (epsilon, delta) of this member's update of the viewed round, from its own
    signed manifest (what the coordinator sees), read once: None when the round has no
    update yet, was not noised, or its row already has it. Only with spec.privacy set."""
    plan = view.plan
    if config.privacy is None or plan is None or not view.uploaded:
        return None
    round_number = plan.document.round
    if "privacy" in history.get(round_number, {}):
        return None
    key = config.layout.update_manifest(round_number, config.member)
    try:
        document, raw, _ = read_document(store, key, UpdateManifest)
        verify(raw, config.member, signer.public_key)
    except (Rejected, StoreError):
        return None  # the round's verdict says what is wrong with it
    recorded = document.privacy
    if recorded is None or document.round != round_number:
        return None
    return {
        "epsilon": recorded.epsilon,
        "delta": recorded.delta,
        "rounds": recorded.rounds,
        "noiseMultiplier": recorded.noise_multiplier,
        "clipNorm": recorded.clip_norm,
    }


def latest_privacy(
    history: dict[int, dict[str, Any]], previous: dict[str, Any] | None
) -> dict[str, Any] | None:
    """status.privacy: the newest round's cumulative guarantee; kept when the rows that
    had it have aged out of status.rounds."""
    for round_number in sorted(history, reverse=True):
        found = history[round_number].get("privacy")
        if found:
            row = {"round": round_number, **{k: found[k] for k in ("epsilon", "delta", "rounds")}}
            if previous and previous.get("round", -1) > round_number:
                return previous
            return row
    return previous or None


def _remember(
    history: dict[int, dict[str, Any]],
    round_number: int,
    step: lifecycle.Next,
    privacy: dict[str, Any] | None = None,
) -> None:
    """The round's row of status.rounds; its privacy, once read, stays with it."""
    privacy = privacy or history.get(round_number, {}).get("privacy")
    row: dict[str, Any] = {
        "round": round_number,
        "state": str(step.state),
        "reason": str(step.reason),
        "message": step.message[:1024],
    }
    if step.weight is not None:
        row["weight"] = step.weight
    if privacy:
        row["privacy"] = privacy
    history[round_number] = row


def _clean_history(kube: Kube, config: ParticipantConfig, current: int) -> None:
    """Delete the Jobs (and Services) of rounds older than the history limit."""
    selector = f"{api.LABEL_PARTICIPANT}={config.member},{api.LABEL_COMPONENT}=trainer"
    for job in kube.jobs(config.namespace, selector):
        labels = job.metadata.labels or {}
        try:
            r = int(labels.get(api.LABEL_ROUND, ""))
        except ValueError:
            continue
        if r < current - config.history_limit + 1 and r != current:
            kube.delete_job(config.namespace, job.metadata.name)


def _health(step: lifecycle.Next) -> Health:
    if step.do == Do.AWAIT_APPROVAL:
        return Health.idle(step.reason, step.message)
    if step.do in (Do.DONE, Do.IGNORE):
        return Health.done(step.reason, step.message)
    return Health.working(step.reason, step.message)
