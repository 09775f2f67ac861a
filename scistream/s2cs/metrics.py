"""Prometheus metrics of one s2cs (`s2cs --metrics-port`): what an operator graphs and alerts on.

Two sources. The gateway is read when Prometheus scrapes: its sessions, the connections and bytes
their proxies report (the HAProxy runtime API, or the shaper's stats file for stunnel), the limits
in force, the restarts of their processes and the use of the port range. The control server counts
the requests it answers, as it answers them.

A stream is labelled with its UID prefix (`short`), never its UID: the UID is the stream's secret,
and whoever can read the metrics must not be able to join the stream. The metrics have a registry
of their own, so they are exactly the ones listed in the operator guide (the library's default
registry would add the process and garbage-collector metrics of the Python interpreter).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

from .. import __version__
from ..errors import ConfigError
from ..protocol import OPS, hostport, rate_bytes_per_second
from ..s2ds.render import SessionFiles
from ..s2ds.supervisor import State
from .host import Host
from .sessions import Session, short

PATH = "/metrics"
ROLES = ("inbound", "outbound")
STREAM_LABELS = ("stream", "session", "role", "owner")
# From an `info` in milliseconds to an `inbound` whose proxy takes its whole start timeout (10 s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def stream_labels(session: Session) -> list[str]:
    """The labels of a stream's series: its UID prefix (what logs and listings show, and the same
    on both gateways of the stream), its session id here (so two streams whose prefixes happen to
    agree never share a series), its role and its owner's identity ("" without authentication)."""
    return [short(session.uid), session.sid, session.role, session.owner or ""]


class GatewayCollector(Collector):
    """Everything the gateway knows of its streams on this host, read at each scrape."""

    def __init__(self, gateway: Host) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gateway = self.gateway
        backend = gateway.backend
        caps = backend.capabilities
        sessions = gateway.registry.all()
        # What the proxies' logs told of failed connections (s2ds/diagnosis.py), by session.
        failed = {session.sid: counts for session, counts in gateway.failure_counts()}

        info = GaugeMetricFamily(
            "scistream_info",
            "Always 1; its labels say which s2cs this is and which proxies it runs.",
            labels=["version", "backend", "backend_version"],
        )
        info.add_metric([__version__, backend.name, backend.version], 1)
        yield info

        by_state = GaugeMetricFamily(
            "scistream_sessions",
            "Sessions (one stream, one role) on this gateway, by the state of their processes.",
            labels=["state", "role", "backend"],
        )
        counts = {(str(state), role): 0 for state in State for role in ROLES}
        for session in sessions:
            counts[(str(session.state), session.role)] += 1
        for (state, role), count in sorted(counts.items()):
            by_state.add_metric([state, role, backend.name], count)
        yield by_state

        pool = gateway.pool
        free = pool.available()
        ports = GaugeMetricFamily(
            "scistream_listener_ports",
            f"Ports of the listener port range {pool.label}: reserved by a stream, or free.",
            labels=["state"],
        )
        ports.add_metric(["reserved"], pool.size - free)
        ports.add_metric(["free"], free)
        yield ports

        stream_state = GaugeMetricFamily(
            "scistream_stream_state",
            "1 for the state a stream's processes are in (the worst of them).",
            labels=[*STREAM_LABELS, "state"],
        )
        started = GaugeMetricFamily(
            "scistream_stream_start_time_seconds",
            "When the stream was set up on this gateway, in seconds since the epoch.",
            labels=STREAM_LABELS,
        )
        max_conn = GaugeMetricFamily(
            "scistream_stream_max_connections",
            "num_conn: the most connections the stream carries at once; more wait in a queue.",
            labels=[*STREAM_LABELS, "enforced"],
        )
        rate = GaugeMetricFamily(
            "scistream_stream_rate_limit_bytes_per_second",
            "The most bytes per second the stream carries in each direction; 0 = unlimited.",
            labels=[*STREAM_LABELS, "enforced"],
        )
        restarts = CounterMetricFamily(
            "scistream_stream_restarts",
            "How often s2cs started a process of the stream again after it died.",
            labels=[*STREAM_LABELS, "process"],
        )
        connections = GaugeMetricFamily(
            "scistream_stream_current_connections",
            "Connections the stream's proxy carries now.",
            labels=STREAM_LABELS,
        )
        connections_total = CounterMetricFamily(
            "scistream_stream_connections",
            "Connections the stream's proxy has accepted since it started.",
            labels=STREAM_LABELS,
        )
        bytes_in = CounterMetricFamily(
            "scistream_stream_received_bytes",
            "Bytes received from the clients of the stream's listeners, since its proxy started.",
            labels=STREAM_LABELS,
            unit="bytes",
        )
        bytes_out = CounterMetricFamily(
            "scistream_stream_sent_bytes",
            "Bytes sent to the clients of the stream's listeners, since its proxy started.",
            labels=STREAM_LABELS,
            unit="bytes",
        )
        refused = CounterMetricFamily(
            "scistream_stream_refused_sources",
            "Connections to the stream's plain entry (outbound) refused at accept: their source is "
            "not allowed (s2cs --allow-sources, policy sources).",
            labels=STREAM_LABELS,
        )
        failures = CounterMetricFamily(
            "scistream_stream_failures",
            "Connections of the stream that failed, by kind (handshake, service-refused, ...).",
            labels=[*STREAM_LABELS, "kind"],
        )
        for session in sessions:
            labels = stream_labels(session)
            stream_state.add_metric([*labels, str(session.state)], 1)
            started.add_metric(labels, session.created)
            max_conn.add_metric([*labels, _flag(caps.num_conn.enforced)], session.limits.num_conn)
            rate_enforced = caps.rate.enforced or session.limits.rate == 0
            rate.add_metric([*labels, _flag(rate_enforced)], rate_bytes_per_second(session.limits.rate))
            for proc in list(session.procs):
                restarts.add_metric([*labels, proc.kind], proc.restarts)
            for kind, count in sorted(failed.get(session.sid, {}).items()):
                failures.add_metric([*labels, kind], count)
            # None while no process of the session can tell (a proxy starting, or down): then
            # the series is absent, not 0, and `rate()` across a restart sees a counter reset.
            stats = backend.stats(SessionFiles(gateway.state.session_dir(session.sid)))
            if stats is None:
                continue
            connections.add_metric(labels, stats.connections)
            connections_total.add_metric(labels, stats.total_connections)
            bytes_in.add_metric(labels, stats.bytes_in)
            bytes_out.add_metric(labels, stats.bytes_out)
            if session.role == "outbound":
                refused.add_metric(labels, stats.refused)
                gateway.note_refused(session, stats)
        yield from (stream_state, started, max_conn, rate, restarts, connections, connections_total)
        yield from (bytes_in, bytes_out, failures, refused)


