"""The supervisor's state machine, driven by a fake operating system with a fake clock.

Nothing here starts a process or sleeps: `FakeSystem.sleep` moves the clock, and a test decides
when each fake process listens and when it exits.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scistream.errors import BackendFailed
from scistream.s2ds import supervisor
from scistream.s2ds.runtime import ProcessRuntime
from scistream.s2ds.supervisor import LogBound, ProxyProcess, State, log_tail


@dataclass
class FakeHandle:
    pid: int
    create_time: float
    listens_after: float | None = 0.0  # seconds after its start; None = never
    ignores_sigterm: bool = False
    exit_code: int | None = None

    def poll(self) -> int | None:
        return self.exit_code


@dataclass
class FakeSystem:
    """Implements scistream.s2ds.runtime.Runtime for processes that exist only in this test."""

    clock: float = 1000.0
    listens_after: float | None = 0.0  # how the next processes behave
    ignores_sigterm: bool = False
    on_spawn: Callable[[FakeHandle, Path], None] = lambda handle, log: None
    spawn_error: OSError | None = None
    spawned: list[FakeHandle] = field(default_factory=list)
    signals: list[tuple[int, int, float]] = field(default_factory=list)  # pid, signal, when
    log_appends: bool = True  # whether the processes' log descriptors append (keep_appending)

    def spawn(
        self,
        argv: Sequence[str],
        cwd: Path,
        log: Path,
        recorded: Callable[[FakeHandle], None] = lambda _: None,
    ) -> FakeHandle:
        if self.spawn_error is not None:
            raise self.spawn_error
        handle = FakeHandle(4000 + len(self.spawned), self.clock, self.listens_after, self.ignores_sigterm)
        self.spawned.append(handle)
        self.on_spawn(handle, log)
        recorded(handle)
        return handle

    def adopt(self, pid: int, create_time: float, argv: Sequence[str]) -> FakeHandle | None:
        return None

    def signal(self, handle: FakeHandle, sig: int) -> None:
        self.signals.append((handle.pid, sig, self.clock))
        if handle.exit_code is None and not (sig == signal.SIGTERM and handle.ignores_sigterm):
            handle.exit_code = -sig

    def keep_appending(self, handle: FakeHandle) -> bool:
        return self.log_appends

    def listening(self, handle: FakeHandle, endpoints: Sequence[int | str]) -> bool:
        after = handle.listens_after
        return handle.exit_code is None and after is not None and self.clock >= handle.create_time + after

    def now(self) -> float:
        return self.clock

    def sleep(self, seconds: float) -> None:
        self.clock += seconds


@pytest.fixture
def system() -> FakeSystem:
    return FakeSystem()


@pytest.fixture
def changes() -> list[State]:
    return []


@pytest.fixture
def proc(system, changes, tmp_path) -> ProxyProcess:
    return ProxyProcess(
        "inbound 5f0c2a9e proxy",
        "proxy",
        ["/usr/sbin/haproxy", "-db", "-f", "proxy.conf"],
        tmp_path,
        tmp_path / "proxy.log",
        [5100, 5101],
        system,
        on_change=lambda p: changes.append(p.state),
    )


def write_log(path: Path, *lines: str) -> None:
    with open(path, "a") as f:
        f.writelines(line + "\n" for line in lines)


def dies_at_once(*lines: str, code: int = 1) -> Callable[[FakeHandle, Path], None]:
    def behave(handle: FakeHandle, log: Path) -> None:
        write_log(log, *lines)
        handle.exit_code = code

    return behave


def crash(system: FakeSystem, proc: ProxyProcess, after: float, *lines: str) -> None:
    """The running process dies `after` seconds from now, leaving `lines` in its log."""
    system.clock += after
    write_log(proc.log_path, *lines)
    system.spawned[-1].exit_code = 139


def run_until(
    system: FakeSystem, proc: ProxyProcess, states: State | set[State], limit: float = 120.0
) -> None:
    """Tick as the Supervisor thread would, on the fake clock, until `proc` is in one of `states`.

    Ticks at least once, so it notices a process that died since the last tick."""
    wanted = {states} if isinstance(states, State) else states
    deadline = system.clock + limit
    while True:
        system.sleep(supervisor.TICK)
        proc.tick()
        if proc.state in wanted:
            return
        assert system.clock < deadline, f"still {proc.state} after {limit}s, expected {wanted}"


# --- start ---------------------------------------------------------------------------------------


def test_start_returns_once_the_proxy_listens(system, proc, changes):
    system.listens_after = 0.5
    began = system.clock
    proc.start()
    assert proc.state == State.RUNNING
    assert proc.pid == 4000
    assert 0.5 <= system.clock - began < 0.6
    assert changes == []  # the request records the whole session once it runs (gateway.py)


def test_start_fails_with_the_proxys_own_last_words(system, proc, tmp_path):
    system.on_spawn = dies_at_once(
        "[NOTICE]   (1) : haproxy version is 2.8.25",
        "[ALERT]    (1) : Starting frontend inbound: cannot bind socket (Address in use) [0.0.0.0:5100]",
    )
    with pytest.raises(BackendFailed) as caught:
        proc.start()
    assert "inbound 5f0c2a9e proxy did not start" in caught.value.message
    assert "cannot bind socket (Address in use) [0.0.0.0:5100]" in caught.value.message
    assert caught.value.code == "BACKEND_FAILED"
    assert proc.state == State.STOPPED  # the request failed: nobody restarts it
    assert len(system.spawned) == 1


def test_start_fails_with_the_exit_status_when_the_proxy_said_nothing(system, proc):
    system.on_spawn = dies_at_once(code=3)
    with pytest.raises(BackendFailed, match="exited with status 3"):
        proc.start()


def test_start_gives_up_after_the_start_timeout_and_stops_the_process(system, proc):
    system.listens_after = None
    system.on_spawn = lambda handle, log: write_log(log, "[WARNING]  (1) : resolving peer, still waiting")
    began = system.clock
    with pytest.raises(BackendFailed) as caught:
        proc.start()
    message = caught.value.message
    assert "not listening on 5100, 5101 after 10s" in message
    assert "still waiting" in message
    assert supervisor.START_TIMEOUT <= system.clock - began < supervisor.START_TIMEOUT + 1
    assert [(pid, sig) for pid, sig, _ in system.signals] == [(4000, signal.SIGTERM)]
    assert system.spawned[0].poll() is not None  # nothing left running
    assert proc.state == State.STOPPED


def test_a_binary_that_cannot_run_fails_the_request_and_is_not_restarted(system, proc):
    system.spawn_error = FileNotFoundError(2, "No such file or directory")
    with pytest.raises(BackendFailed, match="cannot run /usr/sbin/haproxy"):
        proc.start()
    assert proc.state == State.STOPPED


def test_a_binary_that_cannot_run_fails_the_request_with_the_reason(system, proc):
    system.spawn_error = FileNotFoundError(2, "No such file or directory")
    with pytest.raises(BackendFailed, match=r"cannot run /usr/sbin/haproxy: .*No such file or directory"):
        proc.start()


def test_a_log_that_cannot_be_opened_is_the_reason_given_not_the_binary(system, proc, tmp_path):
    """ProcessRuntime.spawn opens the log first: ENOENT there means the session directory is gone."""
    system.spawn_error = FileNotFoundError(2, "No such file or directory", str(proc.log_path))
    with pytest.raises(BackendFailed) as caught:
        proc.start()
    message = caught.value.message
    assert "cannot run" not in message
    assert f"cannot open its log {proc.log_path}: the session directory {tmp_path} is gone" in message


def test_a_proxy_whose_session_directory_vanished_goes_fatal_saying_so(system, proc, tmp_path):
    proc.start()
    system.spawn_error = FileNotFoundError(2, "No such file or directory", str(proc.log_path))
    crash(system, proc, 60, "[ALERT] killed")
    run_until(system, proc, State.FATAL)
    assert proc.last_error.startswith(f"cannot open its log {proc.log_path}: the session directory")
    assert "cannot run /usr/sbin/haproxy" not in proc.last_error


def test_a_real_spawn_into_a_deleted_session_directory_names_the_directory(tmp_path):
    gone = tmp_path / "sessions" / "5f0c2a9e41b7"
    proc = ProxyProcess(
        "inbound 5f0c2a9e shaper",
        "shaper",
        [sys.executable, "-m", "scistream.s2ds.shaper", "--route=a=b"],
        gone,
        gone / "shaper.log",
        [str(gone / "shaper-0.sock")],
        ProcessRuntime(),
    )
    with pytest.raises(BackendFailed) as caught:
        proc.start()
    assert caught.value.message == (
        f"inbound 5f0c2a9e shaper did not start: cannot open its log {gone}/shaper.log: "
        f"the session directory {gone} is gone; release the stream and request it again"
    )


def test_a_missing_binary_is_still_named(system, proc):
    system.spawn_error = FileNotFoundError(2, "No such file or directory", "/usr/sbin/haproxy")
    with pytest.raises(BackendFailed, match=r"cannot run /usr/sbin/haproxy: No such file or directory$"):
        proc.start()


# --- restarts ------------------------------------------------------------------------------------


def test_a_running_proxy_that_dies_is_restarted_after_the_backoff(system, proc, changes):
    proc.start()
    crash(system, proc, 60, "[ALERT] segfault")
    proc.tick()
    assert proc.state == State.BACKOFF
    assert proc.restarts == 0  # counted when it is started again
    assert proc.last_error == "[ALERT] segfault"
    assert changes[-1] == State.BACKOFF

    system.clock += supervisor.BACKOFF_FIRST - 0.01
    proc.tick()
    assert proc.state == State.BACKOFF  # not yet
    assert len(system.spawned) == 1

    system.clock += 0.01
    proc.tick()
    assert proc.state == State.STARTING
    assert len(system.spawned) == 2
    assert proc.restarts == 1
    proc.tick()
    assert proc.state == State.RUNNING
    assert proc.pid == 4001
    assert changes[-1] == State.RUNNING  # the new pid is persisted


def test_every_death_of_a_running_proxy_is_counted(system, proc):
    proc.start()
    for expected in (1, 2, 3):
        crash(system, proc, 60, "[ALERT] killed by the OOM killer")
        run_until(system, proc, State.RUNNING)
        assert proc.restarts == expected
    assert len(system.spawned) == 4


def test_repeated_fast_failures_end_in_fatal_and_keep_the_reason(system, proc, changes):
    proc.start()
    system.on_spawn = dies_at_once("[ALERT] (1) : cannot bind socket (Address in use) [0.0.0.0:5101]")
    crash(system, proc, 0.5, "[ALERT] (1) : died young")
    spawned_at = []
    while proc.state != State.FATAL:
        assert system.clock < 2000, "never gave up"
        count = len(system.spawned)
        system.sleep(supervisor.TICK)
        proc.tick()
        if len(system.spawned) > count:
            spawned_at.append(system.clock)
    assert proc.fast_failures == supervisor.MAX_FAST_FAILURES
    assert "cannot bind socket (Address in use) [0.0.0.0:5101]" in proc.last_error
    assert changes[-1] == State.FATAL
    # Back-off doubles between attempts: 0.5 s, 1 s, 2 s, 4 s (up to one tick late).
    gaps = [b - a for a, b in itertools.pairwise(spawned_at)]
    assert len(spawned_at) == supervisor.MAX_FAST_FAILURES - 1
    for gap, backoff in zip(gaps, (1.0, 2.0, 4.0), strict=True):
        assert backoff <= gap <= backoff + 2 * supervisor.TICK + 1e-9
    # FATAL is final: no more attempts however long we wait.
    for _ in range(100):
        system.sleep(1)
        proc.tick()
    assert proc.state == State.FATAL
    assert len(system.spawned) == supervisor.MAX_FAST_FAILURES


def test_a_proxy_that_ran_long_starts_counting_fast_failures_afresh(system, proc):
    proc.start()
    for _ in range(supervisor.MAX_FAST_FAILURES - 2):  # young deaths, one short of giving up
        crash(system, proc, 1, "[ALERT] died young")
        run_until(system, proc, State.RUNNING)
    assert proc.fast_failures == supervisor.MAX_FAST_FAILURES - 2

    crash(system, proc, 3600, "[ALERT] died after an hour")
    proc.tick()
    assert proc.state == State.BACKOFF
    assert proc.fast_failures == 1
    # ... so the next restart comes after the first, shortest back-off.
    began = system.clock
    run_until(system, proc, State.STARTING)
    assert system.clock - began <= supervisor.BACKOFF_FIRST + supervisor.TICK + 1e-9


def test_a_proxy_that_dies_soon_after_a_slow_start_ends_in_fatal(system, proc):
    system.listens_after = 2.5
    proc.start()
    for _ in range(3 * supervisor.MAX_FAST_FAILURES):
        crash(system, proc, 1, "[ALERT] died one second after it listened")
        run_until(system, proc, {State.RUNNING, State.FATAL})
        if proc.state == State.FATAL:
            break
    assert proc.state == State.FATAL


def test_restart_later_starts_a_proxy_found_dead_at_the_next_tick(system, proc):
    proc.restart_later("pid 3999 was gone after the s2cs restart")
    assert proc.state == State.BACKOFF
    assert proc.last_error == "pid 3999 was gone after the s2cs restart"
    proc.tick()
    assert proc.state == State.STARTING
    proc.tick()
    assert proc.state == State.RUNNING


def _socket_file(path: Path, listening: bool) -> socket.socket | None:
    """A Unix socket file at `path`: held by a listening socket, or left by one that is gone
    (as a killed process leaves it: nobody unlinks it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    if listening:
        return sock
    sock.close()
    return None


def test_a_restart_starts_from_a_clean_slate_without_the_dead_ones_socket(system, tmp_path):
    """stunnel fails to bind a path where a file is ("Address already in use"): a killed one
    that left its socket could never come back, and ended FATAL."""
    stale = tmp_path / "shaper-0.sock"
    proc = ProxyProcess(
        "outbound 5f0c2a9e proxy", "proxy", ["stunnel"], tmp_path, tmp_path / "p.log", [str(stale)], system
    )
    proc.start()
    _socket_file(stale, listening=False)
    found_at_spawn: list[bool] = []
    system.on_spawn = lambda handle, log: found_at_spawn.append(stale.exists())
    crash(system, proc, 10.0)
    run_until(system, proc, State.RUNNING)
    assert found_at_spawn == [False]
    assert proc.restarts == 1


def test_a_socket_that_a_live_process_listens_on_is_never_removed(system, tmp_path):
    """Not ours to take: a process of an earlier s2cs that was not re-adopted may still serve
    the stream there. The new process fails to bind, in its own words, and the live one goes on."""
    live, stale = tmp_path / "shaper-0.sock", tmp_path / "shaper-1.sock"
    proc = ProxyProcess(
        "outbound 5f0c2a9e proxy",
        "proxy",
        ["stunnel"],
        tmp_path,
        tmp_path / "p.log",
        [str(live), str(stale)],
        system,
    )
    holder = _socket_file(live, listening=True)
    _socket_file(stale, listening=False)
    try:
        proc.restart_later("it was not running when s2cs started")
        run_until(system, proc, State.RUNNING)
        assert live.exists() and not stale.exists()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(live))  # still the live one's
        client.close()
    finally:
        assert holder is not None
        holder.close()


