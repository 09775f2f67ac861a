"""The dependency floors: declared once, pinned once, and true.

pyproject.toml declares each direct dependency's lowest allowed version; constraints/lowest.txt pins
exactly those, and `make test-lowest` runs the unit tests with them. The first tests keep the two
files in agreement, so a floor raised in one and not the other fails `make test`. The others call
what SciStream calls in psutil, globus-sdk and typer where no other unit test does, so that the
run at the floors catches a floor too low for them (psutil 5.9 has no `Process.net_connections`,
which readiness calls when the kernel's socket diagnostics are unavailable).
"""

from __future__ import annotations

import os
import socket
import sys
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints" / "lowest.txt"


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"] + project["optional-dependencies"]["dev"]]


def floor(requirement: Requirement) -> str:
    floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    assert len(floors) == 1, f"pyproject.toml: {requirement} needs exactly one floor (>=)"
    return floors[0]


def pinned() -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, raw in enumerate(CONSTRAINTS.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and name.strip() and version.strip(), f"{CONSTRAINTS.name}:{number}: not NAME==VERSION"
        key = canonicalize_name(name.strip())
        assert key not in pins, f"{CONSTRAINTS.name}:{number}: {name.strip()} pinned twice"
        pins[key] = version.strip()
    return pins


def test_every_dependency_has_a_floor():
    for requirement in declared():
        floor(requirement)


def test_the_constraints_pin_every_floor_and_nothing_else():
    floors = {canonicalize_name(r.name): floor(r) for r in declared()}
    pins = pinned()
    differ = {
        name: (floors.get(name), pins.get(name))
        for name in sorted(floors.keys() | pins.keys())
        if floors.get(name) != pins.get(name)
    }
    assert differ == {}, "(floor in pyproject.toml, pin in constraints/lowest.txt) differ: change both"


# --- the floors provide what the code calls ----------------------------------------------------


@dataclass(frozen=True)
class ThisProcess:
    """A Handle (scistream.s2ds.runtime) of the test's own process."""

    pid: int
    create_time: float = 0.0

    def poll(self) -> int | None:
        return None


def test_psutil_sees_the_tcp_and_unix_listeners_of_a_process(tmp_path, monkeypatch):
    """Readiness without netlink: Process.net_connections, and psutil.net_connections for the
    stale socket files a restart removes."""
    from scistream.s2ds import runtime
    from scistream.s2ds.runtime import ProcessRuntime, Readiness, clear_stale_sockets

    monkeypatch.setattr(runtime, "_readiness", Readiness(netlink=False, reason="forbidden here"))

    path = str(tmp_path / "shaper.sock")
    with socket.socket() as tcp, socket.socket(socket.AF_UNIX) as unix:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        unix.bind(path)
        unix.listen()
        port = tcp.getsockname()[1]
        me = ThisProcess(os.getpid())
        assert ProcessRuntime().listening(me, [port, path])
        assert not ProcessRuntime().listening(me, [port, path + ".other"])
        assert clear_stale_sockets([path]) == []  # a live one stays


def test_globus_sdk_starts_a_native_app_login_and_stores_nothing_without_a_code(tmp_path, monkeypatch):
    from scistream.client.tokens import TokenStore
    from scistream.errors import Unauthenticated

    scope = "https://auth.example.org/scopes/s2cs/scistream"
    monkeypatch.setenv("SCISTREAM_HOME", str(tmp_path))
    store = TokenStore()
    shown: list[str] = []

    def user(url: str) -> str:
        shown.append(url)
        return ""  # the user pastes no code

    with pytest.raises(Unauthenticated):
        store.login(scope, user)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(shown[0]).query)
    assert query["scope"] == [scope]
    assert query["code_challenge_method"] == ["S256"]
    assert store.find(scope) is None


def test_globus_sdk_builds_the_servers_client_and_a_missing_token_says_how_to_log_in():
    from scistream.errors import Unauthenticated
    from scistream.s2cs.auth import GlobusAuth

    auth = GlobusAuth("s2cs-client-id", "s2cs-secret")
    with pytest.raises(Unauthenticated) as caught:
        auth.identify(None)
    assert "s2uc login --scope" in caught.value.message


def run_cli(main, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as caught:
        main()
    out = capsys.readouterr()
    return int(caught.value.code or 0), out.out + out.err


def test_typer_and_click_show_help_versions_and_refuse_a_bad_option(monkeypatch, capsys):
    from scistream import __version__
    from scistream.s2cs.cli import main as s2cs
    from scistream.s2uc.cli import main as s2uc

    assert run_cli(s2uc, ["s2uc", "--version"], monkeypatch, capsys) == (0, f"s2uc {__version__}\n")
    status, text = run_cli(s2uc, ["s2uc", "inbound_request", "--help"], monkeypatch, capsys)
    assert status == 0 and "--remote_ip" in text
    status, text = run_cli(s2uc, ["s2uc", "inbound-request", "--help"], monkeypatch, capsys)  # hidden
    assert status == 0 and "--remote_ip" in text
    # A required option left out: typer before 0.18 with click 8.3 or later ran the command with None.
    status, text = run_cli(s2uc, ["s2uc", "inbound_request", "--remote_ip", "10.0.0.1"], monkeypatch, capsys)
    assert status == 2 and "Missing option '--receiver_ports'" in text
    # A value that s2uc's own parser refuses, named by its option.
    argv = ["s2uc", "inbound_request", "--remote_ip", "10.0.0.1", "--receiver_ports", "70000"]
    status, text = run_cli(s2uc, argv, monkeypatch, capsys)
    assert status == 2 and "'--receiver_ports' / '--receiver-ports': 70000 is not a TCP port" in text
    status, text = run_cli(s2cs, ["s2cs", "--help"], monkeypatch, capsys)
    assert status == 0 and "--listener-ip" in text
    status, text = run_cli(s2cs, ["s2cs", "--type", "nope"], monkeypatch, capsys)
    assert status == 2 and "unknown proxy type 'nope'" in text
