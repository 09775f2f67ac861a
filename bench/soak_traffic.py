"""Byte-checked connections for the soak: a service that judges every connection, a sender that
waits for the judgement, and the verdict on each connection once both ends have told their story.

A connection carries `SOAK <id> <length>\\n` and then `length` bytes; the sender half-closes and
waits for the service's answer, `OK <bytes> <sha256>` or `BAD <bytes> <sha256>`. The service knows
what each id should carry (the sender registers it before it connects), so both ends can say
whether what they saw was whole. What each end saw is kept apart from what it means (`judge`,
pure): a cut reported as a reset or an error is no loss; a clean end with bytes missing or wrong
is a silent loss, the one thing a user cannot notice.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

# What the sender saw at its end.
OK = "ok"  # the service's answer came and matched what was sent
BAD = "bad"  # the service answered that what it got was not what was sent
CLEAN_CLOSE = "clean-close"  # a clean end (FIN) without the answer: a sender could take it for success
RESET = "reset"  # a reset or a socket error: a cut the sender notices
REFUSED = "refused"  # no connection at all (the proxy's port closed)
TIMEOUT = "timeout"  # nothing within the bounded wait

# What the service saw at its end.
WHOLE = "whole"  # every byte, in order, then a clean end
SHORT = "short"  # a clean end with bytes missing: silent loss
WRONG = "wrong"  # a clean end after bytes that are not those sent: silent loss
SVC_RESET = "reset"  # a reset or an error: a cut the service notices
SVC_TIMEOUT = "timeout"
EMPTY = "empty"  # a clean end before a whole header: nothing to tell which connection it was

HEADER_MAX = 64


@dataclass
class Expected:
    length: int
    sha256: str


@dataclass
class ServiceSeen:
    conn_id: str | None
    outcome: str
    nbytes: int
    start: float
    end: float


@dataclass
class SenderSeen:
    conn_id: str
    stream: str  # the stream's name in the soak
    service: str  # the name of the service it was sent to
    gateways: tuple[str, ...]  # the gateways on its way
    length: int
    outcome: str
    start: float
    end: float
    detail: str = ""


@dataclass(frozen=True)
class Route:
    """Where a connection goes: its stream, the service behind it, the gateways on its way."""

    stream: str
    service: str
    gateways: tuple[str, ...]


@dataclass
class Ledger:
    """Every connection's expected content and what each end saw; shared by all threads."""

    expected: dict[str, Expected] = field(default_factory=dict)
    senders: list[SenderSeen] = field(default_factory=list)
    services: dict[str, list[ServiceSeen]] = field(default_factory=dict)  # by stream name
    lock: threading.Lock = field(default_factory=threading.Lock)

    def expect(self, conn_id: str, payload: memoryview) -> None:
        with self.lock:
            self.expected[conn_id] = Expected(len(payload), hashlib.sha256(payload).hexdigest())

    def sent(self, seen: SenderSeen) -> None:
        with self.lock:
            self.senders.append(seen)

    def served(self, stream: str, seen: ServiceSeen) -> None:
        with self.lock:
            self.services.setdefault(stream, []).append(seen)

    def lookup(self, conn_id: str) -> Expected | None:
        with self.lock:
            return self.expected.get(conn_id)

    def delivered_bytes(self) -> int:
        with self.lock:
            return sum(s.length for s in self.senders if s.outcome == OK)