def test_a_file_that_is_not_a_socket_is_left_where_a_process_must_listen(system, tmp_path):
    other = tmp_path / "shaper-0.sock"
    other.write_text("an operator's file")
    proc = ProxyProcess(
        "inbound 5f0c2a9e proxy",
        "proxy",
        ["stunnel"],
        tmp_path,
        tmp_path / "p.log",
        [str(other), 5100],
        system,
    )
    proc.restart_later("it was not running when s2cs started")
    run_until(system, proc, State.RUNNING)
    assert other.read_text() == "an operator's file"


# --- stop ----------------------------------------------------------------------------------------


def test_stop_sends_sigterm_and_waits(system, proc):
    proc.start()
    proc.stop()
    assert [(pid, sig) for pid, sig, _ in system.signals] == [(4000, signal.SIGTERM)]
    assert proc.state == State.STOPPED


def test_stop_sends_sigkill_when_sigterm_is_ignored_for_the_grace_period(system, proc):
    system.ignores_sigterm = True
    proc.start()
    proc.stop()
    (pid1, term, t_term), (pid2, kill, t_kill) = system.signals
    assert (pid1, term, pid2, kill) == (4000, signal.SIGTERM, 4000, signal.SIGKILL)
    assert supervisor.STOP_GRACE <= t_kill - t_term < supervisor.STOP_GRACE + 0.1
    assert system.spawned[0].poll() is not None
    assert proc.state == State.STOPPED


