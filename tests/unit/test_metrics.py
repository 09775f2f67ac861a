from __future__ import annotations

import datetime
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scistream.errors import ConfigError
from scistream.protocol import Limits
from scistream.s2cs.metrics import Metrics, serve_metrics
from scistream.s2cs.ports import PortPool
from scistream.s2cs.server import ControlServer
from scistream.s2cs.sessions import Session, SessionRegistry
from scistream.s2ds.backend import Capabilities, Capability, Stats
from scistream.s2ds.render import ListenerSpec, SessionFiles
from scistream.s2ds.supervisor import State

from ..certificates import write_pair

UID_A = "0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"
UID_B = "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a"


CAPABILITIES = Capabilities(
    num_conn=Capability(True, by="HAProxy maxconn"), rate=Capability(False, reason="no splice(2)")
)


@dataclass
class FakeBackend:
    """Stats by session directory name; a session without any has no proxy to ask."""

    stats_of: dict[str, Stats] = field(default_factory=dict)
    name: str = "haproxy"
    version: str = "HAProxy 2.8.25"
    capabilities: Capabilities = CAPABILITIES

    def stats(self, files: SessionFiles) -> Stats | None:
        return self.stats_of.get(files.directory.name)


def proc(kind: str, state: State, restarts: int = 0) -> SimpleNamespace:
    return SimpleNamespace(kind=kind, state=state, restarts=restarts)


def session(uid: str, sid: str, role: str, owner: str | None, port: int, limits: Limits, *procs) -> Session:
    found = Session(
        uid=uid,
        sid=sid,
        role=role,
        owner=owner,
        listeners=(ListenerSpec("127.0.0.1", port, "10.0.1.5", 5001),),
        advertised=(f"127.0.0.1:{port}",),
        limits=limits,
        created=1767225600.0,
    )
    found.procs = list(procs)
    return found


@pytest.fixture
def gateway(tmp_path: Path) -> SimpleNamespace:
    """Two streams: an inbound one that runs and has carried data, an outbound one that is FATAL
    (so its proxy reports nothing)."""
    registry = SessionRegistry()
    pool = PortPool(5100, 5109)
    inbound = session(
        UID_A, "a1a1a1a1a1a1", "inbound", "owner-identity", 5100, Limits(5, 0), proc("proxy", State.RUNNING)
    )
    outbound = session(
        UID_B,
        "b2b2b2b2b2b2",
        "outbound",
        None,
        5101,
        Limits(3, 8000),
        proc("shaper", State.RUNNING),
        proc("proxy", State.FATAL, restarts=5),
    )
    for each in (inbound, outbound):
        registry.add(each)
        pool.take(each.ports, owner=each.sid)
    backend = FakeBackend({"a1a1a1a1a1a1": Stats(2, 7, 5_000_000, 1234)})
    state = SimpleNamespace(session_dir=lambda sid: tmp_path / sid)
    failures: dict[str, dict[str, int]] = {}  # by session id, as the proxies' logs told them

    def failure_counts():
        return [(each, failures.get(each.sid, {})) for each in registry.all()]

    return SimpleNamespace(
        backend=backend,
        registry=registry,
        pool=pool,
        state=state,
        failures=failures,
        failure_counts=failure_counts,
    )


def scrape(metrics: Metrics) -> tuple[str, dict[str, list[tuple[dict[str, str], float]]]]:
    """The exposition text, and each sample name's (labels, value) pairs."""
    text = generate_latest(metrics.registry).decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return text, samples