def _flag(value: bool) -> str:
    return "true" if value else "false"


class Metrics:
    """The registry of one s2cs: its gateway's collector and the requests it answered."""

    def __init__(self, gateway: Host) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(GatewayCollector(gateway))
        self.requests = Counter(
            "scistream_requests",
            "Control requests answered, by op and result code (ok, or the error code of the reply).",
            ["op", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "scistream_request_duration_seconds",
            "Time from a whole request to its reply, by op.",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        for op in OPS:  # every op has its series from the start, so a rate is 0, not absent
            self.requests.labels(op, "ok")
            self.latency.labels(op)
        # Labelled by the file, so that it has no series (rather than a 0, "expired in 1970") until
        # s2cs knows which certificate it presents, and an alert can name the file to renew.
        self.certificate_expiry = Gauge(
            "scistream_control_certificate_expiry_time_seconds",
            "When the certificate the control port presents expires (its notAfter), in seconds "
            "since the epoch.",
            ["path"],
            registry=self.registry,
        )

    def control_certificate(self, crt: Path) -> None:
        """The certificate the control port presents (checked already: it is a certificate and
        not expired). Its expiry is read now, as the control port keeps what it loaded at start."""
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        self.certificate_expiry.labels(str(crt)).set(cert.not_valid_after_utc.timestamp())

    def observe(self, op: str, code: str, seconds: float) -> None:
        """One answered request. `op` is "?" when the request could not be read at all."""
        op = op if op in OPS else "unknown"  # never a label value a client chose
        self.requests.labels(op, code).inc()
        self.latency.labels(op).observe(seconds)


class MetricsServer:
    """The HTTP server of the metrics: GET /metrics, in a thread of its own."""

    def __init__(self, registry: CollectorRegistry, address: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"registry": registry})
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family})
        try:
            self.http: ThreadingHTTPServer = server_class((address, port), handler)
        except OSError as exc:
            where = hostport(address, port)
            raise ConfigError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None
        self.address = address
        self.port = int(self.http.server_address[1])  # the one chosen when asked for port 0
        self._thread = threading.Thread(target=self.http.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{hostport(self.address, self.port)}{PATH}"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self._thread.join()


class _Handler(MetricsHandler):
    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == PATH:
            super().do_GET()
            return
        body = f"SciStream s2cs: the metrics are at {PATH}\n".encode()
        self.send_response(404)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve_metrics(metrics: Metrics, address: str, port: int) -> MetricsServer:
    """Serve `metrics` on http://ADDRESS:PORT/metrics; ConfigError when the port is taken."""
    return MetricsServer(metrics.registry, address, port)