def test_stop_of_a_process_that_already_ended_signals_nothing(system, proc):
    proc.start()
    system.spawned[0].exit_code = 0
    proc.stop()
    assert system.signals == []
    assert proc.state == State.STOPPED


def test_a_stopped_proxy_is_not_restarted(system, proc):
    proc.start()
    proc.stop()
    for _ in range(50):
        system.sleep(1)
        proc.tick()
    assert proc.state == State.STOPPED
    assert len(system.spawned) == 1


# --- concurrency with requests, and re-adoption ----------------------------------------------------


def test_tick_leaves_a_process_alone_while_a_request_holds_its_lock(system, proc):
    proc.start()
    crash(system, proc, 60, "[ALERT] died")
    holding, done = threading.Event(), threading.Event()

    def request_in_progress():
        with proc.lock:
            holding.set()
            done.wait(10)

    other = threading.Thread(target=request_in_progress)
    other.start()
    try:
        assert holding.wait(10)
        proc.tick()
        assert proc.state == State.RUNNING  # untouched: the request decides
        assert proc.restarts == 0
    finally:
        done.set()
        other.join(10)
    proc.tick()
    assert proc.state == State.BACKOFF  # noticed now that the lock is free


def test_adopt_takes_over_a_running_proxy(system, proc, changes):
    proc.adopt(FakeHandle(pid=3999, create_time=system.clock - 7200))
    assert proc.state == State.RUNNING
    assert proc.pid == 3999
    assert system.spawned == []
    proc.tick()
    assert proc.state == State.RUNNING


