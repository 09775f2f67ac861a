"""What a stream guarantees: authentication at the listener, limits, isolation, clean release."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import psutil
import pytest

from scistream.credentials import stream_credentials
from scistream.errors import ScistreamError
from scistream.loopback import Echo, Sink, proxies_of, send

from .conftest import BACKENDS, framed, listen_queue, open_stream, port_of, s2uc, wait_for

EACH_BACKEND = pytest.mark.parametrize("backend", BACKENDS)

RATE_TOLERANCE = 0.15


def _tls_client(cert_dir: Path | None, uid: str | None) -> ssl.SSLContext:
    """A client that trusts exactly stream `uid`'s certificate and presents it (or nothing)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we test what the *listener* accepts, not what it presents
    if uid is not None and cert_dir is not None:
        creds = stream_credentials(uid)
        (cert_dir / "c.pem").write_bytes(creds.cert_pem + creds.key_pem)
        ctx.load_cert_chain(cert_dir / "c.pem")
    return ctx


def _refusal(port: int, ctx: ssl.SSLContext) -> str:
    """Connect, send, read: what the client sees of a refusal ('' when nothing refused it)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
            tls.settimeout(10)
            # TLS 1.3: the server judges the client's certificate after the client's Finished, so
            # the refusal arrives here, as an alert. (Sending first would race it: unread data
            # makes the server's close a reset, which can overtake the alert.)
            return "closed" if tls.recv(100) == b"" else ""
    except ssl.SSLError as exc:
        return exc.reason or str(exc)
    except (ConnectionError, TimeoutError) as exc:
        return type(exc).__name__


@EACH_BACKEND
def test_only_holders_of_the_stream_certificate_reach_the_service(start_s2cs, workdir, backend):
    hpc = start_s2cs("hpc", backend=backend)
    sink = Sink()
    inbound = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)
    port = port_of(inbound["listeners"][0])
    other = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)["uid"]

    assert "CERTIFICATE_REQUIRED" in _refusal(port, _tls_client(workdir, None))
    assert "UNKNOWN_CA" in _refusal(port, _tls_client(workdir, other))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        plain.sendall(b"plain TCP, no TLS at all\n" * 100)
        plain.settimeout(10)
        try:
            answer = plain.recv(100)
        except ConnectionError:
            answer = b""
        assert b"no TLS" not in answer
    # Each client above saw the proxy refuse it before the next one connected; the proxy logs a
    # refused connection as it ends it. Once the last refusal (the plain one) is in the stream's
    # status, the proxy is done with all three, and a wrongly admitted one would have reached the
    # service by then.
    refused = wait_for(
        lambda: _refusals_logged(hpc, inbound["uid"], {"handshake", "not-tls"}), 60, "refusals"
    )
    assert sink.connections == 0, f"a client without the stream's certificate reached the service ({refused})"

    # The stream's own certificate gets through: the refusals above were about the certificate.
    # Standing for the outbound side, the client speaks as its shaper does: framed, with the end.
    ctx = _tls_client(workdir, inbound["uid"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(framed(b"frame 0001"))
        with contextlib.suppress(ssl.SSLError, OSError):
            tls.unwrap()  # close_notify: a TLS end of stream, not a cut connection
    deadline = time.monotonic() + 30
    while not sink.results and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r.sha256 for r in sink.results] == [hashlib.sha256(b"frame 0001").hexdigest()]


def _waiting(gw, port: int) -> int:
    """How many connections wait at the outbound gateway `gw` for one of its stream's places: in
    the listen queue of the shaper in front of the proxy, which stops accepting at num_conn, and
    with HAProxy in its queue too (its stats socket, the queues of the backend and its server)."""
    (session,) = (gw.state_dir / "sessions").iterdir()
    stats = session / "run" / "stats.sock"
    in_front = listen_queue("127.0.0.1", port)
    if not stats.exists():
        return in_front
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        table = b""
        while chunk := sock.recv(65536):
            table += chunk
    header, *rows = table.decode().splitlines()
    qcur = header.lstrip("# ").split(",").index("qcur")
    return in_front + sum(int(row.split(",")[qcur] or 0) for row in rows if row and not row.startswith("#"))


def _refusals_logged(hpc, uid: str, kinds: set[str]) -> list[dict]:
    """The stream's failures, once the proxy's log shows each of `kinds`."""
    (entry,) = hpc.call("status", uid=uid)["streams"]
    failures = entry.get("failures", [])
    return failures if kinds <= {f["kind"] for f in failures} else []


def _steady_rate(marks: list[tuple[float, int]]) -> float:
    """Bits per second from (time, bytes) marks, leaving out the first second (set-up, first burst)."""
    marks = sorted(marks)
    start = marks[0][0] + 1.0
    window = [(t, n) for t, n in marks if t >= start]
    return sum(n for _, n in window) * 8 / (window[-1][0] - start)


def _send_and_read_back(port: int, seconds: float, connections: int) -> list[tuple[float, int]]:
    """`connections` clients each sending for `seconds` and reading the echo; when echo bytes came."""
    block = os.urandom(32 << 10)
    marks: list[tuple[float, int]] = []
    lock = threading.Lock()

    def client() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            # Small buffers: what the clients have sent in `seconds` arrives soon after.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 << 10)

            def read_back() -> None:
                while chunk := sock.recv(1 << 16):
                    with lock:
                        marks.append((time.monotonic(), len(chunk)))

            reader = threading.Thread(target=read_back, daemon=True)
            reader.start()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                sock.sendall(block)
            sock.shutdown(socket.SHUT_WR)
            reader.join(120)

    threads = [threading.Thread(target=client) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return marks


@EACH_BACKEND
def test_rate_limit_holds_for_parallel_connections_in_both_directions(start_s2cs, backend):
    """--rate 8000 (kb/s) with 4 connections: 8 Mbit/s together, each direction, within 15%."""
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    service = Echo()
    port = open_stream(hpc, inst, service.port, rate=8000, num_conn=4).port
    back = _send_and_read_back(port, seconds=6.0, connections=4)
    service.close()
    assert _steady_rate(service.marks) == pytest.approx(8e6, rel=RATE_TOLERANCE)  # instrument -> service
    assert _steady_rate(back) == pytest.approx(8e6, rel=RATE_TOLERANCE)  # and back


@EACH_BACKEND
def test_a_connection_beyond_num_conn_waits_until_one_closes(start_s2cs, backend):
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    server = socket.create_server(("127.0.0.1", 0), backlog=16)
    accepted: list[socket.socket] = []

    def service() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)
            threading.Thread(target=greet_until_closed, args=(conn,), daemon=True).start()

    def greet_until_closed(conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"hello\n")
            while conn.recv(100):
                pass

    threading.Thread(target=service, daemon=True).start()
    port = open_stream(hpc, inst, server.getsockname()[1], num_conn=2, rate=0).port

    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"x")
        return sock

    first, second = connect(), connect()
    for sock in (first, second):
        assert sock.recv(6) == b"hello\n"
    third = connect()  # the kernel accepts it; the proxy does not take it yet
    wait_for(lambda: _waiting(inst, port) == 1, 60, "the third connection waiting at the outbound proxy")
    assert len(accepted) == 2

    first.close()  # a slot frees up: the third one goes through, nothing was dropped
    third.settimeout(30)
    assert third.recv(6) == b"hello\n"
    assert len(accepted) == 3
    for sock in (second, third):
        sock.close()
    server.close()


def test_concurrent_inbound_requests_get_their_own_ports_uids_and_targets(start_s2cs):
    hpc = start_s2cs("hpc")
    inst = start_s2cs("instrument")
    sinks = [Sink(), Sink()]
    replies: dict[int, dict] = {}
    barrier = threading.Barrier(2)

    def request(i: int) -> None:
        barrier.wait()
        replies[i] = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sinks[i].port], rate=0)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert replies[0]["uid"] != replies[1]["uid"]
    assert set(replies[0]["listeners"]).isdisjoint(replies[1]["listeners"])

    # Each stream carries its own data to its own service.
    for i in range(2):
        reply = replies[i]
        out = inst.call("outbound", uid=reply["uid"], remote_listeners=reply["listeners"], rate=0)
        data = f"stream {i} ".encode() * 50_000
        assert send(("127.0.0.1", port_of(out["listeners"][0])), data)[1] == hashlib.sha256(data).hexdigest()
    assert [len(s.results) for s in sinks] == [1, 1]
    assert sinks[0].results[0].sha256 != sinks[1].results[0].sha256


@EACH_BACKEND
def test_release_stops_the_proxy_deletes_its_files_and_frees_its_ports(start_s2cs, workdir, backend):
    hpc = start_s2cs("hpc", backend=backend, ports=1)  # one port: it must come back for the next stream
    sink = Sink()
    first = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])  # with a rate: 2 processes
    procs = hpc.call("status", uid=first["uid"])["streams"][0]["processes"]
    pids = [p["pid"] for p in procs]
    assert {p["name"] for p in procs} == {"proxy", "shaper"}
    assert all(psutil.pid_exists(pid) for pid in pids)
    session_dirs = list((hpc.state_dir / "sessions").iterdir())
    assert len(session_dirs) == 1 and (session_dirs[0] / "stream.key").exists()

    out = s2uc("release", first["uid"], "--s2cs", hpc.address, "--server_cert", str(hpc.cert))
    assert "Released inbound proxy" in out.stdout
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert proxies_of(hpc.state_dir) == []
    assert list((hpc.state_dir / "sessions").iterdir()) == []

    again = s2uc("release", first["uid"], "--s2cs", hpc.address, "--server_cert", str(hpc.cert), check=False)
    assert again.returncode == 5
    assert "NOT_FOUND" in again.stderr

    second = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])
    assert second["listeners"] == first["listeners"]


UID = "0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"
SERVICE = {"remote_ip": "127.0.0.1", "receiver_ports": [5001]}


@pytest.mark.parametrize(
    ("op", "fields", "code", "message"),
    [
        ("launch_missiles", {}, "BAD_REQUEST", "unknown op"),
        ("inbound", {**SERVICE, "receiver_ports": "5001"}, "BAD_REQUEST", "list of ports"),
        ("inbound", {**SERVICE, "num_conn": "5"}, "BAD_REQUEST", "integer"),
        ("inbound", {**SERVICE, "remote_ip": "not-an-ip"}, "BAD_REQUEST", "not an IP"),
        ("outbound", {"uid": UID, "remote_listeners": ["127.0.0.1:1"], "receiver_ports": [80]},
         "BAD_REQUEST", "outside this server's port range"),
        ("release", {"uid": UID}, "NOT_FOUND", "no stream"),
    ],
)  # fmt: skip
def test_bad_requests_get_their_error_codes_and_the_server_keeps_serving(
    start_s2cs, op, fields, code, message
):
    hpc = start_s2cs("hpc")
    with pytest.raises(ScistreamError) as caught:
        hpc.call(op, **fields)
    assert caught.value.code == code
    assert message in caught.value.message
    assert hpc.call("info")["ok"] is True


@EACH_BACKEND
def test_hundreds_of_short_connections_in_a_row_all_get_through(start_s2cs, backend):
    """The prototype's stunnel mode hung after about 14: its log filled a pipe nobody read."""
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    sink = Sink()
    port = open_stream(hpc, inst, sink.port, rate=0, num_conn=2).port
    for i in range(200):
        data = f"short connection {i}\n".encode()
        assert send(("127.0.0.1", port), data) == (len(data), hashlib.sha256(data).hexdigest())
    assert len(sink.results) == 200


