"""The coordinator role: Federations and their FederationRounds.

`reconcile_round` observes the store and the aggregator Job, asks the lifecycle for the
next step, carries it out and returns the status to write. It blocks on store and API
calls, so the daemons in `handlers` run it in a worker thread.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tapestry_lifecycle import coordinator as lifecycle
from tapestry_lifecycle.coordinator import Action, RoundView, round_base
from tapestry_lifecycle.states import MemberState, Reason, RoundPhase
from tapestry_operator import api, builders, identities
from tapestry_operator.conditions import Health, conditions
from tapestry_operator.config import FederationConfig, RoundConfig
from tapestry_operator.kube import Kube, SecretMissing
from tapestry_operator.stores import ca_file_for, store_for
from tapestry_protocol import rejections
from tapestry_protocol.documents import Outcome, parse_time, rfc3339
from tapestry_protocol.exchange import (
    COORDINATOR,
    close_round,
    make_plan,
    publish_plan,
    read_model,
    read_result,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.signing import SigningKey, load_signing_key
from tapestry_protocol.store import ObjectExists, ObjectStore
from tapestry_telemetry import catalog, rounds, tracing
from tapestry_telemetry.catalog import SpanName
from tapestry_telemetry.store import metered

log = logging.getLogger(__name__)
POLL = timedelta(seconds=5)


@dataclass
class Visit:
    """What one reconcile decided: the status to write, events, when to look again."""

    status: dict[str, Any]
    after: float
    events: list[tuple[str, str, str]] = field(default_factory=list)  # type, reason, message


def _signer(kube: Kube, federation: FederationConfig) -> SigningKey:
    pem = kube.secret_entry(federation.namespace, federation.signing_key.name, "signing.key")
    return load_signing_key(COORDINATOR, pem)


def duplicate_of(kube: Kube, config: RoundConfig) -> str | None:
    """The older FederationRound of the same federation and round number, if any: the
    first one applied owns the round and later ones are refused."""
    mine = None
    rivals = []
    for other in kube.list_custom(config.namespace, api.ROUNDS):
        spec, meta = other.get("spec", {}), other["metadata"]
        if spec.get("federation") == config.federation and spec.get("round") == config.round:
            entry = (meta.get("creationTimestamp", ""), meta["name"])
            rivals.append(entry)
            if meta["name"] == config.name:
                mine = entry
    rivals.sort()
    if mine is None or not rivals or rivals[0] == mine:
        return None
    return str(rivals[0][1])


def reconcile_round(kube: Kube, body: dict[str, Any], now: datetime) -> Visit:
    """One visit of a FederationRound."""
    config = RoundConfig.from_body(body)
    previous = body.get("status", {})

    def status(health: Health, **fields: Any) -> dict[str, Any]:
        return {
            "observedGeneration": config.generation,
            "conditions": conditions(previous.get("conditions"), health, config.generation, now),
            **fields,
        }

    if _settled(previous, config.generation):
        return Visit(previous, SETTLED_RECHECK_S)  # its result is write-once: nothing to read
    fed_body = kube.get_custom(config.namespace, api.FEDERATIONS, config.federation)
    if fed_body is None:
        message = f"Federation {config.federation!r} does not exist in {config.namespace}"
        health = Health.working(Reason.WAITING_FOR_BASE, message)
        return Visit(status(health, phase=RoundPhase.PENDING), 10.0)
    rival = duplicate_of(kube, config)
    if rival is not None:
        message = f"round {config.round} of {config.federation} is owned by FederationRound {rival}"
        return Visit(
            status(Health.failed(Reason.DUPLICATE_ROUND, message), phase=RoundPhase.FAILED),
            60.0,
            [("Warning", Reason.DUPLICATE_ROUND, message)],
        )
    federation = FederationConfig.from_body(fed_body)
    quorum = config.quorum or federation.quorum
    if quorum > len(federation.members):
        message = f"quorum {quorum} is more than the {len(federation.members)} members"
        return Visit(
            status(Health.failed(Reason.INVALID_SPEC, message), phase=RoundPhase.FAILED), 60.0
        )
    try:
        signer = _signer(kube, federation)
        store = metered(store_for(kube, federation.namespace, federation.store), federation.name)
    except (SecretMissing, ValueError) as e:
        health = Health.working(Reason.INVALID_SPEC, str(e))
        return Visit(status(health, phase=RoundPhase.PENDING), 15.0)
    layout = federation.layout
    key = signer.public_key_text
    job_name = builders.aggregator_job_name(federation.name, config.round)
    events: list[tuple[str, str, str]] = []
    span_attrs: dict[str, str | int] = {
        catalog.FEDERATION: federation.name,
        catalog.ROUND: config.round,
    }
    for _ in range(4):  # act, then look again at once, a few times per visit
        job = kube.job_status(config.namespace, job_name)
        view = lifecycle.observe_round(
            store, layout, config.round, key, now, job.state, job.message
        )
        base = None if view.plan else round_base(store, layout, config.round, key)
        pinned = federation.initial_base
        if base is not None and config.round == 0 and pinned and base.sha256 != pinned.sha256:
            message = f"round 0's base is not the spec.model.initialBase {pinned.sha256[:16]}…"
            health = Health.failed(Reason.INVALID_SPEC, message)
            return Visit(status(health, phase=RoundPhase.FAILED), 60.0)
        step = lifecycle.decide(
            view, suspended=config.suspend, base_ready=view.plan is not None or base is not None,
            poll=POLL,
        )  # fmt: skip
        if step.action == Action.PUBLISH_PLAN and base is not None:
            traceparent = tracing.new_traceparent()  # the round's trace: its span's ids
            plan = make_plan(
                layout, config.round, base,
                model=base.document.model,
                hyperparameters=config.hyperparameters(federation),
                participants=federation.members,
                min_participants=quorum,
                deadline=rfc3339(now + (config.deadline or federation.deadline)),
                encoding=config.encoding or federation.encoding,
                traceparent=traceparent,
            )  # fmt: skip
            started = datetime.now(UTC)
            try:
                publish_plan(store, layout, plan, signer)
                events.append(("Normal", Reason.PLAN_PUBLISHED, f"plan for round {config.round}"))
                tracing.record(SpanName.ROUND_PUBLISH, traceparent, started, None, span_attrs)
            except ObjectExists:
                pass  # published before (a restart): the stored plan stands
            continue
        if step.action == Action.CLOSE and view.plan is not None and step.trigger is not None:
            trigger: dict[str, str | int] = {**span_attrs, catalog.CLOSE_TRIGGER: str(step.trigger)}
            with tracing.phase(SpanName.ROUND_CLOSE, rounds.round_context(view.plan), trigger):
                close_round(store, layout, view.plan, signer, step.trigger, now)
            events.append(("Normal", Reason.CLOSED, f"round closed: {step.message}"))
            continue
        if step.action == Action.AGGREGATE and view.plan is not None:
            context = rounds.round_context(view.plan)
            traceparent = tracing.format_traceparent(context)
            started = datetime.now(UTC)
            aggregator = builders.build_aggregator_job(federation, config, body, traceparent)
            if kube.create(aggregator):
                events.append(("Normal", Reason.AGGREGATING, f"started Job {job_name}"))
                job_attrs: dict[str, str | int] = {**span_attrs, catalog.JOB: job_name}
                tracing.record(SpanName.ROUND_AGGREGATE, context, started, None, job_attrs)
            continue
        break
    if view.plan is not None:
        states = [str(s) for s in lifecycle.member_states(view).values()]
        rounds.record_members(federation.name, config.round, states, map(str, MemberState))
    # The visit that first sees the round's result (or its terminal failure) ends it.
    finished = view.result is not None and "result" not in previous
    stalled = step.action == Action.STALLED and previous.get("phase") != RoundPhase.FAILED
    if view.plan is not None and (finished or stalled):
        ended = parse_time(previous["completedAt"]) if previous.get("completedAt") else now
        result = view.result.document if view.result is not None else None
        rounds.round_over(federation.name, view.plan, result, ended, step.message)
    fields = round_fields(view, step.phase)
    if view.plan is not None:
        fields["startedAt"] = view.plan.document.issued_at
    if view.result is not None:
        fields["completedAt"] = previous.get("completedAt") or rfc3339(now)
    return Visit(
        status(_health(step), **fields),
        step.recheck_after.total_seconds() if step.recheck_after else 30.0,
        events,
    )


SETTLED_RECHECK_S = 300.0


def _settled(status: dict[str, Any], generation: int) -> bool:
    """A round whose signed result is recorded for the current spec: it cannot change, so
    a visit need not read the store again (the participants' and members' many reads
    would otherwise repeat for every finished round)."""
    return (
        status.get("observedGeneration") == generation
        and status.get("phase") in (RoundPhase.SUCCEEDED, RoundPhase.FAILED)
        and "result" in status
    )


def _health(step: lifecycle.Step) -> Health:
    if step.action == Action.DONE:
        return Health.done(step.reason, step.message)
    if step.action == Action.STALLED:
        return Health.failed(step.reason, step.message)
    if step.phase == RoundPhase.SUSPENDED:
        return Health.idle(step.reason, step.message)
    return Health.working(step.reason, step.message)


def round_fields(view: RoundView, phase: RoundPhase) -> dict[str, Any]:
    """The round's status fields besides conditions: members, progress, result."""
    fields: dict[str, Any] = {"phase": str(phase)}
    if view.plan is None:
        return fields
    plan = view.plan.document
    states = lifecycle.member_states(view)
    contributions = {a.participant: a for a in view.result.document.accepted} if view.result else {}
    refusals = {r.participant: r for r in view.result.document.rejected} if view.result else {}
    excluded = {e.participant: e for e in view.close.document.excluded} if view.close else {}
    members = []
    for name in plan.names:
        row: dict[str, Any] = {"name": name, "state": str(states[name])}
        if name in contributions:
            c = contributions[name]
            row.update(tokens=c.tokens, weight=c.weight)
            loss = c.metrics.get("trainLoss")
            if isinstance(loss, int | float):
                row["trainLoss"] = float(loss)
            if c.adjustments:  # what the robust policies did; the result has the figures
                row["adjustments"] = [a.reason for a in c.adjustments]
                row["message"] = "; ".join(a.message for a in c.adjustments)[:1024]
        elif name in refusals:
            row.update(reason=refusals[name].reason, message=refusals[name].message[:1024])
        elif name in excluded:
            row.update(reason=excluded[name].reason, message=excluded[name].message[:1024])
        members.append(row)
    reported = sum(1 for s in states.values() if s in _REPORTED)
    fields.update(
        planSha256=view.plan.sha256,
        deadline=plan.deadline,
        expected=len(plan.names),
        reported=reported,
        progress=f"{reported}/{len(plan.names)}",
        members=members,
    )
    if view.result is not None:
        result = view.result.document
        summary: dict[str, Any] = {"outcome": str(result.outcome), "message": result.message}
        if result.next_base is not None:
            summary["nextBase"] = {
                "manifest": result.next_base.manifest,
                "sha256": result.next_base.sha256,
            }
        loss = result.metrics.get("trainLoss")
        if isinstance(loss, int | float):
            summary["trainLoss"] = float(loss)
        tokens = result.metrics.get("tokens")
        if isinstance(tokens, int | float):
            summary["tokens"] = int(tokens)
        fields["result"] = summary
    return fields