def value(samples, name: str, **labels: str) -> float:
    found = [v for have, v in samples[name] if all(have.get(k) == want for k, want in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found} in {samples.get(name)}"
    return found[0]


def test_streams_are_reported_by_uid_prefix_and_owner_never_by_uid(gateway):
    text, samples = scrape(Metrics(gateway))
    assert UID_A not in text and UID_B not in text
    labels = {"stream": "0b7c1f2e", "session": "a1a1a1a1a1a1", "role": "inbound", "owner": "owner-identity"}
    assert value(samples, "scistream_stream_received_bytes_total", **labels) == 5_000_000
    assert value(samples, "scistream_stream_sent_bytes_total", **labels) == 1234
    assert value(samples, "scistream_stream_current_connections", **labels) == 2
    assert value(samples, "scistream_stream_connections_total", **labels) == 7
    assert value(samples, "scistream_stream_state", **labels, state="RUNNING") == 1
    assert value(samples, "scistream_stream_start_time_seconds", **labels) == 1767225600.0
    # Without authentication a stream has no owner: an empty label, which Prometheus drops.
    assert value(samples, "scistream_stream_state", stream="9f8e7d6c", owner="", state="FATAL") == 1


def test_the_limits_in_force_say_whether_the_backend_enforces_them(gateway):
    _, samples = scrape(Metrics(gateway))
    assert value(samples, "scistream_stream_max_connections", stream="0b7c1f2e", enforced="true") == 5
    # 8000 kb/s = 1 MB/s, which this backend cannot enforce; unlimited is enforced by anyone.
    rate = "scistream_stream_rate_limit_bytes_per_second"
    assert value(samples, rate, stream="9f8e7d6c", enforced="false") == 1_000_000
    assert value(samples, rate, stream="0b7c1f2e", enforced="true") == 0


def test_a_stream_whose_proxy_reports_nothing_has_no_byte_series_rather_than_zero(gateway):
    _, samples = scrape(Metrics(gateway))
    assert [labels["stream"] for labels, _ in samples["scistream_stream_received_bytes_total"]] == [
        "0b7c1f2e"
    ]
    restarts = "scistream_stream_restarts_total"
    assert value(samples, restarts, stream="9f8e7d6c", process="proxy") == 5
    assert value(samples, restarts, stream="9f8e7d6c", process="shaper") == 0


def test_sessions_are_counted_by_state_and_role_with_every_combination_present(gateway):
    _, samples = scrape(Metrics(gateway))
    assert value(samples, "scistream_sessions", state="RUNNING", role="inbound", backend="haproxy") == 1
    assert value(samples, "scistream_sessions", state="FATAL", role="outbound") == 1
    assert value(samples, "scistream_sessions", state="BACKOFF", role="inbound") == 0
    assert len(samples["scistream_sessions"]) == len(State) * 2
    assert value(samples, "scistream_listener_ports", state="reserved") == 2
    assert value(samples, "scistream_listener_ports", state="free") == 8
    assert value(samples, "scistream_info", backend="haproxy", backend_version="HAProxy 2.8.25") == 1


def test_failed_connections_are_counted_by_kind(gateway):
    _, samples = scrape(Metrics(gateway))
    assert samples.get("scistream_stream_failures_total") is None
    gateway.failures[gateway.registry.all()[0].sid] = {"handshake": 3, "service-refused": 1}
    _, samples = scrape(Metrics(gateway))
    assert value(samples, "scistream_stream_failures_total", stream="0b7c1f2e", kind="handshake") == 3
    assert value(samples, "scistream_stream_failures_total", stream="0b7c1f2e", kind="service-refused") == 1


def test_the_control_server_counts_requests_by_op_and_code_and_times_them(gateway):
    metrics = Metrics(gateway)
    gateway.info = lambda: {"ok": True}
    server = ControlServer(gateway, ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), None, 0, metrics=metrics)
    try:
        assert server.dispatch(b'{"v": 1, "op": "info", "token": null}\n', "192.0.2.1:4000")["ok"]
        assert server.dispatch(b'{"v": 1, "op": "info", "token": null}\n', "192.0.2.1:4000")["ok"]
        refused = server.dispatch(b'{"v": 1, "op": "drop tables", "token": null}\n', "192.0.2.1:4000")
        assert refused["error"]["code"] == "BAD_REQUEST"
    finally:
        server.workers.shutdown()
    _, samples = scrape(metrics)
    assert value(samples, "scistream_requests_total", op="info", code="ok") == 2
    assert value(samples, "scistream_requests_total", op="inbound", code="ok") == 0
    # What a client sent as its op never becomes a label value.
    assert value(samples, "scistream_requests_total", op="unknown", code="BAD_REQUEST") == 1
    assert value(samples, "scistream_request_duration_seconds_count", op="info") == 2
    assert value(samples, "scistream_request_duration_seconds_bucket", op="info", le="+Inf") == 2


def test_the_metrics_are_served_at_their_path_and_nowhere_else(gateway):
    exporter = serve_metrics(Metrics(gateway), "127.0.0.1", 0)
    try:
        assert exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"
        with urllib.request.urlopen(exporter.url, timeout=30) as reply:  # noqa: S310 - our own URL
            assert reply.headers["Content-Type"].startswith("text/plain")
            body = reply.read().decode()
        assert "scistream_stream_received_bytes_total{" in body and 'owner="owner-identity"' in body
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/", timeout=30)
        assert refused.value.code == 404
    finally:
        exporter.close()


def test_a_metrics_port_that_is_taken_is_one_line_saying_so(gateway):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError) as failed:
            serve_metrics(Metrics(gateway), "127.0.0.1", port)
    assert failed.value.message == f"cannot serve metrics on 127.0.0.1:{port}: Address already in use"


def test_the_control_certificates_expiry_is_served_once_s2cs_knows_which_it_presents(gateway, tmp_path):
    expiry = "scistream_control_certificate_expiry_time_seconds"
    metrics = Metrics(gateway)
    # Before: no series at all, never a 0 that an alert on the days left would take for expired.
    assert expiry not in scrape(metrics)[1]
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    not_after = now + datetime.timedelta(days=9)
    crt, _ = write_pair(tmp_path / "server.crt", tmp_path / "server.key", now, not_after)
    metrics.control_certificate(crt)
    assert value(scrape(metrics)[1], expiry, path=str(crt)) == not_after.timestamp()