def test_an_adopted_proxy_that_dies_at_once_is_restarted_not_counted_as_a_failed_start(system, proc):
    proc.adopt(FakeHandle(pid=3999, create_time=system.clock - 7200))
    proc.handle.exit_code = -1  # gone, as AdoptedHandle.poll reports it
    proc.tick()
    assert proc.state == State.BACKOFF
    assert proc.fast_failures == 1
    run_until(system, proc, State.RUNNING)
    assert proc.pid == 4000


def test_detach_forgets_the_process_without_signalling_it(system, proc):
    proc.start()
    proc.detach()
    assert proc.pid is None
    assert proc.state == State.STOPPED
    assert system.signals == []


# --- the log tail --------------------------------------------------------------------------------


def test_log_tail_keeps_the_last_non_empty_lines(tmp_path):
    log = tmp_path / "proxy.log"
    write_log(log, *[f"line {i}" for i in range(1, 10)], "", "   ")
    assert log_tail(log, lines=3) == "line 7\nline 8\nline 9"


def test_log_tail_of_a_missing_log_is_empty(tmp_path):
    assert log_tail(tmp_path / "never-written.log") == ""


def test_log_tail_survives_bytes_that_are_not_utf8(tmp_path):
    log = tmp_path / "proxy.log"
    log.write_bytes(b"[ALERT] bad \xff byte\n")
    assert log_tail(log) == "[ALERT] bad \ufffd byte"


