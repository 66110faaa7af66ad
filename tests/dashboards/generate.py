"""The source of the chart's Grafana dashboards, charts/tapestry/dashboards/*.json.

`python -m tests.dashboards.generate` (part of `make dashboards`) writes them;
tests/dashboards/test_dashboards.py fails while the committed files differ from what
this module makes. Metric and label names come from the telemetry catalogue, resource
plurals from the operator's API module, so a rename shows up here as a test failure
rather than as an empty panel.

How the queries read the metrics, by who exports them:

- The operator lives long and exports all the time (scraped, or pushed over OTLP):
  over time, counters are read with `increase`/`rate`, histograms as `increase(_sum) /
  increase(_count)` or `histogram_quantile`, gauges as they are. Stat panels show its
  counters as they are: counts since the operator started. (Prometheus takes a
  series' first sample as its start, so `increase` misses what a counter had counted
  by its first export: the first round an operator sees after it starts.)
- A trainer or aggregator process lives for one round and exports its values once or
  a few times before it exits; each process is its own series (its own `instance`).
  `rate` cannot be taken over one point, so their panels show one point per run: the
  last value each process exported in the step (`last_over_time(...[$__interval])`),
  joined across runs by the panel's line.

Every query is evaluated by the real Prometheus over a real round's data in
tests/kube/test_observability.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tapestry_operator import api
from tapestry_telemetry import catalog
from tapestry_telemetry.catalog import MetricDef, Service

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "charts" / "tapestry" / "dashboards"
SCHEMA_VERSION = 41  # Grafana 12's classic dashboard model
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# target_info: the series in which Prometheus keeps an OTLP-pushed process's resource
# attributes (tapestry.federation, tapestry.participant), joined on job and instance.
TARGET_INFO = "target_info"


def label(key: str) -> str:
    """An attribute key as a Prometheus label (OpenTelemetry's translation)."""
    return key.replace(".", "_")


FEDERATION = label(catalog.FEDERATION)
PARTICIPANT = label(catalog.PARTICIPANT)
OUTCOME = label(catalog.ROUND_OUTCOME)
STATE = label(catalog.MEMBER_STATE)
VERDICT = label(catalog.UPDATE_VERDICT)
REASON = label(catalog.REJECTION_REASON)
RESOURCE = label(catalog.RESOURCE)
ERROR_TYPE = label(catalog.ERROR_TYPE)
DIRECTION = label(catalog.NETWORK_IO_DIRECTION)

IN_FEDERATION = f'{FEDERATION}="$federation"'
OF_PARTICIPANT = f'{PARTICIPANT}="$participant"'
COORDINATOR_RESOURCES = f'{RESOURCE}=~"{api.FEDERATIONS}|{api.ROUNDS}"'
PARTICIPANT_RESOURCES = f'{RESOURCE}="{api.PARTICIPANTS}"'


def job(service: Service) -> str:
    """A matcher for the processes of one kind. Prometheus's OTLP receiver (and the
    OpenTelemetry Collector's Prometheus exporters) make `service.namespace/service.name`
    the `job` label."""
    return f'job=~"(.+/)?{service}"'


def sel(metric: MetricDef, *matchers: str, suffix: str = "") -> str:
    """`metric`'s Prometheus series (`suffix` `_bucket`, `_sum` or `_count` of a
    histogram) with `matchers`."""
    inner = ", ".join(matchers)
    return f"{metric.prometheus}{suffix}{{{inner}}}"


def per_run(metric: MetricDef, *matchers: str, by: str) -> str:
    """The value each short-lived process last exported in the step, the highest of
    those per `by`: one point per trainer or aggregator run."""
    return f"max by ({by}) (last_over_time({sel(metric, *matchers)}[$__interval]))"


def per_run_mean(metric: MetricDef, *matchers: str, by: str) -> str:
    """A short-lived process's histogram as its mean (one observation per run: the
    value itself)."""
    total = f"last_over_time({sel(metric, *matchers, suffix='_sum')}[$__interval])"
    count = f"last_over_time({sel(metric, *matchers, suffix='_count')}[$__interval])"
    return f"max by ({by}) ({total} / {count})"


def windowed_mean(metric: MetricDef, *matchers: str, by: str) -> str:
    """A long-lived process's histogram as the mean of what it observed in each window."""
    total = f"increase({sel(metric, *matchers, suffix='_sum')}[$__rate_interval])"
    count = f"increase({sel(metric, *matchers, suffix='_count')}[$__rate_interval])"
    return f"sum by ({by}) ({total}) / sum by ({by}) ({count})"


def quantile(q: float, metric: MetricDef, *matchers: str, by: str) -> str:
    buckets = f"rate({sel(metric, *matchers, suffix='_bucket')}[$__rate_interval])"
    return f"histogram_quantile({q}, sum by (le, {by}) ({buckets}))"


# -- Grafana JSON ----------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False  # evaluated once at the end of the range (stat panels)


@dataclass(frozen=True)
class Panel:
    kind: str  # "stat", "timeseries" or "row"
    title: str
    description: str = ""
    queries: tuple[Query, ...] = ()
    unit: str = "short"
    w: int = 12
    h: int = 8
    style: str = "line"  # timeseries: line (per-run points joined), bars (events), area
    decimals: int | None = None
    stack: bool = False


@dataclass
class Layout:
    """Places panels left to right, wrapping at Grafana's 24 columns."""

    x: int = 0
    y: int = 0
    row_h: int = 0
    next_id: int = 1
    panels: list[dict[str, Any]] = field(default_factory=list)

    def add(self, panel: Panel) -> None:
        if panel.kind == "row":
            self.newline()
            self.panels.append(_row(panel, self._id(), self.y))
            self.y += 1
            return
        if self.x + panel.w > 24:
            self.newline()
        grid = {"h": panel.h, "w": panel.w, "x": self.x, "y": self.y}
        self.panels.append(_panel(panel, self._id(), grid))
        self.x += panel.w
        self.row_h = max(self.row_h, panel.h)

    def newline(self) -> None:
        self.y += self.row_h
        self.x, self.row_h = 0, 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def _row(panel: Panel, panel_id: int, y: int) -> dict[str, Any]:
    return {
        "collapsed": False,
        "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
        "id": panel_id,
        "panels": [],
        "title": panel.title,
        "type": "row",
    }


def _targets(panel: Panel) -> list[dict[str, Any]]:
    out = []
    for i, query in enumerate(panel.queries):
        out.append({
            "datasource": DATASOURCE,
            "editorMode": "code",
            "expr": query.expr,
            "instant": query.instant,
            "legendFormat": query.legend or "__auto",
            "range": not query.instant,
            "refId": chr(ord("A") + i),
        })  # fmt: skip
    return out


def _panel(panel: Panel, panel_id: int, grid: dict[str, int]) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit, "color": {"mode": "palette-classic"}}
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    out: dict[str, Any] = {
        "datasource": DATASOURCE,
        "description": panel.description,
        "gridPos": grid,
        "id": panel_id,
        "title": panel.title,
        "type": panel.kind,
    }
    if panel.kind == "stat":
        defaults["color"] = {"mode": "thresholds"}
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "blue", "value": None}]}
        out["options"] = {
            "colorMode": "value",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "showPercentChange": False,
            "textMode": "value_and_name",
            "wideLayout": True,
        }
    else:
        defaults["custom"] = {
            "axisPlacement": "auto",
            "drawStyle": "bars" if panel.style == "bars" else "line",
            "fillOpacity": {"bars": 80, "area": 40}.get(panel.style, 0),
            "lineWidth": 2,
            "pointSize": 6,
            "showPoints": "always" if panel.style == "line" else "never",
            "spanNulls": panel.style == "line",
            "stacking": {"group": "A", "mode": "normal" if panel.stack else "none"},
        }
        legend = {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True}
        out["options"] = {"legend": legend, "tooltip": {"mode": "multi", "sort": "desc"}}
    out["fieldConfig"] = {"defaults": defaults, "overrides": []}
    out["targets"] = _targets(panel)
    return out


