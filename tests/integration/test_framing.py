"""Two shapers with `--frame` back to back, as on the two gateways of a stream, with real processes.

    sender -> outbound shaper -> [relay A] -> TCP -> [relay B] -> inbound shaper -> service
              (TCP -> Unix)      (Unix -> TCP)     (TCP -> Unix)   (Unix -> TCP)

The two relays stand for the two proxies and the TLS hop between them: they pass bytes and
half-closes unchanged and, as HAProxy 2.8 and stunnel 5.68 do (docs/reliability.md, "What a fault
does to a connection"), turn a cut into an orderly end. They are two processes, as the proxies
are, so that a kill of one leaves the shaper beside the other facing a live process that ends its
connection in order: the case where a shaper without framing passes a FIN on with bytes missing
(one relay process beside both shapers would be a dead peer to both, which they already tell).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scistream.s2ds.framing import END, HEADER, PREAMBLE

from .conftest import ending
from .test_shaper import (  # noqa: F401 (fixtures: pytest finds them by name in this module)
    Service,
    Shaper,
    connect,
    home,
    local,
    python,
    shaper_env,
    start_shaper,
    user,
    wait_until,
)

RELAY = r"""
import os, socket, sys, threading

def address(text):
    if text.startswith("/"):
        return socket.AF_UNIX, text
    host, _, port = text.rpartition(":")
    return socket.AF_INET, (host, int(port))

family, where = address(sys.argv[1])
target_family, target = address(sys.argv[2])
listener = socket.socket(family, socket.SOCK_STREAM)
if family == socket.AF_INET:
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(where)
if family == socket.AF_UNIX:
    os.chmod(where, 0o777)
listener.listen(256)
print("listening", flush=True)

def copy(src, dst):
    try:
        while data := src.recv(1 << 20):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)  # an orderly end, passed on as one
    except OSError:
        for sock in (src, dst):  # a cut, passed on as an orderly end: what the proxies do
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

