"""The dashboards over real data: two rounds of the single-cluster example on the test
cluster, a real Prometheus (built from its Go module) scraping the operator's /metrics
(its one metrics path) and receiving the trainer and aggregator pods' metrics over OTLP,
the operator passing its OTEL_* settings on to them (tests.dashboards.observed).

Then every panel query of both dashboards, and every template variable's, is evaluated
by Prometheus's own engine through its HTTP API, as Grafana would send it (variables
substituted, `$__interval` the step, `$__rate_interval` by Grafana's rule), and must
return a finite value other than zero (a panel that cannot see what happened shows
zeros).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tapestry_telemetry.catalog import METRICS, Service
from tests.dashboards import promql
from tests.dashboards.observed import OPERATOR_JOB, Observed, observed_rounds
from tests.kube.cluster import KubeCluster
from tests.s3servers import S3Server

pytestmark = [
    pytest.mark.kube, pytest.mark.s3, pytest.mark.tools, pytest.mark.torch, pytest.mark.slow,
]  # fmt: skip

STEP_S = 5.0  # the panels' step ($__interval), as Grafana picks for a short range
# Panels that are rightly all zero in rounds without trouble (they must still return
# data: the operator's counter starts at zero).
ZERO_IS_DATA = {"Reconcile errors": "no reconcile visit fails in these rounds"}


def _no_data(observed: Observed) -> list[str]:
    """Every dashboard query that returns nothing, nothing finite, or only zeros (a
    query that cannot see what happened, such as a rate over one point per process),
    with its PromQL."""
    problems = []
    titles = set()
    for name in ("coordinator", "participant"):
        for target in promql.targets(promql.load(name)):
            titles.add(target.panel["title"])
            series = observed.evaluate(target, STEP_S)
            values = promql.finite_values(series)
            if not series:
                kind = "no series"
            elif not values:
                kind = f"{len(series)} series, no finite value"
            elif not any(values) and target.panel["title"] not in ZERO_IS_DATA:
                kind = f"{len(series)} series, only zeros"
            else:
                continue
            problems.append(f"{target.title}: {kind} for\n    {target.expr}")
    assert set(ZERO_IS_DATA) <= titles, "ZERO_IS_DATA names a panel no dashboard has"
    return problems


def _variable_values(observed: Observed) -> dict[str, set[str]]:
    """What each template variable offers, from its label_values() selector."""
    out: dict[str, set[str]] = {}
    range_s = promql.duration(observed.end - observed.start)
    for name in ("coordinator", "participant"):
        for var, selector, label in promql.query_variables(promql.load(name)):
            selector = promql.substitute(selector, observed.variables)
            series = observed.prometheus.query(
                f"group by ({label}) (last_over_time({selector}[{range_s}]))", time=observed.end
            )
            out[f"{name}.{var}"] = {s["metric"].get(label, "") for s in series}
    return out


def test_every_dashboard_query_returns_data_from_a_real_round(
    kube_cluster: KubeCluster, minio_server: S3Server, tmp_path: Path
) -> None:
    with observed_rounds(kube_cluster, minio_server, tmp_path, bucket="dashboards") as observed:
        problems = _no_data(observed)
        values = _variable_values(observed)
        scraped = observed.prometheus.query(
            f'count by (__name__) ({{job="{OPERATOR_JOB}", __name__=~"tapestry_.+"}})',
            time=observed.end,
        )
        operator_only = "|".join(
            f"{m.prometheus}.*" for m in METRICS if set(m.by) <= {Service.OPERATOR, Service.LOCAL}
        )
        range_s = promql.duration(observed.end - observed.start)
        operator_jobs = observed.prometheus.query(
            f'count by (job) (last_over_time({{__name__=~"{operator_only}"}}[{range_s}]))',
            time=observed.end,
        )
        targets = observed.prometheus.targets()
        members = set(observed.deployment.members)
    assert not problems, "dashboard queries without data:\n" + "\n".join(problems)

    assert values["coordinator.federation"] == {"demo"}
    assert values["participant.federation"] == {"demo"}
    assert values["participant.participant"] == members, "every member's trainer reported"

    # The operator's own metrics came through the scrape of its /metrics, and only
    # through it (pushed as well, every sum over them would count them twice).
    assert [t["health"] for t in targets] == ["up"], targets
    assert {s["metric"]["job"] for s in operator_jobs} == {OPERATOR_JOB}, operator_jobs
    names = {s["metric"]["__name__"] for s in scraped}
    for metric in METRICS:
        if Service.OPERATOR in metric.by:
            assert any(n.startswith(metric.prometheus) for n in names), (metric.prometheus, names)
