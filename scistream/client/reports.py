"""What `status` and `info` replies say, checked and typed (see replies.py): the results of
`Client.status` and `Client.info` and of their `s2uc` commands. A module of its own, made at its
first use: a request of a stream needs none of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .replies import Capabilities, Limits, _capability, _frozen, _limits, _Reader

TYPE_CHECKING = False  # typing's, without importing typing: nothing here needs it to run
if TYPE_CHECKING:
    from typing import Any


@dataclass(frozen=True)
class Failure:
    """Why connections of a stream failed, at one address (docs/protocol.md, `status`)."""

    kind: str  # handshake, not-tls, service-refused, ...
    message: str
    count: int
    last: float | None  # seconds since the epoch


@dataclass(frozen=True)
class Process:
    """One process of a stream: its proxy or its shaper."""

    name: str  # "proxy" or "shaper"
    pid: int | None
    state: str
    restarts: int
    log: tuple[str, ...] | None  # its last log lines, when asked for


@dataclass(frozen=True)
class Session:
    """One side of a stream on one gateway, as `status` describes it. An anonymous listing shows
    8 characters of the UID and leaves out targets, processes, last_error and failures."""

    uid: str
    role: str  # "inbound" or "outbound"
    state: str  # RUNNING, STARTING, BACKOFF, FATAL, STOPPING, STOPPED
    listeners: tuple[str, ...]
    created: float  # seconds since the epoch
    restarts: int
    limits: Limits
    targets: tuple[str, ...] | None
    processes: tuple[Process, ...]
    failures: tuple[Failure, ...]
    last_error: str | None
    connections: int | None  # None when the proxy cannot tell
    total_connections: int | None
    bytes_in: int | None
    bytes_out: int | None
    refused_sources: int | None = None  # outbound: connections its plain entry refused by source


@dataclass(frozen=True)
class Status:
    """The streams a gateway shows the caller (`status`)."""

    server: str
    streams: tuple[Session, ...]
    reply: Mapping[str, Any] = field(repr=False, compare=False)
    omitted: int = 0  # streams more than a reply holds (64 KiB): each can be asked for by its UID


@dataclass(frozen=True)
class Backend:
    """The proxy a gateway runs streams with, and the limits it enforces."""

    type: str  # "haproxy" or "stunnel"
    version: str
    capabilities: Capabilities


@dataclass(frozen=True)
class Auth:
    """Whether a gateway wants a Globus token, and for which scope."""

    enabled: bool
    scope: str | None  # the Globus Auth scope a token must carry


@dataclass(frozen=True)
class Quota:
    """The most each identity may use at once on the gateway; None = no limit."""

    max_streams: int | None = None
    max_rate: int | None = None  # kb/s, 0 = unlimited
    max_num_conn: int | None = None

    def items(self) -> list[tuple[str, int]]:
        """The limits that are set, by their wire names, in the order the gateway sends them."""
        named = [("max_streams", self.max_streams), ("max_rate", self.max_rate)]
        named.append(("max_num_conn", self.max_num_conn))
        return [(name, value) for name, value in named if value is not None]


@dataclass(frozen=True)
class Policy:
    """Where the gateway's proxies may lead, and for whom (docs/protocol.md, `info`)."""

    targets: tuple[str, ...]
    targets_default: bool
    peers: tuple[str, ...] | None  # None: any
    never: tuple[str, ...]
    identities: str  # "any" or "listed"
    quota: Quota
    sources: tuple[str, ...] = ()  # who may send to a plain entry; () from an s2cs before entries


@dataclass(frozen=True)
class Info:
    """What a gateway offers (`info`): version, backend, authentication, ports, policy."""

    server: str
    version: str
    protocol: int
    backend: Backend
    auth: Auth
    listener_ip: str
    entry_ips: tuple[str, ...]  # where outbound proxies listen; () from an s2cs before entries
    port_range: str
    free_ports: int
    streams: int
    policy: Policy | None  # None from an s2cs older than the target policy
    reply: Mapping[str, Any] = field(repr=False, compare=False)


def status(server: str, reply: Mapping[str, Any]) -> Status:
    read = _Reader(server, reply)
    streams = tuple(_session(s) for s in read.children("streams", required=True))
    return Status(server, streams, _frozen(reply), read.maybe_integer("omitted") or 0)


def _session(read: _Reader) -> Session:
    return Session(
        uid=read.text("uid"),
        role=read.text("role"),
        state=read.text("state"),
        listeners=read.texts("listeners"),
        created=read.number("created"),
        restarts=read.integer("restarts"),
        limits=_limits(read),
        targets=read.maybe_texts("targets"),
        processes=tuple(_process(p) for p in read.children("processes")),
        failures=tuple(_failure(f) for f in read.children("failures")),
        last_error=read.maybe_text("last_error"),
        connections=read.maybe_integer("connections"),
        total_connections=read.maybe_integer("total_connections"),
        bytes_in=read.maybe_integer("bytes_in"),
        bytes_out=read.maybe_integer("bytes_out"),
        refused_sources=read.maybe_integer("refused_sources"),
    )


def _process(read: _Reader) -> Process:
    return Process(
        read.text("name"),
        read.maybe_integer("pid"),
        read.text("state"),
        read.integer("restarts"),
        read.maybe_texts("log"),
    )


def _failure(read: _Reader) -> Failure:
    return Failure(read.text("kind"), read.text("message"), read.integer("count"), read.maybe_number("last"))


def info(server: str, reply: Mapping[str, Any]) -> Info:
    read = _Reader(server, reply)
    backend = read.child("backend")
    caps = backend.child("capabilities")
    auth = read.child("auth")
    return Info(
        server=server,
        version=read.text("version"),
        protocol=read.integer("protocol"),
        backend=Backend(
            backend.text("type"),
            backend.text("version"),
            Capabilities(_capability(caps.child("num_conn")), _capability(caps.child("rate"))),
        ),
        auth=Auth(auth.flag("enabled"), auth.maybe_text("scope")),
        listener_ip=read.text("listener_ip"),
        entry_ips=read.texts("entry_ips", required=False),
        port_range=read.text("port_range"),
        free_ports=read.integer("free_ports"),
        streams=read.integer("streams"),
        policy=_policy(read.child("policy")) if isinstance(reply.get("policy"), Mapping) else None,
        reply=_frozen(reply),
    )


def _policy(read: _Reader) -> Policy:
    quota = read.child("quota") if read.fields.get("quota") is not None else _Reader(read.server, {})
    return Policy(
        targets=read.texts("targets", required=False),
        targets_default=read.flag("targets_default", False),
        peers=read.maybe_texts("peers"),
        never=read.texts("never", required=False),
        identities=read.maybe_text("identities") or "any",
        quota=Quota(
            quota.maybe_integer("max_streams"),
            quota.maybe_integer("max_rate"),
            quota.maybe_integer("max_num_conn"),
        ),
        sources=read.texts("sources", required=False),
    )