def serve(client):
    upstream = socket.socket(target_family, socket.SOCK_STREAM)
    try:
        upstream.connect(target)
    except OSError:
        client.close()
        return
    threads = [threading.Thread(target=copy, args=pair) for pair in ((client, upstream), (upstream, client))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    upstream.close()

while True:
    client, _ = listener.accept()
    threading.Thread(target=serve, args=(client,), daemon=True).start()
"""

MIB = 1 << 20


@pytest.fixture
def service() -> Iterator[Service]:
    svc = Service()
    yield svc
    svc.close()


@dataclass
class Path_:
    """A stream's path: where the sender connects, and its processes."""

    entry: tuple[str, int]
    outbound: Shaper
    inbound: Shaper
    relays: dict[str, subprocess.Popen[str]] = field(default_factory=dict)  # "A", "B"

    def logs(self) -> str:
        return self.outbound.output() + self.inbound.output()


@pytest.fixture
def relays() -> Iterator[Callable[[str, str], subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(listen: str, target: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-c", RELAY, listen, target]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "listening\n"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)  # one may have been stopped
        proc.kill()
        proc.wait()


@pytest.fixture
def path(request: pytest.FixtureRequest, relays) -> Callable[..., Path_]:
    """Shapers (framed, or not, each) around the two relays, toward `target` (the service)."""
    start = request.getfixturevalue("start_shaper")  # test_shaper.py's, imported above
    where: Path = request.getfixturevalue("home")

    def make(target: tuple[str, int], outbound_frames: bool = True, inbound_frames: bool = True) -> Path_:
        inbound_sock, outbound_sock = str(where / "inbound.sock"), str(where / "outbound.sock")
        hop, entry = local(), local()
        inbound = start([(inbound_sock, target)], 0, *(["--frame"] if inbound_frames else []))
        b = relays(f"{hop[0]}:{hop[1]}", inbound_sock)
        a = relays(outbound_sock, f"{hop[0]}:{hop[1]}")
        outbound = start([(entry, outbound_sock)], 0, *(["--frame"] if outbound_frames else []))
        return Path_(entry, outbound, inbound, {"A": a, "B": b})

    return make


def data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def read_all(sock: socket.socket) -> bytes:
    got = bytearray()
    while chunk := sock.recv(MIB):
        got.extend(chunk)
    return bytes(got)


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


# --- 1: everything gets through, ends in order -----------------------------------------------------


@pytest.mark.parametrize("first", ["sender", "service"])
def test_64_mib_each_way_arrive_whole_whichever_side_ends_first(path, service, first):
    stream = path(service.address)
    up, down = data(64 * MIB, 1), data(64 * MIB, 2)
    with connect(stream.entry) as client, service.accept() as server:
        ends = {"sender": (client, up), "service": (server, down)}
        second = "service" if first == "sender" else "sender"
        (a, a_data), (b, b_data) = ends[first], ends[second]
        got: dict[str, bytes] = {}

        def then_answer() -> None:
            got[second] = read_all(b)  # to the FIN of the first: then its own 64 MiB
            b.sendall(b_data)
            b.shutdown(socket.SHUT_WR)

        answer = threading.Thread(target=then_answer)
        answer.start()
        a.sendall(a_data)
        a.shutdown(socket.SHUT_WR)
        got[first] = read_all(a)
        answer.join(120)
        assert not answer.is_alive()
    assert digest(got[second]) == digest(a_data), f"{len(got[second])} of {len(a_data)} bytes"
    assert digest(got[first]) == digest(b_data), f"{len(got[first])} of {len(b_data)} bytes"
    assert "reset" not in stream.logs()


def test_a_service_that_speaks_first_is_not_held_up(path, service):
    """Each shaper sends its preamble when the connection is made and waits for nobody's: a
    service that greets first (SMTP, FTP, a data server announcing its format) gets through
    before the sender has sent anything."""
    stream = path(service.address)
    with connect(stream.entry) as client, service.accept() as server:
        server.sendall(b"220 ready\r\n")
        client.settimeout(30)
        assert client.recv(100) == b"220 ready\r\n"
        client.sendall(b"QUIT\r\n")
        client.shutdown(socket.SHUT_WR)
        assert read_all(server) == b"QUIT\r\n"
        server.sendall(b"221 bye\r\n")
        server.shutdown(socket.SHUT_WR)
        assert read_all(client) == b"221 bye\r\n"


def test_200_short_connections_in_a_row_all_end_clean(path, service):
    """As test_streams.py's short connections: a request, a half-close, the answer and the close;
    not one of them may be taken for a cut."""
    stream = path(service.address)
    count = 200

    def serve() -> None:
        for _ in range(count):
            with service.accept() as server:
                request = read_all(server)
                server.sendall(digest(request).encode())

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    answers = []
    for number in range(count):
        with connect(stream.entry) as client:
            request = f"request {number}".encode() * (number + 1)
            client.sendall(request)
            client.shutdown(socket.SHUT_WR)
            answers.append(read_all(client) == digest(request).encode())
    server.join(60)
    assert answers.count(True) == count, f"{answers.count(False)} of {count} answers wrong or missing"
    assert "reset" not in stream.logs()


# --- 2: a relay killed: both ends see a cut ----------------------------------------------------------


def _send_until_stopped(sock: socket.socket, outcome: list[str]) -> None:
    block = data(MIB, 3)
    try:
        for _ in range(4096):  # 4 GiB at most: far more than the path holds
            sock.sendall(block)
        outcome.append("all")
    except OSError as exc:
        outcome.append(type(exc).__name__)


@pytest.mark.parametrize("killed", ["A", "B"], ids=["outbound-relay", "inbound-relay"])
def test_a_relay_killed_while_the_sender_writes_is_a_cut_at_both_ends(path, service, killed):
    stream = path(service.address)
    outcome: list[str] = []
    with connect(stream.entry) as client, service.accept() as server:
        sender = threading.Thread(target=_send_until_stopped, args=(client, outcome))
        sender.start()
        received = bytearray()
        server.settimeout(60)
        while len(received) < 8 * MIB:
            received.extend(server.recv(MIB))
        stream.relays[killed].kill()
        assert ending(server) == "ConnectionResetError"
        sender.join(60)
        assert outcome in (["ConnectionResetError"], ["BrokenPipeError"])
    if killed == "A":  # the inbound shaper's own peer (relay B) lives: only framing tells it
        assert "without its end mark" in stream.inbound.output()


def _stopped(pid: int) -> bool:
    """Whether every thread of `pid` is stopped (a signal is only on its way when kill returns)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "stat").read_text()
        states.append(text[text.rfind(")") + 2])
    return all(state in "tT" for state in states)


@pytest.mark.parametrize("frames", [True, False], ids=["framed", "unframed"])
def test_a_relay_killed_after_the_sender_has_ended_is_a_cut_not_a_delivery(path, service, frames):
    """The sender wrote 1 MiB and half-closed; relay A, which held it, is killed before the
    service got any of it. Relay B ends its connection in order, as the inbound proxy would.
    Framed: the service is reset. Unframed (the contrast): a clean end with nothing, the silent
    loss of docs/reliability.md."""
    stream = path(service.address, outbound_frames=frames, inbound_frames=frames)
    relay_a = stream.relays["A"]
    with connect(stream.entry) as client, service.accept() as server:
        os.kill(relay_a.pid, signal.SIGSTOP)  # it holds what comes, passes nothing on
        wait_until(lambda: _stopped(relay_a.pid), "relay A stopped")
        client.sendall(data(MIB, 4))
        client.shutdown(socket.SHUT_WR)
        relay_a.kill()
        relay_a.wait()
        assert ending(client) == "ConnectionResetError"  # the outbound shaper saw relay A die
        server.settimeout(60)
        if frames:
            assert ending(server) == "ConnectionResetError"
            assert "without its end mark" in stream.inbound.output()
        else:
            assert len(read_all(server)) < MIB  # a clean end, with the 1 MiB not all there


# --- 3: a service that cannot be reached ----------------------------------------------------------


def test_a_sender_to_a_service_that_is_not_listening_is_reset(path):
    """Today's finding 3: the inbound shaper cannot reach the service and ends its connection;
    the proxies make that an orderly end, and the sender took a clean close for a delivery."""
    stream = path(local())  # nobody listens there
    with connect(stream.entry) as client:
        try:
            client.sendall(data(MIB, 5))
            client.shutdown(socket.SHUT_WR)
            seen = ending(client)
        except OSError as exc:  # the reset came first: ENOTCONN is what the half-close then meets
            seen = "ConnectionResetError" if exc.errno == errno.ENOTCONN else type(exc).__name__
        assert seen in ("ConnectionResetError", "BrokenPipeError")
    # The outbound shaper resets for an end without the end mark, or for the error its Unix side
    # meets first when relay A closes with bytes unread (ECONNRESET, EPIPE): a cut either way.
    wait_until(lambda: "cannot connect to" in stream.inbound.output(), "the inbound shaper's line")


# --- 4: a framed shaper facing one that does not frame ---------------------------------------------


def test_a_framed_sender_side_facing_an_unframed_service_side_is_reset(path, service):
    """The outbound shaper frames, the inbound one does not: the service gets the frames as data
    (all that an end that does not frame can do), and its answer, unframed, makes the outbound
    shaper reset the sender with a line that says why."""
    stream = path(service.address, outbound_frames=True, inbound_frames=False)
    with connect(stream.entry) as client, service.accept() as server:
        client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)
        seen = read_all(server)
        assert seen == b"\x00SCIFRM1" + (5).to_bytes(4, "big") + b"hello" + bytes(4)
        server.sendall(b"ok")
        server.shutdown(socket.SHUT_WR)
        assert ending(client) == "ConnectionResetError"
    wait_until(lambda: "does not frame" in stream.outbound.output(), "the outbound shaper's line")


def test_an_unframed_sender_side_facing_a_framed_service_side_resets_the_service(path, service):
    stream = path(service.address, outbound_frames=False, inbound_frames=True)
    with connect(stream.entry) as client, service.accept() as server:
        client.sendall(b"hello")
        assert ending(server) == "ConnectionResetError"
        client.settimeout(60)
        # A clean end, after the inbound preamble as data when it went out before the reset (it
        # goes in the pass that finds the connection made, which may be the one that reads hello).
        assert read_all(client) in (b"", b"\x00SCIFRM1")
    wait_until(lambda: "does not frame" in stream.inbound.output(), "the inbound shaper's line")


# --- the end of a connection, in order -------------------------------------------------------------


def test_the_shaper_closes_its_unix_side_only_after_the_proxy_has_ended_its_own(request, service):
    """A proxy passes its peer's end on (a TLS close_notify) after the end frame that came before
    it. A shaper that closed the connection at the end frame alone made a stunnel close its TLS
    connection with that close_notify unread: the kernel reset it, and the reset threw away what
    was still on its way to the far end (one 424 kB echo in about 300 came back cut, no fault)."""
    start = request.getfixturevalue("start_shaper")  # test_shaper.py's, imported above
    sock_path = str(request.getfixturevalue("home") / "inbound.sock")
    start([(sock_path, service.address)], 0, "--frame")
    with connect(sock_path) as proxy:  # the test stands for the inbound proxy
        proxy.sendall(PREAMBLE + (2).to_bytes(HEADER, "big") + b"hi" + END)  # its peer's stream, ended
        with service.accept() as server:
            assert read_all(server) == b"hi"  # every byte, then the FIN: the end frame passed on
            server.sendall(b"ok")
        assert read_all(proxy) == PREAMBLE + (2).to_bytes(HEADER, "big") + b"ok" + END  # and the shaper's end
        # Both directions have ended in frames; the proxy has not ended its side yet.
        hung_up = select.poll()
        hung_up.register(proxy, select.POLLHUP)
        assert hung_up.poll(1000) == [], "the shaper closed the connection before the proxy ended its side"
        proxy.shutdown(socket.SHUT_WR)  # the proxy's own end, once it has read its peer's
        assert hung_up.poll(60_000), "the shaper did not close the connection after the proxy's end"
