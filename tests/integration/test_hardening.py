"""An S2CS on a facility's public address: hostile input, floods and concurrency.

What each test shows is summed up in docs/security.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import socket
import ssl
import threading
import time
from pathlib import Path

import psutil
import pytest

from scistream.credentials import stream_credentials
from scistream.errors import NoPorts, ScistreamError
from scistream.loopback import Sink, proxies_of

from .conftest import BACKENDS, framed, open_stream, port_of

UID = "0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"
NASTY = [
    "1.2.3.4\n    bind *:22",
    '1.2.3.4" crt /etc/shadow',
    "{{ 7*7 }}",
    "{% include '/etc/passwd' %}",
    "# everything after is a comment",
    "../../etc/passwd",
]


def raw_exchange(gw, payload: bytes, timeout: float = 30) -> dict | None:
    """Send raw bytes over TLS to the control port; the parsed reply, or None if none came."""
    ctx = ssl.create_default_context(cafile=str(gw.cert))
    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(payload)
        data = b""
        with contextlib.suppress(OSError):
            while not data.endswith(b"\n") and (chunk := tls.recv(65536)):
                data += chunk
    return json.loads(data) if data else None


def error_code(gw, message: dict) -> str:
    reply = raw_exchange(gw, json.dumps(message).encode() + b"\n")
    assert reply is not None and reply["ok"] is False, reply
    return reply["error"]["code"]


def _snapshot(*roots: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if any(s in path.parents or path == s for s in skip):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                found[str(path)] = (st.st_mtime_ns, st.st_size)
    return found


def test_hostile_requests_get_precise_errors_and_change_nothing(start_s2cs, workdir):
    hpc = start_s2cs("hpc", ports=3)
    sink = Sink()
    legit = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])
    (config,) = (hpc.state_dir / "sessions").glob("*/proxy.conf")
    config_before = config.read_text()
    # s2cs's own log is meant to change: it has a line for every refused request.
    untouched = (hpc.state_dir, hpc.log)
    outside = _snapshot(workdir, Path("/etc/passwd"), Path("/etc/hosts"), skip=untouched)
    refusals = hpc.log.read_text().count("-> BAD_REQUEST")

    service = {"remote_ip": "127.0.0.1", "receiver_ports": [sink.port]}
    cases = [
        ({"v": 1, "op": "inbound", **service, "num_conn": -1}, "BAD_REQUEST"),
        ({"v": 1, "op": "inbound", **service, "num_conn": 10**12}, "BAD_REQUEST"),
        ({"v": 1, "op": "inbound", **service, "rate": -5}, "BAD_REQUEST"),
        ({"v": 1, "op": "inbound", **service, "rate": 10**15}, "BAD_REQUEST"),
        ({"v": 1, "op": "inbound", **service, "num_conn": 2.5}, "BAD_REQUEST"),
        ({"v": 1, "op": "inbound", "remote_ip": "127.0.0.1", "receiver_ports": [0]}, "BAD_REQUEST"),
        ({"v": 1, "op": "inbound", "remote_ip": "127.0.0.1", "receiver_ports": [65536]}, "BAD_REQUEST"),
        ({"v": 1, "op": "inbound", "remote_ip": "999.1.1.1", "receiver_ports": [1]}, "BAD_REQUEST"),
        ({"v": 1, "op": "outbound", "uid": UID, "remote_listeners": ["127.0.0.1:1"], "receiver_ports": [1]},
         "BAD_REQUEST"),
        ({"v": 1, "op": "status", "uid": ["a"]}, "BAD_REQUEST"),
        ({"v": 7, "op": "info"}, "BAD_REQUEST"),
        ({"v": "1", "op": "info"}, "BAD_REQUEST"),
        ({"v": 1, "op": "INFO"}, "BAD_REQUEST"),
        ({"v": 1, "op": None}, "BAD_REQUEST"),
        ({"v": 1, "op": "release", "uid": str(__import__("uuid").uuid4())}, "NOT_FOUND"),
    ]  # fmt: skip
    for nasty in NASTY:
        cases += [
            ({"v": 1, "op": nasty}, "BAD_REQUEST"),
            ({"v": 1, "op": "info", "token": nasty}, "BAD_REQUEST"),
            ({"v": 1, "op": "inbound", "remote_ip": nasty, "receiver_ports": [sink.port]}, "BAD_REQUEST"),
            ({"v": 1, "op": "release", "uid": nasty}, "BAD_REQUEST"),
            ({"v": 1, "op": "status", "uid": nasty}, "BAD_REQUEST"),
            ({"v": 1, "op": "outbound", "uid": UID, "remote_listeners": [nasty]}, "BAD_REQUEST"),
            ({"v": 1, "op": "outbound", "uid": nasty, "remote_listeners": ["127.0.0.1:5100"]}, "BAD_REQUEST"),
            ({"v": 1, "op": "outbound", "uid": UID, "remote_listeners": ["127.0.0.1:1"], "remote_ip": nasty},
             "BAD_REQUEST"),
            ({"v": 1, "op": "inbound", **service, nasty: 1}, "BAD_REQUEST"),
        ]  # fmt: skip
    for message, code in cases:
        assert error_code(hpc, message) == code, message

    framing = [
        (b'{"v":1,"op":"info","pad":"' + b"a" * (70 << 10) + b'"}\n', "larger than 64 KiB"),
        (b"[" * 30_000 + b"]" * 30_000 + b"\n", "nested too deeply"),
        (b'{"v":1,"op":"info","op":"status"}\n', "appears twice"),
        (b'{"v":1,"op":"status","uid":NaN}\n', "not a JSON number"),
        (b"\xff\xfe not utf-8\n", "not UTF-8"),
        (b"not json at all\n", "not JSON"),
        (b'["v", 1]\n', "must be a JSON object"),
    ]  # fmt: skip
    for payload, words in framing:
        reply = raw_exchange(hpc, payload)
        assert reply is not None and reply["error"]["code"] == "BAD_REQUEST", payload[:40]
        assert words in reply["error"]["message"]

    # Not TLS at all: the connection is dropped, nothing else happens.
    with socket.create_connection(("127.0.0.1", hpc.port), timeout=30) as plain:
        plain.sendall(b'{"v":1,"op":"info"}\n')
        plain.settimeout(30)
        with contextlib.suppress(ConnectionError):
            assert b"ok" not in plain.recv(100)

    assert hpc.call("info")["streams"] == 1  # still serving; still just the one stream
    assert config.read_text() == config_before  # no line gained
    assert len(list((hpc.state_dir / "sessions").iterdir())) == 1  # nothing else rendered
    assert _snapshot(workdir, Path("/etc/passwd"), Path("/etc/hosts"), skip=untouched) == outside
    assert hpc.log.read_text().count("-> BAD_REQUEST") > refusals  # the operator sees them
    hpc.call("release", uid=legit["uid"])


def test_a_silent_client_is_cut_off_and_does_not_hold_the_server(start_s2cs):
    hpc = start_s2cs("hpc")
    ctx = ssl.create_default_context(cafile=str(hpc.cert))
    with (
        socket.create_connection(("127.0.0.1", hpc.port), timeout=60) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as silent,
    ):
        started = time.monotonic()
        assert hpc.call("info")["ok"]  # served while the silent one waits
        silent.settimeout(60)
        with contextlib.suppress(OSError):
            assert silent.recv(100) == b""
        assert time.monotonic() - started < 30  # the server's read timeout is 10 s


def test_hundreds_of_idle_connections_do_not_delay_a_real_request(start_s2cs):
    hpc = start_s2cs("hpc")
    ctx = ssl.create_default_context(cafile=str(hpc.cert))
    idle = []
    try:
        for _ in range(200):
            raw = socket.create_connection(("127.0.0.1", hpc.port), timeout=30)
            idle.append(ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
        for _ in range(50):  # and some that never even start TLS
            idle.append(socket.create_connection(("127.0.0.1", hpc.port), timeout=30))
        started = time.monotonic()
        assert hpc.call("info")["ok"]
        sink = Sink()
        uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])["uid"]
        assert time.monotonic() - started < 5
        hpc.call("release", uid=uid)
    finally:
        for sock in idle:
            sock.close()


def _tls_to_listener(uid: str, port: int, directory: Path) -> ssl.SSLSocket:
    """A client holding stream `uid`'s certificate (what an outbound proxy presents)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    return _stream_client(uid, directory).wrap_socket(raw)


