"""s2cs checks its options together before it makes anything: a refused start leaves no state
dir, certificate or lock behind (scistream/s2cs/cli.py, options.py)."""

from __future__ import annotations

import errno
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from scistream.s2cs.cli import main


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose path leaves room for a state dir's sockets (StateDir's limit)."""
    with tempfile.TemporaryDirectory(prefix="s2cs-", dir="/tmp") as name:
        yield Path(name)


def start(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as caught:
        main(args)
    return int(caught.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (
            ["--runtime", "swarm", "--metrics-port", "PORT"],
            "error: --metrics-port is not available with --runtime swarm yet",
        ),
        (["--metrics-port", "PORT", "--metrics-address", "nowhere"], "--metrics-address"),
        (["--server-crt", "server.crt"], "error: give both --server-crt and --server-key"),
        (["--image", "scistream:test"], "error: --image goes with --runtime docker or swarm"),
        (["--client-id", "some-client"], "error: authentication needs both --client-id and --client-secret"),
        (["--runtime", "swarm", "--facility", "Not A Name"], "error: --facility 'Not A Name'"),
    ],
)
def test_a_refused_start_makes_no_state_dir(options, said, short_dir, capsys, monkeypatch):
    monkeypatch.delenv("SCISTREAM_CLIENT_SECRET", raising=False)
    state = short_dir / "state"
    args = [o.replace("PORT", str(free_port())) for o in options]
    status, err = start(
        [*args, "--port", str(free_port()), "--state-dir", str(state), "--listener-ip", "127.0.0.1"], capsys
    )
    assert status == 2, err
    assert said in err
    assert len(err.strip().splitlines()) == 1, err  # one line, before any start-up output
    assert not state.exists()


def readiness_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("readiness"))


def test_check_says_readiness_uses_netlink(short_dir, capsys):
    with pytest.raises(SystemExit):
        main(["--check", "--state-dir", str(short_dir / "state"), "--port", str(free_port())])
    line = readiness_line(capsys.readouterr().out)
    assert line.split() == ["readiness", "OK", "kernel", "socket", "diagnostics", "(netlink)"]
    assert not (short_dir / "state").exists()


def test_check_warns_that_readiness_falls_back_to_psutil_without_netlink(short_dir, capsys, monkeypatch):
    """A seccomp profile that forbids netlink sockets: s2cs still starts, and says what it costs."""
    real = socket.socket

    def refused(family: int = -1, *args: object, **kwargs: object) -> socket.socket:
        if family == socket.AF_NETLINK:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real(family, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "socket", refused)
    with pytest.raises(SystemExit):
        main(["--check", "--state-dir", str(short_dir / "state"), "--port", str(free_port())])
    line = readiness_line(capsys.readouterr().out)
    assert line.split(None, 2)[:2] == ["readiness", "WARN"]
    assert line.split(None, 2)[2].startswith(
        "psutil (netlink unavailable: Operation not permitted), slower with many streams; fix: "
    )
