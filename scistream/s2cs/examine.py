"""The shell of `s2cs --check`: gather the facts doctor.py judges, touching nothing.

Nothing is started, created or written: a state dir that does not exist is reported as one s2cs
would create, a certificate s2cs would generate as such, and the state dir's lock is probed with a
non-blocking shared flock that is let go at once (it cannot take the lock from an s2cs that holds
it, and takes nothing for longer than the probe). The only processes run are the proxies' own
version and config checks, as at every start (preflight.py), in a scratch directory.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import ipaddress
import os
import pwd
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import typer

from ..errors import ConfigError
from ..protocol import hostport
from ..s2ds import preflight, sockdiag
from ..s2ds.backend import Backend
from ..s2ds.containers import DockerRuntime
from ..s2ds.haproxy import HaproxyBackend
from ..s2ds.runtime import Runtime, SpawnFailed
from ..s2ds.stunnel import StunnelBackend
from . import doctor, tuning
from .certs import check_pair
from .doctor import Check, DirFacts, Proxy, Status
from .gateway import Settings, entry_addresses, inbound_bind, port_is_free
from .policy import Policy
from .server import MAX_CLIENTS
from .state import StateDir
from .tuning import HostTuning, NetworkPath


@dataclass(frozen=True)
class Setup:
    """The options of one s2cs, parsed as its start parses them, and the start's own builders."""

    settings: Settings
    kind: str  # the backend of --type
    port: int
    control_ip: str | None
    server_crt: Path | None
    server_key: Path | None
    client_id: str | None
    secret_given: bool
    auth_scope: str | None
    metrics: tuple[str, int] | None  # --metrics-address and --metrics-port, when given
    backend: Callable[[str], Backend]  # make_backend, for either kind
    runtime: Runtime  # where the proxies would run: made, not yet used
    policy: Callable[[], Policy]  # make_policy with these options; ConfigError when it is wrong
    swarm: Callable[[], str] | None = None  # --runtime swarm: what the swarm is, or ConfigError
    path: NetworkPath | None = None  # --path-rtt and --path-rate: what the host tuning is judged for


def main(setup: Setup, json: bool) -> int:
    checks = examine(setup)
    typer.echo(doctor.as_json(checks) if json else doctor.table(checks), nl=False)
    return int(doctor.exit_status(checks))


def examine(setup: Setup) -> list[Check]:
    settings = setup.settings
    checks, selected = _proxies(setup)
    checks.append(_templates(selected, setup.kind))
    state = _state(settings.state_dir)
    listening = _listening()
    checks.append(_own_port("control port", setup.control_ip, setup.port, "--port", listening, state.s2cs))
    checks.append(_port_range(settings, listening, state.ports, state.pids | state.s2cs))
    if setup.metrics is not None:
        address, port = setup.metrics
        checks.append(_own_port("metrics port", address, port, "--metrics-port", listening, state.s2cs))
    checks.append(_certificate(setup, state.usable))
    checks += state.checks
    if isinstance(setup.runtime, DockerRuntime):
        try:
            checks.append(doctor.docker_check(setup.runtime.check(), True))
        except SpawnFailed as exc:
            checks.append(doctor.docker_check(str(exc), False))
    if setup.swarm is not None:
        try:
            checks.append(doctor.swarm_check(setup.swarm(), True))
        except ConfigError as exc:
            checks.append(doctor.swarm_check(exc.message, False))
    checks.append(doctor.readiness_check(sockdiag.probe()))
    checks.append(_auth(setup))
    try:
        checks.append(doctor.policy_check(setup.policy()))
    except ConfigError as exc:
        checks.append(doctor.policy_check(exc.message))
    first, last = settings.port_range
    checks += tuning.checks(_host_tuning(), setup.path, last - first + 1, MAX_CLIENTS)
    return checks