def test_a_hundred_concurrent_requests_get_their_own_ports_and_carry_their_own_data(start_s2cs, workdir):
    hpc = start_s2cs("hpc", ports=60)
    sinks = [Sink() for _ in range(100)]
    replies: dict[int, dict | ScistreamError] = {}
    barrier = threading.Barrier(100)

    def request(i: int) -> None:
        barrier.wait()
        try:
            replies[i] = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sinks[i].port])
        except ScistreamError as exc:
            replies[i] = exc

    threads = [threading.Thread(target=request, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)

    granted = {i: r for i, r in replies.items() if isinstance(r, dict)}
    refused = [r for r in replies.values() if not isinstance(r, dict)]
    assert len(granted) + len(refused) == 100
    assert all(isinstance(r, NoPorts) for r in refused), refused
    assert len(granted) == 60  # the whole range, and not a port more
    ports = [p for r in granted.values() for p in r["listeners"]]
    assert len(set(ports)) == len(ports) == 60
    assert len({r["uid"] for r in granted.values()}) == 60

    # Each stream carries its own data to its own service.
    for i, reply in granted.items():
        with _tls_to_listener(reply["uid"], port_of(reply["listeners"][0]), workdir) as tls:
            tls.sendall(framed(f"stream {i}: ".encode() * 1000))
            with contextlib.suppress(ssl.SSLError):  # the service answers, unwrap() balks at it
                tls.unwrap()  # close_notify: the end of this stream's data
    deadline = time.monotonic() + 120
    while any(not sinks[i].results for i in granted) and time.monotonic() < deadline:
        time.sleep(0.1)
    for i in range(100):
        expected = [hashlib.sha256(f"stream {i}: ".encode() * 1000).hexdigest()] if i in granted else []
        assert [r.sha256 for r in sinks[i].results] == expected, i

    with pytest.raises(NoPorts, match=f"{hpc.port_range[0]}-{hpc.port_range[1]}"):
        hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sinks[0].port])
    for reply in granted.values():
        hpc.call("release", uid=reply["uid"])
    assert hpc.call("info")["free_ports"] == 60
    assert proxies_of(hpc.state_dir) == []