def _datasource_variable() -> dict[str, Any]:
    return {
        "current": {},
        "hide": 0,
        "includeAll": False,
        "label": "Data source",
        "multi": False,
        "name": "datasource",
        "options": [],
        "query": "prometheus",
        "refresh": 1,
        "regex": "",
        "type": "datasource",
    }


def _query_variable(name: str, title: str, query: str) -> dict[str, Any]:
    return {
        "current": {},
        "datasource": DATASOURCE,
        "definition": query,
        "hide": 0,
        "includeAll": False,
        "label": title,
        "multi": False,
        "name": name,
        "options": [],
        "query": {
            "qryType": 1,
            "query": query,
            "refId": "PrometheusVariableQueryEditor-VariableQuery",
        },
        "refresh": 2,  # on time range change: a new federation shows up by itself
        "regex": "",
        "sort": 1,
        "type": "query",
    }


def dashboard(
    uid: str, title: str, description: str, variables: Sequence[dict[str, Any]],
    panels: Sequence[Panel],
) -> dict[str, Any]:  # fmt: skip
    layout = Layout()
    for panel in panels:
        layout.add(panel)
    return {
        "annotations": {"list": []},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": layout.panels,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["tapestry"],
        "templating": {"list": [_datasource_variable(), *variables]},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": title,
        "uid": uid,
        "version": 1,
    }