@dataclass(frozen=True)
class _StateView:
    """What the state dir shows to a look that changes nothing."""

    checks: list[Check]  # the state dir, its lock, the streams it records
    usable: Path | None  # the state dir, when it exists and can be read
    s2cs: set[int]  # the pid of the s2cs that holds it
    pids: set[int]  # the processes state.json records
    ports: set[int]  # their listener ports


def _state(path: Path) -> _StateView:
    try:
        state = StateDir(path)
    except ConfigError as exc:
        return _StateView(
            [Check("state dir", Status.FAIL, exc.message, "choose another --state-dir")],
            None,
            set(),
            set(),
            set(),
        )
    facts = _dir_facts(state.path)
    checks = [doctor.state_dir_check(facts, _user(os.geteuid()))]
    if facts.kind == "missing" and not facts.blocker:  # nothing in it yet, the certificate neither
        return _StateView(checks, state.path, set(), set(), set())
    if facts.kind != "dir" or facts.error:
        return _StateView(checks, None, set(), set(), set())
    held, holder, error = _lock(state.lock_file)
    checks.append(doctor.lock_check(str(state.lock_file), held, holder, error))
    try:
        recorded = state.load()
    except ConfigError as exc:
        recorded = []
        checks.append(doctor.streams_check(str(state.file), 0, exc.message))
    else:
        checks.append(doctor.streams_check(str(state.file), len(recorded)))
    pids, ports = _recorded_processes(recorded)
    s2cs = {int(holder)} if held and holder.isdigit() else set()
    return _StateView(checks, state.path, s2cs, pids, ports)


# --- the proxies -------------------------------------------------------------------------------


def _proxies(setup: Setup) -> tuple[list[Check], Backend | None]:
    checks, selected = [], None
    for kind in ("haproxy", "stunnel"):
        try:
            backend = setup.backend(kind)
        except ConfigError as exc:
            checks.append(doctor.proxy_check(kind, kind == setup.kind, exc.message))
            continue
        path = backend.binary if isinstance(backend, HaproxyBackend | StunnelBackend) else backend.name
        found = Proxy(path, backend.version, backend.capabilities)
        checks.append(doctor.proxy_check(kind, kind == setup.kind, found))
        if kind == setup.kind:
            selected = backend
    return checks, selected


def _templates(backend: Backend | None, kind: str) -> Check:
    if backend is None:
        return Check(
            "templates",
            Status.WARN,
            f"not checked: there is no {kind} to check them with",
            f"see the {kind} check",
        )
    try:
        preflight.check(backend)
    except ConfigError as exc:
        return Check(
            "templates",
            Status.FAIL,
            exc.message,
            "correct the template at the line named, or remove it from --templates to use the shipped one",
        )
    where = backend.templates.get_template(backend.template).filename or backend.template
    return Check("templates", Status.OK, f"{where}: {backend.version} accepts what it renders")


# --- ports ---------------------------------------------------------------------------------------


def _listening() -> dict[int, set[int | None]]:
    """Port -> pids of the processes listening on it (None where this user may not know)."""
    found: dict[int, set[int | None]] = {}
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return found
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr:
            found.setdefault(conn.laddr.port, set()).add(conn.pid)
    return found


def _holder(port: int, listening: dict[int, set[int | None]]) -> str:
    named = []
    for pid in sorted(p for p in listening.get(port, set()) if p is not None):
        try:
            named.append(f"{psutil.Process(pid).name()} (pid {pid})")
        except psutil.Error:
            named.append(f"pid {pid}")
    return f"in use by {', '.join(named)}" if named else "in use"


def _held_by(port: int, listening: dict[int, set[int | None]], pids: set[int]) -> bool:
    holders = listening.get(port, set())
    return bool(holders) and holders <= pids


def _own_port(
    name: str,
    address: str | None,
    port: int,
    option: str,
    listening: dict[int, set[int | None]],
    s2cs: set[int],
) -> Check:
    """A port s2cs listens on itself; free, or held by the s2cs of this state dir."""
    where = hostport(address, port) if address else f"port {port} of every interface"
    busy = None if _free(address, port) else _holder(port, listening)
    return doctor.port_check(name, where, busy, _held_by(port, listening, s2cs), option)