def _random_blocks(seed: int, count: int, size: int = 1 << 20):
    rng = random.Random(seed)
    for _ in range(count):
        yield rng.randbytes(size)


def _send_blocks(port: int, seed: int, count: int) -> tuple[str, tuple[int, str]]:
    digest = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        for block in _random_blocks(seed, count):
            digest.update(block)
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.makefile("rb").readline().split()
    return digest.hexdigest(), (int(answer[0]), answer[1].decode())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flood_of_failing_handshakes_does_not_disturb_a_stream(start_s2cs, workdir, backend):
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    sink = Sink()
    stream = open_stream(hpc, inst, sink.port, rate=0, num_conn=2)
    port, listener = stream.port, stream.listener
    stop = threading.Event()
    attempts = [0]
    impostor = str(__import__("uuid").uuid4())

    def flood() -> None:
        while not stop.is_set():
            attempts[0] += 1
            with contextlib.suppress(OSError), _tls_to_listener(impostor, listener, workdir) as tls:
                tls.sendall(b"let me in")
                tls.recv(10)

    flooders = [threading.Thread(target=flood, daemon=True) for _ in range(8)]
    for t in flooders:
        t.start()
    try:
        # The flood is under way: 3 attempts per flooder begun, so at least 2 each refused.
        deadline = time.monotonic() + 60
        while attempts[0] < 3 * len(flooders):
            assert time.monotonic() < deadline, f"the flood did not start: {attempts[0]} attempts"
            time.sleep(0.05)
        expected, got = _send_blocks(port, seed=1, count=200)
        assert got == (200 << 20, expected)
        # A new connection of the stream still gets through while the flood goes on.
        expected, got = _send_blocks(port, seed=2, count=1)
        assert got == (1 << 20, expected)
    finally:
        stop.set()
        for t in flooders:
            t.join(30)
    assert attempts[0] > 100
    assert [r.nbytes for r in sink.results] == [200 << 20, 1 << 20]


