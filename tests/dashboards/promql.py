"""What the dashboards ask Prometheus: every panel's queries and every variable's, with
Grafana's variables replaced by concrete values, as Grafana would send them.

Shared by the pure tests (names and labels against the catalogue), the end-to-end test
(each query evaluated by the real Prometheus over a real round) and the pictures.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser

from tests.dashboards.generate import OUT

# Grafana's built-in interval variables, longest first so `$__rate_interval` is not
# read as `$__range` or `$__interval` followed by text.
_BUILTINS = ("$__rate_interval", "$__interval", "$__range")
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.*),\s*(?P<label>\w+)\s*\)$", re.S)


def load(name: str) -> dict[str, Any]:
    """A committed dashboard (`coordinator` or `participant`)."""
    data: dict[str, Any] = json.loads((OUT / f"{name}.json").read_text())
    return data


def dashboard_files() -> list[Path]:
    return sorted(OUT.glob("*.json"))


@dataclass(frozen=True)
class Target:
    """One query of one panel."""

    dashboard: str
    panel: dict[str, Any]
    ref_id: str
    expr: str
    instant: bool
    legend: str

    @property
    def title(self) -> str:
        return f"{self.dashboard} / {self.panel['title']} / {self.ref_id}"


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that is not a row, rows' nested panels included."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panels({"panels": panel.get("panels", [])})
        else:
            yield panel


def targets(dashboard: Mapping[str, Any]) -> list[Target]:
    out = []
    for panel in panels(dashboard):
        for t in panel.get("targets", []):
            out.append(Target(
                dashboard["uid"], panel, t["refId"], t["expr"], bool(t.get("instant")),
                t.get("legendFormat", ""),
            ))  # fmt: skip
    return out


def query_variables(dashboard: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(name, series selector, label) of each `label_values(selector, label)` variable."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = _LABEL_VALUES.match(query.strip())
        if match is None:
            raise ValueError(f"variable {var['name']}: not label_values(selector, label): {query}")
        out.append((var["name"], match["selector"].strip(), match["label"]))
    return out


def duration(seconds: float) -> str:
    """A PromQL duration (whole seconds, at least 1s)."""
    return f"{max(1, math.ceil(seconds))}s"


def substitute(
    expr: str,
    variables: Mapping[str, str],
    *,
    interval_s: float = 15,
    rate_interval_s: float = 60,
    range_s: float = 3600,
) -> str:
    """`expr` as Grafana sends it: the interval variables as durations and the
    template variables by their values; an unknown variable is an error."""
    for name, seconds in zip(_BUILTINS, (rate_interval_s, interval_s, range_s), strict=True):
        expr = expr.replace(name, duration(seconds))

    def value(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        if name not in variables:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return variables[name]

    return _VARIABLE.sub(value, expr)


def rate_interval(interval_s: float, scrape_interval_s: float) -> float:
    """Grafana's `$__rate_interval`: max($__interval + scrape interval, 4 x scrape
    interval)."""
    return max(interval_s + scrape_interval_s, 4 * scrape_interval_s)


# -- what a query names ------------------------------------------------------------------


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)


@dataclass(frozen=True)
class Names:
    selectors: tuple[Selector, ...]
    labels: frozenset[str]  # in by/without, on/ignoring and group_left/right clauses


# MatchOp members compare equal but do not hash: keyed by their names.
_OPS = {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}


def names(expr: str) -> Names:
    """The series selectors and grouping labels of a PromQL expression, from the
    parser of the promql-parser crate (a port of Prometheus's own grammar)."""
    tree = promql_parser.parse(expr)
    selectors: list[Selector] = []
    labels: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found = tuple(
                (m.name, _OPS[str(m.op).rsplit(".", 1)[-1]], m.value)
                for m in node.matchers.matchers
            )
            name = node.name or next((v for n, op, v in found if n == "__name__"), "")
            if not name:
                raise ValueError(f"a selector without a metric name in {expr!r}")
            matchers = tuple(m for m in found if m[0] != "__name__")
            selectors.append(Selector(name, matchers))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            modifier = node.modifier
            if modifier.matching is not None:
                labels.update(modifier.matching.labels)
            labels.update(modifier.group_labels or ())

    promql_parser.walk(tree, visit)
    return Names(tuple(selectors), frozenset(labels))


# -- results -----------------------------------------------------------------------------


def finite_values(series: list[dict[str, Any]]) -> list[float]:
    """The finite sample values of an instant or range query's result."""
    out = []
    for s in series:
        points = s.get("values") or ([s["value"]] if "value" in s else [])
        for _, text in points:
            v = float(text)
            if math.isfinite(v):
                out.append(v)
    return out
