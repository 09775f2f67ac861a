"""Why a stream's data does not arrive, in plain words, from what its proxies wrote in their logs.

A sender whose connection fails at the far end often sees only a clean close; the proxies' logs
say why. This module turns their lines into failures a user can act on: a handshake refused
(the two sides hold different UIDs), the service refusing or not answering, the peer refused or
unreachable. Each failure has a kind, a message naming the address concerned, a count and the
time of the last one. `s2uc status UID` shows them; the metrics count them by kind.

The lines it knows, as seen from HAProxy 2.6 and 2.8 and stunnel 5.68 (templates/):

    HAProxy, a connection (log-format of haproxy.cfg.j2; %ts "SC": refused, "sC": timed out):
      127.0.0.1:51812 [02/Dec/2026:14:10:52.107] outbound target0/peer 1/-1/3014 0 SC 1/1/0/0/3 0/0
          server=127.0.0.1:27766 error="SSL handshake failure" tls="error:0A000086:...:certificate
          verify failed"   (one line)
    HAProxy, a client's failed handshake (error-log-format; 2.8's default has the reason in brackets):
      127.0.0.1:57682 [02/Dec/2026:14:12:00.919] inbound~ 127.0.0.1:27766: SSL handshake failure tls="..."
      127.0.0.1:41180 [07/Dec/2026:05:45:47.607] inbound~ 127.0.0.1:20099: SSL client certificate not
          trusted tls="error:0A000086:SSL routines::certificate verify failed"   (one line)
    stunnel (debug = notice):
      2026.12.02 14:13:23 LOG3[0]: SSL_accept: ...: error:0A000418:SSL routines::tlsv1 alert unknown ca
      2026.12.02 14:13:16 LOG3[0]: s_connect: connect 127.0.0.1:55821: Connection refused (111)
    the shaper (no time of its own: the reader gives the log's modification time):
      cannot connect to 127.0.0.1:5001: Connection refused

Pure: lines in, failures out. Reading the logs, boundedly, is proxylog.py's.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

HANDSHAKE = "handshake"  # the peer did not present this stream's certificate
NOT_TLS = "not-tls"  # a client spoke no TLS to an inbound listener
SERVICE_REFUSED = "service-refused"
SERVICE_TIMEOUT = "service-timeout"
SERVICE_UNREACHABLE = "service-unreachable"
PEER_REFUSED = "peer-refused"
PEER_UNREACHABLE = "peer-unreachable"  # no route, or no answer within the connect timeout
KINDS = (
    HANDSHAKE,
    NOT_TLS,
    SERVICE_REFUSED,
    SERVICE_TIMEOUT,
    SERVICE_UNREACHABLE,
    PEER_REFUSED,
    PEER_UNREACHABLE,
)
SHOWN = 5  # failures in a status reply, newest first


@dataclass(frozen=True)
class Event:
    """One failed connection, as one log line tells it."""

    kind: str
    address: str  # the peer's, the service's, or a client's IP; "" when the line names none
    when: float | None  # seconds since the epoch; None: the line has no time


@dataclass(frozen=True)
class Failure:
    kind: str
    message: str
    count: int
    last: float | None

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "message": self.message, "count": self.count, "last": self.last}


def message(kind: str, address: str) -> str:
    """What the user reads, with the address concerned."""
    at = f" at {address}" if address else ""
    if kind == HANDSHAKE:
        return f"the peer{at} did not present this stream's certificate: is the UID the same on both sides?"
    if kind == NOT_TLS:
        source = f"{address} " if address else "a client "
        return (
            f"{source}connected without TLS: the instrument sends to the outbound proxy's listener "
            "(outbound_request), never to this inbound one"
        )
    if kind == SERVICE_REFUSED:
        return f"the service{at} refused the connection: is it running?"
    if kind == SERVICE_TIMEOUT:
        return (
            f"the service{at} did not answer: is the address right, and does a firewall let this "
            "gateway through?"
        )
    if kind == SERVICE_UNREACHABLE:
        return f"the service{at} cannot be reached from this gateway (no route): is the address right?"
    if kind == PEER_REFUSED:
        return (
            f"the peer{at} refused the connection: is the stream still open at the other facility, "
            "and is this its listener address?"
        )
    if kind == PEER_UNREACHABLE:
        return (
            f"the peer{at} cannot be reached: is the listener address right, and do the firewalls "
            "between the facilities let this gateway through?"
        )
    raise ValueError(f"no failure kind {kind!r}")


# --- times -----------------------------------------------------------------------------------------

_MONTHS = {
    m: i
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
_HAPROXY_TIME = re.compile(r"(\d\d)/(\w{3})/(\d{4}):(\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?")
_STUNNEL_TIME = re.compile(r"(\d{4})\.(\d\d)\.(\d\d) (\d\d):(\d\d):(\d\d)")


def _local(*fields: int) -> float | None:
    """Year, month, day, hour, minute, second (and microsecond) of this host's local time, which
    the proxies write (they run beside s2cs) -> seconds since the epoch."""
    try:
        return datetime.datetime(*fields).timestamp()  # type: ignore[arg-type]
    except (ValueError, OverflowError):
        return None


def haproxy_time(text: str) -> float | None:
    """`02/Dec/2026:14:10:52.107` (month names in English whatever the locale)."""
    m = _HAPROXY_TIME.fullmatch(text)
    if not m or m.group(2) not in _MONTHS:
        return None
    micro = int((m.group(7) or "0").ljust(6, "0"))
    day, year, hour, minute, second = (int(m.group(i)) for i in (1, 3, 4, 5, 6))
    return _local(year, _MONTHS[m.group(2)], day, hour, minute, second, micro)


def stunnel_time(text: str) -> float | None:
    """`2026.12.02 14:13:23`."""
    m = _STUNNEL_TIME.fullmatch(text)
    return _local(*(int(x) for x in m.groups())) if m else None


# --- what the proxies say --------------------------------------------------------------------------

_HAPROXY_CONNECTION = re.compile(
    r"(?P<client>\S+) \[(?P<time>[^\]]+)\] (?P<frontend>\S+) (?P<backend>[^/\s]+)/(?P<server>\S+) "
    r"\S+ \d+ (?P<ts>\S\S) \S+ \S+"
    r'(?: server=(?P<address>\S+) error="(?P<error>(?:[^"\\]|\\.)*)" tls="(?P<tls>(?:[^"\\]|\\.)*)")?'
)
_HAPROXY_CLIENT_ERROR = re.compile(r"(?P<client>\S+) \[(?P<time>[^\]]+)\] \S+(?: \S+)?: (?P<text>.*)")
_STUNNEL = re.compile(r"(?P<time>\d{4}\.\d\d\.\d\d \d\d:\d\d:\d\d) LOG\d\[(?P<thread>[^\]]+)\]: (?P<text>.*)")
_STUNNEL_ACCEPTED = re.compile(r"Service \[\S+\] accepted connection from (?P<address>\S+)")
_STUNNEL_CONNECTED = re.compile(r"s_connect: connected (?P<address>\S+)")
_STUNNEL_TLS = re.compile(r"SSL_(?P<side>accept|connect): .*?(?P<reason>error:[0-9A-Fa-f]+:.*)")
_STUNNEL_CONNECT = re.compile(
    r"(?:s_connect|connect_blocking): (?:connect|s_poll_wait) (?P<address>\S+): (?P<reason>.*)"
)
_SHAPER_CONNECT = re.compile(r"cannot connect to (?P<address>\S+): (?P<reason>.*)")
# HAProxy's words for a client's handshake that failed for what the client sent (fc_err_str; its
# connection error strings, src/connection.c): a refused handshake, or a certificate it does not
# trust. "Connection closed during SSL handshake" is not among them: a client gone before its
# handshake (a port scan) is no failure of the stream.
_HAPROXY_REFUSED_CLIENT = (
    "SSL handshake failure",
    "SSL client certificate not trusted",
    "SSL client CA chain cannot be verified",
)
# Clients that spoke something else than TLS (OpenSSL's words): plain data, HTTP.
_NOT_TLS = ("wrong version number", "http request", "https proxy request", "unknown protocol")


def _connect_kind(role: str, reason: str) -> str | None:
    """A failed TCP connect, by its reason: to the service (inbound) or to the peer (outbound)."""
    text = reason.lower()
    if "refused" in text:
        return SERVICE_REFUSED if role == "inbound" else PEER_REFUSED
    if "timeout" in text or "timed out" in text:
        return SERVICE_TIMEOUT if role == "inbound" else PEER_UNREACHABLE
    if "unreachable" in text or "no route" in text:
        return SERVICE_UNREACHABLE if role == "inbound" else PEER_UNREACHABLE
    return None


def _handshake_kind(reason: str) -> str:
    return NOT_TLS if any(words in reason.lower() for words in _NOT_TLS) else HANDSHAKE


def _host(address: str) -> str:
    """A client's IP without its port, which changes with every connection: one failure per client."""
    host = address.rpartition(":")[0] if ":" in address else address
    return host.strip("[]") or address


