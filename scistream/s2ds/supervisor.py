"""Supervision of proxy processes: one `ProxyProcess` per session, one `Supervisor` thread for all.

Lifecycle (as in Supervisor's process.py):

    STARTING -> RUNNING -> (EXITED -> BACKOFF -> STARTING) -> STOPPING -> STOPPED
                                    \\-> FATAL after MAX_FAST_FAILURES starts in a row that died young

RUNNING only once every listener port is listening. Every start is from a clean slate: a Unix
socket the dead process left where the new one must listen is removed first (a live one never).
A FATAL proxy keeps its ports reserved until
the session is released, and keeps the last lines of its log as the reason.
The log of a running process is bounded: rotated by size, a few parts kept (`LogBound`).
Everything touching the OS goes through `Runtime`, so the state machine runs under a fake clock in
the unit tests.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendFailed
from .logfiles import create_private, open_log_for_rotation, read_log, size_of
from .runtime import Handle, Runtime, SpawnFailed, clear_stale_sockets, terminate

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0  # seconds for a new proxy to listen on all its ports
START_SECONDS = 3.0  # a proxy that dies sooner after becoming RUNNING counts as a failed start
MAX_FAST_FAILURES = 5
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 8.0
STOP_GRACE = 5.0
TICK = 0.2
# How often a request looks whether its new processes listen: it waits for the look after they
# do, and one look (sockdiag.py) costs a fraction of a millisecond.
START_POLL = 0.005
# HAProxy logs every connection (option tcplog), stunnel and the shaper log too: once a process's
# log reaches LOG_MAX_BYTES it is copied to LOG.1 (LOG.1 to LOG.2, ...) and emptied, and the
# oldest of LOG_KEEP parts is dropped. Each process of a session keeps at most
# (1 + LOG_KEEP) x LOG_MAX_BYTES of log, 40 MiB, and what it writes in one TICK.
# `s2cs --log-max-bytes` sets the size.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_KEEP = 3


class State(enum.StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"


@dataclass(frozen=True)
class LogBound:
    """How large the log of a process may grow, and how many rotated parts of it are kept."""

    max_bytes: int = LOG_MAX_BYTES
    keep: int = LOG_KEEP

    def due(self, size: int) -> bool:
        return size >= self.max_bytes

    def renames(self, log: Path) -> list[tuple[Path, Path]]:
        """What makes room for a new LOG.1, in order: LOG.2 -> LOG.3, then LOG.1 -> LOG.2."""
        return [(rotated(log, i), rotated(log, i + 1)) for i in range(self.keep - 1, 0, -1)]


DEFAULT_LOGS = LogBound()


def rotated(log: Path, index: int) -> Path:
    return log.with_name(f"{log.name}.{index}")


def rotate_log(log: Path, bound: LogBound) -> None:
    """Copy a log to LOG.1 (LOG.1 to LOG.2, ...) and empty it.

    The process goes on writing to the descriptor ProcessRuntime.spawn gave it, which must append
    (Runtime.keep_appending): after the truncation its next line lands at the start of the emptied
    file, so no restart is needed (logrotate's copytruncate). Only a line written between the end
    of the copy and the truncation, microseconds, can be lost. If the copy fails (a full disk)
    the log is left whole and the OSError raised. No link planted for the log or its parts is
    followed (logfiles.py): a rename moves a link itself, never its target."""
    part = log.with_name(f".{log.name}.rotating")
    try:
        with open_log_for_rotation(log) as source, create_private(part) as copy:
            shutil.copyfileobj(source, copy, 1 << 20)  # up to the end, lines written meanwhile too
            copy.flush()
            os.ftruncate(source.fileno(), 0)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    for older, newer in bound.renames(log):
        if os.path.lexists(older):
            os.replace(older, newer)
    os.replace(part, rotated(log, 1))


def _last_lines(path: Path, limit: int) -> list[str]:
    try:
        with read_log(path) as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    # HAProxy opens every run with NOTICE lines on its version and path: not the reason.
    return [line.strip() for line in text.splitlines() if line.strip() and "[NOTICE]" not in line]


def log_tail(path: Path, lines: int = 5, limit: int = 16384) -> str:
    """The last lines a proxy wrote: its own words for why it failed, also when its log was
    rotated just before (then they are at the end of LOG.1)."""
    kept = _last_lines(path, limit)
    if len(kept) < lines:
        kept = _last_lines(rotated(path, 1), limit) + kept
    return "\n".join(kept[-lines:])


def spawn_failure(exc: OSError, argv: Sequence[str], cwd: Path, log: Path) -> str:
    """Why a process could not be started, naming what failed: its log, its directory or its binary.

    The OS says which by the file name of the error (open of the log, chdir, then exec)."""
    if isinstance(exc, SpawnFailed):
        return str(exc)
    reason = exc.strerror or str(exc)
    gone = f"the session directory {cwd} is gone; release the stream and request it again"
    if exc.filename == str(log):
        # The log is opened with O_CREAT: "no such file" can only mean no directory to put it in.
        return f"cannot open its log {log}: {gone if exc.errno == errno.ENOENT else reason}"
    if exc.filename == str(cwd) and exc.errno == errno.ENOENT:
        return gone[0].upper() + gone[1:]
    return f"cannot run {argv[0]}: {reason}"


class ProxyProcess:
    def __init__(
        self,
        name: str,
        kind: str,
        argv: Sequence[str],
        cwd: Path,
        log_path: Path,
        ready: Sequence[int | str],
        runtime: Runtime,
        on_change: Callable[[ProxyProcess], None] = lambda p: None,
    ) -> None:
        self.name = name  # for logs: "inbound 1a2b3c4d proxy"
        self.kind = kind  # "proxy" or "shaper"
        self.argv = list(argv)
        self.cwd = cwd
        self.log_path = log_path
        self.ready = tuple(ready)
        self.runtime = runtime
        self.on_change = on_change
        self.state = State.STOPPED
        self.handle: Handle | None = None
        self.restarts = 0
        self.fast_failures = 0
        self.last_error = ""
        self._running_since = 0.0
        self._deadline = 0.0
        self._next_start = 0.0
        self._rotation_problem = ""  # why its log could not be rotated at the last tick
        self.lock = threading.RLock()

    # --- what s2cs asks for ----------------------------------------------------------------------

    def start(self) -> None:
        """First start, from a request: returns when RUNNING, raises BackendFailed otherwise."""
        self.launch()
        self.wait_started()

    def launch(self) -> None:
        """The first start's first half: the process is spawned, and STARTING unless it could
        not be; `wait_started` follows. A session's processes are launched together and then
        waited for, so that a request waits for the slowest of them, not for their sum."""
        with self.lock:
            self._spawn(first=True)

    def wait_started(self) -> None:
        """Returns when RUNNING, raises BackendFailed otherwise (after `launch`). Unlike a restart,
        a first start is no change to report: the request that made it records its session once
        all of the session's processes run, and a record of this one alone would be lost work."""
        with self.lock:
            while self.state == State.STARTING:
                self._check_starting(first=True)
                if self.state == State.STARTING:
                    self.runtime.sleep(START_POLL)
            if self.state != State.RUNNING:
                raise BackendFailed(f"{self.name} did not start: {self.last_error or 'no output'}")

    def adopt(self, handle: Handle) -> None:
        """Take over a proxy that an earlier s2cs started and that still runs."""
        with self.lock:
            self.handle = handle
            self.state = State.RUNNING
            self._running_since = self.runtime.now() - START_SECONDS  # it has proven itself already
            log.info("%s: re-adopted pid %d", self.name, handle.pid)

    def restart_later(self, reason: str) -> None:
        """Schedule a start by the supervisor (a proxy found dead after an s2cs restart)."""
        with self.lock:
            self.last_error = reason
            self.state = State.BACKOFF
            self._next_start = self.runtime.now()

    def fail(self, reason: str) -> None:
        """FATAL without a try: it cannot be started at all (s2cs restarted, its config refused)."""
        with self.lock:
            self.last_error = reason
            self.state = State.FATAL

    def stop(self) -> None:
        with self.lock:
            self.state = State.STOPPING
            if self.handle is not None:
                terminate(self.runtime, self.handle, STOP_GRACE)
            self.state = State.STOPPED

    def detach(self) -> None:
        """Forget the process without stopping it (s2cs exits, the stream goes on)."""
        with self.lock:
            self.state = State.STOPPED
            self.handle = None

    @property
    def pid(self) -> int | None:
        """The live process's pid; None while there is none (BACKOFF, FATAL, STOPPED)."""
        alive = self.state in (State.STARTING, State.RUNNING, State.STOPPING)
        return self.handle.pid if self.handle and alive else None

    # --- what the supervisor does ----------------------------------------------------------------

    def tick(self, logs: LogBound = DEFAULT_LOGS) -> None:
        if not self.lock.acquire(blocking=False):
            return  # a request is starting or stopping it right now
        try:
            if self.state == State.RUNNING:
                self._check_running()
                if self.state == State.RUNNING:  # not one that just died: its log holds why
                    self._rotate(logs)
            elif self.state == State.BACKOFF and self.runtime.now() >= self._next_start:
                self._spawn(first=False)
            elif self.state == State.STARTING:
                self._check_starting(first=False)
        finally:
            self.lock.release()

    def _rotate(self, logs: LogBound) -> None:
        """Rotate its log once it reached its bound; say why not, once, when it cannot be.

        Whether its descriptor appends is seen to at every tick, not only when the log is full:
        a proxy may take O_APPEND away with its first line, and an s2cs restarted before the first
        rotation may not be allowed to give it back."""
        if self.handle is None:
            return
        problem = ""
        try:
            appends = self.runtime.keep_appending(self.handle)
            if logs.due(size_of(self.log_path)):  # a link's own size: never its target's
                if appends:
                    rotate_log(self.log_path, logs)
                else:
                    problem = (
                        "its descriptor no longer appends, and this s2cs may not give the flag back "
                        "to a process an earlier one started (pidfd_getfd); rotated after its next start"
                    )
        except FileNotFoundError:
            pass  # no log (its directory was deleted): nothing to rotate
        except OSError as exc:
            problem = exc.strerror or str(exc)
        if problem and problem != self._rotation_problem:
            log.warning("%s: cannot rotate its log %s: %s", self.name, self.log_path, problem)
        self._rotation_problem = problem

    # --- transitions -----------------------------------------------------------------------------

    def _spawn(self, first: bool) -> None:
        if not first:
            self.restarts += 1  # what `s2uc status` shows: how often it was started again
        self.state = State.STARTING
        self._clean_slate()
        self._deadline = self.runtime.now() + START_TIMEOUT
        try:
            self.handle = self.runtime.spawn(self.argv, self.cwd, self.log_path)
        except OSError as exc:
            self.handle = None
            self._failed(spawn_failure(exc, self.argv, self.cwd, self.log_path), first)

    def _clean_slate(self) -> None:
        """Remove the Unix sockets a dead process of this kind left where the new one must
        listen (clear_stale_sockets), so that a restart finds what a first start finds."""
        try:
            removed = clear_stale_sockets(self.ready)
        except OSError as exc:
            # The start goes on: if a stale socket is in its way, the process says so itself.
            log.warning("%s: cannot tell stale sockets from live ones: %s", self.name, exc)
            return
        for path in removed:
            log.info("%s: removed %s, left by the process before", self.name, path)

    def _check_starting(self, first: bool) -> None:
        if self.handle is None:
            return
        code = self.handle.poll()
        if code is not None:
            self._failed(log_tail(self.log_path) or f"exited with status {code}", first)
        elif self.runtime.listening(self.handle, self.ready):
            self.state = State.RUNNING
            self._running_since = self.runtime.now()
            if not first:
                log.info("%s: running again (pid %d)", self.name, self.handle.pid)
                self.on_change(self)
        elif self.runtime.now() > self._deadline:
            terminate(self.runtime, self.handle, STOP_GRACE)
            self._failed(
                f"not listening on {', '.join(map(str, self.ready))} after {START_TIMEOUT:.0f}s; "
                + (log_tail(self.log_path) or "no output"),
                first,
            )

    def _check_running(self) -> None:
        if self.handle is None:
            return
        code = self.handle.poll()
        if code is None:
            return
        young = self.runtime.now() - self._running_since < START_SECONDS
        self.fast_failures = self.fast_failures + 1 if young else 1
        self.last_error = log_tail(self.log_path) or f"exited with status {code}"
        log.warning("%s: pid %d exited (%s); restarting", self.name, self.handle.pid, code)
        self._backoff()

    def _failed(self, reason: str, first: bool) -> None:
        self.last_error = reason
        if first:
            self.state = State.STOPPED  # the request fails; nobody restarts it
            return
        self.fast_failures += 1
        self._backoff()

    def _backoff(self) -> None:
        if self.fast_failures >= MAX_FAST_FAILURES:
            self.state = State.FATAL
            log.error(
                "%s: failed %d times in a row, giving up (FATAL); ports stay reserved "
                "until release. Last output:\n%s",
                self.name,
                self.fast_failures,
                self.last_error,
            )
            self.on_change(self)
            return
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, self.fast_failures - 1))
        self.state = State.BACKOFF
        self._next_start = self.runtime.now() + delay
        self.on_change(self)


class Supervisor:
    """One thread that ticks every proxy: restarts the dead ones, notices the ready ones."""

    def __init__(self, interval: float = TICK, logs: LogBound = DEFAULT_LOGS) -> None:
        self.interval = interval
        self.logs = logs
        self._procs: dict[int, ProxyProcess] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def limit_logs(self, max_bytes: int) -> None:
        """Rotate the logs at `max_bytes` instead of LOG_MAX_BYTES (s2cs --log-max-bytes)."""
        self.logs = LogBound(max_bytes, self.logs.keep)

    def add(self, proc: ProxyProcess) -> None:
        with self._lock:
            self._procs[id(proc)] = proc

    def remove(self, proc: ProxyProcess) -> None:
        with self._lock:
            self._procs.pop(id(proc), None)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                procs = list(self._procs.values())
            for proc in procs:
                try:
                    proc.tick(self.logs)
                except Exception:
                    log.exception("%s: supervision failed", proc.name)
