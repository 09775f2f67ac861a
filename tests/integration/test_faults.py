"""Faults a gateway must survive for months: every kind of process of both backends killed, on
each side, shaped and not; s2cs restarted meanwhile. The stream comes back and carries new
connections (DESIGN.md, "Supervision").
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import socket
import struct
import termios
import threading
from dataclasses import astuple

import pytest

from scistream.loopback import S2csProcess, Sink, send

from .conftest import ending, open_stream, wait_for

# (backend, side, rate in kbit/s, process): every process of every arrangement. Every session
# runs a shaper next to its proxy, with or without a rate; HAProxy is configured otherwise without
# one (no rate of its own to hold), stunnel the same way (it limits nothing itself).
KINDS = [
    (backend, side, rate, victim)
    for backend in ("haproxy", "stunnel")
    for side in ("inbound", "outbound")
    for rate in (10_000, 0)
    for victim in ("proxy", "shaper")
    if not (backend == "stunnel" and rate == 0)  # the same config as with a rate
]
KIND_IDS = [f"{b}-{side}-{'shaped' if rate else 'unshaped'}-{victim}" for b, side, rate, victim in KINDS]


def _process(gw: S2csProcess, uid: str, kind: str) -> dict:
    (stream,) = gw.call("status", uid=uid)["streams"]
    (found,) = [p for p in stream["processes"] if p["name"] == kind]
    return {**found, "stream": stream["state"]}


def _back(gw: S2csProcess, uid: str, kind: str, killed: int) -> bool:
    """Whether the process runs again, a new one, with its stream RUNNING."""
    now = _process(gw, uid, kind)
    return now["state"] == "RUNNING" and now["stream"] == "RUNNING" and now["pid"] not in (None, killed)


def _carries(port: int, size: int = 1 << 20) -> None:
    data = os.urandom(size)
    assert send(("127.0.0.1", port), data) == (len(data), hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize(("backend", "side", "rate", "victim"), KINDS, ids=KIND_IDS)
def test_a_killed_process_comes_back_and_the_stream_carries_new_connections(
    start_s2cs, backend, side, rate, victim
):
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    sink = Sink()
    uid, _, port = astuple(open_stream(hpc, inst, sink.port, rate=rate))
    gw = hpc if side == "inbound" else inst
    _carries(port)
    killed = _process(gw, uid, victim)["pid"]
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: _back(gw, uid, victim, killed), timeout=30, what=f"the {side} {victim} back")
    _carries(port)
    assert _process(gw, uid, victim)["restarts"] == 1


@pytest.mark.parametrize(("backend", "side", "rate", "victim"), KINDS, ids=KIND_IDS)
def test_a_process_found_dead_after_an_s2cs_restart_comes_back(start_s2cs, backend, side, rate, victim):
    """The process dies while no s2cs watches; the next s2cs starts it again (gateway recovery),
    from a clean slate: a stunnel outbound proxy's listener is a Unix socket it left behind."""
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    sink = Sink()
    uid, _, port = astuple(open_stream(hpc, inst, sink.port, rate=rate))
    gw = hpc if side == "inbound" else inst
    killed = _process(gw, uid, victim)["pid"]
    gw.stop(signal.SIGKILL)
    os.kill(killed, signal.SIGKILL)
    gw.start()
    wait_for(lambda: _back(gw, uid, victim, killed), timeout=30, what=f"the {side} {victim} back")
    _carries(port)


# More than the buffers of the whole path hold (sockets, the shapers' pipes, the proxies): while
# the service pauses, the sender is surely still writing when the process is killed, and a
# killed process surely held some of it, in its pipes or in its sockets' queues.
PAYLOAD = 64 << 20


class PausedService:
    """A service that takes one connection and reads nothing of it until told to: what a sender
    sends waits in the gateways meanwhile, surely in flight when a process is killed. Its tiny
    receive buffer keeps almost all of it out of the service's own kernel."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accept
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.go = threading.Event()
        self.conn: socket.socket | None = None
        self.ending = ""  # "clean" (a FIN after the data) or the error that ended it
        self.received = hashlib.sha256()
        self.count = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.conn, _ = self.sock.accept()
        self.go.wait(120)
        try:
            while chunk := self.conn.recv(1 << 16):
                self.received.update(chunk)
                self.count += len(chunk)
            self.ending = "clean"
        except OSError as exc:
            self.ending = f"error: {exc}"
        finally:
            self.conn.close()  # the sender waits for this close

    def queued(self) -> int:
        """Bytes in the service's receive buffer, not read yet: data has come all the way."""
        if self.conn is None:
            return 0
        return struct.unpack("i", fcntl.ioctl(self.conn.fileno(), termios.FIONREAD, b"\0" * 4))[0]

    def close(self) -> None:
        self.go.set()
        self.thread.join(60)
        self.sock.close()


