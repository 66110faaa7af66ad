"""`tapestry local run`, the lifecycle's second driver, exports the same trace as the
operator: one round, its participants' spans with their receipts and training, the
aggregator's span linking to every trainer's, and the catalogue's metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tapestry_telemetry import catalog
from tapestry_telemetry.catalog import METRICS, Service, SpanName
from tests.e2e.texts import write_corpora
from tests.telemetry.otlp import OtlpReceiver, one_span

pytestmark = [pytest.mark.torch, pytest.mark.slow]

TINY = ["--preset", "tiny", "--inner-steps", "3", "--batch-size", "4", "--seq-len", "32"]


def test_a_local_round_is_one_trace(tmp_path: Path) -> None:
    data = write_corpora(tmp_path / "text")
    with OtlpReceiver() as receiver:
        env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
        args = ["local", "run", "--participants", "2", "--rounds", "1", *TINY, "--no-baseline"]
        args += ["--data", str(data), "--workdir", str(tmp_path / "w")]
        done = subprocess.run(
            [sys.executable, "-m", "tapestry_cli", *args], env=env, capture_output=True,
            text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        spans, points = receiver.spans(), receiver.points()

    root = one_span(spans, SpanName.ROUND)
    assert root.parent_span_id == "" and root.service == Service.LOCAL
    ours = [s for s in spans if s.trace_id == root.trace_id]
    assert len(ours) == len(spans), "one trace"
    for name in (SpanName.ROUND_PUBLISH, SpanName.ROUND_CLOSE, SpanName.AGGREGATION):
        assert one_span(ours, name).parent_span_id == root.span_id, name
    trainings = set()
    for member in ("alice", "bob"):
        participant = one_span(ours, SpanName.PARTICIPANT_ROUND, **{catalog.PARTICIPANT: member})
        assert participant.parent_span_id == root.span_id
        for name in (SpanName.PARTICIPANT_RECEIPT, SpanName.PARTICIPANT_JOB, SpanName.TRAINING):
            span = one_span(ours, name, **{catalog.PARTICIPANT: member})
            assert span.parent_span_id == participant.span_id, name
        training = one_span(ours, SpanName.TRAINING, **{catalog.PARTICIPANT: member})
        assert training.service == Service.TRAINER
        trainings.add(training.ids)
    aggregation = one_span(ours, SpanName.AGGREGATION)
    assert {(t, s) for t, s, _ in aggregation.links} == trainings

    exported = {(p.service, p.name) for p in points}
    for d in METRICS:
        wanted = {s for s in d.by if s in (Service.LOCAL, Service.TRAINER)}
        assert {(s, d.name) for s in wanted} <= exported, d.name
    # Each member's verdict, counted by the coordinating side under the member's name.
    updates = [p for p in points if p.name == catalog.ROUND_UPDATES.name]
    assert all(set(p.attributes) == set(catalog.ROUND_UPDATES.attributes) for p in updates)
    judged = {(p.attributes[catalog.PARTICIPANT], p.attributes[catalog.UPDATE_VERDICT], p.value)
              for p in updates}  # fmt: skip
    assert judged == {
        ("alice", catalog.VERDICT_ACCEPTED, 1.0),
        ("bob", catalog.VERDICT_ACCEPTED, 1.0),
    }