def test_a_gibibyte_arrives_byte_exact(start_s2cs):
    hpc = start_s2cs("hpc")
    inst = start_s2cs("instrument")
    sink = Sink()
    port = open_stream(hpc, inst, sink.port, rate=0).port
    expected, got = _send_blocks(port, seed=3, count=1024)
    assert got == (1 << 30, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rate", [0, 10_000])
def test_half_close_is_passed_on_in_both_directions(start_s2cs, rate, backend):
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    server = socket.create_server(("127.0.0.1", 0))
    log: list[str] = []

    def service() -> None:
        conn, _ = server.accept()
        with conn:
            request = b""
            while chunk := conn.recv(65536):  # until the client's FIN: the request is complete
                request += chunk
            log.append(f"request {len(request)}")
            time.sleep(12)  # longer than the proxies' 10 s set-up timeouts: computing an answer
            conn.sendall(hashlib.sha256(request).hexdigest().encode())
            conn.shutdown(socket.SHUT_WR)  # the answer is complete: FIN the other way
            log.append("answered")
            conn.settimeout(30)
            log.append(f"after answer {conn.recv(100)!r}")

    threading.Thread(target=service, daemon=True).start()
    port = open_stream(hpc, inst, server.getsockname()[1], rate=rate).port
    request = os.urandom(300_000)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(100):  # ends at the service's FIN
            answer += chunk
        assert answer == hashlib.sha256(request).hexdigest().encode()
    deadline = time.monotonic() + 30
    while len(log) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log == ["request 300000", "answered", "after answer b''"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_connections_without_the_stream_certificate_take_no_num_conn_slot(start_s2cs, workdir, backend):
    """Anyone can reach a listener; only the stream's own connections count against num_conn."""
    hpc = start_s2cs("hpc", backend=backend)
    sink = Sink()
    reply = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], num_conn=2, rate=0)
    listener = port_of(reply["listeners"][0])
    # Many, but fewer than the 256 places HAProxy keeps for connections in their handshake.
    squatters = [socket.create_connection(("127.0.0.1", listener), timeout=30) for _ in range(200)]
    try:
        started = time.monotonic()
        _one_frame_reaches_the_service(reply["uid"], listener, workdir, sink)
        assert time.monotonic() - started < 5
    finally:
        for sock in squatters:
            sock.close()


def _one_frame_reaches_the_service(uid: str, listener: int, directory: Path, sink: Sink) -> None:
    """The stream's own connection (with its certificate) carries a frame to the service."""
    with _tls_to_listener(uid, listener, directory) as tls:
        tls.sendall(framed(b"frame 1"))
        with contextlib.suppress(ssl.SSLError):
            tls.unwrap()
    deadline = time.monotonic() + 30
    while not sink.results and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r.nbytes for r in sink.results] == [7]


HANDSHAKE_TIMEOUT = 10  # seconds: HAProxy's `timeout client`, stunnel's TIMEOUTbusy (docs/security.md)


