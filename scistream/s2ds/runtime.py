"""The one seam between the supervisor and the operating system.

Spawning, signalling, finding a process again and the clock all go through `Runtime`, so unit tests
can drive the supervisor's state machine with a fake one while integration tests run real proxies.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import psutil

from .logfiles import append_log
from .sockdiag import (
    probe,
    socket_inodes,
    tcp_listeners,
    unix_listener,
    unix_listener_files,
    unix_listeners,
)

log = logging.getLogger(__name__)


class Handle(Protocol):
    """A running (or finished) proxy process."""

    @property
    def pid(self) -> int: ...

    @property
    def create_time(self) -> float: ...

    def poll(self) -> int | None:
        """The exit status once it has ended (-1 when unknown), else None."""
        ...


@dataclass
class ChildHandle:
    """A process this s2cs started: it can be waited for, so its pid cannot be reused meanwhile."""

    popen: subprocess.Popen[bytes]
    create_time: float
    log: BinaryIO | None = None  # our copy of its log's open file, shared with it (keep_appending)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        code = self.popen.poll()
        if code is not None and self.log is not None:
            self.log.close()
            self.log = None
        return code


@dataclass
class AdoptedHandle:
    """A process an earlier s2cs started; identified by pid *and* start time, never by pid alone."""

    process: psutil.Process
    create_time: float

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def poll(self) -> int | None:
        try:
            if self.process.is_running() and self.process.status() != psutil.STATUS_ZOMBIE:
                return None
        except psutil.NoSuchProcess:
            return -1
        # Reap it if it happens to be our child (s2cs running as pid 1 in a container).
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, os.WNOHANG)
        return -1


class SpawnFailed(OSError):
    """A runtime could not start a process, for a reason it says in full (the engine's, say)."""


class Runtime(Protocol):
    """Where a session's processes run: `ProcessRuntime` (here) or `DockerRuntime` (containers.py)."""

    name: str

    def spawn(
        self, argv: Sequence[str], cwd: Path, log: Path, recorded: Callable[[Handle], None] = lambda _: None
    ) -> Handle:
        """Start `argv`; `recorded` is called with its handle before the program runs (s2cs
        writes it to state.json there), and the program never runs if that fails."""
        ...

    def adopt(self, pid: int, create_time: float, argv: Sequence[str]) -> Handle | None: ...

    def unrecorded(self, wanted: Sequence[tuple[Path, Sequence[str]]]) -> list[Handle | None]:
        """For each (session dir, argv) of `wanted`: the process running `argv` that this runtime
        started for that session and whose record never reached state.json (restarted while its
        disk was full), adopted; None when there is none, or more than one (the sweep stops them
        then). All at once: a start after a reboot asks for every recorded process."""
        ...

    def signal(self, handle: Handle, sig: int) -> None: ...

    def listening(self, handle: Handle, endpoints: Sequence[int | str]) -> bool: ...

    def keep_appending(self, handle: Handle) -> bool:
        """Whether the process's log descriptor appends, after giving O_APPEND back if it was taken."""
        ...

    def sweep(self, sessions: set[str], running: Collection[int] = (), where: Path | None = None) -> None:
        """Stop what this runtime started for the state dir whose sessions are in `where` and that
        s2cs does not run now: of sessions other than these (their sids), or of these but none
        of the `running` pids (started while state.json could not be written)."""
        ...

    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


_HAPROXY_TEMP = re.compile(r"\.\d+\.tmp$")

# s2cs takes its Globus client secret from the environment (SCISTREAM_CLIENT_SECRET); its proxies
# and shapers need no secret of it, and a copy in each of them is one more place to leak from
# (a core dump, /proc/PID/environ of a proxy running as another user, a support bundle).
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|^GLOBUS_", re.IGNORECASE)


def proxy_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment a proxy or shaper gets: s2cs's own without anything that names a secret."""
    return {name: value for name, value in environ.items() if not _SECRET_NAME.search(name)}


# A process waits at its start for the go of the s2cs that started it, once that s2cs has recorded
# it (state.json), and runs its program in place of the wait (same pid and start time, and the
# command line s2cs recorded). A proxy that ran before it was recorded, its s2cs killed in between,
# ran on unknown to the next s2cs and kept its port (seen on a busy machine).
# And it carries its session's directory in its environment: should its record never reach
# state.json (a full disk), the next s2cs still finds it (sweep). A command line would not do:
# an operator's `tail -f` of a proxy's log names the session's directory too.
SESSION_MARK = "SCISTREAM_SESSION_DIR"
STRAY_GRACE = 5.0  # seconds a stray process has to end on SIGTERM
GATE = ("/bin/sh", "-c", 'read go && exec "$@" </dev/null', "scistream-gate")


def _runnable(program: str) -> None:
    """The error Popen raises for a program that cannot be run, before the gate is started."""
    found = shutil.which(program)
    if found is None:
        what = program if os.sep in program else f"{program} (not on PATH)"
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), what)


