"""The command line of s2uc (scistream/s2uc/cli.py), through its real entry point `main`: the
commands and options a user sees, usage errors that exit 2 with one line, and an import that
stays light (each command pays for it before it sends anything)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scistream import __version__, api
from scistream.errors import NotFound
from scistream.s2uc.cli import main
from scistream.s2uc.replies import Released

UID = "5d2f8a61-0b7c-4f2e-9d4a-4b5c8d9e0f1a"
COMMANDS = [
    "inbound_request",
    "outbound_request",
    "connect",
    "release",
    "status",
    "info",
    "login",
    "check-auth",
    "logout",
]
ALIASES = {
    "inbound-request": "inbound_request",
    "outbound-request": "outbound_request",
    "check_auth": "check-auth",
}
OPTIONS = {
    "inbound_request": [
        "--remote_ip, --remote-ip",
        "--receiver_ports, --receiver-ports",
        "--s2cs",
        "--num_conn, --num-conn",
        "--rate",
        "--server_cert, --server-cert",
        "--scope",
        "--json",
        "--uid-file, --uid_file",
    ],
    "outbound_request": [
        "UID",
        "HPC_LISTENER",
        "--remote_ip, --remote-ip",
        "--receiver_ports, --receiver-ports",
        "--s2cs",
        "--num_conn, --num-conn",
        "--rate",
        "--server_cert, --server-cert",
        "--scope",
        "--json",
        "--uid-file, --uid_file",
    ],
    "connect": [
        "--inbound-s2cs, --inbound_s2cs",
        "--outbound-s2cs, --outbound_s2cs",
        "--remote_ip, --remote-ip",
        "--receiver_ports, --receiver-ports",
        "--local_port, --local-port",
        "--local_ip, --local-ip",
        "--num_conn, --num-conn",
        "--rate",
        "--server_cert, --server-cert",
        "--scope",
        "--json",
        "--uid-file, --uid_file",
    ],
    "release": [
        "UID",
        "--s2cs",
        "--server_cert, --server-cert",
        "--scope",
        "--json",
        "--uid-file, --uid_file",
    ],
    "status": ["UID", "--s2cs", "--server_cert, --server-cert", "--scope", "--json", "--log"],
    "info": ["--s2cs", "--server_cert, --server-cert", "--json"],
    "login": ["--scope", "--s2cs", "--server_cert, --server-cert"],
    "check-auth": ["--scope", "--show-token"],
    "logout": ["--scope"],
}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """s2uc ARGS, in this process: its exit status, stdout and stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out = capsys.readouterr()
    return int(exited.value.code or 0), out.out, out.err


def test_help_lists_each_command_with_its_summary_and_hides_the_aliases(capsys):
    status, out, err = run(capsys, "--help")
    assert status == 0 and err == ""
    listed = [line.split()[0] for line in out.split("commands:\n")[1].splitlines() if line.startswith("  ")]
    assert listed == COMMANDS
    assert "  logout            Revoke stored tokens at Globus Auth and delete them.\n" in out
    assert "  inbound_request   Create the inbound proxy in front of a service at this" in out
    for alias in ALIASES:
        assert alias not in out
    assert "--debug" in out and "--version" in out


def test_no_arguments_show_the_help_and_exit_2(capsys):
    status, out, err = run(capsys)
    assert status == 2 and out == ""
    assert err.startswith("usage: s2uc ") and "commands:" in err


@pytest.mark.parametrize("command", [*COMMANDS, *ALIASES])
def test_the_help_of_a_command_lists_each_of_its_options(capsys, command):
    status, out, err = run(capsys, command, "--help")
    assert status == 0 and err == ""
    assert out.startswith(f"usage: s2uc {command} [OPTIONS]")
    for option in OPTIONS[ALIASES.get(command, command)]:
        assert f"  {option}" in out, option


def test_help_shows_defaults_ranges_and_the_docstring_paragraphs(capsys):
    _, out, _ = run(capsys, "inbound_request", "--help")
    assert "[default: 5; 1<=x<=10000]" in " ".join(out.split())
    assert "[default: localhost:5000]" in " ".join(out.split())
    _, out, _ = run(capsys, "login", "--help")
    assert "\n\nNeeds SCISTREAM_CLIENT_ID" in out  # the docstring's second paragraph, kept apart


def test_version(capsys):
    assert run(capsys, "--version") == (0, f"s2uc {__version__}\n", "")


def _usage_error(err: str, command: str) -> str:
    """The one error line of a usage error, after the usage line."""
    usage, error = err.splitlines()
    assert usage == f"usage: s2uc {command} [OPTIONS]"
    assert error.startswith("error: ")
    return error


def test_a_missing_required_option_is_a_usage_error(capsys):
    status, out, err = run(capsys, "inbound_request", "--remote_ip", "10.0.0.1")
    assert status == 2 and out == ""
    assert "--receiver_ports" in _usage_error(err, "inbound_request")