# -- the dashboards ----------------------------------------------------------------------


def _operator_panels(resources: str) -> list[Panel]:
    errors = sel(catalog.RECONCILE_ERRORS, resources)
    return [
        Panel("row", "Operator"),
        Panel(
            "timeseries", "Reconcile errors",
            "Reconcile visits that failed (and are retried with backoff) per window, by "
            "resource and exception type. StoreError types mean the object store was "
            "unreachable.",
            (Query(
                f"sum by ({RESOURCE}, {ERROR_TYPE}) (increase({errors}[$__rate_interval]))",
                f"{{{{{RESOURCE}}}}} {{{{{ERROR_TYPE}}}}}",
            ),),
            unit="short", style="bars", decimals=0,
        ),
        Panel(
            "timeseries", "Reconcile time (p90)",
            "90th percentile of the time one reconcile visit takes, by resource.",
            (Query(
                quantile(0.9, catalog.RECONCILE_DURATION, resources, by=RESOURCE),
                f"{{{{{RESOURCE}}}}}",
            ),),
            unit="s", style="area",
        ),
    ]  # fmt: skip


def coordinator() -> dict[str, Any]:
    f = IN_FEDERATION
    updates = sel(catalog.ROUND_UPDATES, f)
    aggregator_io = sel(catalog.STORE_IO, f, job(Service.AGGREGATOR))
    panels = [
        Panel("row", "Rounds"),
        Panel(
            "stat", "Current round",
            "The newest round of the federation the coordinator works on.",
            (Query(f"max({sel(catalog.ROUND_NUMBER, f)})", "round"),),
            unit="none", w=4, h=5, decimals=0,
        ),
        Panel(
            "stat", "Rounds finished",
            "Rounds that ended since the coordinator's operator started, by outcome.",
            (Query(
                f"sum by ({OUTCOME}) ({sel(catalog.ROUND_DURATION, f, suffix='_count')})",
                f"{{{{{OUTCOME}}}}}", instant=True,
            ),),
            unit="none", w=6, h=5, decimals=0,
        ),
        Panel(
            "stat", "Updates judged",
            "Members' updates the round results accepted (merged) or rejected since the "
            "coordinator's operator started.",
            (Query(f"sum by ({VERDICT}) ({updates})", f"{{{{{VERDICT}}}}}", instant=True),),
            unit="none", w=6, h=5, decimals=0,
        ),
        Panel(
            "stat", "Members of the current round",
            "How many members of the current round are in each state now.",
            (Query(
                f"max by ({STATE}) ({sel(catalog.ROUND_MEMBERS, f)}) > 0", f"{{{{{STATE}}}}}",
                instant=True,
            ),),
            unit="none", w=8, h=5, decimals=0,
        ),
        Panel(
            "timeseries", "Round duration",
            "Time from a round's plan to its signed result, for the rounds that ended in "
            "each window, by outcome.",
            (Query(
                windowed_mean(catalog.ROUND_DURATION, f, by=OUTCOME), f"{{{{{OUTCOME}}}}}"
            ),),
            unit="s",
        ),
        Panel(
            "timeseries", "Members by state",
            "Members of the current round in each state: Planned, Accepted, Uploaded, "
            "Merged or Rejected by the result; Declined, Failed or Late when out.",
            (Query(
                f"max by ({STATE}) ({sel(catalog.ROUND_MEMBERS, f)}) > 0", f"{{{{{STATE}}}}}"
            ),),
            unit="none", style="area", stack=True, decimals=0,
        ),
        Panel("row", "Members and contributions"),
        Panel(
            "timeseries", "Updates accepted and rejected",
            "Members judged by each round's result: accepted (merged) or rejected, with "
            "the rejection reason (Late, Declined, TrainingFailed, HashMismatch, ...).",
            (Query(
                f"sum by ({VERDICT}, {REASON}) (increase({updates}[$__rate_interval]))",
                f"{{{{{VERDICT}}}}} {{{{{REASON}}}}}",
            ),),
            unit="none", style="bars", decimals=0,
        ),
        Panel(
            "timeseries", "Contributions per member",
            "Each member's update as each round's result judged it: accepted (merged "
            "into the next base) or rejected, with the reason. Counted by the "
            "coordinator, so every member shows without its own metrics.",
            (Query(
                f"sum by ({PARTICIPANT}, {VERDICT}, {REASON}) "
                f"(increase({updates}[$__rate_interval]))",
                f"{{{{{PARTICIPANT}}}}} {{{{{VERDICT}}}}} {{{{{REASON}}}}}",
            ),),
            unit="none", style="bars", decimals=0,
        ),
        Panel("row", "Aggregation"),
        Panel(
            "timeseries", "Aggregation time",
            "Time the aggregator took to verify, merge and publish a round, one point "
            "per aggregation, by outcome.",
            (Query(
                per_run_mean(catalog.AGGREGATION_DURATION, f, by=OUTCOME),
                f"{{{{{OUTCOME}}}}}",
            ),),
            unit="s", w=8,
        ),
        Panel(
            "timeseries", "Aggregation throughput",
            "Delta bytes merged per second of streaming merge, one point per aggregation.",
            (Query(
                per_run(catalog.AGGREGATION_THROUGHPUT, f, by=FEDERATION), "merge",
            ),),
            unit="Bps", w=8,
        ),
        Panel(
            "timeseries", "Store bytes per aggregation",
            "Bytes each aggregation read from (receive) and wrote to (transmit) the "
            "object store: the members' deltas in, the next base and result out.",
            (Query(
                f"sum by ({DIRECTION}) (last_over_time({aggregator_io}[$__interval]))",
                f"{{{{{DIRECTION}}}}}",
            ),),
            unit="bytes", w=8,
        ),
        *_operator_panels(COORDINATOR_RESOURCES),
    ]  # fmt: skip
    variables = [
        _query_variable(
            "federation", "Federation",
            f"label_values({catalog.ROUND_NUMBER.prometheus}, {FEDERATION})",
        ),
    ]  # fmt: skip
    return dashboard(
        "tapestry-coordinator", "Tapestry / Coordinator",
        "A federation's rounds as its coordinator sees them: rounds, members, updates, "
        "aggregation and the operator.",
        variables, panels,
    )  # fmt: skip


