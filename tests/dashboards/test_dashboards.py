"""The chart's Grafana dashboards, without a server: they are what tests.dashboards.generate
makes, they name exactly the catalogue's metrics and labels, every catalogue metric is
on one of them, and they are well-formed Grafana (variables, datasource, layout).

What their queries return over a real round is tests/kube/test_observability.py's.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tapestry_operator import api
from tapestry_telemetry import catalog
from tapestry_telemetry.catalog import METRICS, Instrument, MetricDef, Service
from tests.dashboards import generate, promql
from tests.dashboards.generate import TARGET_INFO, label

NAMES = ("coordinator", "participant")
VALUES = {"federation": "demo", "participant": "de"}
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_ALWAYS = frozenset({"job", "instance"})  # every series has them
# The resource attributes Prometheus keeps in target_info that the dashboards join on.
_TARGET_INFO_LABELS = frozenset({label(catalog.FEDERATION), label(catalog.PARTICIPANT)})
_UNITS = {"short", "none", "s", "bytes", "Bps"}


def _series_names() -> dict[str, tuple[MetricDef | None, frozenset[str]]]:
    """Every series name a dashboard may use: the metric it belongs to and its labels."""
    out: dict[str, tuple[MetricDef | None, frozenset[str]]] = {
        TARGET_INFO: (None, _TARGET_INFO_LABELS | _ALWAYS)
    }
    for d in METRICS:
        labels = frozenset(label(a) for a in d.attributes) | _ALWAYS
        if d.instrument == Instrument.HISTOGRAM:
            out[f"{d.prometheus}_bucket"] = (d, labels | {"le"})
            out[f"{d.prometheus}_sum"] = (d, labels)
            out[f"{d.prometheus}_count"] = (d, labels)
        else:
            out[d.prometheus] = (d, labels)
    return out


def _queries(name: str) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel query and every variable's series selector."""
    board = promql.load(name)
    out = [(t.title, promql.substitute(t.expr, VALUES)) for t in promql.targets(board)]
    for var, selector, _ in promql.query_variables(board):
        out.append((f"{board['uid']} / variable {var}", promql.substitute(selector, VALUES)))
    return out


def test_the_committed_dashboards_are_the_generated_ones() -> None:
    files = {p.name for p in promql.dashboard_files()}
    assert files == {f"{n}.json" for n in NAMES}, files
    for path, text in generate.rendered():
        assert path.read_text() == text, (
            f"{path.name} differs from tests/dashboards/generate.py's; run"
            " `python -m tests.dashboards.generate` (or `make dashboards`)"
        )


@pytest.mark.parametrize("name", NAMES)
def test_every_query_names_only_catalogue_metrics_and_their_labels(name: str) -> None:
    known = _series_names()
    problems = []
    for where, expr in _queries(name):
        found = promql.names(expr)
        usable: set[str] = set()
        for s in found.selectors:
            if s.name not in known:
                problems.append(f"{where}: {s.name} is not a series of the catalogue")
                continue
            _, labels = known[s.name]
            usable |= labels
            for key, _, _ in s.matchers:
                if key not in labels:
                    problems.append(f"{where}: {s.name} has no label {key}")
        for key in sorted(found.labels - usable):
            problems.append(f"{where}: groups by {key}, a label none of its series has")
    assert not problems, "\n".join(problems)


def test_histogram_suffixes_only_on_histograms() -> None:
    """A `_bucket`/`_sum`/`_count` of a counter or gauge would be a silent empty panel."""
    for name in NAMES:
        for where, expr in _queries(name):
            for s in promql.names(expr).selectors:
                metric, _ = _series_names().get(s.name, (None, frozenset()))
                if metric is not None and s.name != metric.prometheus:
                    assert metric.instrument == Instrument.HISTOGRAM, (where, s.name)
                    assert s.name.removeprefix(metric.prometheus) in _HISTOGRAM_SUFFIXES


