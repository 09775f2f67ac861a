"""The one seam between the supervisor and the operating system.

Spawning, signalling, finding a process again and the clock all go through `System`, so unit tests
can drive the supervisor's state machine with a fake one while integration tests run real proxies.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil


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

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()


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


class System(Protocol):
    def spawn(self, argv: Sequence[str], cwd: Path, log: Path) -> Handle: ...

    def adopt(self, pid: int, create_time: float, argv: Sequence[str]) -> Handle | None: ...

    def signal(self, handle: Handle, sig: int) -> None: ...

    def listening(self, handle: Handle, endpoints: Sequence[int | str]) -> bool: ...

    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


_HAPROXY_TEMP = re.compile(r"\.\d+\.tmp$")


class RealSystem:
    def spawn(self, argv: Sequence[str], cwd: Path, log: Path) -> Handle:
        # Append: a restarted proxy's log keeps the lines that explain why it died.
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,  # a file, never a pipe: a proxy must not block on its own logging
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group; survives a killed s2cs
                close_fds=True,
            )
        try:
            create_time = psutil.Process(popen.pid).create_time()
        except psutil.NoSuchProcess:
            create_time = 0.0
        return ChildHandle(popen, create_time)

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
            conns = psutil.Process(handle.pid).net_connections(kind="all")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        bound: set[int | str] = set()
        for c in conns:
            if c.family == socket.AF_UNIX:
                # psutil gives Unix sockets no state; bind and listen come together. HAProxy binds
                # PATH.PID.tmp and renames it to PATH, and the kernel keeps the name of the bind.
                path = _HAPROXY_TEMP.sub("", str(c.laddr))
                if path == str(c.laddr) or os.path.exists(path):
                    bound.add(path)
            elif c.status == psutil.CONN_LISTEN:
                bound.add(c.laddr.port)
        return set(endpoints) <= bound

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def processes_using(directory: Path) -> list[psutil.Process]:
    """Processes whose command line names a file below `directory`: the proxies and shapers of a
    state dir, found without trusting any pid file."""
    marker = str(directory) + "/"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if any(marker in arg for arg in cmdline):
            found.append(process)
    return found


def terminate(system: System, handle: Handle, grace: float) -> None:
    """SIGTERM to the process group, a bounded wait, then SIGKILL; returns once it has ended."""
    if handle.poll() is not None:
        return
    system.signal(handle, signal.SIGTERM)
    deadline = system.now() + grace
    while handle.poll() is None and system.now() < deadline:
        system.sleep(0.02)
    if handle.poll() is None:
        system.signal(handle, signal.SIGKILL)
        deadline = system.now() + 5
        while handle.poll() is None and system.now() < deadline:
            system.sleep(0.02)