@pytest.mark.parametrize("value", ["0", "10001", "many"])
def test_num_conn_out_of_its_range_is_a_usage_error(capsys, value):
    args = ["inbound_request", "--remote_ip", "10.0.0.1", "--receiver_ports", "5001", "--num-conn", value]
    status, out, err = run(capsys, *args)
    assert status == 2 and out == ""
    error = _usage_error(err, "inbound_request")
    assert error.startswith("error: argument --num_conn/--num-conn: ") and value in error
    assert "not in the range 1<=x<=10000" in error or "'many' is not an integer" in error


def test_ports_that_are_not_ports_are_a_usage_error(capsys):
    args = ["inbound_request", "--remote_ip", "10.0.0.1", "--receiver-ports", "5001,70000"]
    status, _, err = run(capsys, *args)
    assert status == 2
    assert _usage_error(err, "inbound_request").endswith("70000 is not a TCP port (1-65535)")


def test_an_unknown_command_or_option_is_a_usage_error(capsys):
    status, out, err = run(capsys, "inbound")
    assert status == 2 and out == ""
    assert err.splitlines()[-1] == "error: no such command 'inbound'"
    status, _, err = run(capsys, "info", "--s2c", "h:1")  # no abbreviations: a typo is not guessed
    assert status == 2 and err.splitlines()[-1] == "error: unrecognized arguments: --s2c h:1"
    status, _, err = run(capsys, "info", "--debug")  # --debug is s2uc's, before the command
    assert status == 2 and len(err.splitlines()) == 2


def test_release_takes_s2cs_twice(capsys, monkeypatch, tmp_path):
    asked = {}

    def release(uid, *, s2cs, server_cert, scope=None, accept_new_cert=False):
        asked.update(
            uid=uid, s2cs=s2cs, server_cert=server_cert, scope=scope, accept_new_cert=accept_new_cert
        )
        return (
            api.Outcome("a:1", released=Released("a:1", uid, ("outbound",), {})),
            api.Outcome("b:2", error=NotFound("no stream 5d2f8a61 on this server (already released?)")),
        )

    monkeypatch.setattr(api, "release", release)
    status, out, err = run(
        capsys,
        "release",
        UID,
        "--s2cs",
        "a:1",
        "--s2cs",
        "b:2",
        "--server-cert",
        "x.pem",
        "--accept-new-cert",
    )
    assert asked == {
        "uid": UID,
        "s2cs": ["a:1", "b:2"],
        "server_cert": Path("x.pem"),
        "scope": None,
        "accept_new_cert": True,  # the user took the gateways' new certificates on purpose
    }
    assert status == 0
    assert out == f"Released outbound proxy of stream {UID} on a:1.\n"
    assert err == "note: no stream 5d2f8a61 on this server (already released?)\n"


def test_release_asks_localhost_without_s2cs(capsys, monkeypatch):
    asked = {}

    def release(uid, *, s2cs, server_cert, scope=None, accept_new_cert=False):
        asked.update(s2cs=s2cs, server_cert=server_cert)
        return (api.Outcome("localhost:5000", released=Released("localhost:5000", uid, ("inbound",), {})),)

    monkeypatch.setattr(api, "release", release)
    assert run(capsys, "release", UID)[0] == 0
    assert asked == {"s2cs": ["localhost:5000"], "server_cert": Path("server.crt")}


def test_outbound_request_takes_its_arguments_between_options(capsys, tmp_path):
    uid_file = tmp_path / "uid"
    # UID and HPC_LISTENER with options between them: both are taken, so both with --uid-file is
    # refused as both (not as an argument too many).
    args = ["outbound_request", UID, "--uid-file", str(uid_file), "10.0.0.1:5100"]
    status, out, err = run(capsys, *args)
    assert status == 2 and out == ""
    assert err.splitlines() == [
        "usage: s2uc outbound_request [OPTIONS] [UID] HPC_LISTENER",
        "error: give the UID as an argument or with --uid-file, not both",
    ]


def test_debug_before_the_command_shows_the_traceback(capsys, tmp_path):
    missing = tmp_path / "none.crt"
    status, _, err = run(capsys, "info", "--server_cert", str(missing))
    assert (
        status == 2 and err.splitlines() == [err.strip()] and err.startswith("error: no server certificate")
    )
    status, _, err = run(capsys, "--debug", "info", "--server_cert", str(missing))
    assert status == 2 and "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith("error: no server certificate")


def test_importing_the_cli_loads_nothing_heavy():
    check = (
        "import sys\n"
        "import scistream.s2uc.cli\n"
        "heavy = ('typer', 'click', 'scistream.s2cs', 'scistream.s2ds', 'cryptography', 'globus_sdk')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_a_request_loads_no_typing():
    """typing is only for the type checker here: at run time it was 3-4 ms of every command."""
    check = "import sys, scistream.s2uc.cli, scistream.api\nprint('typing' in sys.modules)\n"
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"