_REPORTED = {MemberState.UPLOADED, MemberState.MERGED, MemberState.REJECTED}


def reconcile_federation(kube: Kube, body: dict[str, Any], now: datetime) -> Visit:
    """One visit of a Federation: publish round 0's base (bootstrap Job) and report."""
    federation = FederationConfig.from_body(body)
    previous = body.get("status", {})

    def status(health: Health, **fields: Any) -> dict[str, Any]:
        return {
            "observedGeneration": federation.generation,
            "conditions": conditions(
                previous.get("conditions"), health, federation.generation, now
            ),
            "members": len(federation.members),
            **fields,
        }

    try:
        signer = _signer(kube, federation)
        store = metered(store_for(kube, federation.namespace, federation.store), federation.name)
    except (SecretMissing, ValueError) as e:
        return Visit(status(Health.working(Reason.INVALID_SPEC, str(e))), 15.0)
    layout = federation.layout
    key = signer.public_key_text
    events: list[tuple[str, str, str]] = []
    issued: identities.Outcome | None = None
    if federation.store.identities is not None:
        try:
            issued = _store_identities(kube, federation, body, previous)
        except (SecretMissing, ValueError) as e:
            return Visit(status(Health.working(Reason.INVALID_SPEC, str(e))), 15.0)
        events += issued.events
        identity_fields: dict[str, Any] = {"storeIdentities": issued.rows}
        if not issued.coordinator_ready:  # its pods would mount a Secret not yet there
            health = _identity_health(issued)
            return Visit(status(health, **identity_fields), 60.0 if health.stalled else 15.0,
                         events)  # fmt: skip
        status = functools.partial(status, **identity_fields)
    initial = federation.initial_base
    if initial is not None and initial.manifest != layout.base_manifest(0):
        message = (
            f"spec.model.initialBase.manifest must be {layout.base_manifest(0)} (round 0's "
            f"base of federation {federation.name}), not {initial.manifest}"
        )
        return Visit(status(Health.failed(Reason.INVALID_SPEC, message)), 60.0)
    if initial is not None and not store.exists(initial.manifest):
        message = (
            f"waiting for round 0's base at {initial.manifest}: publish it with "
            "`tapestry base publish`"
        )
        return Visit(status(Health.working(Reason.WAITING_FOR_BASE, message)), 15.0)
    if not store.exists(layout.base_manifest(0)):
        job_name = builders.bootstrap_job_name(federation.name)
        job = kube.job_status(federation.namespace, job_name)
        if job.state.value == "Failed":
            message = f"Job {job_name} could not publish round 0's base: {job.message}"
            return Visit(status(Health.failed(Reason.WAITING_FOR_BASE, message)), 60.0)
        if kube.create(builders.build_bootstrap_job(federation, body)):
            events.append(("Normal", Reason.WAITING_FOR_BASE, f"started Job {job_name}"))
        message = f"publishing round 0's base from preset {federation.preset}"
        return Visit(status(Health.working(Reason.WAITING_FOR_BASE, message)), 5.0, events)
    try:
        expected = initial.sha256 if initial is not None else None
        base = read_model(store, layout, layout.base_manifest(0), key, expected_sha256=expected)
    except Rejected as e:
        message = f"round 0's base does not verify: {e}"
        return Visit(status(Health.failed(Reason.INVALID_SPEC, message)), 60.0)
    latest, succeeded, newest = _history(store, layout, key)
    fields: dict[str, Any] = {"roundsSucceeded": succeeded}
    if latest is not None:
        fields["latestRound"] = latest
    ref = newest or base.ref
    fields["base"] = {"manifest": ref.manifest, "sha256": ref.sha256}
    if federation.auto_rounds:
        started = _next_auto_round(kube, federation, store, key, body)
        if started is not None:
            events.append(("Normal", Reason.PLAN_PUBLISHED, f"started round {started}"))
    again = 10.0 if federation.auto_rounds else 30.0  # rounds follow each other promptly
    health = Health.done(Reason.SUCCEEDED, "base published")
    if issued is not None and issued.failure:
        health, again = _identity_health(issued), 15.0
    return Visit(status(health, **fields), again, events)