def _internal(address: str) -> bool:
    """A Unix socket between the proxy and the shaper: the other of the two says what failed."""
    return address.startswith(("/", "unix"))


def _target(backend: str, targets: Sequence[str]) -> str:
    """`target1` -> the session's second target; "" if there is no such."""
    index = backend.removeprefix("target")
    return targets[int(index)] if index.isdigit() and int(index) < len(targets) else ""


def _haproxy(line: str, role: str, targets: Sequence[str]) -> Event | None:
    if m := _HAPROXY_CONNECTION.fullmatch(line):
        ts = m["ts"]
        if ts[1] != "C" or ts[0] not in "Ss":  # only what failed while connecting to the server
            return None
        address = m["address"] or ""
        if _internal(address):
            return None
        address = address or _target(m["backend"], targets)
        when = haproxy_time(m["time"])
        if m["tls"] or "SSL" in (m["error"] or ""):
            return Event(_handshake_kind(m["tls"] or ""), address, when)
        kind = _connect_kind(role, "timeout" if ts[0] == "s" else "refused")
        return Event(kind, address, when) if kind else None
    if m := _HAPROXY_CLIENT_ERROR.fullmatch(line):
        if not any(words in m["text"] for words in _HAPROXY_REFUSED_CLIENT):
            return None
        return Event(_handshake_kind(m["text"]), _host(m["client"]), haproxy_time(m["time"]))
    return None