def _seconds_until_cut(sock: socket.socket, since: float) -> float:
    """How long after `since` the listener closed or reset this connection (at most 60 s)."""
    sock.settimeout(max(1.0, since + 60 - time.monotonic()))
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(100) == b""  # nothing is ever sent to a client that did not finish
    return time.monotonic() - since


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_connection_that_never_completes_its_handshake_is_cut_after_10_seconds(
    start_s2cs, workdir, backend
):
    hpc = start_s2cs("hpc", backend=backend)
    sink = Sink()
    reply = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], num_conn=2, rate=0)
    listener = port_of(reply["listeners"][0])
    started = time.monotonic()
    silent = socket.create_connection(("127.0.0.1", listener), timeout=30)
    halfway = socket.create_connection(("127.0.0.1", listener), timeout=30)
    halfway.sendall(bytes.fromhex("160301 0200 01 0001fc 0303"))  # a ClientHello's first bytes
    try:
        for sock in (silent, halfway):
            cut = _seconds_until_cut(sock, started)
            assert HANDSHAKE_TIMEOUT - 2 < cut < HANDSHAKE_TIMEOUT + 15, cut
        # The stream itself is unharmed: its own connection still gets through.
        _one_frame_reaches_the_service(reply["uid"], listener, workdir, sink)
    finally:
        silent.close()
        halfway.close()


def test_secrets_stay_private(start_s2cs):
    hpc = start_s2cs("hpc")
    sink = Sink()
    uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])["uid"]
    mode = lambda path: path.stat().st_mode & 0o777  # noqa: E731
    assert mode(hpc.state_dir) == 0o700
    assert mode(hpc.state_dir / "state.json") == 0o600
    (session,) = (hpc.state_dir / "sessions").iterdir()
    assert mode(session) == 0o700
    for name in ("stream.key", "stream.pem", "proxy.conf"):
        assert mode(session / name) == 0o600, name
    # The UID is the stream's secret: not in any command line other users can read, not in the
    # server's log (which shows its first 8 characters).
    for pid in proxies_of(hpc.state_dir):
        assert uid not in " ".join(psutil.Process(pid).cmdline())
    assert uid not in hpc.log.read_text()
    assert uid[:8] in hpc.log.read_text()
    hpc.call("release", uid=uid)


def _stream_client(uid: str, directory: Path) -> ssl.SSLContext:
    """The TLS client of stream `uid`, holding its certificate (what an outbound proxy presents)."""
    creds = stream_credentials(uid)
    pem = directory / f"{uid[:8]}.pem"
    pem.write_bytes(creds.cert_pem + creds.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=creds.cert_pem.decode())
    ctx.load_cert_chain(pem)
    return ctx


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_connection_to_a_proxy_makes_a_full_handshake(start_s2cs, workdir, backend):
    """No TLS session is resumed: each connection's certificate is checked again (and HAProxy
    keeps no session cache, 5 MB of every session's process; docs/performance.md)."""
    hpc = start_s2cs("hpc", backend=backend)
    sink = Sink()
    reply = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)
    listener = port_of(reply["listeners"][0])
    ctx = _stream_client(reply["uid"], workdir)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", listener), timeout=60)) as first:
        first.sendall(framed(b"frame 1"))
        with contextlib.suppress(ssl.SSLError, OSError):
            first.unwrap()  # reads what the proxy sent after the handshake: its session, if any
        session = first.session
    assert session is not None
    raw = socket.create_connection(("127.0.0.1", listener), timeout=60)
    with ctx.wrap_socket(raw, session=session) as second:
        second.sendall(framed(b"frame 2"))
        assert not second.session_reused
        # A close with unread bytes (the proxy's post-handshake messages) is a reset, which the
        # kernel may act on before the proxy read the frame: end the connection as a client does.
        with contextlib.suppress(ssl.SSLError, OSError):
            second.unwrap()
    deadline = time.monotonic() + 30
    while len(sink.results) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(r.nbytes for r in sink.results) == [7, 7]