def _bind_error(address: str, port: int) -> int | None:
    """The errno binding `address`:`port` gets, as a proxy would bind it (SO_REUSEADDR); None: free."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            return exc.errno or errno.EADDRINUSE
    return None


def _free(address: str | None, port: int) -> bool:
    """As the server binds: `address`, or every interface (IPv4 and IPv6) when None."""
    return port_is_free(port) if address is None else _bind_error(address, port) is None


def _port_range(
    settings: Settings, listening: dict[int, set[int | None]], recorded: set[int], pids: set[int]
) -> Check:
    try:
        bind = inbound_bind(settings)
    except ConfigError as exc:
        return Check("port range", Status.FAIL, exc.message, "give --bind-ip an address of this host")
    try:
        entry_addresses(settings)  # where outbound proxies listen, in the same range
    except ConfigError as exc:
        return Check("port range", Status.FAIL, exc.message, "give --entry-ip an address of this host")
    first, last = settings.port_range
    busy: dict[int, str] = {}
    for port in range(first, last + 1):
        error = _bind_error(bind, port)
        if error is None and port_is_free(port):  # free on every address, as the port pool asks
            continue
        if error in (errno.EACCES, errno.EPERM):
            busy[port] = "need root or CAP_NET_BIND_SERVICE (ports below 1024)"
        elif error not in (None, errno.EADDRINUSE):
            busy[port] = f"cannot be bound: {os.strerror(error)}"
        else:
            busy[port] = _holder(port, listening)
    # A recorded stream's port counts as its own when what listens there is one of its processes
    # (or this user cannot see who does).
    ours = {
        port
        for port in recorded & set(busy)
        if not {p for p in listening.get(port, set()) if p is not None} - pids
    }
    return doctor.port_range_check(settings.port_range, bind, busy, ours)


# --- the certificate -----------------------------------------------------------------------------


def _certificate(setup: Setup, state: Path | None) -> Check:
    now = datetime.datetime.now(datetime.UTC)
    ip = setup.settings.listener_ip
    crt, key = setup.server_crt, setup.server_key
    if crt and key:
        try:
            pem = crt.read_bytes()
        except OSError as exc:
            return Check("certificate", Status.FAIL, f"cannot read {crt}: {exc.strerror}", "make it readable")
        # Its dates and names first: s2cs refuses an expired pair too, and this says what to do.
        verdict = doctor.certificate_check(pem, str(crt), now, ip, generated=False)
        if verdict.status is Status.FAIL:
            return verdict
        try:
            check_pair(crt, key)
        except ConfigError as exc:
            return Check(
                "certificate", Status.FAIL, exc.message, "give --server-crt and --server-key a usable pair"
            )
        return verdict
    if crt or key:
        return Check(
            "certificate",
            Status.FAIL,
            "only one of --server-crt and --server-key is given",
            "give both, or neither to use a generated pair",
        )
    if state is None:
        return Check(
            "certificate", Status.WARN, "not checked: the state dir cannot be used", "see the state dir check"
        )
    crt, key = state / "server.crt", state / "server.key"
    if not crt.exists() and not key.exists():
        return Check(
            "certificate",
            Status.OK,
            f"none given, none in the state dir yet: s2cs generates {crt} at start "
            "(give users that file: s2uc --server_cert)",
        )
    try:
        check_pair(crt, key)
    except ConfigError as exc:
        return Check(
            "certificate",
            Status.WARN,
            f"the generated pair is unusable ({exc.message}): s2cs generates a new one at start",
            f"give users the new {crt} once s2cs has started",
        )
    return doctor.certificate_check(crt.read_bytes(), str(crt), now, ip, generated=True)


# --- the state dir -------------------------------------------------------------------------------


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _dir_facts(path: Path) -> DirFacts:
    shown = str(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        return DirFacts(shown, "missing", blocker=_blocker(path))
    except NotADirectoryError:
        return DirFacts(shown, "missing", blocker="a part of that path is a file")
    except OSError as exc:
        return DirFacts(shown, "dir", error=f"cannot look it up: {exc.strerror}")
    if not path.is_dir():
        return DirFacts(shown, "other")
    facts = DirFacts(shown, "dir", owner=_user(info.st_uid), mode=info.st_mode)
    try:
        os.listdir(path)  # a real read: as root, mode bits alone say nothing
    except OSError as exc:
        return DirFacts(shown, "dir", facts.owner, facts.mode, error=f"cannot read it: {exc.strerror}")
    if not os.access(path, os.W_OK | os.X_OK):
        return DirFacts(shown, "dir", facts.owner, facts.mode, error="cannot write in it: Permission denied")
    return facts


def _blocker(path: Path) -> str:
    """Why `path`, which does not exist, could not be made; "" when it could."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{_user(os.geteuid())} may not create anything in {parent}"
    return ""


