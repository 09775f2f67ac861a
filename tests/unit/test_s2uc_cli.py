"""The command line of s2uc (scistream/s2uc/cli.py), through its real entry point `main`: the
commands and options a user sees, usage errors that exit 2 with typer's usage and one line, and
what a command loads (each command pays for it before it sends anything)."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from scistream import __version__, api
from scistream.client.replies import Released
from scistream.errors import NotFound
from scistream.s2uc.cli import main

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
    assert out.startswith("Usage: s2uc [OPTIONS] COMMAND [ARGS]...\n")
    listed = [line.split()[0] for line in out.split("Commands:\n")[1].splitlines() if line.startswith("  ")]
    assert listed == COMMANDS
    assert "  logout            Revoke stored tokens at Globus Auth and delete them.\n" in out
    assert "  inbound_request   Create the inbound proxy in front of a service at" in out
    for alias in ALIASES:
        assert alias not in out
    assert "--debug" in out and "--version" in out


def test_no_arguments_show_the_help_and_exit_2(capsys):
    status, out, err = run(capsys)
    assert status == 2 and out == ""
    assert err.startswith("Usage: s2uc ") and "Commands:" in err


@pytest.mark.parametrize("command", [*COMMANDS, *ALIASES])
def test_the_help_of_a_command_lists_each_of_its_options(capsys, command):
    status, out, err = run(capsys, command, "--help")
    assert status == 0 and err == ""
    assert out.startswith(f"Usage: s2uc {command} [OPTIONS]")
    for option in OPTIONS[ALIASES.get(command, command)]:
        assert f"  {option}" in out, option


def test_help_shows_defaults_ranges_and_the_docstring_paragraphs(capsys):
    _, out, _ = run(capsys, "inbound_request", "--help")
    assert "[default: 5; 1<=x<=10000]" in " ".join(out.split())
    assert "[default: localhost:5000]" in " ".join(out.split())
    assert "[required]" in out
    _, out, _ = run(capsys, "login", "--help")
    assert "\n\n  Needs SCISTREAM_CLIENT_ID" in out  # the docstring's second paragraph, kept apart


def test_version(capsys):
    assert run(capsys, "--version") == (0, f"s2uc {__version__}\n", "")


def _usage_error(err: str, command: str = "") -> str:
    """The error line of a usage error, after typer's usage line and its pointer to --help."""
    prog = f"s2uc {command}".strip()
    usage, pointer, blank, error = err.splitlines()
    # The words after [OPTIONS] differ with the typer release ([UID] or UID): not checked.
    assert usage.startswith(f"Usage: {prog} [OPTIONS]"), err
    assert (pointer, blank) == (f"Try '{prog} --help' for help.", ""), err
    assert error.startswith("Error: ")
    return error


def test_a_missing_required_option_is_a_usage_error(capsys):
    status, out, err = run(capsys, "inbound_request", "--remote_ip", "10.0.0.1")
    assert status == 2 and out == ""
    assert "Missing option '--receiver_ports'" in _usage_error(err, "inbound_request")


@pytest.mark.parametrize("value", ["0", "10001", "many"])
def test_num_conn_out_of_its_range_is_a_usage_error(capsys, value):
    args = ["inbound_request", "--remote_ip", "10.0.0.1", "--receiver_ports", "5001", "--num-conn", value]
    status, out, err = run(capsys, *args)
    assert status == 2 and out == ""
    error = _usage_error(err, "inbound_request")
    assert error.startswith("Error: Invalid value for '--num_conn' / '--num-conn': ") and value in error
    assert "is not in the range 1<=x<=10000" in error or "'many' is not a valid int" in error


def test_ports_that_are_not_ports_are_a_usage_error(capsys):
    args = ["inbound_request", "--remote_ip", "10.0.0.1", "--receiver-ports", "5001,70000"]
    status, _, err = run(capsys, *args)
    assert status == 2
    error = _usage_error(err, "inbound_request")
    assert error == (
        "Error: Invalid value for '--receiver_ports' / '--receiver-ports': 70000 is not a TCP port (1-65535)"
    )
    status, _, err = run(capsys, *args[:-1], "5001;5002")
    assert status == 2
    assert _usage_error(err, "inbound_request").endswith(
        "expected ports separated by commas, like 5001,5002; got '5001;5002'"
    )


def test_an_unknown_command_or_option_is_a_usage_error(capsys):
    status, out, err = run(capsys, "inbound")
    assert status == 2 and out == ""
    assert _usage_error(err).startswith("Error: No such command 'inbound'")
    status, _, err = run(capsys, "info", "--s2c", "h:1")  # no abbreviations: a typo is not guessed
    error = _usage_error(err, "info")  # click's words differ from one release to the next
    assert status == 2 and error.startswith("Error: No such option") and "--s2c" in error
    status, _, err = run(capsys, "info", "--debug")  # --debug is s2uc's, before the command
    error = _usage_error(err, "info")
    assert status == 2 and error.startswith("Error: No such option") and "--debug" in error