class CheckedService:
    """A service listening on 127.0.0.1 that judges each connection byte-exact (hash per
    connection). `stop` is a service that crashes: the listener goes, and every connection is
    reset (a process that dies with unread data does that); `start` brings it back on its port."""

    def __init__(self, name: str, ledger: Ledger, read_timeout: float = 120.0) -> None:
        self.name = name
        self.ledger = ledger
        self.read_timeout = read_timeout
        self.port = 0
        self._sock: socket.socket | None = None
        self._live: set[socket.socket] = set()
        self._killed: set[socket.socket] = set()  # cut by stop(): reset, never judged
        self._lock = threading.Lock()
        self.start()

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self.port = int(sock.getsockname()[1])
        with self._lock:
            self._sock = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
            live = list(self._live)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread: close alone would not
            sock.close()
        for conn in live:
            with self._lock:
                self._killed.add(conn)
            with contextlib.suppress(OSError):
                # SO_LINGER 0: its close sends a reset. SHUT_RD only wakes the thread reading it
                # (it sends nothing); that thread then closes it, unjudged.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RD)

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # stopped
            with self._lock:
                self._live.add(conn)
            threading.Thread(target=self._judge, args=(conn,), daemon=True).start()

    def _judge(self, conn: socket.socket) -> None:
        start = time.monotonic()
        conn.settimeout(self.read_timeout)
        conn_id: str | None = None
        nbytes = 0
        digest = hashlib.sha256()
        outcome = EMPTY
        try:
            head = bytearray()
            while b"\n" not in head and len(head) < HEADER_MAX:
                chunk = conn.recv(HEADER_MAX - len(head))
                if not chunk:
                    break
                head += chunk
            line, _, rest = bytes(head).partition(b"\n")
            parts = line.split()
            if len(parts) == 3 and parts[0] == b"SOAK" and _:
                conn_id = parts[1].decode()
                digest.update(rest)
                nbytes = len(rest)
                while chunk := conn.recv(1 << 16):
                    digest.update(chunk)
                    nbytes += len(chunk)
                self._alive(conn)
                outcome = self._verdict(conn_id, nbytes, digest.hexdigest())
                word = "OK" if outcome == WHOLE else "BAD"
                conn.sendall(f"{word} {nbytes} {digest.hexdigest()}\n".encode())
        except TimeoutError:
            outcome = SVC_TIMEOUT
        except OSError:
            outcome = SVC_RESET
        finally:
            with self._lock:
                self._live.discard(conn)
                if conn in self._killed:
                    self._killed.discard(conn)
                    outcome = SVC_RESET
            conn.close()
        self.ledger.served(self.name, ServiceSeen(conn_id, outcome, nbytes, start, time.monotonic()))

    def _alive(self, conn: socket.socket) -> None:
        """A connection that stop() cut ends as a reset, whatever its read returned."""
        with self._lock:
            if conn in self._killed:
                raise ConnectionResetError("the service stopped")

    def _verdict(self, conn_id: str, nbytes: int, sha256: str) -> str:
        expected = self.ledger.lookup(conn_id)
        if expected is None:
            return WRONG
        if nbytes < expected.length:
            return SHORT
        return WHOLE if (nbytes, sha256) == (expected.length, expected.sha256) else WRONG


def send_checked(
    ledger: Ledger,
    route: Route,
    address: tuple[str, int],
    conn_id: str,
    payload: memoryview,
    pace_bps: float,
    timeout: float,
) -> SenderSeen:
    """Send one checked connection at about `pace_bps` bits per second, half-close, and wait for
    the service's answer; what the sender saw is noted in the ledger and returned."""
    ledger.expect(conn_id, payload)
    start = time.monotonic()
    deadline = start + timeout
    outcome, detail = TIMEOUT, ""
    try:
        with socket.create_connection(address, timeout=10) as sock:
            sock.settimeout(max(1.0, deadline - time.monotonic()))
            sock.sendall(f"SOAK {conn_id} {len(payload)}\n".encode())
            chunk = 1 << 16
            for offset in range(0, len(payload), chunk):
                sock.sendall(payload[offset : offset + chunk])
                if pace_bps:
                    ahead = start + (offset + chunk) * 8 / pace_bps - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                if time.monotonic() > deadline:
                    raise TimeoutError
            sock.shutdown(socket.SHUT_WR)
            reply = bytearray()
            while chunk_in := sock.recv(256):
                reply += chunk_in
                if len(reply) > 256:
                    break
            outcome, detail = _read_answer(bytes(reply), ledger.lookup(conn_id))
    except ConnectionRefusedError as exc:
        outcome, detail = (RESET, str(exc)) if time.monotonic() - start > 1 else (REFUSED, str(exc))
    except TimeoutError:
        outcome = TIMEOUT
    except OSError as exc:
        outcome, detail = RESET, exc.strerror or str(exc)
    seen = SenderSeen(
        conn_id,
        route.stream,
        route.service,
        route.gateways,
        len(payload),
        outcome,
        start,
        time.monotonic(),
        detail,
    )
    ledger.sent(seen)
    return seen


