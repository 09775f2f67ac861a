"""The facility gateway: what each control-protocol operation does.

`Gateway` holds the rules of a request (policy, quotas, ownership) and the shape of its reply;
where a session runs and where its record lives is its `Site`'s: this host (host.py) or a swarm
(swarm.py). A site leaves things as it found them when a launch fails (STYLE.md rule 3).
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jinja2
import psutil

from .. import __version__
from ..errors import ConfigError, Forbidden, NotFound
from ..protocol import (
    VERSION,
    InboundRequest,
    Limits,
    OutboundRequest,
    format_rate,
    hostport,
    listing,
    ok,
    rate_bytes_per_second,
)
from ..s2ds.backend import Backend
from ..s2ds.render import ListenerSpec, ProxySpec, Role
from .auth import Authenticator, Identity
from .policy import (
    Grant,
    IPAddress,
    Own,
    Policy,
    build_policy,
    interface_addresses,
    limits_verdict,
    normalised,
    ports_verdict,
    streams_verdict,
)
from .sessions import Phase, Session, short
from .state import StateDir

log = logging.getLogger(__name__)

ENTRY_LOOK = 5.0  # seconds between two looks at what the plain entries refused, for the log


@dataclass(frozen=True)
class Place:
    """Where a new session runs: its ports, the address users are given, and where its inbound
    proxy listens; `node` is the swarm node's id (swarm.py), empty on a gateway of its own."""

    ports: list[int]
    advertise: str
    inbound_bind: str
    node: str = ""
    entry: str = "127.0.0.1"  # where an outbound proxy's plain listeners listen (entry_address)


@dataclass(frozen=True)
class Settings:
    listener_ip: str  # advertised in listener addresses
    bind_ip: str | None  # where inbound proxies listen; None = listener_ip if local, else all
    port_range: tuple[int, int]
    state_dir: Path
    # Where plain entries listen (outbound proxies' listeners, where instruments send): the
    # instrument side of this gateway only, never every interface. The first is the default.
    entry_ips: tuple[str, ...] = ("127.0.0.1",)


ENTRY_OPTION = "s2cs --entry-ip"


def entry_addresses(settings: Settings) -> tuple[str, ...]:
    """--entry-ip, each checked: an address of this host, not one that means all of them."""
    for ip in settings.entry_ips:
        if ipaddress.ip_address(ip).is_unspecified:
            raise ConfigError(
                f"--entry-ip {ip} would open plain entries on every interface; give the address of "
                "this gateway on the instruments' network (the default is 127.0.0.1)"
            )
        if not is_local_address(ip):
            raise ConfigError(f"--entry-ip {ip} is not an address of this host; give one of its own")
    return tuple(str(ipaddress.ip_address(ip)) for ip in settings.entry_ips)


def entry_address(wanted: str | None, entries: Sequence[str]) -> str:
    """Where an outbound request's plain listeners listen: the address it names, when that is
    an entry address; the first entry address when it names none. Forbidden otherwise, never
    widened to all interfaces: anyone who reaches a plain entry sends into the stream. Pure."""
    if wanted is None:
        return entries[0]
    ip = ipaddress.ip_address(wanted)
    shown = ", ".join(entries)
    if ip.is_unspecified:
        raise Forbidden(
            f"remote_ip {wanted} would listen on every interface; plain entries listen only on this "
            f"gateway's entry addresses ({shown}): leave --remote_ip out, or its operator adds "
            f"one with {ENTRY_OPTION}"
        )
    for entry in entries:
        if ipaddress.ip_address(entry) == ip:
            return entry
    raise Forbidden(
        f"remote_ip {wanted} is not an entry address of this gateway ({shown}); its operator "
        f"adds one with {ENTRY_OPTION} {wanted}"
    )


def is_local_address(ip: str) -> bool:
    """True when this host can bind `ip` (it is one of its addresses)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((ip, 0))
    except OSError:
        return False
    return True


def any_address(ip: str) -> str:
    return "::" if ipaddress.ip_address(ip).version == 6 else "0.0.0.0"


def interfaces() -> list[tuple[str, str | None]]:
    """(address, netmask) of every IP address of this host's interfaces, loopback included."""
    return [
        (addr.address, addr.netmask)
        for addrs in psutil.net_if_addrs().values()
        for addr in addrs
        if addr.family in (socket.AF_INET, socket.AF_INET6)
    ]