def test_release_takes_s2cs_twice(capsys, monkeypatch, tmp_path):
    asked = {}

    def release(uid, *, s2cs, server_cert, scope=None, accept_new_cert=False, names=None):
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

    def release(uid, *, s2cs, server_cert, scope=None, accept_new_cert=False, names=None):
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
    error = _usage_error(err, "outbound_request")
    assert error == "Error: give the UID as an argument or with --uid-file, not both"


def test_debug_before_the_command_shows_the_traceback(capsys, tmp_path):
    missing = tmp_path / "none.crt"
    status, _, err = run(capsys, "info", "--server_cert", str(missing))
    assert (
        status == 2 and err.splitlines() == [err.strip()] and err.startswith("error: no server certificate")
    )
    status, _, err = run(capsys, "--debug", "info", "--server_cert", str(missing))
    assert status == 2 and "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith("error: no server certificate")


def test_the_installed_command_shows_typers_help_and_exits_as_a_program_does():
    """The console script pyproject.toml names, in a process of its own: the entry point itself."""
    s2uc = Path(sys.executable).parent / "s2uc"
    done = subprocess.run([s2uc, "--help"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("Usage: s2uc [OPTIONS] COMMAND [ARGS]...")
    done = subprocess.run(
        [s2uc, "info", "--server_cert", "/nonexistent.crt"], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("error: no server certificate at /nonexistent.crt")


HEAVY = ("scistream.s2cs", "scistream.s2ds", "cryptography", "globus_sdk")
LOADED = (
    "heavy = {heavy!r}\n"
    "print(json.dumps({{'status': status, 'heavy': sorted(m for m in sys.modules "
    "if m.split('.')[0] in heavy or m.startswith(heavy))}}))\n"
)


def test_importing_the_cli_loads_no_server_data_plane_cryptography_or_globus_sdk():
    # Nor the API, the client library and the scopes: each command imports what it needs.
    heavy = (*HEAVY, "scistream.api", "scistream.client", "scistream.scopes")
    check = "import json, sys\nimport scistream.s2uc.cli\nstatus = 0\n" + LOADED.format(heavy=heavy)
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == {"status": 0, "heavy": []}


def _gateway(tmp_path: Path, reply: dict[str, object]) -> tuple[socket.socket, Path]:
    """A TLS server on 127.0.0.1 that answers each request line with `reply`: its socket, and its
    certificate for --server_cert."""
    import datetime

    from tests.certificates import pair_pem

    now = datetime.datetime.now(datetime.UTC)
    cert_pem, key_pem = pair_pem(now - datetime.timedelta(days=1), now + datetime.timedelta(days=1))
    cert, key = tmp_path / "gateway.crt", tmp_path / "gateway.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls, tls.makefile("rwb") as lines:
                    lines.readline()
                    lines.write(json.dumps(reply).encode() + b"\n")
            except (ssl.SSLError, OSError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return listener, cert


def test_a_request_loads_no_server_data_plane_cryptography_or_globus_sdk(tmp_path):
    """All of `s2uc inbound_request`, reply and summary included, in a process of its own."""
    limits = {
        "num_conn": {"value": 5, "enforced": True, "by": "HAProxy maxconn"},
        "rate": {"value": 10000, "unit": "kb/s", "human": "10 Mbit/s", "enforced": True, "by": "the shaper"},
    }
    reply = {"ok": True, "uid": UID, "role": "inbound", "listeners": ["127.0.0.1:5100"], "limits": limits}
    listener, cert = _gateway(tmp_path, reply)
    with listener:
        args = ["inbound_request", "--s2cs", f"127.0.0.1:{listener.getsockname()[1]}"]
        args += ["--server_cert", str(cert), "--remote_ip", "10.0.0.1", "--receiver_ports", "5001"]
        check = (
            "import json, sys\n"
            "from scistream.s2uc.cli import main\n"
            "try:\n"
            f"    main({args!r})\n"
            "except SystemExit as exc:\n"
            "    status = exc.code\n"
        ) + LOADED.format(heavy=HEAVY)
        done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    *summary, loaded = done.stdout.splitlines()
    assert summary[0] == f"UID: {UID}", done.stderr
    assert json.loads(loaded) == {"status": 0, "heavy": []}


def test_a_uid_read_from_standard_input_is_said_to_come_from_there():
    from scistream.s2uc.cli import _named

    assert _named(UID, Path("-")) == f"{UID[:8]} (UID from stdin)"
    assert _named(UID, Path("uid.txt")) == f"{UID[:8]} (UID in uid.txt)"