def _read_answer(reply: bytes, expected: Expected | None) -> tuple[str, str]:
    if not reply:
        return CLEAN_CLOSE, "a clean end without the service's answer"
    parts = reply.split()
    if len(parts) == 3 and parts[0] == b"OK" and expected is not None:
        matches = (int(parts[1]), parts[2].decode()) == (expected.length, expected.sha256)
        return (OK, "") if matches else (BAD, reply.decode(errors="replace").strip())
    if parts and parts[0] == b"BAD":
        return BAD, reply.decode(errors="replace").strip()
    return CLEAN_CLOSE, f"a clean end after a broken answer {reply[:80]!r}"


# --- what it means (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Judged:
    """One connection as both ends saw it, and what that means."""

    sender: SenderSeen
    service: ServiceSeen | None
    silent: str | None  # why this is a silent loss, else None
    cut: bool  # the connection failed, visibly to the sender


def judge(senders: list[SenderSeen], services: dict[str, list[ServiceSeen]]) -> list[Judged]:
    """Pair each sender with the service's view of the same connection and say what happened.

    Silent losses: the service saw a clean end with bytes missing or wrong (SHORT, WRONG); the
    sender saw a clean end without the answer while the service did not get everything (the
    sender would take its data for delivered), or while the service did (then the answer, bytes
    of the other direction, were lost silently)."""
    by_id: dict[str, ServiceSeen] = {}
    for seen in (s for listed in services.values() for s in listed):
        if seen.conn_id is not None:
            by_id[seen.conn_id] = seen
    judged = []
    for sender in senders:
        service = by_id.get(sender.conn_id)
        silent = None
        if service is not None and service.outcome in (SHORT, WRONG):
            silent = f"the service saw a clean end after {service.nbytes} of {sender.length} bytes"
            if service.outcome == WRONG:
                silent = f"the service saw a clean end after {service.nbytes} bytes not those sent"
        elif sender.outcome == CLEAN_CLOSE:
            if service is None or service.outcome != WHOLE:
                got = "nothing" if service is None else f"{service.outcome} ({service.nbytes} bytes)"
                silent = f"the sender saw a clean end; the service got {got}"
            else:
                silent = "the sender saw a clean end without the service's answer (the data arrived)"
        cut = sender.outcome in (RESET, REFUSED, TIMEOUT, BAD, CLEAN_CLOSE)
        judged.append(Judged(sender, service, silent, cut))
    return judged


def empty_silences(judged: list[Judged], services: dict[str, list[ServiceSeen]]) -> int:
    """Clean ends the services saw before any header, on streams where a sender's connection
    reached a proxy and no service saw it: each of those bytes was lost, and the service end
    could not tell (a clean end). Counted per stream, at most one per such sender."""
    unmatched: dict[str, int] = {}
    for j in judged:
        if j.service is None and j.sender.outcome not in (REFUSED, OK):
            unmatched[j.sender.service] = unmatched.get(j.sender.service, 0) + 1
    empties = {name: sum(1 for s in listed if s.outcome == EMPTY) for name, listed in services.items()}
    return sum(min(count, empties.get(name, 0)) for name, count in unmatched.items())