def told_addresses(*told: str | None) -> frozenset[IPAddress]:
    """The addresses s2cs was told are its own (an advertised address behind NAT, say). Those of
    its interfaces are read for each request instead (Gateway.addresses)."""
    return frozenset(normalised(ip) for ip in told if ip)


def inbound_bind(settings: Settings) -> str:
    """The address inbound proxies listen on: --bind-ip, else --listener-ip when it is one of this
    host's, else every interface. ConfigError for a --bind-ip that is not this host's."""
    if settings.bind_ip:
        # Behind NAT, --listener-ip is the address peers reach and --bind-ip the one of this
        # host that it leads to: one a proxy can bind.
        ip = ipaddress.ip_address(settings.bind_ip)
        if not (ip.is_unspecified or is_local_address(settings.bind_ip)):
            raise ConfigError(
                f"--bind-ip {settings.bind_ip} is not an address of this host; give one of its "
                "own (the address peers reach, behind NAT, is --listener-ip)"
            )
        return settings.bind_ip
    if is_local_address(settings.listener_ip):
        return settings.listener_ip
    return any_address(settings.listener_ip)


def port_is_free(port: int) -> bool:
    """Nobody on this host listens on `port`, over IPv4 or IPv6. SO_REUSEADDR: connections in
    TIME_WAIT do not count, as they do not stop a proxy (which sets it too) from binding."""
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this host
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True


def within_quota(grant: Grant, owned: Sequence[Session], session: Session) -> None:
    """Forbidden when `session` would take its owner, who has `owned` already, over a quota: its
    streams (max_streams) or their listener ports together (max_ports). Without authentication
    everybody is anonymous, and the quotas count everybody together."""
    streams_verdict(grant, len(owned)).enforce()
    ports_verdict(grant, sum(len(s.ports) for s in owned), len(session.ports)).enforce()


def default_policy(settings: Settings) -> Policy:
    """The policy of a gateway started without one: the defaults, and no stream to its ports."""
    own = Own(told_addresses(settings.listener_ip, settings.bind_ip), 0, settings.port_range)
    return build_policy(own, interfaces())


def proxy_spec(backend: Backend, policy: Policy, session: Session) -> ProxySpec:
    """What the backend configures for a session; a plain entry admits the sources of the policy
    in force when its proxy is configured."""
    rate_bytes = rate_bytes_per_second(session.limits.rate)
    sources = tuple(str(rule.network) for rule in policy.sources)
    return backend.spec(
        session.sid, session.role, session.listeners, session.limits.num_conn, rate_bytes, sources
    )


class Site(Protocol):
    """Where a gateway's sessions run and where their records live: the seam between what a
    request may do (Gateway, below) and where it is done. Two sites: this host, its processes
    or containers and state.json (host.py); a swarm, its services and their labels (swarm.py)."""

    streams_outlive_s2cs: bool  # True: the streams are not this s2cs's, and outlive it
    settings: Settings
    backend: Backend
    policy: Policy  # the policy in force: Gateway.reconfigure swaps it
    state: StateDir  # this s2cs's own: its lock, its certificate, a request's scratch files
    inbound_bind: str  # where inbound proxies listen, when the site does not say otherwise
    entry_ips: tuple[str, ...]  # where plain entries may listen (--entry-ip)

    def open(self) -> None:
        """Take the state dir and look at what there is, acting on nothing yet."""

    def start(self) -> None:
        """Take over the streams there are (recover, sweep); open() came first."""

    def close(self, keep_streams: bool) -> None:
        """Stop; end the streams unless they are to outlive this s2cs."""

    def info(self) -> dict[str, Any]:
        """port_range, free_ports and streams, as `s2uc info` shows them (and what else it knows)."""

    def addresses(self) -> frozenset[IPAddress]:
        """Where streams listen besides this host's own addresses: the gateway's too."""

    def place(self, sid: str, count: int, requested: Sequence[int] = (), entry: str | None = None) -> Place:
        """Ports for a new session: `requested`, else `count` free ones; `entry` the plain entry
        address an outbound request names (entry_address), checked before any port is taken."""

    def launch(self, session: Session, grant: Grant) -> None:
        """Start the placed session, counted against `grant`'s quotas (within_quota) with the
        owner's other sessions; on any failure nothing of it is left, its ports freed."""

    def sessions(self, uid: str | None = None) -> list[Session]:
        """The sessions of a stream, or all of them."""

    def release(self, uid: str, visible: Callable[[list[Session]], list[Session]]) -> list[Session]:
        """End the sessions of `uid` that `visible` keeps; those ended (empty: none found).
        BackendFailed when one could not be ended, naming what is left."""

    def describe(self, session: Session, full: bool, log: bool = False) -> dict[str, Any]:
        """A session's `state` and `restarts`; with `full`, what else its owner may see."""


