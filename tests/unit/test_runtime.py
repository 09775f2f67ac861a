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
