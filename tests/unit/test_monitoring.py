"""monitoring/: the alerting rules pass promtool's checks and their own unit tests, and the
dashboard is one Grafana imports as it is, on whatever Prometheus data source the operator picks."""

from __future__ import annotations

import re
import subprocess

import pytest

from ..monitoring import (
    MONITORING,
    RULES,
    alert_names,
    alerts_tested_firing,
    dashboard,
    dashboard_queries,
    metric_names,
    panels,
)
from ..needs import require_command

# What the issue asks operators to be warned of, each by its alert.
ALERTS = {
    "ScistreamProcessGivenUp",
    "ScistreamRestartsInALoop",
    "ScistreamRefusalsRising",
    "ScistreamSourcesRefused",
    "ScistreamControlCertificateExpiresSoon",
    "ScistreamControlCertificateExpired",
    "ScistreamStreamIdle",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    require_command("promtool", "checks the alerting rules; make test installs it (system-deps prometheus)")
    return subprocess.run(["promtool", *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)


def test_promtool_finds_every_alerting_rule_sound():
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout
    assert set(alert_names()) == ALERTS


def test_every_alert_fires_in_its_unit_tests_and_they_all_pass():
    ran = promtool("test", "rules", "alerts-test.yml")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "SUCCESS" in ran.stdout
    assert alerts_tested_firing() == ALERTS


def test_the_dashboard_imports_as_it_is_on_any_prometheus_data_source():
    board = dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    assert board.get("id") is None  # Grafana gives it its own; a fixed one would replace another's
    assert "__inputs" not in board and "${DS_" not in str(board)  # no data source asked at import
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    chosen = {"type": "prometheus", "uid": "${datasource}"}
    shown = panels(board)
    assert len(shown) >= 10
    for panel in shown:
        assert panel["datasource"] == chosen, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", chosen) == chosen, panel["title"]
            assert target["expr"] and target["refId"], panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == chosen, variable["name"]
    rows = [p for p in board["panels"] if p["type"] == "row"]
    ids = [p["id"] for p in rows] + [p["id"] for p in shown]
    assert len(ids) == len(set(ids))  # Grafana keeps one panel of each id
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]


def test_the_dashboard_shows_what_an_operator_watches():
    read = set().union(*map(metric_names, dashboard_queries(dashboard()).values()))
    assert {
        "scistream_sessions",  # streams by state and backend
        "scistream_stream_received_bytes_total",  # bytes per stream
        "scistream_stream_current_connections",  # connections per stream
        "scistream_requests_total",  # refusals by code
        "scistream_request_duration_seconds_bucket",  # request latency
        "scistream_stream_restarts_total",  # process restarts
        "scistream_control_certificate_expiry_time_seconds",
    } <= read
    # Only s2cs's own metrics: no panel stays empty for want of another exporter.
    assert all(name.startswith("scistream_") for name in read), read


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (code) (rate(scistream_requests_total{code!="ok"}[5m]))', {"scistream_requests_total"}),
        ("scistream_a - time() < 14 * 86400", {"scistream_a"}),
        (
            "(increase(a_total[30m]) + increase(b_total[30m]) == 0)"
            " and on (job, session) (c{state='RUNNING'} == 1)",
            {"a_total", "b_total", "c"},
        ),
        ("histogram_quantile(0.95, sum by (le, op) (rate(d_bucket[$__rate_interval])))", {"d_bucket"}),
        ("up offset 1h > bool 0 unless ignoring (x) e", {"up", "e"}),
    ],
)
def test_the_metric_names_of_a_query_are_found_and_nothing_else(expr, names):
    assert metric_names(expr) == names


def test_the_operator_guide_names_every_alert_and_every_metric_they_read():
    guide = (MONITORING.parent / "docs" / "operator-guide.md").read_text()
    section = guide.split("\n## Monitoring\n", 1)[1].split("\n## ", 1)[0]
    assert [name for name in alert_names() if f"| `{name}` |" not in section] == []
    read = set().union(*map(metric_names, dashboard_queries(dashboard()).values()))
    read |= set(re.findall(r"\bscistream_\w+", RULES.read_text()))
    documented = {re.sub(r"_(bucket|sum|count)$", "", name) for name in read}
    assert [name for name in sorted(documented) if f"| `{name}` |" not in guide] == []
