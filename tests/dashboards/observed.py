"""Rounds of the single-cluster example observed by a real Prometheus, as a party would
run it with the chart's defaults: Prometheus scrapes the operator's /metrics, and the
operator (OTEL_METRICS_EXPORTER=prometheus: its metrics take that one path, so nothing
is counted twice) passes its other OTEL_* settings on to the trainer and aggregator
pods it creates, which push theirs to Prometheus's OTLP receiver.

One member (`it`) has no data, so its training fails in every round while the quorum
of the other two carries the round: the dashboards then show a failed member and a
rejected update as well as merged ones.

Used by tests/kube/test_observability.py (every dashboard query returns data) and by
tests.dashboards.render (the pictures in docs/images).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tapestry_protocol.store import ObjectStore
from tapestry_telemetry import METRICS_EXPORTER_ENV, MetricsExporter, catalog
from tests.dashboards import promql
from tests.kube.cluster import KubeCluster
from tests.kube.deployment import FEDERATION, ROUND_TIMEOUT_S, Deployment, Setup, deploy
from tests.kube.tapestry_env import Keys
from tests.ports import free_port
from tests.s3servers import S3Server
from tests.tools import Prometheus, PrometheusError

OPERATOR_JOB = "tapestry-operator"  # the scrape job of the operator's /metrics
FAILING = "it"  # the member without data
SHOWN_PARTICIPANT = "de"  # the participant dashboard's choice
SCRAPE_INTERVAL_S = 1.0
EXPORT_INTERVAL_MS = 1000


@dataclass
class Observed:
    deployment: Deployment
    prometheus: Prometheus
    start: float  # when the deployment began (Unix seconds)
    end: float  # when every process had exported its last round
    rounds: int

    @property
    def variables(self) -> dict[str, str]:
        """The dashboards' template variables as a user would pick them."""
        return {"federation": FEDERATION, "participant": SHOWN_PARTICIPANT}

    def evaluate(self, target: promql.Target, step_s: float) -> list[dict[str, Any]]:
        """`target` as Grafana would run it over the whole run at `step_s`: a range query
        (or, for an instant target, one query at the end over the whole range)."""
        expr = promql.substitute(
            target.expr, self.variables,
            interval_s=step_s,
            rate_interval_s=promql.rate_interval(step_s, SCRAPE_INTERVAL_S),
            range_s=self.end - self.start,
        )  # fmt: skip
        if target.instant:
            return self.prometheus.query(expr, time=self.end)
        return self.prometheus.query_range(expr, self.start, self.end, step_s)


def _auto_rounds(rounds: int) -> Any:
    def prepare(_store: ObjectStore, _keys: Keys) -> dict[str, Any]:
        return {"autoRounds": {"enabled": True, "maxRounds": rounds}}

    return prepare


def _wait(prom: Prometheus, expr: str, what: str, timeout: float) -> None:
    try:
        prom.wait_for_series(expr, timeout=timeout)
    except PrometheusError as e:
        raise AssertionError(f"Prometheus never saw {what}: {e}") from e


@contextlib.contextmanager
def observed_rounds(
    cluster: KubeCluster,
    minio: S3Server,
    tmp_path: Path,
    *,
    rounds: int = 2,
    bucket: str = "observed",
    scrape: bool = True,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[Observed]:
    """Rounds 0..rounds-1 (autoRounds) with every process's metrics in a fresh
    Prometheus; yields once the last round's metrics are all in. `scrape`: the
    operator's metrics reach Prometheus through its /metrics, else over OTLP; either
    way one path only (as the chart sets it), so each series comes once."""
    with Prometheus(scrape_interval=f"{SCRAPE_INTERVAL_S:g}s") as prom:
        path = MetricsExporter.PROMETHEUS if scrape else MetricsExporter.OTLP
        env = {
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": prom.otlp_metrics_endpoint,
            "OTEL_TRACES_EXPORTER": "none",  # Prometheus receives metrics only
            "OTEL_METRIC_EXPORT_INTERVAL": str(EXPORT_INTERVAL_MS),
            METRICS_EXPORTER_ENV: str(path),  # the operator's own; its pods push over OTLP
            **(extra_env or {}),
        }
        if scrape:
            port = free_port()
            env["TAPESTRY_METRICS_PORT"] = str(port)
            prom.add_targets([f"127.0.0.1:{port}"], job=OPERATOR_JOB)
        setup = Setup(
            bucket=bucket, operator_env=env, no_data=frozenset({FAILING}),
            round_defaults={"quorum": 2}, prepare=_auto_rounds(rounds),
        )  # fmt: skip
        start = time.time()
        with deploy(cluster, minio, tmp_path, setup) as d:
            last = f"{FEDERATION}-round-{rounds - 1}"
            d.wait_round(last, "Succeeded", timeout=ROUND_TIMEOUT_S * rounds)
            f = f'tapestry_federation="{FEDERATION}"'
            # Each participant's operator counts its last round once it sees the result;
            # the last aggregator exports as it exits.
            finished = (
                "sum by (tapestry_participant) (max by (tapestry_participant,"
                f" tapestry_member_state) (tapestry_participant_rounds_total{{{f}}}))"
            )
            _wait(
                prom, f"count({finished} >= {rounds}) >= {len(d.members)}",
                f"every participant's {rounds} rounds", timeout=120,
            )  # fmt: skip
            aggregations = (
                "count(count by (instance) (last_over_time("
                f"tapestry_aggregation_duration_seconds_count{{{f}}}[1h])))"
            )
            _wait(prom, f"{aggregations} >= {rounds}", f"{rounds} aggregations", 120)
            # The coordinator's own view of every round's end: on a busy machine its visit
            # that counts the last result can trail the participants' and the status.
            judged = f"sum({catalog.ROUND_UPDATES.prometheus}{{{f}}})"
            _wait(prom, f"{judged} >= {rounds * len(d.members)}",
                  f"the coordinator's verdicts on {rounds} rounds", timeout=120)  # fmt: skip
            ended = f"sum({catalog.ROUND_DURATION.prometheus}_count{{{f}}})"
            _wait(prom, f"{ended} >= {rounds}", f"the coordinator's end of {rounds} rounds", 120)
            # One more rate window, so the last increase has samples on both sides.
            time.sleep(promql.rate_interval(0, SCRAPE_INTERVAL_S) + 1)
            yield Observed(d, prom, start, time.time(), rounds)