def test_every_catalogue_metric_is_on_a_dashboard() -> None:
    known = _series_names()
    shown = set()
    for name in NAMES:
        for _, expr in _queries(name):
            for s in promql.names(expr).selectors:
                metric, _ = known[s.name]
                if metric is not None:
                    shown.add(metric.name)
    missing = {d.name for d in METRICS} - shown - set(generate.NOT_SHOWN)
    assert not missing, f"on no dashboard, and not in generate.NOT_SHOWN: {sorted(missing)}"
    assert not shown & set(generate.NOT_SHOWN), "NOT_SHOWN lists a metric that is shown"
    assert all(generate.NOT_SHOWN.values()), "every metric left out says why"


def _regex_matches(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text) is not None  # PromQL regexes are anchored


# Label values the dashboards may match, from their one definition each.
_ENUMS = {
    label(catalog.RESOURCE): {api.FEDERATIONS, api.ROUNDS, api.PARTICIPANTS},
    label(catalog.NETWORK_IO_DIRECTION): {catalog.TRANSMIT, catalog.RECEIVE},
    label(catalog.UPDATE_VERDICT): {catalog.VERDICT_ACCEPTED, catalog.VERDICT_REJECTED},
    # Prometheus's OTLP receiver: job = service.namespace/service.name
    "job": {f"tapestry/{s}" for s in Service} | {str(s) for s in Service},
}


@pytest.mark.parametrize("name", NAMES)
def test_matched_label_values_exist(name: str) -> None:
    """A matcher on a resource, direction, verdict or job matches a value that is
    emitted, so a rename cannot leave a panel silently empty."""
    for where, expr in _queries(name):
        for s in promql.names(expr).selectors:
            for key, op, value in s.matchers:
                if key not in _ENUMS or op.startswith("!"):
                    continue
                values = _ENUMS[key]
                if op == "=":
                    assert value in values, (where, key, value)
                else:
                    assert any(_regex_matches(value, v) for v in values), (where, key, value)
                    for alternative in value.split("|"):
                        assert any(_regex_matches(alternative, v) for v in values), (
                            where, key, alternative,
                        )  # fmt: skip


def _variables_used(board: dict[str, Any]) -> set[str]:
    text = " ".join(t.expr for t in promql.targets(board))
    text += " ".join(sel for _, sel, _ in promql.query_variables(board))
    return {m[0] or m[1] for m in re.findall(r"\$\{(\w+)\}|\$(\w+)", text)} - {
        "__rate_interval", "__interval", "__range",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("name", "uid", "variables"),
    [
        ("coordinator", "tapestry-coordinator", ["datasource", "federation"]),
        ("participant", "tapestry-participant", ["datasource", "federation", "participant"]),
    ],
)
def test_dashboard_is_well_formed_grafana(name: str, uid: str, variables: list[str]) -> None:
    board = promql.load(name)
    assert board["uid"] == uid, "the uid is stable: links and provisioning rely on it"
    assert board["schemaVersion"] == generate.SCHEMA_VERSION
    assert board["id"] is None, "no database id: Grafana assigns one on import"
    templating = board["templating"]["list"]
    assert [v["name"] for v in templating] == variables
    ds = templating[0]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for var in templating[1:]:
        assert var["type"] == "query" and var["datasource"]["uid"] == "${datasource}"
        assert not var["multi"] and not var["includeAll"], "queries match one value with ="
    assert _variables_used(board) <= set(variables), _variables_used(board)
    assert "participant" not in variables or "participant" in _variables_used(board)

    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, (panel["title"], g)
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]
    for panel in promql.panels(board):
        assert panel["title"] and panel["description"], panel["title"]
        assert panel["type"] in ("stat", "timeseries"), panel["type"]
        assert panel["datasource"] == generate.DATASOURCE, panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"] in _UNITS, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for t in panel["targets"]:
            assert t["datasource"] == generate.DATASOURCE, panel["title"]
            assert t["instant"] != t["range"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_substitute_replaces_grafana_variables() -> None:
    expr = 'rate(x{a="$federation", b="${participant}"}[$__rate_interval])'
    expr += " + y[$__interval] + z[$__range]"
    out = promql.substitute(expr, VALUES, interval_s=5, rate_interval_s=20.5, range_s=600)
    assert out == 'rate(x{a="demo", b="de"}[21s]) + y[5s] + z[600s]'
    with pytest.raises(KeyError, match=r"\$job"):
        promql.substitute('x{job="$job"}', VALUES)
    assert promql.rate_interval(5, 1) == 6 and promql.rate_interval(15, 15) == 60