class ProcessRuntime:
    name = "process"

    def spawn(
        self, argv: Sequence[str], cwd: Path, log: Path, recorded: Callable[[Handle], None] = lambda _: None
    ) -> Handle:
        # Append: a restarted proxy's log keeps the lines that explain why it died. And O_APPEND
        # lets the supervisor empty a full log under the running proxy (rotate_log); our copy
        # of the open file is kept to give O_APPEND back if the proxy takes it (keep_appending).
        # Never through a link planted in its place (logfiles.py): s2cs may be root.
        _runnable(argv[0])  # as Popen would, though the gate below runs it later
        out = append_log(log)  # it lives as long as the process, in its handle
        gate, go = os.pipe()
        try:
            popen = subprocess.Popen(
                [*GATE, *argv],
                cwd=cwd,
                env={**proxy_environment(os.environ), SESSION_MARK: str(cwd)},
                stdin=gate,
                stdout=out,  # a file, never a pipe: a proxy must not block on its own logging
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group; survives a killed s2cs
                close_fds=True,
            )
        except BaseException:
            out.close()
            os.close(go)
            raise
        finally:
            os.close(gate)
        try:
            create_time = psutil.Process(popen.pid).create_time()
        except psutil.NoSuchProcess:
            create_time = 0.0
        handle = ChildHandle(popen, create_time, out)
        with open(go, "wb", buffering=0) as gone:
            # The program runs once the go is written; if the record fails, or s2cs dies before,
            # the gate reads the end of the pipe and exits, and the program never runs.
            try:
                recorded(handle)
            except BaseException:
                gone.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(STRAY_GRACE)
                handle.poll()  # our copy of its log is closed with it
                raise
            gone.write(b"go\n")
        return handle

    def keep_appending(self, handle: Handle) -> bool:
        """HAProxy makes its log descriptor non-blocking with its first line, with an F_SETFL
        that clears O_APPEND (on the open file, which it shares with us); emptied then, the log
        would get its next line at the old offset, after a hole as large. So the flag is given
        back (once given back it stays): through our copy of the open file for a process we
        started; for one an earlier s2cs started, which most often got it back from that s2cs,
        through the process's own descriptor (pidfd_getfd) if it is missing.
        False when the descriptor does not append and cannot be made to."""
        if isinstance(handle, ChildHandle):
            return handle.log is not None and _append(handle.log.fileno())
        if not isinstance(handle, AdoptedHandle) or handle.poll() is not None:
            return False
        if _flags_of(handle.pid, 1) & os.O_APPEND:  # stdout: the log (spawn)
            return True
        try:
            same = abs(handle.process.create_time() - handle.create_time) < 0.05
        except psutil.NoSuchProcess:
            return False
        theirs = _descriptor_of(handle.pid, 1) if same else None
        if theirs is None:
            return False
        try:
            return _append(theirs)
        finally:
            os.close(theirs)

    def adopt(self, pid: int, create_time: float, argv: Sequence[str]) -> Handle | None:
        try:
            process = psutil.Process(pid)
            same = (
                abs(process.create_time() - create_time) < 0.05
                and process.cmdline() == list(argv)
                and process.status() != psutil.STATUS_ZOMBIE
            )
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return AdoptedHandle(process, create_time) if same else None

    def signal(self, handle: Handle, sig: int) -> None:
        if isinstance(handle, AdoptedHandle):
            # Check identity right before signalling: the pid may have been recycled.
            try:
                if abs(handle.process.create_time() - handle.create_time) >= 0.05:
                    return
            except psutil.NoSuchProcess:
                return
        elif handle.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(handle.pid, sig)

    def listening(self, handle: Handle, endpoints: Sequence[int | str]) -> bool:
        """Every TCP port listening, every Unix socket path bound, by this very process."""
        try:
            process = psutil.Process(handle.pid)
        except psutil.NoSuchProcess:
            return False
        return set(endpoints) <= bound_endpoints([process], endpoints)

    def unrecorded(self, wanted: Sequence[tuple[Path, Sequence[str]]]) -> list[Handle | None]:
        """By the mark it carries (SESSION_MARK) and its command line, which is the recorded one:
        the supervisor restarts a process as it was. One still in its gate has the gate's command
        line and is not taken: it waits for a go that will not come, and ends. One pass over the
        process table for all of `wanted` (a pass costs about 2 ms per 70 processes, and a start
        after a reboot asks for every process of every stream)."""
        if not wanted:
            return []
        keys = [(str(session_dir), tuple(argv)) for session_dir, argv in wanted]
        found: dict[tuple[str, tuple[str, ...]], list[psutil.Process]] = {key: [] for key in keys}
        for process in psutil.process_iter(["environ", "cmdline", "create_time"]):
            key = ((process.info["environ"] or {}).get(SESSION_MARK), tuple(process.info["cmdline"] or ()))
            if key in found:
                found[key].append(process)
        handles: list[Handle | None] = []
        for key, (_, argv) in zip(keys, wanted, strict=True):
            one = found[key]
            handle = self.adopt(one[0].pid, one[0].info["create_time"], argv) if len(one) == 1 else None
            handles.append(handle)
        return handles

    def sweep(self, sessions: set[str], running: Collection[int] = (), where: Path | None = None) -> None:
        """Every process this runtime started below `where` (it carries SESSION_MARK) that is not
        one of the `running`: a record of it never reached state.json, so no s2cs would stop it,
        and it holds its stream's port. Those of `sessions` too, unlike containers: a process
        has no name that the next start of its kind would take over (DockerRuntime.spawn)."""
        if where is None:
            return
        below = f"{where}{os.sep}"
        for process in psutil.process_iter(["environ"]):
            mark = (process.info["environ"] or {}).get(SESSION_MARK, "")
            if mark.startswith(below) and process.pid not in running:
                log.warning(
                    "stopping pid %d of session %s: no record of it (state.json could not be "
                    "written when it started)",
                    process.pid,
                    mark[len(below) :],
                )
                with contextlib.suppress(psutil.Error):
                    handle = AdoptedHandle(process, process.create_time())
                    terminate(self, handle, STRAY_GRACE)

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass(frozen=True)
class Readiness:
    """How this s2cs tells which sockets listen: the kernel's socket diagnostics (sockdiag.py), or
    psutil when they are unavailable, for `reason`."""

    netlink: bool
    reason: str = ""


