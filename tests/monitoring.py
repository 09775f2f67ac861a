"""What monitoring/ holds, read as Grafana and Prometheus read it: the dashboard's queries, the
alerts' names, and the metric names a PromQL expression reads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES = MONITORING / "alerts.yml"
RULE_TESTS = MONITORING / "alerts-test.yml"

# Grafana's variables, as a query sees them once Grafana has put in the values: all gateways, all
# streams, the interval Grafana would choose for a 1 s scrape.
GRAFANA_VALUES = {"$__rate_interval": "1m", "$instance": ".*", "$stream": ".*"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w$.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS |= {"offset", "bool", "inf", "nan", "Inf", "NaN"}


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` reads: what is left once strings, label matchers, ranges, grouping
    labels, functions (a name before "(") and keywords are taken out."""
    for pattern in (_STRING, _MATCHERS, _RANGE, _GROUPING):
        expr = pattern.sub(" ", expr)
    return {name for name in _IDENTIFIER.findall(expr) if name not in _KEYWORDS}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too; rows themselves are no panels."""
    found: list[dict[str, Any]] = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            found += panel.get("panels", [])
        else:
            found.append(panel)
    return found


def dashboard_queries(board: dict[str, Any]) -> dict[str, str]:
    """Where -> PromQL: each panel's targets, and each query variable's query."""
    queries = {
        f"panel {panel['title']!r} {target['refId']}": target["expr"]
        for panel in panels(board)
        for target in panel["targets"]
    }
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            # label_values(SELECTOR, LABEL): the selector is PromQL, the label is none.
            selector = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            queries[f"variable {variable['name']}"] = selector.group(1) if selector else query
    return queries


def with_grafana_values(expr: str) -> str:
    for variable, value in GRAFANA_VALUES.items():
        expr = expr.replace(variable, value)
    return expr


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", RULES.read_text(), re.MULTILINE)


def alerts_tested_firing() -> set[str]:
    """The alerts some case of alerts-test.yml expects to fire (an alertname with exp_alerts)."""
    return set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:", RULE_TESTS.read_text()))