@EACH_BACKEND
def test_ipv6_listeners_and_services(start_s2cs, backend, workdir):
    from scistream.loopback import S2csProcess, free_port_range

    hpc = S2csProcess(
        "hpc6", workdir / "hpc6", free_port_range(4), ("--type", backend), listener_ip="::1"
    ).start()
    inst = start_s2cs("instrument", backend=backend)
    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
        got: list[bytes] = []

        def service() -> None:
            conn, _ = server.accept()
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                got.append(data)

        threading.Thread(target=service, daemon=True).start()
        inbound = hpc.call("inbound", remote_ip="::1", receiver_ports=[server.getsockname()[1]], rate=0)
        assert inbound["listeners"][0].startswith("[::1]:")
        outbound = inst.call("outbound", uid=inbound["uid"], remote_listeners=inbound["listeners"])
        with socket.create_connection(("127.0.0.1", port_of(outbound["listeners"][0])), timeout=30) as sock:
            sock.sendall(b"over IPv6 to the service")
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [b"over IPv6 to the service"]
    finally:
        hpc.stop()


def test_an_outbound_address_that_is_not_an_entry_address_is_refused_never_widened(start_s2cs):
    hpc = start_s2cs("hpc")
    inst = start_s2cs("instrument")
    inbound = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[Sink().port], rate=0)
    args = ["--s2cs", inst.address, "--server_cert", str(inst.cert), "--remote_ip", "192.0.2.10"]
    out = s2uc("outbound_request", *args, inbound["uid"], inbound["listeners"][0], check=False)
    assert out.returncode == 4  # not allowed
    assert "remote_ip 192.0.2.10 is not an entry address of this gateway (127.0.0.1)" in out.stderr
    assert "s2cs --entry-ip 192.0.2.10" in out.stderr
    assert inst.call("info")["streams"] == 0
