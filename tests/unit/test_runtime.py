"""The process runtime (scistream/s2ds/runtime.py): the environment proxies get, their start."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from scistream.s2ds.runtime import Handle, ProcessRuntime, proxy_environment, terminate


def test_a_proxy_gets_no_variable_that_names_a_secret():
    environ = {
        "PATH": "/usr/bin",
        "PYTHONPATH": "/opt/scistream",
        "LANG": "C.UTF-8",
        "SCISTREAM_CLIENT_SECRET": "s3cret",
        "GLOBUS_SDK_ENVIRONMENT": "test",
        "AWS_SESSION_TOKEN": "t",
        "DB_PASSWORD": "p",
        "my_credentials": "c",
    }
    assert proxy_environment(environ) == {
        "PATH": "/usr/bin",
        "PYTHONPATH": "/opt/scistream",
        "LANG": "C.UTF-8",
    }


# --- a process runs only once it is recorded --------------------------------------------------


def _program(marker: Path) -> list[str]:
    return ["/bin/sh", "-c", f"touch {marker}; exec sleep 60"]


def _settled(handle: Handle, marker: Path) -> bool:
    """The program ran, or its process waits for the go of whoever started it."""
    if marker.exists():
        return True
    try:
        process = psutil.Process(handle.pid)
        return process.status() == psutil.STATUS_SLEEPING and process.cmdline()[:1] == ["/bin/sh"]
    except psutil.NoSuchProcess:
        return True


def _bounded(condition: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "nothing happened"
        time.sleep(0.01)


def test_a_proxy_does_not_run_before_s2cs_has_recorded_it(tmp_path: Path):
    """s2cs records each process it starts (state.json) so that the next s2cs stops or adopts it.
    A proxy that ran before it was recorded, with s2cs killed in between, ran on unknown to
    anyone and held its port for ever (seen on a busy machine)."""
    marker = tmp_path / "ran"
    seen: list[bool] = []

    def recorded(handle: Handle) -> None:
        _bounded(lambda: _settled(handle, marker))
        seen.append(marker.exists())

    runtime = ProcessRuntime()
    handle = runtime.spawn(_program(marker), tmp_path, tmp_path / "log", recorded)
    try:
        assert seen == [False]  # not run while being recorded
        _bounded(marker.exists)  # and run once it was
        assert psutil.Process(handle.pid).cmdline() == ["sleep", "60"]
    finally:
        terminate(runtime, handle, 5)


def test_a_proxy_whose_record_failed_never_runs(tmp_path: Path):
    marker = tmp_path / "ran"

    def recorded(handle: Handle) -> None:
        _bounded(lambda: _settled(handle, marker))
        raise OSError(28, "No space left on device")  # as s2cs killed before the record was made

    runtime = ProcessRuntime()
    with pytest.raises(OSError):
        runtime.spawn(_program(marker), tmp_path, tmp_path / "log", recorded)
    _bounded(lambda: not any(p.info["cmdline"] == _program(marker) for p in psutil.process_iter(["cmdline"])))
    assert not marker.exists()


# --- a process whose record never reached state.json ----------------------------------------------


def _started(runtime: ProcessRuntime, session_dir: Path, argv: list[str]) -> Handle:
    session_dir.mkdir(exist_ok=True)
    handle = runtime.spawn(argv, session_dir, session_dir / "log")
    _bounded(lambda: psutil.Process(handle.pid).cmdline() == argv)  # past its gate
    return handle


def test_the_one_unrecorded_process_of_a_session_is_found_by_its_mark_and_command_line(tmp_path: Path):
    """A proxy restarted while the disk was full is known to no state.json: the next s2cs takes
    it over instead of cutting its connections (docs/reliability.md, finding 6)."""
    runtime = ProcessRuntime()
    argv = ["sleep", "61"]
    mine = _started(runtime, tmp_path / "s1", argv)
    other = _started(runtime, tmp_path / "s2", argv)  # the same program for another session
    try:
        found, other_kind, none_there = runtime.unrecorded(
            [
                (tmp_path / "s1", argv),
                (tmp_path / "s1", ["sleep", "62"]),  # another kind of process
                (tmp_path / "s3", argv),  # a session with none
            ]
        )
        assert found is not None and found.pid == mine.pid
        assert other_kind is None and none_there is None
    finally:
        for handle in (mine, other):
            terminate(runtime, handle, 5)


def test_two_unrecorded_processes_of_the_same_kind_are_neither_taken(tmp_path: Path):
    """Which of them the stream's port belongs to cannot be told: the sweep stops both, and the
    stream's process is started anew."""
    runtime = ProcessRuntime()
    argv = ["sleep", "63"]
    handles = [_started(runtime, tmp_path / "s1", argv) for _ in range(2)]
    try:
        assert runtime.unrecorded([(tmp_path / "s1", argv)]) == [None]
    finally:
        for handle in handles:
            terminate(runtime, handle, 5)


def test_the_unrecorded_processes_of_many_sessions_are_found_in_one_call(tmp_path: Path):
    """A start after a reboot asks for every process of every stream at once: each session gets
    its own process, none another's."""
    runtime = ProcessRuntime()
    argv = ["sleep", "64"]
    handles = {name: _started(runtime, tmp_path / name, argv) for name in ("s1", "s2", "s3")}
    try:
        found = runtime.unrecorded([(tmp_path / name, argv) for name in ("s3", "s1", "s4", "s2")])
        assert [None if h is None else h.pid for h in found] == [
            handles["s3"].pid,
            handles["s1"].pid,
            None,
            handles["s2"].pid,
        ]
        assert runtime.unrecorded([]) == []
    finally:
        for handle in handles.values():
            terminate(runtime, handle, 5)
