"""`s2cs --metrics-port`, scraped by a real Prometheus server while a stream carries data."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from scistream.loopback import Sink, free_port

from ..monitoring import RULES, alert_names, dashboard, dashboard_queries, metric_names, with_grafana_values
from .conftest import BACKENDS, open_stream, wait_for
from .test_diagnosis import send_and_lose

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
MISSING = "Prometheus is not installed: scripts/system-deps prometheus (make test does)"
SENT = 8 * 1024 * 1024
# 2 MB/s: the 8 MiB take about 4 s, so Prometheus scrapes the stream while the data moves.
RATE_KBPS = 16000


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as reply:  # noqa: S310 - a URL of this test
        return bytes(reply.read())


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The series of an instant query, each {"metric": labels, "value": [time, "number"]}."""
        reply = json.loads(get(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"))
        assert reply["status"] == "success", reply
        return list(reply["data"]["result"])

    def rules(self) -> list[dict[str, Any]]:
        """Each rule as Prometheus loaded it: name, query, health, lastEvaluation, ..."""
        reply = json.loads(get(f"{self.url}/api/v1/rules"))
        assert reply["status"] == "success", reply
        return [rule for group in reply["data"]["groups"] for rule in group["rules"]]

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
        try:
            return b"Ready" in get(f"{self.url}/-/ready")
        except (urllib.error.URLError, ConnectionError):
            return False


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    """Start the system's Prometheus scraping the given targets every second; it is stopped at
    the end whatever happens."""
    started: list[Prometheus] = []

    def start(*targets: str, rules: Path | None = None) -> Prometheus:
        assert os.access(PROMETHEUS, os.X_OK) and os.access(PROMTOOL, os.X_OK), MISSING
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            + (f"rule_files: [{json.dumps(str(rules))}]\n" if rules else "")
            + "scrape_configs:\n  - job_name: scistream\n    static_configs:\n"
            f"      - targets: {json.dumps(list(targets))}\n"
        )
        port = free_port()
        log = tmp_path / "prometheus.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = Prometheus(process, f"http://127.0.0.1:{port}", log)
        started.append(server)
        wait_for(server.ready, 120, "Prometheus ready")
        return server

    yield start
    for server in started:
        server.process.terminate()
        try:
            server.process.wait(60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
        assert server.process.returncode is not None


def samples(server: Prometheus, promql: str) -> dict[str, float]:
    """role -> value of each series of `promql`."""
    return {s["metric"]["role"]: float(s["value"][1]) for s in server.query(promql)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_prometheus_scraping_s2cs_reports_a_running_streams_bytes_within_one_percent(
    start_s2cs, prometheus, backend
):
    hpc_metrics, inst_metrics = free_port(), free_port()
    hpc = start_s2cs("hpc", "--metrics-port", str(hpc_metrics), backend=backend)
    inst = start_s2cs("inst", "--metrics-port", str(inst_metrics), backend=backend)
    assert f"metrics on http://127.0.0.1:{hpc_metrics}/metrics" in hpc.log.read_text()
    server = prometheus(f"127.0.0.1:{hpc_metrics}", f"127.0.0.1:{inst_metrics}")
    sink = Sink()
    stream = open_stream(hpc, inst, sink.port, rate=RATE_KBPS)
    prefix = stream.uid[:8]
    data = os.urandom(SENT)

    with socket.create_connection(("127.0.0.1", stream.port), timeout=120) as sock:
        sock.sendall(data)
        wait_for(lambda: sink.received == SENT, 120, "all bytes at the service")
        # The connection stays open: the stream is live while Prometheus reads its counters.
        received = f'scistream_stream_received_bytes_total{{stream="{prefix}"}}'

        seen: dict[str, float] = {}

        def both_within_one_percent() -> dict[str, float]:
            seen.update(samples(server, received))
            close = {role: n for role, n in seen.items() if abs(n - SENT) <= SENT / 100}
            return seen if len(close) == 2 else {}

        try:
            counted = wait_for(both_within_one_percent, 120, f"{received} within 1% of {SENT}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen: {seen}") from None
        assert set(counted) == {"inbound", "outbound"}
        connections = f'scistream_stream_current_connections{{stream="{prefix}"}}'
        assert wait_for(
            lambda: samples(server, connections) == {"inbound": 1, "outbound": 1}, 120, connections
        )

        # What Prometheus scraped passes its own linter.
        text = get(f"http://127.0.0.1:{hpc_metrics}/metrics")
        lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=60)
        assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()

        # Every series of s2cs names the stream by its prefix; none carries the UID, the secret.
        every = server.query('{__name__=~"scistream_.+"}')
        assert stream.uid not in json.dumps(every)
        assert {s["metric"].get("stream") for s in every if "stream" in s["metric"]} == {prefix}
        limit = samples(server, f'scistream_stream_rate_limit_bytes_per_second{{stream="{prefix}"}}')
        assert limit == {"inbound": RATE_KBPS * 125, "outbound": RATE_KBPS * 125}

        sock.shutdown(socket.SHUT_WR)
        reply = sock.makefile("rb").readline().split()
    assert int(reply[0]) == SENT and reply[1].decode() == hashlib.sha256(data).hexdigest()

    # Each gateway answered one request that made the stream: the inbound one, the outbound one.
    for op in ("inbound", "outbound"):
        made = server.query(f'sum(scistream_requests_total{{op="{op}", code="ok"}})')
        assert [float(s["value"][1]) for s in made] == [1.0], op


def served(url: str) -> set[str]:
    """The sample names a /metrics page holds (a histogram's _bucket, _sum and _count each)."""
    text = get(url).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_dashboard_and_the_alerts_read_only_metrics_a_real_s2cs_serves(start_s2cs, prometheus, tmp_path):
    hpc_metrics, inst_metrics = free_port(), free_port()
    hpc = start_s2cs("hpc", "--metrics-port", str(hpc_metrics))
    inst = start_s2cs("inst", "--metrics-port", str(inst_metrics))
    targets = (f"127.0.0.1:{hpc_metrics}", f"127.0.0.1:{inst_metrics}")
    server = prometheus(*targets, rules=RULES)
    # A stream that carries data, and one whose service is not running: each series the panels
    # and alerts read has a reason to be there, the failures by kind too.
    sink = Sink()
    stream = open_stream(hpc, inst, sink.port)
    with socket.create_connection(("127.0.0.1", stream.port), timeout=120) as sock:
        sock.sendall(b"scan 0001 " * 1000)
        wait_for(lambda: sink.received == 10000, 120, "the data at the service")
    broken = open_stream(hpc, inst, free_port())
    send_and_lose(broken.port)
    urls = [f"http://{target}/metrics" for target in targets]
    have: set[str] = set()

    def failure_counted() -> bool:
        have.update(*map(served, urls))
        return "scistream_stream_failures_total" in have

    wait_for(failure_counted, 120, "scistream_stream_failures_total on a /metrics page")

    loaded = server.rules()
    assert sorted(rule["name"] for rule in loaded) == sorted(alert_names())
    queries = {f"alert {rule['name']}": rule["query"] for rule in loaded}
    queries.update(dashboard_queries(dashboard()))
    # scistream_control_certificate_expiry_time_seconds is served once s2cs's serve() (cli.py)
    # gives Metrics.control_certificate the certificate it loaded for the control port.
    missing = {f"{where}: {name}" for where, query in queries.items() for name in metric_names(query) - have}
    assert not missing, f"not served by s2cs: {sorted(missing)} (served: {sorted(have)})"

    # The control certificate's panel and alerts read the one the control port presents.
    presented = x509.load_pem_x509_certificate(hpc.cert.read_bytes()).not_valid_after_utc.timestamp()
    expiry = f'scistream_control_certificate_expiry_time_seconds{{instance="{targets[0]}"}}'
    scraped = wait_for(lambda: server.query(expiry), 120, f"{expiry} in Prometheus")
    assert [float(s["value"][1]) for s in scraped] == [presented]

    # Every panel's query is one Prometheus answers, and the streams' panels show both streams.
    for where, query in dashboard_queries(dashboard()).items():
        assert isinstance(server.query(with_grafana_values(query)), list), where
    table = with_grafana_values(dashboard_queries(dashboard())["panel 'Streams' A"])
    both = {(uid[:8], role) for uid in (stream.uid, broken.uid) for role in ("inbound", "outbound")}
    wait_for(
        lambda: {(s["metric"]["stream"], s["metric"]["role"]) for s in server.query(table)} == both,
        120,
        "both streams, on both gateways, in the table of streams",
    )

    # Evaluated against real series, the rules are sound and nothing fires for two fresh streams.
    before = {rule["name"]: rule["lastEvaluation"] for rule in server.rules()}
    wait_for(
        lambda: all(rule["lastEvaluation"] != before[rule["name"]] for rule in server.rules()),
        120,
        "a rule evaluation after the streams were scraped",
    )
    assert [(rule["name"], rule["health"], rule.get("lastError", "")) for rule in server.rules()] == [
        (rule["name"], "ok", "") for rule in loaded
    ]
    assert server.query("ALERTS") == []
