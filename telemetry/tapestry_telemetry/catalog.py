"""Every metric, span and attribute name Tapestry emits, defined once.

Dashboards, alerts and tests use exactly these names. Names follow the OpenTelemetry
semantic conventions where one exists (units `s` and `By`, `network.io.direction`,
`error.type`); everything else lives under `tapestry.`. Attributes stay low-cardinality:
federation, participant, states and reason codes, never a round number, a key or a
hash (those go on spans only).

Metrics, with their Prometheus names (OpenTelemetry's Prometheus translation: dots
become underscores, the unit becomes a suffix, counters end in `_total`, histograms
expose `_bucket`, `_sum` and `_count`); each definition's docstring says which process
emits it:

| metric | kind, unit | Prometheus |
| --- | --- | --- |
| tapestry.round.duration | histogram, s | tapestry_round_duration_seconds |
| tapestry.round.number | gauge, {round} | tapestry_round_number |
| tapestry.round.members | gauge, {member} | tapestry_round_members |
| tapestry.round.updates | counter, {update} | tapestry_round_updates_total |
| tapestry.participant.rounds | counter, {round} | tapestry_participant_rounds_total |
| tapestry.store.io | counter, By | tapestry_store_io_bytes_total |
| tapestry.aggregation.duration | histogram, s | tapestry_aggregation_duration_seconds |
| tapestry.aggregation.throughput | gauge, By/s | tapestry_aggregation_throughput_bytes_per_second |
| tapestry.training.duration | histogram, s | tapestry_training_duration_seconds |
| tapestry.training.step.duration | histogram, s | tapestry_training_step_duration_seconds |
| tapestry.training.loss | gauge, {nat} | tapestry_training_loss |
| tapestry.training.throughput | gauge, {token}/s | tapestry_training_throughput_per_second |
| tapestry.training.tokens | counter, {token} | tapestry_training_tokens_total |
|tapestry.operator.reconcile.duration|histogram, s|tapestry_operator_reconcile_duration_seconds|
| tapestry.operator.reconcile.errors | counter, {error} | tapestry_operator_reconcile_errors_total |

Attribute keys become Prometheus labels the same way (`tapestry.federation` ->
`tapestry_federation`, `network.io.direction` -> `network_io_direction`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# --- services (resource `service.name`, one per kind of process) ------------------------


class Service(StrEnum):
    """The `service.name` of each kind of process."""

    OPERATOR = "tapestry-operator"
    TRAINER = "tapestry-trainer"
    AGGREGATOR = "tapestry-aggregator"
    LOCAL = "tapestry-local"  # `tapestry local run`: the drivers of both roles in one process


# --- attribute keys ---------------------------------------------------------------------

FEDERATION = "tapestry.federation"
PARTICIPANT = "tapestry.participant"
ROUND = "tapestry.round"  # spans only: a round number is never a metric attribute
ROUND_OUTCOME = "tapestry.round.outcome"  # Succeeded | Failed (documents.Outcome)
MEMBER_STATE = "tapestry.member.state"  # a MemberState: Planned, Accepted, ..., Merged
UPDATE_VERDICT = "tapestry.update.verdict"  # accepted | rejected
REJECTION_REASON = "tapestry.rejection.reason"  # a code from tapestry_protocol.rejections
RECEIPT_STATE = "tapestry.receipt.state"  # spans: Accepted | Declined | Failed
CLOSE_TRIGGER = "tapestry.close.trigger"  # spans: AllReported | Deadline | QuorumLost | Manual
RESOURCE = "tapestry.resource"  # the custom resource's plural: federations, ...
ERROR_TYPE = "error.type"  # semantic conventions: the exception's class name
NETWORK_IO_DIRECTION = "network.io.direction"  # semantic conventions: transmit | receive
JOB = "k8s.job.name"  # spans: the Job the operator created

VERDICT_ACCEPTED = "accepted"
VERDICT_REJECTED = "rejected"
TRANSMIT = "transmit"
RECEIVE = "receive"


# --- metrics ----------------------------------------------------------------------------


class Instrument(StrEnum):
    COUNTER = "counter"
    HISTOGRAM = "histogram"
    GAUGE = "gauge"


@dataclass(frozen=True)
class MetricDef:
    """One metric: its OpenTelemetry name, kind, unit, description, attribute keys, the
    Prometheus name it gets after translation, the processes that emit it, and histogram
    bucket boundaries."""

    name: str
    instrument: Instrument
    unit: str
    description: str
    attributes: tuple[str, ...]
    prometheus: str
    by: tuple[Service, ...]  # the processes that emit it
    buckets: tuple[float, ...] = ()


# who emits what: the operator's roles (and the local runner, which drives both)
_COORDINATION = (Service.OPERATOR, Service.LOCAL)
_AGGREGATOR = (Service.AGGREGATOR, Service.LOCAL)
_TRAINER = (Service.TRAINER,)
_OPERATOR = (Service.OPERATOR,)
_EVERYONE = (Service.OPERATOR, Service.TRAINER, Service.AGGREGATOR, Service.LOCAL)

_LONG_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
_MEDIUM_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
_SHORT_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

ROUND_DURATION = MetricDef(
    "tapestry.round.duration", Instrument.HISTOGRAM, "s",
    "Time from a round's plan publication to its signed result, by outcome",
    (FEDERATION, ROUND_OUTCOME), "tapestry_round_duration_seconds",
    _COORDINATION, _LONG_S,
)  # fmt: skip
"""Prometheus: `tapestry_round_duration_seconds` (`_bucket`, `_sum`, `_count`); the
count by `tapestry_round_outcome` is the number of rounds that succeeded or failed."""

ROUND_NUMBER = MetricDef(
    "tapestry.round.number", Instrument.GAUGE, "{round}",
    "The newest round of the federation the coordinator is working on",
    (FEDERATION,), "tapestry_round_number",
    _COORDINATION,
)  # fmt: skip
"""Prometheus: `tapestry_round_number`."""

ROUND_MEMBERS = MetricDef(
    "tapestry.round.members", Instrument.GAUGE, "{member}",
    "Members of the federation's current round in each state (reporting = Uploaded, "
    "Merged, Rejected; out = Declined, Failed, Late)",
    (FEDERATION, MEMBER_STATE), "tapestry_round_members",
    _COORDINATION,
)  # fmt: skip
"""Prometheus: `tapestry_round_members`; every state is reported, 0 where none is."""

ROUND_UPDATES = MetricDef(
    "tapestry.round.updates", Instrument.COUNTER, "{update}",
    "Members judged by a round's result: accepted (merged) or rejected, with the reason",
    (FEDERATION, PARTICIPANT, UPDATE_VERDICT, REJECTION_REASON), "tapestry_round_updates_total",
    _COORDINATION,
)  # fmt: skip
"""Prometheus: `tapestry_round_updates_total`; `tapestry_rejection_reason` is empty for
accepted updates. `tapestry_participant` is the judged member, so the coordinator's own
metrics show each member's contributions; it is bounded by the federation's member
count (times the verdicts and reasons)."""

PARTICIPANT_ROUNDS = MetricDef(
    "tapestry.participant.rounds", Instrument.COUNTER, "{round}",
    "Rounds this participant finished, by its final state (Merged, Rejected, Late, "
    "Declined, Failed)",
    (FEDERATION, PARTICIPANT, MEMBER_STATE), "tapestry_participant_rounds_total",
    _COORDINATION,
)  # fmt: skip
"""Prometheus: `tapestry_participant_rounds_total`."""

STORE_IO = MetricDef(
    "tapestry.store.io", Instrument.COUNTER, "By",
    "Bytes moved to (transmit) and from (receive) the object store",
    (FEDERATION, NETWORK_IO_DIRECTION), "tapestry_store_io_bytes_total",
    _EVERYONE,
)  # fmt: skip
"""Prometheus: `tapestry_store_io_bytes_total` by `network_io_direction`."""

AGGREGATION_DURATION = MetricDef(
    "tapestry.aggregation.duration", Instrument.HISTOGRAM, "s",
    "Time the aggregator took to merge a closed round and publish its result",
    (FEDERATION, ROUND_OUTCOME), "tapestry_aggregation_duration_seconds",
    _AGGREGATOR, _MEDIUM_S,
)  # fmt: skip
"""Prometheus: `tapestry_aggregation_duration_seconds`."""

AGGREGATION_THROUGHPUT = MetricDef(
    "tapestry.aggregation.throughput", Instrument.GAUGE, "By/s",
    "Delta bytes merged per second of streaming merge, in the last aggregation",
    (FEDERATION,), "tapestry_aggregation_throughput_bytes_per_second",
    _AGGREGATOR,
)  # fmt: skip
"""Prometheus: `tapestry_aggregation_throughput_bytes_per_second`."""

TRAINING_DURATION = MetricDef(
    "tapestry.training.duration", Instrument.HISTOGRAM, "s",
    "Time of one participant's share of a round: fetch, inner training, upload",
    (FEDERATION, PARTICIPANT), "tapestry_training_duration_seconds",
    _TRAINER, _LONG_S,
)  # fmt: skip
"""Prometheus: `tapestry_training_duration_seconds`."""

TRAINING_STEP_DURATION = MetricDef(
    "tapestry.training.step.duration", Instrument.HISTOGRAM, "s",
    "Mean time of one inner optimizer step in a training run",
    (FEDERATION, PARTICIPANT), "tapestry_training_step_duration_seconds",
    _TRAINER, _SHORT_S,
)  # fmt: skip
"""Prometheus: `tapestry_training_step_duration_seconds`. One value per run (the mean):
timing each step would need a device synchronisation per step."""

TRAINING_LOSS = MetricDef(
    "tapestry.training.loss", Instrument.GAUGE, "{nat}",
    "Mean training loss (cross-entropy, nats per token) of the last inner run",
    (FEDERATION, PARTICIPANT), "tapestry_training_loss",
    _TRAINER,
)  # fmt: skip
"""Prometheus: `tapestry_training_loss`."""

TRAINING_THROUGHPUT = MetricDef(
    "tapestry.training.throughput", Instrument.GAUGE, "{token}/s",
    "Tokens per second of the last inner run, all ranks together",
    (FEDERATION, PARTICIPANT), "tapestry_training_throughput_per_second",
    _TRAINER,
)  # fmt: skip
"""Prometheus: `tapestry_training_throughput_per_second` (the `{token}` annotation is
dropped by the translation)."""

TRAINING_TOKENS = MetricDef(
    "tapestry.training.tokens", Instrument.COUNTER, "{token}",
    "Tokens trained on, over every inner run",
    (FEDERATION, PARTICIPANT), "tapestry_training_tokens_total",
    _TRAINER,
)  # fmt: skip
"""Prometheus: `tapestry_training_tokens_total`."""

RECONCILE_DURATION = MetricDef(
    "tapestry.operator.reconcile.duration", Instrument.HISTOGRAM, "s",
    "Time of one reconcile visit of a resource",
    (RESOURCE,), "tapestry_operator_reconcile_duration_seconds",
    _OPERATOR, _SHORT_S,
)  # fmt: skip
"""Prometheus: `tapestry_operator_reconcile_duration_seconds`."""

RECONCILE_ERRORS = MetricDef(
    "tapestry.operator.reconcile.errors", Instrument.COUNTER, "{error}",
    "Reconcile visits that failed (and are retried with backoff), by error type",
    (RESOURCE, ERROR_TYPE), "tapestry_operator_reconcile_errors_total",
    _OPERATOR,
)  # fmt: skip
"""Prometheus: `tapestry_operator_reconcile_errors_total` by `error_type` (the
exception's class; `StoreError` subclasses when the store is unavailable)."""

METRICS: tuple[MetricDef, ...] = (
    ROUND_DURATION,
    ROUND_NUMBER,
    ROUND_MEMBERS,
    ROUND_UPDATES,
    PARTICIPANT_ROUNDS,
    STORE_IO,
    AGGREGATION_DURATION,
    AGGREGATION_THROUGHPUT,
    TRAINING_DURATION,
    TRAINING_STEP_DURATION,
    TRAINING_LOSS,
    TRAINING_THROUGHPUT,
    TRAINING_TOKENS,
    RECONCILE_DURATION,
    RECONCILE_ERRORS,
)


# --- spans ------------------------------------------------------------------------------


class SpanName(StrEnum):
    """Span names. One trace per round; docs/observability.md draws the tree."""

    ROUND = "tapestry.round"  # coordinator: plan publication -> result (the root)
    ROUND_PUBLISH = "tapestry.round.publish"  # coordinator: sign and write the plan
    ROUND_CLOSE = "tapestry.round.close"  # coordinator: commit the close record
    ROUND_AGGREGATE = "tapestry.round.aggregate"  # coordinator: start the aggregator Job
    PARTICIPANT_ROUND = "tapestry.participant.round"  # participant: receipt -> trained
    PARTICIPANT_RECEIPT = "tapestry.participant.receipt"  # participant: a signed receipt
    PARTICIPANT_JOB = "tapestry.participant.job"  # participant: start the training Job
    TRAINING = "tapestry.training"  # trainer rank 0: the whole share of the round
    TRAINING_FETCH = "tapestry.training.fetch"  # verify plan and base, load the base
    TRAINING_INNER = "tapestry.training.inner"  # H inner steps
    TRAINING_UPLOAD = "tapestry.training.upload"  # delta shards, then the manifest
    AGGREGATION = "tapestry.aggregation"  # aggregator: links to each merged update
    AGGREGATION_COLLECT = "tapestry.aggregation.collect"  # verify the round's inputs
    AGGREGATION_MERGE = "tapestry.aggregation.merge"  # stream the merge
    AGGREGATION_COMMIT = "tapestry.aggregation.commit"  # next base, result


SPANS: tuple[SpanName, ...] = tuple(SpanName)
