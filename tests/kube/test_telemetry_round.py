"""A real round's traces and metrics, as the processes exported them.

The single-cluster example runs one round on the test cluster with the operator's
OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP/HTTP receiver in the test; the
operator passes it on to the trainer and aggregator pods it creates. The test then
checks the span tree across the operator (coordinator and participants), the trainers
and the aggregator — parents, the aggregator's links, ids fixed by the signed plan and
recorded in the signed manifests — and that every metric of the catalogue was exported,
the operator's also on its Prometheus endpoint.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from tapestry_protocol.exchange import read_plan
from tapestry_protocol.layout import Layout
from tapestry_protocol.store import ObjectStore
from tapestry_telemetry import catalog, tracing
from tapestry_telemetry.catalog import METRICS, Service, SpanName
from tests.kube.cluster import KubeCluster
from tests.kube.deployment import FEDERATION, Setup, deploy
from tests.ports import free_port
from tests.s3servers import S3Server
from tests.telemetry.otlp import OtlpReceiver, one_span

pytestmark = [pytest.mark.kube, pytest.mark.slow]

ROUND = "demo-round-0"
# Attribute keys a span may carry: names, numbers and states, never data or secrets.
SPAN_ATTRIBUTES = {
    catalog.FEDERATION, catalog.ROUND, catalog.PARTICIPANT, catalog.ROUND_OUTCOME,
    catalog.MEMBER_STATE, catalog.RECEIPT_STATE, catalog.CLOSE_TRIGGER, catalog.JOB,
    catalog.ERROR_TYPE,
}  # fmt: skip


def _scrape(port: int) -> set[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {line.split()[2] for line in text.decode().splitlines() if line.startswith("# TYPE ")}


def _plan_ids(store: ObjectStore, coordinator_key: str) -> tuple[str, str]:
    plan = read_plan(store, Layout(FEDERATION), 0, coordinator_key)
    root = tracing.round_span_context(plan.document.traceparent, plan.sha256)
    return f"{root.trace_id:032x}", f"{root.span_id:016x}"


def test_a_round_is_one_trace_and_exports_every_metric(
    kube_cluster: KubeCluster, minio_server: S3Server, tmp_path: Path
) -> None:
    metrics_port = free_port()
    with OtlpReceiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "TAPESTRY_METRICS_PORT": str(metrics_port),
        }
        setup = Setup(bucket="telemetry", operator_env=env)
        with deploy(kube_cluster, minio_server, tmp_path, setup) as d:
            d.wait_round(ROUND, "Succeeded")
            members = d.members
            # Each participant's operator counts its verdict once it sees the result.
            receiver.wait_for(
                "every participant's verdict",
                lambda r: (
                    {
                        p.attributes.get(catalog.PARTICIPANT)
                        for p in r.points()
                        if p.name == catalog.PARTICIPANT_ROUNDS.name and p.value >= 1
                    }
                    >= set(members)
                ),
            )
            scraped = _scrape(metrics_port)
            trace_id, root_id = _plan_ids(d.store, d.coordinator_key)
            manifests = {m: d.store.get(d.layout.update_manifest(0, m)).decode() for m in members}
        # The operator has stopped (SIGTERM): whatever it buffered has been flushed.
        spans = receiver.spans()
        points = receiver.points()

    ours = [s for s in spans if s.trace_id == trace_id]
    assert {s.trace_id for s in spans if s.name.startswith("tapestry.")} == {trace_id}, (
        "every span of the round is in the plan's trace"
    )
    by_id = {s.span_id: s for s in ours}
    assert len(by_id) == len(ours), "no span was exported twice"

    root = one_span(ours, SpanName.ROUND)
    assert (root.span_id, root.parent_span_id, root.service) == (root_id, "", Service.OPERATOR)
    assert root.attributes[catalog.ROUND_OUTCOME] == "Succeeded"
    assert root.attributes[catalog.FEDERATION] == FEDERATION and root.attributes[catalog.ROUND] == 0
    for name in (SpanName.ROUND_PUBLISH, SpanName.ROUND_CLOSE, SpanName.ROUND_AGGREGATE):
        assert one_span(ours, name).parent_span_id == root_id, name

    trainings = {}
    for member in members:
        mine = [s for s in ours if s.attributes.get(catalog.PARTICIPANT) == member]
        participant = one_span(mine, SpanName.PARTICIPANT_ROUND)
        assert participant.parent_span_id == root_id and participant.service == Service.OPERATOR
        # its training is over: uploaded (or already merged, if the result came first)
        assert participant.attributes[catalog.MEMBER_STATE] in ("Uploaded", "Merged")
        receipt = one_span(mine, SpanName.PARTICIPANT_RECEIPT)
        assert receipt.attributes[catalog.RECEIPT_STATE] == "Accepted"
        job = one_span(mine, SpanName.PARTICIPANT_JOB)
        training = one_span(mine, SpanName.TRAINING)
        for child in (receipt, job, training):
            assert child.parent_span_id == participant.span_id, child.name
        assert training.service == Service.TRAINER
        assert training.resource[catalog.PARTICIPANT] == member
        for name in (SpanName.TRAINING_FETCH, SpanName.TRAINING_INNER, SpanName.TRAINING_UPLOAD):
            child = one_span((s for s in ours if s.parent_span_id == training.span_id), name)
            assert child.service == Service.TRAINER
        # The signed manifest records the span the update was made in.
        assert f'"traceparent":"00-{trace_id}-{training.span_id}-01"' in manifests[member]
        trainings[member] = training

    aggregation = one_span(ours, SpanName.AGGREGATION)
    assert aggregation.service == Service.AGGREGATOR and aggregation.parent_span_id == root_id
    assert aggregation.attributes[catalog.ROUND_OUTCOME] == "Succeeded"
    links = {(t, s): a.get(catalog.PARTICIPANT) for t, s, a in aggregation.links}
    assert links == {t.ids: m for m, t in trainings.items()}, "a link to every merged update"
    for name in (SpanName.AGGREGATION_COLLECT, SpanName.AGGREGATION_MERGE,
                 SpanName.AGGREGATION_COMMIT):  # fmt: skip
        assert one_span(ours, name).parent_span_id == aggregation.span_id, name

    for span in ours:
        assert span.end_ns >= span.start_ns > 0, span.name
        assert set(span.attributes) <= SPAN_ATTRIBUTES, (span.name, span.attributes)
        assert span.status_code != 2, f"{span.name} failed"

    exported = {(p.service, p.name) for p in points}
    for d_ in METRICS:
        emitted = {s for s in d_.by if s != Service.LOCAL}
        assert {(s, d_.name) for s in emitted} <= exported, f"{d_.name} from {emitted}"
        if Service.OPERATOR in emitted:
            assert d_.prometheus in scraped, f"{d_.prometheus} not on the operator's /metrics"
    merged = [
        p for p in points
        if p.name == catalog.ROUND_UPDATES.name
        and p.attributes[catalog.UPDATE_VERDICT] == catalog.VERDICT_ACCEPTED
    ]  # fmt: skip
    # The coordinator counts each member's verdict itself: its contributions are on its
    # own dashboard without the members' metrics.
    assert {p.attributes[catalog.PARTICIPANT]: p.value for p in merged} == dict.fromkeys(
        members, 1.0
    ), merged
    for p in points:
        assert catalog.ROUND not in p.attributes, f"{p.name} is labelled by round"