def _lock(lock_file: Path) -> tuple[bool, str, str]:
    """(held, the pid the file names, why it could not be probed)."""
    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_CLOEXEC)  # never created here
    except FileNotFoundError:
        return False, "", ""
    except OSError as exc:
        return False, "", exc.strerror or str(exc)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, os.read(fd, 32).decode("ascii", "replace").strip(), ""
        except OSError as exc:
            return False, "", exc.strerror or str(exc)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, "", ""
    finally:
        os.close(fd)


def _recorded_processes(records: list[dict[str, Any]]) -> tuple[set[int], set[int]]:
    """(pids, listener ports) that state.json records; malformed entries are the start's to judge."""
    pids: set[int] = set()
    ports: set[int] = set()
    for record in records:
        for process in record.get("processes") or []:
            if isinstance(process, dict) and isinstance(process.get("pid"), int):
                pids.add(process["pid"])
        for listener in record.get("listeners") or []:
            if isinstance(listener, list) and len(listener) > 1 and isinstance(listener[1], int):
                ports.add(listener[1])
    return pids, ports


# --- the host's tuning ----------------------------------------------------------------------------


def _sysctl(name: str) -> str | None:
    """A sysctl's value as /proc/sys shows it; None where this network namespace does not."""
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return None


def _numbers(name: str) -> tuple[int, ...] | None:
    text = _sysctl(name)
    try:
        return tuple(int(n) for n in text.split()) if text else None
    except ValueError:
        return None


def _autotuning(name: str) -> tuple[int, int, int] | None:
    """min, default, max of net.ipv4.tcp_rmem or tcp_wmem."""
    found = _numbers(name)
    return (found[0], found[1], found[2]) if found and len(found) == 3 else None


def _host_tuning() -> HostTuning:
    rmem, wmem = _numbers("net.core.rmem_max"), _numbers("net.core.wmem_max")
    nr_open = _numbers("fs.nr_open")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return HostTuning(
        rmem_max=rmem[0] if rmem else None,
        wmem_max=wmem[0] if wmem else None,
        tcp_rmem=_autotuning("net.ipv4.tcp_rmem"),
        tcp_wmem=_autotuning("net.ipv4.tcp_wmem"),
        congestion_control=_sysctl("net.ipv4.tcp_congestion_control") or None,
        available_congestion_control=tuple(
            (_sysctl("net.ipv4.tcp_available_congestion_control") or "").split()
        ),
        default_qdisc=_sysctl("net.core.default_qdisc") or None,
        open_files=None if hard == resource.RLIM_INFINITY else hard,
        nr_open=nr_open[0] if nr_open else None,
    )


# --- authentication ------------------------------------------------------------------------------


def _auth(setup: Setup) -> Check:
    scope = setup.auth_scope
    if setup.client_id and setup.secret_given and scope is None:
        from .auth import default_scope  # loads globus-sdk, as authentication does

        scope = default_scope(setup.client_id)
    return doctor.auth_check(setup.client_id, setup.secret_given, scope, setup.port)