# --- bounded logs --------------------------------------------------------------------------------

SMALL = LogBound(max_bytes=1000, keep=3)


def test_the_renames_of_a_rotation_go_from_the_oldest_part_to_the_newest():
    log = Path("/state/sessions/5f0c2a9e41b7/proxy.log")
    assert SMALL.renames(log) == [
        (Path(f"{log}.2"), Path(f"{log}.3")),
        (Path(f"{log}.1"), Path(f"{log}.2")),
    ]
    assert LogBound(max_bytes=1000, keep=1).renames(log) == []


def test_a_log_is_due_for_rotation_once_it_reaches_its_bound():
    assert not SMALL.due(999)
    assert SMALL.due(1000)
    assert supervisor.LogBound().max_bytes == 10 * 1024 * 1024
    assert supervisor.LogBound().keep == 3


def test_a_log_below_its_bound_is_left_alone(system, proc):
    proc.start()
    write_log(proc.log_path, "x" * 900)
    proc.tick(SMALL)
    assert proc.log_path.stat().st_size == 901
    assert not Path(f"{proc.log_path}.1").exists()


def test_a_growing_log_keeps_its_newest_parts_and_drops_the_oldest(system, proc):
    proc.start()
    for generation in range(1, 7):
        write_log(proc.log_path, f"generation {generation} " + "x" * 1000)
        system.sleep(supervisor.TICK)
        proc.tick(SMALL)
        assert proc.log_path.stat().st_size == 0
    parts = sorted(p.name for p in proc.log_path.parent.iterdir() if p.name.startswith("proxy.log"))
    assert parts == ["proxy.log", "proxy.log.1", "proxy.log.2", "proxy.log.3"]
    for index, generation in ((1, 6), (2, 5), (3, 4)):
        assert Path(f"{proc.log_path}.{index}").read_text().startswith(f"generation {generation} ")
    assert proc.state == State.RUNNING  # nothing else changed