class HalfClosingSender:
    """Writes its payload, half-closes (shutdown SHUT_WR) and waits for the peer's close: a clean
    end of that wait is what a sender takes for a delivery."""

    def __init__(self, port: int, payload: bytes) -> None:
        self.half_closed = threading.Event()
        self.ending = ""
        self.thread = threading.Thread(target=self._send, args=(port, payload), daemon=True)
        self.thread.start()

    def _send(self, port: int, payload: bytes) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                self.half_closed.set()
                while sock.recv(1 << 16):
                    pass
            self.ending = "clean"
        except OSError as exc:
            self.ending = f"error: {exc}"
        self.half_closed.set()


MOMENTS = {
    # Still writing: more than the path holds, so some of it was surely in the killed process.
    "writing": 64 << 20,
    # Done: the sender, whose 1 MiB all sits in the gateways (the service pauses) when
    # the process is killed; a clean end of its wait is what it takes for a delivery.
    "half-closed": 1 << 20,
}


@pytest.mark.parametrize("moment", MOMENTS)
@pytest.mark.parametrize(("backend", "side", "rate", "victim"), KINDS, ids=KIND_IDS)
def test_a_connection_cut_by_a_fault_is_never_taken_for_a_delivery(
    start_s2cs, backend, side, rate, victim, moment
):
    """A sender's payload is in flight (the service pauses) when a process of the stream is
    SIGKILLed. Whatever each end sees, a clean end means every byte came (DESIGN.md: a cut is
    reset on both ends, never closed cleanly)."""
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    service = PausedService()
    # A high rate for the shaped kinds: the payload piles up in front of the paused service,
    # past every process of the stream, instead of trickling through the sender's side.
    uid, _, port = astuple(open_stream(hpc, inst, service.port, rate=rate and 1_000_000))
    gw = hpc if side == "inbound" else inst
    payload = os.urandom(MOMENTS[moment])
    sender = HalfClosingSender(port, payload)
    try:
        wait_for(lambda: service.queued() > 0, timeout=60, what="the payload at the service")
        if moment == "writing":
            assert not sender.half_closed.is_set(), f"not in flight: the sender ended ({sender.ending})"
        else:
            wait_for(sender.half_closed.is_set, timeout=60, what="the sender's half-close")
            assert not sender.ending, f"the sender ended before the fault: {sender.ending}"
        os.kill(_process(gw, uid, victim)["pid"], signal.SIGKILL)
        service.go.set()
        sender.thread.join(120)
        service.thread.join(120)
    finally:
        service.close()
    digest = hashlib.sha256(payload).hexdigest()
    whole = service.count == len(payload) and service.received.hexdigest() == digest
    seen = f"sender: {sender.ending}; service: {service.ending} after {service.count} of {len(payload)} bytes"
    print(seen)
    assert sender.ending and service.ending, seen
    fooled = [
        end for end, ending in (("sender", sender.ending), ("service", service.ending)) if ending == "clean"
    ]
    assert whole or not fooled, f"the {fooled[0]} took a cut for a delivery ({seen})"


_ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection


@pytest.mark.parametrize("aborts", ["service", "sender"])
@pytest.mark.parametrize("backend", ["haproxy", "stunnel"])
def test_an_end_that_aborts_its_connection_is_seen_aborting_by_the_other(start_s2cs, backend, aborts):
    """A service that crashes in the middle of an answer, or a sender that gives up, resets its
    connection: the other end is told so (docs/reliability.md), where the proxies alone close it
    cleanly, which the other end takes for a complete answer or a complete stream."""
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    server = socket.create_server(("127.0.0.1", 0))
    port = open_stream(hpc, inst, server.getsockname()[1], rate=0).port
    sender = socket.create_connection(("127.0.0.1", port), timeout=60)
    sender.sendall(b"request\n")
    server.settimeout(60)
    service, _ = server.accept()
    service.settimeout(60)
    assert service.recv(8) == b"request\n"
    service.sendall(os.urandom(1 << 20))  # a part of the answer
    aborting, other = (service, sender) if aborts == "service" else (sender, service)
    aborting.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
    aborting.close()
    seen = ending(other)
    other.close()
    server.close()
    assert seen != "clean", f"the {aborts} reset its connection; the other end saw a clean end"