class Gateway:
    """What each control-protocol operation does: the rules of a request (policy, quotas,
    ownership) and the shape of its reply, over a Site that runs and records the sessions."""

    def __init__(self, auth: Authenticator, site: Site) -> None:
        self.auth = auth
        self.site = site
        self._addresses: tuple[tuple[str, ...], frozenset[IPAddress]] = ((), frozenset())

    # The site's, as the rest of s2cs reads them.
    @property
    def policy(self) -> Policy:
        return self.site.policy

    @property
    def state(self) -> StateDir:
        return self.site.state

    @property
    def inbound_bind(self) -> str:
        return self.site.inbound_bind

    @property
    def entry_ips(self) -> tuple[str, ...]:
        return self.site.entry_ips

    @property
    def streams_outlive_s2cs(self) -> bool:
        return self.site.streams_outlive_s2cs

    def reconfigure(self, templates: jinja2.Environment, policy: Policy) -> None:
        """New templates and policy for the requests to come (SIGHUP), both checked already.
        Running streams keep their configs. Each is one reference, which a request reads once."""
        self.site.backend.templates = templates
        self.site.policy = policy

    # --- life of the server ----------------------------------------------------------------------

    def open(self) -> None:
        """Hold the state dir and read what it records, acting on nothing yet: a second s2cs, or
        a damaged state.json, fails here and changes nothing."""
        self.site.open()

    def start(self) -> None:
        self.site.start()

    def close(self, keep_streams: bool = False) -> None:
        self.site.close(keep_streams)

    # --- operations ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        backend = self.site.backend
        caps = backend.capabilities
        return ok(
            version=__version__,
            protocol=VERSION,
            backend={
                "type": backend.name,
                "version": backend.version,
                "capabilities": {"num_conn": caps.num_conn.as_dict(), "rate": caps.rate.as_dict()},
            },
            auth={"enabled": self.auth.enabled, "scope": self.auth.scope},
            listener_ip=self.site.settings.listener_ip,
            entry_ips=list(self.entry_ips),  # where outbound requests may ask their plain entries
            **self.site.info(),  # port_range, free_ports, streams
            policy=self.policy.describe(),
        )

    def addresses(self) -> frozenset[IPAddress]:
        """This gateway's addresses now, read for every request: DHCP, SLAAC and VIPs add some
        while s2cs runs; and those of the site's other hosts (a swarm's gateway nodes). psutil
        lists them in 0.05 ms (2 addresses) to 0.6 ms (100); parsing them costs as much again,
        so it is done only when the list changed."""
        found = tuple(address for address, _ in interfaces())
        listed, parsed = self._addresses  # one reference: a request running along reads a pair
        if found != listed:
            parsed = interface_addresses((address, None) for address in found)
            self._addresses = (found, parsed)
        return parsed | self.site.addresses()

    def inbound(self, req: InboundRequest, who: Identity | None) -> dict[str, Any]:
        policy = self.policy  # one policy for the whole request, whatever a reload swaps in meanwhile
        grant = policy.grant(who)
        here = self.addresses()
        for target in req.receiver_ports:  # before anything is taken: a refusal changes nothing
            policy.target(grant, req.remote_ip, target, here).enforce()
        limits_verdict(grant, req.limits).enforce()
        ports_verdict(grant, 0, len(req.receiver_ports)).enforce()  # too many alone: before any is taken
        uid = str(uuid.uuid4())  # random from os.urandom: the stream's secret
        sid = secrets.token_hex(6)  # the session's local name, and the owner of its ports
        place = self.site.place(sid, len(req.receiver_ports))
        listeners = tuple(
            ListenerSpec(place.inbound_bind, port, req.remote_ip, target)
            for port, target in zip(place.ports, req.receiver_ports, strict=True)
        )
        advertised = tuple(hostport(place.advertise, port) for port in place.ports)
        session = self._session(uid, sid, "inbound", who, listeners, advertised, req.limits)
        session.node = place.node
        self.site.launch(session, grant)
        return ok(uid=uid, role="inbound", listeners=list(advertised), **self._limits(req.limits))

    def outbound(self, req: OutboundRequest, who: Identity | None) -> dict[str, Any]:
        policy = self.policy  # one policy for the whole request, whatever a reload swaps in meanwhile
        grant = policy.grant(who)
        here = self.addresses()
        for remote in req.remote_listeners:
            policy.peer(remote.ip, remote.port, here).enforce()
        limits_verdict(grant, req.limits).enforce()
        ports_verdict(grant, 0, len(req.remote_listeners)).enforce()  # too many alone: before any is taken
        sid = secrets.token_hex(6)
        # The entry address is checked before any port is taken: a refusal changes nothing.
        place = self.site.place(sid, len(req.remote_listeners), req.receiver_ports, entry=req.bind_ip)
        bind = place.entry
        listeners = tuple(
            ListenerSpec(bind, port, remote.ip, remote.port)
            for port, remote in zip(place.ports, req.remote_listeners, strict=True)
        )
        advertised = tuple(hostport(bind, port) for port in place.ports)  # where it really listens
        session = self._session(req.uid, sid, "outbound", who, listeners, advertised, req.limits)
        session.node = place.node
        self.site.launch(session, grant)
        return ok(
            uid=req.uid, role="outbound", listeners=list(advertised), bind=bind, **self._limits(req.limits)
        )

    def release(self, uid: str, who: Identity | None) -> dict[str, Any]:
        ended = self.site.release(uid, lambda found: self._visible(found, who))
        if not ended:
            raise NotFound(f"no stream {short(uid)} on this server (already released?)")
        return ok(uid=uid, released=[s.role for s in ended])

    def status(self, uid: str | None, who: Identity | None, log: bool = False) -> dict[str, Any]:
        """`log`: with the last lines of each process's log too (for one stream, its owner's)."""
        if uid is not None:
            sessions = self._visible(self.site.sessions(uid), who)
            if not sessions:
                raise NotFound(f"no stream {short(uid)} on this server")
            return ok(streams=[self._describe(s, full=True, log=log) for s in sessions])
        everything = self.site.sessions()
        if self.auth.enabled:
            everyone = self._admin(who)
            mine = [s for s in everything if everyone or (who is not None and s.owner == who.id)]
            return listing([self._describe(s, full=True) for s in mine])
        # Without authentication everybody is anonymous: holding the UID is the only proof of
        # ownership, so a listing must not hand UIDs out.
        return listing([self._describe(s, full=False) for s in everything])

    # --- helpers ---------------------------------------------------------------------------------

    def _session(
        self,
        uid: str,
        sid: str,
        role: Role,
        who: Identity | None,
        listeners: tuple[ListenerSpec, ...],
        advertised: tuple[str, ...],
        limits: Limits,
    ) -> Session:
        return Session(
            uid=uid,
            sid=sid,
            role=role,
            owner=who.id if who else None,
            listeners=listeners,
            advertised=advertised,
            limits=limits,
            phase=Phase.STARTING,
        )

    def _limits(self, limits: Limits) -> dict[str, Any]:
        caps = self.site.backend.capabilities
        return {
            "limits": {
                "num_conn": {"value": limits.num_conn, **caps.num_conn.as_dict()},
                "rate": {
                    "value": limits.rate,
                    "unit": "kb/s",
                    "human": format_rate(limits.rate),
                    **(caps.rate.as_dict() if limits.rate else {"enforced": True}),
                },
            }
        }

    def _visible(self, sessions: list[Session], who: Identity | None) -> list[Session]:
        """The sessions `who` may see and release: its own, or all for an admin of the policy.
        Others' are not there at all (NOT_FOUND), so nobody learns what another user runs."""
        if not self.auth.enabled or self._admin(who):
            return sessions
        # A stream made while authentication was off has no owner: as then, its UID suffices.
        return [s for s in sessions if s.owner is None or (who is not None and s.owner == who.id)]

    def _admin(self, who: Identity | None) -> bool:
        try:
            return who is not None and self.policy.grant(who).admin
        except Forbidden:
            return False  # not allowed to make streams; still allowed to see and end its own

    def _describe(self, session: Session, full: bool, log: bool = False) -> dict[str, Any]:
        """A session as `status` shows it: what the request made it, and what its site says."""
        shown = self.site.describe(session, full, log)
        entry: dict[str, Any] = {
            "uid": session.uid if full else short(session.uid),
            "role": session.role,
            "state": shown.pop("state"),
            "listeners": list(session.advertised),
            "created": session.created,
            "restarts": shown.pop("restarts"),
            **self._limits(session.limits),
        }
        if full:
            entry["targets"] = [hostport(lst.target_ip, lst.target_port) for lst in session.listeners]
        entry.update(shown)
        return entry