@dataclass
class Threads:
    """What stunnel said earlier of each of its connections (LOG5[thread]): who connected. Kept
    by whoever reads a log in pieces, since a connection's lines may fall in two of them."""

    addresses: dict[str, str] = field(default_factory=dict)

    def note(self, thread: str, address: str) -> None:
        if len(self.addresses) > 1024:  # a long log must not grow this without end
            self.addresses.clear()
        self.addresses[thread] = address


def _stunnel(line: str, role: str, threads: Threads) -> Event | None:
    m = _STUNNEL.fullmatch(line)
    if not m:
        return None
    text, thread = m["text"], m["thread"]
    when = stunnel_time(m["time"])
    if found := _STUNNEL_ACCEPTED.fullmatch(text):
        if role == "inbound":
            threads.note(thread, _host(found["address"]))
        return None
    if found := _STUNNEL_CONNECTED.fullmatch(text):
        if role == "outbound":
            threads.note(thread, found["address"])
        return None
    if found := _STUNNEL_TLS.match(text):
        return Event(_handshake_kind(found["reason"]), threads.addresses.get(thread, ""), when)
    if found := _STUNNEL_CONNECT.match(text):
        if _internal(found["address"]):
            return None
        kind = _connect_kind(role, found["reason"])
        return Event(kind, found["address"], when) if kind else None
    return None


def events(
    lines: Iterable[str],
    role: str,
    targets: Sequence[str] = (),
    undated: float | None = None,
    threads: Threads | None = None,
) -> Iterator[Event]:
    """Every failed connection the lines of one process's log tell of, in order.

    `role`: the session's, "inbound" or "outbound" (what a refused connect was refused by).
    `targets`: its listeners' targets, for a HAProxy line that names no server address.
    `undated`: the time for a line that has none of its own (the shaper's).
    `threads`: what the earlier lines of the same log said of stunnel's connections."""
    threads = threads if threads is not None else Threads()
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line[:1].isdigit() and line[4:5] == ".":
            event = _stunnel(line, role, threads)
        elif found := _SHAPER_CONNECT.fullmatch(line):
            kind = None if _internal(found["address"]) else _connect_kind(role, found["reason"])
            event = Event(kind, found["address"], undated) if kind else None
        else:
            event = _haproxy(line, role, targets)
        if event is not None:
            yield event


# --- counting --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """Failures so far, one entry per kind and address: (count, time of the last)."""

    seen: tuple[tuple[tuple[str, str], tuple[int, float | None]], ...] = ()

    def add(self, found: Iterable[Event]) -> Tally:
        seen = dict(self.seen)
        for event in found:
            count, last = seen.get((event.kind, event.address), (0, None))
            if event.when is not None and (last is None or event.when > last):
                last = event.when
            seen[(event.kind, event.address)] = (count + 1, last)
        return Tally(tuple(seen.items()))

    def failures(self, limit: int = SHOWN) -> list[Failure]:
        """The newest first (those of unknown time last), at most `limit`."""
        found = [
            Failure(kind, message(kind, address), count, last) for (kind, address), (count, last) in self.seen
        ]
        found.sort(key=lambda f: -f.last if f.last is not None else float("inf"))
        return found[:limit]

    def by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for (kind, _), (count, _) in self.seen:
            counts[kind] = counts.get(kind, 0) + count
        return counts


def merge(tallies: Iterable[Tally]) -> Tally:
    """One tally of a session's processes (its proxy and its shaper)."""
    total = Tally()
    for tally in tallies:
        seen = dict(total.seen)
        for key, (count, last) in tally.seen:
            before, when = seen.get(key, (0, None))
            newest = max((t for t in (when, last) if t is not None), default=None)
            seen[key] = (before + count, newest)
        total = Tally(tuple(seen.items()))
    return total