def _store_identities(
    kube: Kube, federation: FederationConfig, body: dict[str, Any], previous: dict[str, Any]
) -> identities.Outcome:
    """The members' and the coordinator's store identities kept in line with the spec;
    a failure already reported by the previous visit is not reported again."""
    ca_file = ca_file_for(kube, federation.namespace, federation.store)
    provider = identities.provider_for(kube, federation, ca_file)
    issued = identities.sync(provider, kube, federation, body)
    reported = {c.get("message") for c in previous.get("conditions") or []}
    issued.events = [e for e in issued.events if e[0] != "Warning" or e[2] not in reported]
    return issued


def _identity_health(issued: identities.Outcome) -> Health:
    message = issued.failure or "the coordinator's store identity is not issued yet"
    if issued.permanent:
        return Health.failed(Reason.STORE_IDENTITY_FAILED, message)
    return Health.working(Reason.STORE_IDENTITY_FAILED, message)


def _next_auto_round(
    kube: Kube, federation: FederationConfig, store: ObjectStore, key: str, body: dict[str, Any]
) -> int | None:
    """With `autoRounds`, the FederationRound after the newest one once it succeeded
    (round 0 when there is none), up to `maxRounds`; the number it created, if any."""
    numbers = [
        r["spec"]["round"]
        for r in kube.list_custom(federation.namespace, api.ROUNDS)
        if r.get("spec", {}).get("federation") == federation.name
    ]
    if numbers:
        top = max(numbers)
        if not store.exists(federation.layout.result(top)):
            return None
        result = read_result(store, federation.layout, top, key).document
        if result.outcome != Outcome.SUCCEEDED:
            return None  # a failed round needs a person
        following = int(top) + 1
    else:
        following = 0
    if federation.max_rounds is not None and following >= federation.max_rounds:
        return None
    kube.create(builders.build_auto_round(federation, following, body))
    return following


def _history(store: ObjectStore, layout: Layout, key: str) -> tuple[int | None, int, Any]:
    """The newest round with a result, how many succeeded, and the newest base."""
    latest, succeeded, newest = None, 0, None
    r = 0
    while store.exists(layout.plan(r)):
        if store.exists(layout.result(r)):
            try:
                result = read_result(store, layout, r, key).document
            except Rejected as e:
                if e.reason != rejections.MISSING_MANIFEST:
                    raise
                break
            latest = r
            if result.outcome == Outcome.SUCCEEDED:
                succeeded += 1
                newest = result.next_base
        r += 1
    return latest, succeeded, newest