def test_a_process_writing_to_its_log_goes_on_writing_after_a_rotation(tmp_path):
    """As ProcessRuntime.spawn hands it over: O_APPEND. After the truncation the next line lands at
    the start of the empty file, not at the old offset (which would leave a sparse file as large
    as before)."""
    log = tmp_path / "proxy.log"
    with open(log, "ab", buffering=0) as proxy:
        proxy.write(b"old line\n" * 200)
        supervisor.rotate_log(log, SMALL)
        proxy.write(b"new line\n")
    assert log.read_bytes() == b"new line\n"
    assert Path(f"{log}.1").read_bytes() == b"old line\n" * 200


def test_a_log_that_cannot_be_copied_is_left_whole_and_said_once(system, proc, monkeypatch, caplog):
    proc.start()
    write_log(proc.log_path, "x" * 2000)

    def disk_full(src, dst, length=0):
        dst.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(supervisor.shutil, "copyfileobj", disk_full)
    for _ in range(5):
        system.sleep(supervisor.TICK)
        proc.tick(SMALL)
    assert proc.log_path.stat().st_size == 2001  # nothing lost
    assert sorted(p.name for p in proc.log_path.parent.iterdir()) == ["proxy.log"]  # no partial copy
    warnings = [r.getMessage() for r in caplog.records if "cannot rotate" in r.getMessage()]
    assert warnings == [
        f"inbound 5f0c2a9e proxy: cannot rotate its log {proc.log_path}: No space left on device"
    ]
    assert proc.state == State.RUNNING