_readiness: Readiness | None = None  # decided at the first look, once for the life of s2cs
_readiness_lock = threading.Lock()


def readiness() -> Readiness:
    """Netlink if its probe finds this process's own sockets, else psutil, said once in the log."""
    global _readiness
    with _readiness_lock:
        if _readiness is None:
            reason = probe()
            _readiness = Readiness(netlink=True) if reason is None else Readiness(False, reason)
            if reason is not None:
                log.warning(
                    "readiness: kernel socket diagnostics (netlink) unavailable (%s): psutil tells "
                    "which sockets listen instead, slower with many streams",
                    reason,
                )
        return _readiness


def bound_endpoints(
    processes: Sequence[psutil.Process], wanted: Collection[int | str] | None = None
) -> set[int | str]:
    """The TCP ports these processes listen on and the Unix socket paths they listen on: the
    listening sockets of this network namespace (sockdiag.py) that one of them holds open. With
    `wanted`, only those of them, and asked of the kernel by port and by inode, not by a dump of
    every listener of the host: what a request or the supervisor looks for again and again.
    Without the kernel's socket diagnostics, psutil's view of each process (`_psutil_bound`)."""
    if not readiness().netlink:
        seen = _psutil_bound(processes)
        return seen if wanted is None else seen & set(wanted)
    held: set[int] = set()
    for process in processes:
        held |= socket_inodes(process.pid)
    if not held:
        return set()
    if wanted is None:
        ports = {inode: port for inode, port in tcp_listeners().items() if inode in held}
        names = {inode: name for inode, name in unix_listeners().items() if inode in held}
    else:
        ports = {}
        for port in {w for w in wanted if isinstance(w, int)}:
            ports.update((inode, port) for inode in tcp_listeners(port) if inode in held)
        names = {}
        if any(isinstance(w, str) for w in wanted):
            for inode in held:
                name = unix_listener(inode)
                if name is not None:
                    names[inode] = name
    bound: set[int | str] = set(ports.values())
    bound.update(_renamed(name) for name in names.values())
    bound.discard("")
    return bound if wanted is None else bound & set(wanted)


