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


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (
            ["--cert-name", "not a name"],
            "error: --cert-name 'not a name' is neither an IP address nor a host name",
        ),
        (
            ["--cert-name", "10.0.0.1", "--server-crt", "a.crt", "--server-key", "a.key"],
            "error: --cert-name names addresses in the generated certificate; with --server-crt, "
            "your own certificate must name them",
        ),
    ],
)
def test_a_cert_name_that_cannot_be_used_is_refused_in_one_line(options, said, short_dir, capsys):
    state = short_dir / "state"
    status, err = start([*options, "--port", str(free_port()), "--state-dir", str(state)], capsys)
    assert status == 2, err
    assert err.strip() == said
    assert not state.exists()


def _login_lines(monkeypatch, client_id: str | None) -> list[str]:
    from scistream.s2cs import cli

    if client_id is None:
        monkeypatch.delenv("SCISTREAM_CLIENT_ID", raising=False)
    else:
        monkeypatch.setenv("SCISTREAM_CLIENT_ID", client_id)
    return cli.login_lines("https://auth.globus.org/scopes/3a1b6c2d-0e4f-4a5b-8c7d-9e0f1a2b3c4d/scistream")


def test_the_login_hint_says_that_users_need_scistream_client_id(monkeypatch):
    assert _login_lines(monkeypatch, None) == [
        "  users log in with: s2uc login --scope 3a1b6c2d-0e4f-4a5b-8c7d-9e0f1a2b3c4d",
        "    with SCISTREAM_CLIENT_ID set to your facility's Globus native-app client id (s2uc "
        "has none built in): register one, and give users both",
    ]


def test_the_container_limits_line_shows_the_defaults_in_force():
    from scistream.s2cs.cli import container_lines
    from scistream.s2cs.policy import ContainerLimits

    assert container_lines(ContainerLimits(), "docker") == [
        "  each proxy's container at most: memory 1024 MiB (default), cpus 2 (default), pids 1024 (default)"
    ]
    assert container_lines(ContainerLimits(memory=256 << 20, pids=0), "swarm") == [
        "  each proxy's container at most: memory 256 MiB, cpus 2 (default), pids no limit"
    ]
    assert container_lines(ContainerLimits(), "process") == []
    assert container_lines(ContainerLimits(memory=256 << 20, cpus=1.5), "process") == [
        "  [containers] of the policy (memory 256 MiB, cpus 1.5) applies with --runtime docker or swarm "
        "only: not here"
    ]


def test_the_login_hint_names_the_client_id_when_the_operator_set_it_for_s2cs_too(monkeypatch):
    native = "7d9e0f1a-2b3c-4d5e-8f60-718293a4b5c6"
    assert _login_lines(monkeypatch, native) == [
        f"  users log in with: SCISTREAM_CLIENT_ID={native} s2uc login --scope "
        "3a1b6c2d-0e4f-4a5b-8c7d-9e0f1a2b3c4d"
    ]