def test_the_last_words_of_a_proxy_survive_a_rotation_just_before_it_died(system, proc):
    proc.start()
    write_log(proc.log_path, "x" * 990, "[ALERT] (1) : out of memory, exiting")
    proc.tick(SMALL)  # rotated while the proxy was still on its way out
    assert proc.log_path.stat().st_size == 0
    crash(system, proc, 0.1)
    proc.tick(SMALL)
    assert proc.state == State.BACKOFF
    assert proc.last_error.endswith("[ALERT] (1) : out of memory, exiting")


def test_a_log_is_not_rotated_while_nothing_runs(system, proc):
    proc.start()
    crash(system, proc, 60, "x" * 2000, "[ALERT] the reason")
    proc.tick(SMALL)
    assert proc.state == State.BACKOFF
    assert not Path(f"{proc.log_path}.1").exists()


def test_a_restarted_process_appends_to_its_log(tmp_path):
    """The lines that explain why a proxy died are still there after it was started again."""
    log = tmp_path / "proxy.log"
    real = ProcessRuntime()
    for run in (1, 2):
        handle = real.spawn([sys.executable, "-c", f"print('run {run}: bye')"], tmp_path, log)
        deadline = real.now() + 30
        while handle.poll() is None and real.now() < deadline:
            real.sleep(0.02)
    assert log.read_text() == "run 1: bye\nrun 2: bye\n"


def test_a_log_whose_descriptor_no_longer_appends_is_not_emptied_and_that_is_said_once(system, proc, caplog):
    """Emptied, it would get the process's next line at the old offset, after a hole as large."""
    proc.start()
    system.log_appends = False
    write_log(proc.log_path, "x" * 2000)
    for _ in range(5):
        system.sleep(supervisor.TICK)
        proc.tick(SMALL)
    assert proc.log_path.stat().st_size == 2001
    assert not Path(f"{proc.log_path}.1").exists()
    warnings = [r.getMessage() for r in caplog.records if "cannot rotate" in r.getMessage()]
    assert len(warnings) == 1
    assert "no longer appends" in warnings[0]


# A stand-in for HAProxy; its sleeps are its behaviour, which the tests wait on through its log:
# a start-up, a line every 5 ms, then it lives on until killed.
CLEARS_O_APPEND = """
import fcntl, os, sys, time
time.sleep(0.3)
# As HAProxy does with its first log line: F_SETFL takes every other status flag away.
fcntl.fcntl(1, fcntl.F_SETFL, os.O_NONBLOCK)
for i in range(400):
    os.write(1, b"connection %03d " % i + b"x" * 100 + b"\\n")
    time.sleep(0.005)
time.sleep(60)
"""

# The same, three lines each time the test asks for them through a FIFO.
CLEARS_O_APPEND_ON_CUE = """
import fcntl, os, sys
fcntl.fcntl(1, fcntl.F_SETFL, os.O_NONBLOCK)
line = 0
with open(sys.argv[1], "rb") as go:  # a FIFO: the test says when the next three lines come
    while go.read(1):
        for _ in range(3):
            os.write(1, b"connection %03d " % line + b"x" * 100 + b"\\n")
            line += 1
"""


def test_a_log_is_rotated_without_a_hole_when_the_proxy_cleared_o_append(tmp_path):
    real = ProcessRuntime()
    go = tmp_path / "go"
    os.mkfifo(go)
    proc = ProxyProcess(
        "inbound 5f0c2a9e proxy", "proxy", [sys.executable, "-c", CLEARS_O_APPEND_ON_CUE, str(go)], tmp_path,
        tmp_path / "proxy.log", [], real,
    )  # fmt: skip
    proc.start()
    try:
        # 348 bytes, then a tick: the log never holds more than the bound and one batch, however
        # slow this machine is.
        with open(go, "wb", buffering=0) as batches:
            for batch in range(134):
                batches.write(b".")
                last = b"connection %03d " % (3 * batch + 2)
                deadline = real.now() + 60
                while last not in _all_parts(proc.log_path) and real.now() < deadline:
                    real.sleep(0.01)
                proc.tick(SMALL)
    finally:
        proc.stop()
    parts = sorted(tmp_path.glob("proxy.log*"))
    assert [p.name for p in parts] == ["proxy.log", "proxy.log.1", "proxy.log.2", "proxy.log.3"]
    for part in parts:
        data = part.read_bytes()
        assert b"\0" not in data, part.name  # no hole where lines were before the truncation
        assert len(data) < SMALL.max_bytes + 3 * 116, part.name
    assert b"connection 401" in _all_parts(proc.log_path)