def _renamed(name: str) -> str:
    """HAProxy binds PATH.PID.tmp and renames it to PATH, and the kernel keeps the name of the
    bind: PATH counts once the rename is done ("" until then)."""
    path = _HAPROXY_TEMP.sub("", name)
    return path if path == name or os.path.exists(path) else ""


def _psutil_bound(processes: Sequence[psutil.Process]) -> set[int | str]:
    """What psutil sees of these processes' sockets: every TCP port in LISTEN, and the path of
    every Unix stream socket bound to one. psutil reads /proc/net/tcp and /proc/net/tcp6, a line
    for every TCP socket of the host, so a look costs more with every stream the gateway
    carries; and it tells a Unix socket's path, not whether it listens (the proxies listen on it
    right after binding it)."""
    bound: set[int | str] = set()
    for process in processes:
        try:
            tcp = process.net_connections(kind="tcp")
            unix = process.net_connections(kind="unix")
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone, or not ours: never ready
            continue
        bound.update(c.laddr.port for c in tcp if c.status == psutil.CONN_LISTEN and c.laddr)
        for c in unix:
            if c.type == socket.SOCK_STREAM and isinstance(c.laddr, str) and c.laddr.startswith("/"):
                bound.add(_renamed(c.laddr))
    bound.discard("")
    return bound


def clear_stale_sockets(endpoints: Sequence[int | str]) -> list[str]:
    """Remove the Unix socket files among `endpoints` (what a process must listen on) that no
    process listens on any more: what a killed process leaves behind. stunnel binds its `accept`
    path as it finds it and fails on a file there ("Address already in use"), so a killed one
    could never start again; HAProxy and the shaper replace theirs, but start from the same
    clean slate. A file that a live socket is bound to is kept, whoever holds it (a process of
    an earlier s2cs that was not re-adopted): the new process then fails with its own words
    rather than taking the stream away from the live one. The listeners are those of this
    network namespace, which the docker runtime's containers share (host networking).
    Returns the paths removed; OSError when the kernel cannot say which sockets listen."""
    found = []
    for path in (e for e in endpoints if isinstance(e, str)):
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISSOCK(info.st_mode):
            found.append((path, (info.st_dev, info.st_ino)))
    if not found:
        return []  # a first start, in a new directory: no look at the kernel's sockets
    if readiness().netlink:
        live = unix_listener_files()
        stale = [path for path, file in found if file not in live]
    else:
        # psutil knows a Unix socket by the name it was bound with, not by its file: a file
        # whose name a live socket still bears is kept, as one it is bound to would be.
        try:
            names: set[str] = set()
            for c in psutil.net_connections(kind="unix"):
                if isinstance(c.laddr, str):
                    names.add(c.laddr)
        except psutil.Error as exc:
            raise OSError(f"psutil cannot list this host's Unix sockets: {exc}") from None
        stale = [path for path, _ in found if path not in names]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return stale


def _append(fd: int) -> bool:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_APPEND:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_APPEND)
    return True


def _flags_of(pid: int, fd: int) -> int:
    """The status flags of descriptor `fd` of process `pid`, as /proc shows them (0 if it cannot)."""
    try:
        for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0


_SYS_PIDFD_GETFD = 438  # the same number on every architecture Linux numbers alike (5.6 and later)


def _descriptor_of(pid: int, fd: int) -> int | None:
    """A copy of descriptor `fd` of process `pid` (pidfd_getfd(2)); None where not allowed (it
    needs the right to ptrace the process: root, or its owner as ptrace_scope allows)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
    try:
        copy = int(ctypes.CDLL(None, use_errno=True).syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0))
    except (AttributeError, OSError):
        return None
    finally:
        os.close(pidfd)
    return copy if copy >= 0 else None


def terminate(runtime: Runtime, handle: Handle, grace: float) -> None:
    """SIGTERM to the process group, a bounded wait, then SIGKILL; returns once it has ended."""
    if handle.poll() is not None:
        return
    runtime.signal(handle, signal.SIGTERM)
    deadline = runtime.now() + grace
    while handle.poll() is None and runtime.now() < deadline:
        runtime.sleep(0.02)
    if handle.poll() is None:
        runtime.signal(handle, signal.SIGKILL)
        deadline = runtime.now() + 5
        while handle.poll() is None and runtime.now() < deadline:
            runtime.sleep(0.02)