def participant() -> dict[str, Any]:
    fp = (IN_FEDERATION, OF_PARTICIPANT)
    rounds = sel(catalog.PARTICIPANT_ROUNDS, *fp)
    trainer_io = sel(catalog.STORE_IO, IN_FEDERATION, job(Service.TRAINER))
    mine = f"last_over_time({TARGET_INFO}{{{OF_PARTICIPANT}}}[$__interval])"
    panels = [
        Panel("row", "Training"),
        Panel(
            "stat", "Rounds finished",
            "This participant's rounds since its operator started, by the state they "
            "ended in: Merged, Rejected, Late, Declined or Failed.",
            (Query(f"sum by ({STATE}) ({rounds})", f"{{{{{STATE}}}}}", instant=True),),
            unit="none", w=8, h=5, decimals=0,
        ),
        Panel(
            "stat", "Tokens trained",
            "Tokens trained on in the dashboard's time range, over every run.",
            (Query(
                f"sum(max_over_time({sel(catalog.TRAINING_TOKENS, *fp)}[$__range]))",
                "tokens", instant=True,
            ),),
            unit="short", w=5, h=5,
        ),
        Panel(
            "stat", "Loss of the last run",
            "Mean training loss (cross-entropy, nats per token) of the newest run.",
            (Query(per_run(catalog.TRAINING_LOSS, *fp, by=PARTICIPANT), "loss"),),
            unit="none", w=5, h=5, decimals=3,
        ),
        Panel(
            "stat", "Tokens/s of the last run",
            "Tokens per second of the newest run, all ranks together.",
            (Query(per_run(catalog.TRAINING_THROUGHPUT, *fp, by=PARTICIPANT), "tokens/s"),),
            unit="short", w=6, h=5,
        ),
        Panel(
            "timeseries", "Training loss",
            "Mean training loss (nats per token) of each run: one point per round.",
            (Query(per_run(catalog.TRAINING_LOSS, *fp, by=PARTICIPANT), f"{{{{{PARTICIPANT}}}}}"),),
            unit="none", decimals=3,
        ),
        Panel(
            "timeseries", "Tokens per second",
            "Training throughput of each run, all ranks together.",
            (Query(
                per_run(catalog.TRAINING_THROUGHPUT, *fp, by=PARTICIPANT),
                f"{{{{{PARTICIPANT}}}}}",
            ),),
            unit="short",
        ),
        Panel(
            "timeseries", "Step time",
            "Mean time of one inner optimizer step in each run.",
            (Query(
                per_run_mean(catalog.TRAINING_STEP_DURATION, *fp, by=PARTICIPANT),
                f"{{{{{PARTICIPANT}}}}}",
            ),),
            unit="s", w=8,
        ),
        Panel(
            "timeseries", "Training duration",
            "Time of this participant's share of each round: fetch and verify the base, "
            "train, upload the update.",
            (Query(
                per_run_mean(catalog.TRAINING_DURATION, *fp, by=PARTICIPANT),
                f"{{{{{PARTICIPANT}}}}}",
            ),),
            unit="s", w=8,
        ),
        Panel(
            "timeseries", "Tokens per run",
            "Tokens trained on in each run.",
            (Query(
                f"sum by ({PARTICIPANT}) (last_over_time("
                f"{sel(catalog.TRAINING_TOKENS, *fp)}[$__interval]))",
                f"{{{{{PARTICIPANT}}}}}",
            ),),
            unit="short", w=8,
        ),
        Panel("row", "Submissions"),
        Panel(
            "timeseries", "Rounds by final state",
            "This participant's rounds as they end, by state: Merged (its update is in "
            "the next base), Rejected, Late, Declined or Failed.",
            (Query(
                f"sum by ({STATE}) (increase({rounds}[$__rate_interval]))", f"{{{{{STATE}}}}}"
            ),),
            unit="none", style="bars", decimals=0,
        ),
        Panel(
            "timeseries", "Bytes up and down per run",
            "Bytes each training run of this participant wrote to (transmit: the update) "
            "and read from (receive: plan and base) the object store.",
            (Query(
                f"sum by ({DIRECTION}) (last_over_time({trainer_io}[$__interval])"
                f" * on (job, instance) group_left () {mine})",
                f"{{{{{DIRECTION}}}}}",
            ),),
            unit="bytes",
        ),
        *_operator_panels(PARTICIPANT_RESOURCES),
    ]  # fmt: skip
    # from the operator's count, so a participant whose training fails is listed too
    finished = catalog.PARTICIPANT_ROUNDS.prometheus
    variables = [
        _query_variable("federation", "Federation", f"label_values({finished}, {FEDERATION})"),
        _query_variable(
            "participant", "Participant",
            f'label_values({finished}{{{IN_FEDERATION}}}, {PARTICIPANT})',
        ),
    ]  # fmt: skip
    return dashboard(
        "tapestry-participant", "Tapestry / Participant",
        "One participant's own training and submissions, from its trainers and its "
        "operator.",
        variables, panels,
    )  # fmt: skip


DASHBOARDS = {"coordinator": coordinator, "participant": participant}
# Catalogue metrics no dashboard shows, each with the reason (none today).
NOT_SHOWN: dict[str, str] = {}


def rendered() -> Iterator[tuple[Path, str]]:
    """Each dashboard's file and its JSON text, as committed."""
    for name, make in DASHBOARDS.items():
        yield OUT / f"{name}.json", json.dumps(make(), indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file differs")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered():
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}")
    if stale:
        print(f"out of date: {', '.join(str(p) for p in stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
