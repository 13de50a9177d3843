"""The shipped Grafana dashboard read as PromQL: its expressions, Grafana's variables filled in, and the
metric names each one selects. Shared by the unit test (names exist in /metrics) and the scrape test (each
expression runs on a real Prometheus)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

DASHBOARD = Path(__file__).resolve().parents[2] / "loadtest" / "grafana" / "loraplex-dashboard.json"

# What Grafana puts in for its variables before it sends a query (the adapter variable's "All" value).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$adapter": ".*"}

# PromQL words that look like identifiers but name no metric.
PROMQL_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan",
})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*")  # not the unit of a duration like 5m
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,")


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL expression) for every query target, variables filled in."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], fill_variables(target["expr"])


def fill_variables(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left once string literals, label
    matchers, range selectors and grouping clauses are cut out, that are neither a function call nor a
    keyword. (A sketch of PromQL's grammar, enough for dashboards; `{__name__=...}` selectors are not
    understood, and the dashboard has none.)"""
    for pattern in (_STRING, _MATCHERS, _RANGE, _GROUPING):
        expr = pattern.sub(" ", expr)
    names = set()
    for match in _IDENTIFIER.finditer(expr):
        following = expr[match.end():].lstrip()
        if following.startswith("(") or match.group().lower() in PROMQL_KEYWORDS:
            continue
        names.add(match.group())
    return names


def variable_metric_names(dashboard: dict) -> set[str]:
    """Metric names the template variables' `label_values(metric, label)` queries read."""
    names = set()
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else ""
        names.update(_LABEL_VALUES.findall(text))
    return names
