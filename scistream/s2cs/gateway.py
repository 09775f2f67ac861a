"""The facility gateway: what each control-protocol operation does.

`Gateway` ties together the session registry, the port pool, the proxy backend, the supervisor
and the state dir. Every operation leaves things as it found them when it fails: ports are
returned, files deleted, processes stopped (STYLE.md rule 3).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import secrets
import shutil
import socket
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import jinja2
import psutil

from .. import __version__
from ..errors import BackendFailed, ConfigError, Conflict, Forbidden, NotFound, ScistreamError
from ..protocol import (
    VERSION,
    InboundRequest,
    Limits,
    OutboundRequest,
    format_rate,
    hostport,
    ok,
    rate_bytes_per_second,
)
from ..s2ds.backend import Backend, Launch, Stats
from ..s2ds.diagnosis import Tally, merge
from ..s2ds.proxylog import LogWatch, last_lines
from ..s2ds.render import ListenerSpec, ProxySpec, Role, SessionFiles
from ..s2ds.runtime import Handle, ProcessRuntime, Runtime, terminate
from ..s2ds.supervisor import STOP_GRACE, ProxyProcess, State, Supervisor
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
from .ports import PortPool
from .sessions import Phase, RecordedProcess, Session, SessionRegistry, parse_record, short
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


class _Recording:
    """The Runtime a session's processes get: each spawn is written to state.json at once, before
    anything waits for the process. An s2cs that dies while a proxy starts so leaves it recorded,
    and the next one finds it by what was recorded, never by its command line."""

    def __init__(self, runtime: Runtime, spawned: Callable[[Handle], None]) -> None:
        self._runtime = runtime
        self._spawned = spawned

    def spawn(self, argv: Sequence[str], cwd: Path, log: Path) -> Handle:
        handle = self._runtime.spawn(argv, cwd, log)
        self._spawned(handle)
        return handle

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)  # all else as the Runtime it wraps


class Gateway:
    streams_outlive_s2cs = False  # True where the streams are not this s2cs's (swarm.py)

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        auth: Authenticator,
        runtime: Runtime | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.auth = auth
        # Without a policy of the caller's: the default one, and no stream to this gateway's ports.
        own = Own(told_addresses(settings.listener_ip, settings.bind_ip), 0, settings.port_range)
        self.policy = policy or build_policy(own, interfaces())
        self.runtime = runtime or ProcessRuntime()
        self.state = StateDir(settings.state_dir)
        self.registry = SessionRegistry()
        self.pool = PortPool(*settings.port_range, is_free=port_is_free)
        self.supervisor = Supervisor()
        self._save_lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}  # by sid, as last saved (_persist)
        # What each process's log has told of failed connections (diagnosis.py); a process's
        # entry goes with it.
        self._watches: weakref.WeakKeyDictionary[ProxyProcess, LogWatch] = weakref.WeakKeyDictionary()
        self._watch_lock = threading.Lock()
        self._found: list[tuple[Session, list[RecordedProcess]]] = []  # what state.json records
        # Where a request's proxy config is checked while the request starts the shaper (_launch).
        self._checks = ThreadPoolExecutor(thread_name_prefix="config-check")
        self.inbound_bind = inbound_bind(settings)  # checked now, not at the first request
        self._addresses: tuple[tuple[str, ...], frozenset[IPAddress]] = ((), frozenset())
        self.entry_ips = entry_addresses(settings)  # as this one
        self._refused: dict[str, int] = {}  # by sid: sources refused by its plain entry, as logged
        self._refused_lock = threading.Lock()
        self._entry_watch = threading.Event()  # set: stop looking (close)

    def reconfigure(self, templates: jinja2.Environment, policy: Policy) -> None:
        """New templates and policy for the requests to come (SIGHUP), both checked already.
        Running streams keep their configs. Each is one reference, which a request reads once."""
        self.backend.templates = templates
        self.policy = policy

    # --- life of the server ----------------------------------------------------------------------

    def open(self) -> None:
        """Hold the state dir and read what it records, acting on nothing yet: a second s2cs, or
        a damaged state.json, fails here and changes nothing."""
        self.state.open()
        self._found = self._recorded()

    def start(self) -> None:
        """Recover the streams of the state dir and supervise them; `open()` came first."""
        self.recover()
        self.supervisor.start()
        threading.Thread(target=self._watch_entries, name="entry-watch", daemon=True).start()

    def close(self, keep_streams: bool = False) -> None:
        """Stop supervising; release every session unless the streams are to outlive us."""
        self._entry_watch.set()
        self.supervisor.close()
        self._checks.shutdown()
        sessions = self.registry.all()
        if keep_streams:
            for session in sessions:
                for proc in session.procs:
                    proc.detach()
            log.info("leaving %d stream(s) running for the next s2cs to re-adopt", len(sessions))
            return
        for session in sessions:
            self._discard(session)
        log.info("released %d stream(s)", len(sessions))

    def recover(self) -> None:
        """Re-adopt the processes of a previous s2cs that still run; restart the others.

        Refuses to start only when state.json cannot be used (StateDir.damaged says why), and
        then before it touches anything. A session whose processes cannot be started again
        (neither from the current templates nor from their last config) is FATAL with the
        reason, and its ports stay reserved.
        """
        for session, recorded in self._found:
            if session.phase != Phase.ACTIVE:
                self._end_unfinished(session, recorded)
                continue
            self.registry.add(session)
            self.pool.take(session.ports, owner=session.sid)
            files = SessionFiles(self.state.session_dir(session.sid))
            files.directory.mkdir(mode=0o700, exist_ok=True)
            files.run.mkdir(mode=0o700, exist_ok=True)
            spec = self._spec(session)
            gone = []
            for before in recorded:
                launch = Launch(before.kind, before.argv, self.backend.ready(spec, files, before.kind))
                proc = self._process(session, files, launch)
                proc.restarts = before.restarts
                handle = None
                if before.pid and before.create_time:
                    handle = self.runtime.adopt(before.pid, before.create_time, before.argv)
                if handle is not None:
                    proc.adopt(handle)
                else:
                    gone.append(proc)
                session.procs.append(proc)
                self.supervisor.add(proc)
            if gone:
                self._restart_gone(session, files, gone)
        self._sweep()
        self._persist()
        if len(self.registry):
            log.info("recovered %d stream(s) from %s", len(self.registry), self.state.file)

    def _recorded(self) -> list[tuple[Session, list[RecordedProcess]]]:
        """Every session of state.json with its processes, all checked before any is acted on."""
        found = []
        seen: set[object] = set()
        for i, record in enumerate(self.state.load(), 1):
            try:
                session, processes = parse_record(record)
            except ValueError as exc:
                raise self.state.damaged(f"session {i}: {exc}") from None
            for key in (session.sid, (session.uid, session.role)):
                if key in seen:
                    raise self.state.damaged(f"session {i} is recorded twice")
                seen.add(key)
            found.append((session, processes))
        return found

    def _restart_gone(self, session: Session, files: SessionFiles, gone: list[ProxyProcess]) -> None:
        """Schedule the processes that did not survive, with their files written again from the
        current templates (the credentials derive from the UID). If that fails, the files they
        last ran with will do; without those, they are FATAL with the reason."""
        try:
            launches = {launch.name: launch for launch in self._prepare(session, files)}
        except ScistreamError as exc:
            if files.config.is_file() and files.pem.is_file():
                log.warning("%s: %s; starting it again with its last config", session.label, exc.message)
                for proc in gone:
                    proc.restart_later("it was not running when s2cs started")
                return
            for proc in gone:
                proc.fail(f"cannot start it again after the restart of s2cs: {exc.message}")
            log.error("%s: cannot start again: %s", session.label, exc.message)
            return
        for proc in gone:
            if proc.kind in launches:
                proc.argv = list(launches[proc.kind].argv)
            proc.restart_later("it was not running when s2cs started")
            log.warning("%s: was gone after the restart of s2cs; starting it again", proc.name)

    def _end_unfinished(self, session: Session, recorded: list[RecordedProcess]) -> None:
        """End a session the previous s2cs had not finished: one it was releasing, or one it was
        still starting (its request never answered: no user has it as a stream). These are the
        strays: processes recorded in state.json for no session that is kept. Each is stopped
        only if it is still the process recorded (pid, start time and command line); its ports
        are not taken, its files go with the sweep."""
        why = "was being released" if session.phase == Phase.RELEASING else "had not started yet"
        for before in reversed(recorded):  # the proxy first, then what it connects through
            if not (before.pid and before.create_time):
                continue
            handle = self.runtime.adopt(before.pid, before.create_time, before.argv)
            if handle is not None:
                log.warning("%s: stopping its %s, pid %d: it %s", session.label, before.kind, handle.pid, why)
                terminate(self.runtime, handle, STOP_GRACE)
        log.info("%s: ended, as it %s when the previous s2cs stopped", session.label, why)

    def _sweep(self) -> None:
        """Delete the directories of sessions that are not kept.

        It stops no process: s2cs knows its processes by what it recorded (state.json, above),
        never by a command line that names the state dir, which an operator's `tail -f` of a
        proxy log does too."""
        known = self.registry.sids()
        for path in self.state.sessions.iterdir():
            if path.name not in known:
                shutil.rmtree(path, ignore_errors=True)
        self.runtime.sweep(known)

    # --- operations ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        caps = self.backend.capabilities
        return ok(
            version=__version__,
            protocol=VERSION,
            backend={
                "type": self.backend.name,
                "version": self.backend.version,
                "capabilities": {"num_conn": caps.num_conn.as_dict(), "rate": caps.rate.as_dict()},
            },
            auth={"enabled": self.auth.enabled, "scope": self.auth.scope},
            listener_ip=self.settings.listener_ip,
            entry_ips=list(self.entry_ips),  # where outbound requests may ask their plain entries
            port_range=self.pool.label,
            free_ports=self.pool.available(),
            streams=len(self.registry),
            policy=self.policy.describe(),
        )

    def addresses(self) -> frozenset[IPAddress]:
        """This gateway's addresses now, read for every request: DHCP, SLAAC and VIPs add some
        while s2cs runs. psutil lists them in 0.05 ms (2 addresses) to 0.6 ms (100); parsing
        them costs as much again, so it is done only when the list changed."""
        found = tuple(address for address, _ in interfaces())
        listed, parsed = self._addresses  # one reference: a request running along reads a pair
        if found != listed:
            parsed = interface_addresses((address, None) for address in found)
            self._addresses = (found, parsed)
        return parsed

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
        place = self._place(sid, len(req.receiver_ports))
        listeners = tuple(
            ListenerSpec(place.inbound_bind, port, req.remote_ip, target)
            for port, target in zip(place.ports, req.receiver_ports, strict=True)
        )
        advertised = tuple(hostport(place.advertise, port) for port in place.ports)
        session = self._session(uid, sid, "inbound", who, listeners, advertised, req.limits)
        session.node = place.node
        self._launch(session, grant)
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
        place = self._place(sid, len(req.remote_listeners), req.receiver_ports, entry=req.bind_ip)
        bind = place.entry
        listeners = tuple(
            ListenerSpec(bind, port, remote.ip, remote.port)
            for port, remote in zip(place.ports, req.remote_listeners, strict=True)
        )
        advertised = tuple(hostport(bind, port) for port in place.ports)  # where it really listens
        session = self._session(req.uid, sid, "outbound", who, listeners, advertised, req.limits)
        session.node = place.node
        self._launch(session, grant)
        return ok(
            uid=req.uid, role="outbound", listeners=list(advertised), bind=bind, **self._limits(req.limits)
        )

    def release(self, uid: str, who: Identity | None) -> dict[str, Any]:
        with self.registry.lock:
            sessions = self._visible(self.registry.of_uid(uid), who)
            if not sessions:
                raise NotFound(f"no stream {short(uid)} on this server (already released?)")
            # A session still starting is its request's: releasing it now would free its ports
            # under it (maybe twice, once they are another stream's) or delete its directory
            # while it spawns there. The request answers within START_TIMEOUT or so.
            starting = [s for s in sessions if s.phase == Phase.STARTING]
            if starting:
                raise Conflict(
                    f"stream {short(uid)} is still starting its {starting[0].role} proxy here; "
                    "release it once that request has answered"
                )
            for session in sessions:
                session.phase = Phase.RELEASING  # a second release now finds nothing
        for session in sessions:
            self._discard(session)
            log.info("%s: released", session.label)
        return ok(uid=uid, released=[s.role for s in sessions])

    def status(self, uid: str | None, who: Identity | None, log: bool = False) -> dict[str, Any]:
        """`log`: with the last lines of each process's log too (for one stream, its owner's)."""
        if uid is not None:
            sessions = self._visible(self.registry.of_uid(uid), who)
            if not sessions:
                raise NotFound(f"no stream {short(uid)} on this server")
            return ok(streams=[self._describe(s, full=True, log=log) for s in sessions])
        if self.auth.enabled:
            everyone = self._admin(who)
            mine = [s for s in self.registry.all() if everyone or (who is not None and s.owner == who.id)]
            return ok(streams=[self._describe(s, full=True) for s in mine])
        # Without authentication everybody is anonymous: holding the UID is the only proof of
        # ownership, so a listing must not hand UIDs out.
        return ok(streams=[self._describe(s, full=False) for s in self.registry.all()])

    # --- helpers ---------------------------------------------------------------------------------

    def _place(self, sid: str, count: int, requested: Sequence[int] = (), entry: str | None = None) -> Place:
        """`requested` ports, else `count` free ones, for session `sid`, on this host; `entry`:
        the plain entry address an outbound request names (entry_address), checked first."""
        chosen = entry_address(entry, self.entry_ips)
        ports = self.pool.reserve(count, requested, owner=sid)
        return Place(ports, self.settings.listener_ip, self.inbound_bind, entry=chosen)

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
        caps = self.backend.capabilities
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

    def _spec(self, session: Session) -> ProxySpec:
        rate_bytes = rate_bytes_per_second(session.limits.rate)
        # A plain entry admits the sources of the policy in force when its proxy is configured.
        sources = tuple(str(rule.network) for rule in self.policy.sources)
        return self.backend.spec(
            session.sid, session.role, session.listeners, session.limits.num_conn, rate_bytes, sources
        )

    def _prepare(self, session: Session, files: SessionFiles) -> list[Launch]:
        return self.backend.prepare(session.uid, self._spec(session), files)

    def _process(self, session: Session, files: SessionFiles, launch: Launch) -> ProxyProcess:
        def spawned(handle: Handle) -> None:
            proc.handle = handle  # as the process will hold it once spawn returns: record it now
            self._persist(session)

        proc = ProxyProcess(
            f"{session.label} {launch.name}",
            launch.name,
            launch.argv,
            files.directory,
            files.directory / f"{launch.name}.log",
            launch.ready,
            cast(Runtime, _Recording(self.runtime, spawned)),
            on_change=lambda proc: self._persist(session),
        )
        return proc

    def _launch(self, session: Session, grant: Grant) -> None:
        try:
            with self.registry.lock:  # counted and added at once: two requests cannot both pass
                within_quota(grant, [s for s in self.registry.all() if s.owner == session.owner], session)
                self.registry.add(session)
        except ScistreamError:
            self.pool.release(session.ports, owner=session.sid)
            raise
        try:
            files = SessionFiles(self.state.session_dir(session.sid))
            files.directory.mkdir(mode=0o700)
            # Before any process: the shaper may start, and listen in run/, while another thread
            # still writes the proxy's config (below).
            files.run.mkdir(mode=0o700)
            spec = self._spec(session)
            session.procs = [
                self._process(session, files, launch) for launch in self.backend.launches(spec, files)
            ]
            # All at once, then each waited for: the request takes as long as the slowest. None
            # needs the other to be up to start (each connects to the other only when a
            # connection comes), and none is reachable before the reply names its ports. The
            # proxy's config is written and checked by the proxy itself (haproxy -c: about 20 ms)
            # in a thread, while this one records the session and starts the shaper, a Python
            # process; the proxy starts once its config passed.
            checked = self._checks.submit(self.backend.write_config, session.uid, spec, files)
            try:
                # Before a spawn: a crash now still leaves a trace of these ports.
                self._persist(session, strict=True)
                for proc in session.procs:
                    if proc.kind != "proxy":
                        proc.launch()
            finally:
                checked.exception()  # waited for in any case: the release below removes its files
            checked.result()
            for proc in session.procs:
                if proc.kind == "proxy":
                    proc.launch()
            for proc in session.procs:
                proc.wait_started()
                self.supervisor.add(proc)
        except BaseException as exc:
            self.registry.remove(session)
            self._discard(session)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # What the user can act on, not INTERNAL: only this request's files were touched.
                raise BackendFailed(
                    f"the disk of the state dir {self.state.path} is full ({exc.strerror}): free space "
                    "there, then try again; the streams running now are not affected"
                ) from None
            raise
        with self.registry.lock:
            session.phase = Phase.ACTIVE  # from now on a release may end it
        self._persist(session)  # and a restarted s2cs keeps it: its request is answered
        log.info(
            "%s: %s -> %s, %d connection(s), %s",
            session.label,
            ", ".join(session.advertised),
            ", ".join(hostport(lst.target_ip, lst.target_port) for lst in session.listeners),
            session.limits.num_conn,
            format_rate(session.limits.rate),
        )

    def _discard(self, session: Session) -> None:
        """Stop the processes, delete the session's files (its key among them), free its ports."""
        session.phase = Phase.RELEASING
        self._persist(session)  # first: should s2cs die meanwhile, the next one finishes the release
        files = SessionFiles(self.state.session_dir(session.sid))
        stats = self.backend.stats(files) if session.procs else None
        self.note_refused(session, stats)
        with self._refused_lock:
            self._refused.pop(session.sid, None)
        for proc in reversed(session.procs):  # the proxy first, then what it connects through
            self.supervisor.remove(proc)
            proc.stop()
        if stats:
            log.info(
                "%s: carried %d connection(s), %d bytes in, %d bytes out",
                session.label,
                stats.total_connections,
                stats.bytes_in,
                stats.bytes_out,
            )
        shutil.rmtree(files.directory, ignore_errors=True)
        self.registry.remove(session)
        self.pool.release(session.ports, owner=session.sid)
        self._persist(session)

    def _watch_entries(self) -> None:
        """Every ENTRY_LOOK seconds, what the plain entries refused since the last look, in the log."""
        while not self._entry_watch.wait(ENTRY_LOOK):
            for session in self.registry.all():
                if session.role == "outbound" and session.phase == Phase.ACTIVE:
                    files = SessionFiles(self.state.session_dir(session.sid))
                    self.note_refused(session, self.backend.stats(files))

    def note_refused(self, session: Session, stats: Stats | None) -> None:
        """Log the connections a session's plain entry refused since they were last logged: one
        line, naming the stream by its prefix; the proxy's (or shaper's) log has each source."""
        if stats is None or session.role != "outbound":
            return
        with self._refused_lock:
            before = self._refused.get(session.sid, 0)
            self._refused[session.sid] = stats.refused  # lower after a restart: counted from 0 again
        if stats.refused > before:
            log.warning(
                "%s: its plain entry refused %d connection(s) from sources that are not allowed "
                "(%d in all; s2cs --allow-sources, policy sources)",
                session.label,
                stats.refused - before,
                stats.refused,
            )

    def _persist(self, changed: Session | None = None, strict: bool = False) -> None:
        """Save every session in state.json. A request fails when that cannot be done (strict); a
        change the supervisor noticed is only logged, in one line: its stream runs on.

        Only the record of the session that `changed` is built again (of every session when None):
        each change to a session is followed by a save that names it, so the others are as they
        were last saved. Building all of them at every save cost a request more with every live
        stream, in time and in garbage for the collector (at 100 streams, 2 ms a request and a
        collection of every generation now and then)."""
        with self._save_lock:
            records = {}
            for session in self.registry.all():
                record = self._records.get(session.sid)
                if record is None or changed is None or session is changed:
                    record = session.to_record()
                records[session.sid] = record
            self._records = records
            try:
                self.state.save(list(records.values()))
            except OSError as exc:
                if strict:
                    raise
                log.error("cannot write %s: %s", self.state.file, exc.strerror or exc)

    def failure_counts(self) -> list[tuple[Session, dict[str, int]]]:
        """Every session with its failed connections so far by kind (diagnosis.KINDS), for the
        metrics. Counted from what its logs said since this s2cs first looked, beginning with
        the newest 64 KiB of each: they only grow while this s2cs runs."""
        return [(session, self._tally(session).by_kind()) for session in self.registry.all()]

    def _tally(self, session: Session) -> Tally:
        """What the logs of the session's processes have told of failures, read up to now."""
        targets = [hostport(lst.target_ip, lst.target_port) for lst in session.listeners]
        watches = []
        with self._watch_lock:
            for proc in session.procs:
                watch = self._watches.get(proc)
                if watch is None:
                    watch = self._watches[proc] = LogWatch(proc.log_path, session.role, targets)
                watches.append(watch)
        return merge(watch.look() for watch in watches)

    def _describe(self, session: Session, full: bool, log: bool = False) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "uid": session.uid if full else short(session.uid),
            "role": session.role,
            "state": str(session.state),
            "listeners": list(session.advertised),
            "created": session.created,
            "restarts": session.restarts,
            **self._limits(session.limits),
        }
        if full:
            entry["targets"] = [hostport(lst.target_ip, lst.target_port) for lst in session.listeners]
            entry["processes"] = [
                {"name": p.kind, "pid": p.pid, "state": str(p.state), "restarts": p.restarts}
                for p in session.procs
            ]
            if log:
                for shown, proc in zip(entry["processes"], session.procs, strict=True):
                    shown["log"] = last_lines(proc.log_path)
            errors = [f"{p.kind}: {p.last_error}" for p in session.procs if p.state == State.FATAL]
            if errors:
                entry["last_error"] = "\n".join(errors)
            # Why connections failed, in plain words: only its owner sees the addresses.
            entry["failures"] = [f.as_dict() for f in self._tally(session).failures()]
        stats = self.backend.stats(SessionFiles(self.state.session_dir(session.sid)))
        self.note_refused(session, stats)
        if stats is not None:
            if session.role == "outbound":
                entry["refused_sources"] = stats.refused
            entry.update(
                connections=stats.connections,
                total_connections=stats.total_connections,
                bytes_in=stats.bytes_in,
                bytes_out=stats.bytes_out,
            )
        return entry