def _all_parts(log: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(log.parent.glob(f"{log.name}*")))


def test_the_log_of_an_adopted_process_gets_o_append_back(tmp_path):
    """After a restart of s2cs: the descriptor is the process's own, taken over with pidfd_getfd."""
    import os
    import subprocess

    import psutil

    log = tmp_path / "proxy.log"
    argv = [sys.executable, "-c", CLEARS_O_APPEND]
    with open(log, "ab") as out:  # an earlier s2cs started it; its copy is gone
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        real = ProcessRuntime()
        deadline = real.now() + 30
        while b"connection" not in log.read_bytes() and real.now() < deadline:
            real.sleep(0.02)

        def flags() -> int:
            line = Path(f"/proc/{child.pid}/fdinfo/1").read_text().splitlines()[1]
            return int(line.split()[1], 8)

        assert not flags() & os.O_APPEND  # cleared, as HAProxy does
        handle = real.adopt(child.pid, psutil.Process(child.pid).create_time(), argv)
        assert handle is not None
        assert real.keep_appending(handle)
        assert flags() & os.O_APPEND
        assert flags() & os.O_NONBLOCK  # what the process set is kept
    finally:
        child.kill()
        child.wait()


def _flags(pid: int) -> int:
    """The status flags of descriptor 1 (its log) of process `pid`."""
    line = Path(f"/proc/{pid}/fdinfo/1").read_text().splitlines()[1]
    return int(line.split()[1], 8)


def test_o_append_is_given_back_at_the_next_tick_not_only_when_the_log_is_full(tmp_path):
    """So that an s2cs restarted before the first rotation, which may not be allowed to take the
    descriptor of a process it did not start, still finds a log it can empty."""
    import os

    real = ProcessRuntime()
    proc = ProxyProcess(
        "inbound 5f0c2a9e proxy", "proxy", [sys.executable, "-c", CLEARS_O_APPEND], tmp_path,
        tmp_path / "proxy.log", [], real,
    )  # fmt: skip
    proc.start()
    try:
        deadline = real.now() + 30
        while b"connection" not in proc.log_path.read_bytes() and real.now() < deadline:
            real.sleep(0.02)
        assert proc.pid is not None
        assert not _flags(proc.pid) & os.O_APPEND  # the "proxy" took it
        proc.tick()  # the default bound, 10 MiB: nothing to rotate yet
        assert _flags(proc.pid) & os.O_APPEND
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("code", "appends"),
    [("import time; print('hello', flush=True); time.sleep(60)", True), (CLEARS_O_APPEND, False)],
    ids=["kept-o-append", "cleared-o-append"],
)
def test_without_the_right_to_its_descriptor_an_adopted_log_is_emptied_only_if_it_appends(
    tmp_path, monkeypatch, code, appends
):
    import subprocess

    import psutil

    from scistream.s2ds import runtime as system_module

    monkeypatch.setattr(system_module, "_descriptor_of", lambda pid, fd: None)  # pidfd_getfd refused
    log = tmp_path / "proxy.log"
    argv = [sys.executable, "-c", code]
    with open(log, "ab") as out:  # as an earlier s2cs started it
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        real = ProcessRuntime()
        deadline = real.now() + 30
        while not log.read_bytes().strip() and real.now() < deadline:
            real.sleep(0.02)
        handle = real.adopt(child.pid, psutil.Process(child.pid).create_time(), argv)
        assert handle is not None
        assert real.keep_appending(handle) is appends
    finally:
        child.kill()
        child.wait()
