"""Globus authentication end to end: the real s2uc and s2cs code, globus-sdk, a local stand-in."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scistream.client.tokens import NATIVE_CLIENT_ID
from scistream.loopback import BIN, Sink

from ..globus_standin import GlobusStandIn
from .conftest import field, s2uc, wait_for

S2CS_ID = "3a1b6c2d-0e4f-4a5b-8c7d-9e0f1a2b3c4d"
S2CS_SECRET = "s2cs-secret-for-tests"
# Another facility's S2CS, with Globus credentials of its own.
OTHER_ID = "9c8b7a6d-5e4f-4321-8fed-cba987654321"
OTHER_SECRET = "other-secret-for-tests"
SCOPE = f"https://auth.globus.org/scopes/{S2CS_ID}/scistream"
NATIVE_ID = "7d9e0f1a-2b3c-4d5e-8f60-718293a4b5c6"


@pytest.fixture
def globus(workdir: Path) -> Iterator[GlobusStandIn]:
    standin = GlobusStandIn(workdir, confidential={S2CS_ID: S2CS_SECRET, OTHER_ID: OTHER_SECRET}).start()
    yield standin
    standin.stop()


def user_env(globus: GlobusStandIn, workdir: Path, user: str) -> dict[str, str]:
    return {
        **globus.env,
        "SCISTREAM_HOME": str(workdir / user / ".scistream"),
        "SCISTREAM_CLIENT_ID": NATIVE_ID,
    }


def login(globus: GlobusStandIn, env: dict[str, str], user: str, scope: str = SCOPE, *args: str) -> str:
    """`s2uc login --scope`, as the user guide has it: open the address, paste the code.
    With scope "", the login is `s2uc login ARGS` (--s2cs HOST:PORT ...)."""
    proc = subprocess.Popen(
        [str(BIN / "s2uc"), "login", *(("--scope", scope) if scope else ()), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.stdout is not None and proc.stdin is not None
    address, before = "", ""
    while not address:
        line = proc.stdout.readline()
        assert line, f"s2uc login printed no address: {proc.stderr.read() if proc.stderr else ''}"
        before += line
        if line.strip().startswith("https://"):
            address = line.strip()
    proc.stdin.write(globus.authorize(address, user) + "\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return before + out


def secured_s2cs(start_s2cs, globus: GlobusStandIn):
    return start_s2cs(
        "hpc", "--client-id", S2CS_ID, env={**globus.env, "SCISTREAM_CLIENT_SECRET": S2CS_SECRET}
    )


def other_s2cs(start_s2cs, globus: GlobusStandIn, scope: str = SCOPE, name: str = "other"):
    """Another facility's S2CS, which advertises `scope`: by default the hpc facility's."""
    env = {**globus.env, "SCISTREAM_CLIENT_SECRET": OTHER_SECRET}
    return start_s2cs(name, "--client-id", OTHER_ID, "--auth-scope", scope, env=env)


def at(gw) -> list[str]:
    return ["--s2cs", gw.address, "--server_cert", str(gw.cert)]


def test_login_stores_a_private_token_that_check_auth_sees(globus, workdir):
    env = user_env(globus, workdir, "alice")
    assert s2uc("check-auth", "--scope", SCOPE, env=env, check=False).returncode == 4

    out = login(globus, env, "alice")
    assert f"for {SCOPE}" in out
    tokens = workdir / "alice" / ".scistream" / "tokens.json"
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600

    checked = s2uc("check-auth", "--scope", SCOPE, env=env)
    assert "Logged in" in checked.stdout
    token = next(iter(globus.access))
    assert token not in checked.stdout  # never printed unless asked
    assert token in s2uc("check-auth", "--scope", SCOPE, "--show-token", env=env).stdout
    # Another scope is another login.
    assert (
        s2uc("check-auth", "--scope", "https://auth.globus.org/scopes/x/y", env=env, check=False).returncode
        == 4
    )


def test_an_expiring_token_is_refreshed_before_use(globus, workdir):
    globus.token_lifetime = 30  # shorter than the client's refresh margin
    env = user_env(globus, workdir, "alice")
    login(globus, env, "alice")
    assert s2uc("check-auth", "--scope", SCOPE, env=env).returncode == 0
    assert globus.calls.get("/v2/oauth2/token", 0) >= 2  # the code exchange, then a refresh


def test_logout_revokes_and_deletes(globus, workdir):
    env = user_env(globus, workdir, "alice")
    login(globus, env, "alice")
    out = s2uc("logout", env=env).stdout
    assert "1 login(s) revoked" in out
    assert all(grant.revoked for grant in globus.access.values())
    assert s2uc("check-auth", "--scope", SCOPE, env=env, check=False).returncode == 4


def test_a_secured_s2cs_serves_logged_in_users_and_keeps_their_streams_apart(start_s2cs, globus, workdir):
    hpc = secured_s2cs(start_s2cs, globus)
    assert hpc.call("info")["auth"] == {"enabled": True, "scope": SCOPE}
    alice, bob = user_env(globus, workdir, "alice"), user_env(globus, workdir, "bob")
    sink = Sink()
    server = ["--s2cs", hpc.address, "--server_cert", str(hpc.cert)]
    request = ["inbound_request", *server, "--remote_ip", "127.0.0.1", "--receiver_ports", str(sink.port)]

    refused = s2uc(*request, env=alice, check=False)
    assert refused.returncode == 4
    # Tells the user what to do: log in there, or name the scope ID, as the guide does.
    assert f"s2uc login --s2cs {hpc.address}" in refused.stderr and f"--scope {S2CS_ID}" in refused.stderr

    login(globus, alice, "alice")
    uid = field(s2uc(*request, "--scope", SCOPE, env=alice).stdout, "UID")
    # Without --scope too, once alice logged in at this server: it told her client its scope.
    login(globus, alice, "alice", "", *server)
    second = field(s2uc(*request, env=alice).stdout, "UID")

    login(globus, bob, "bob", "", *server)
    assert s2uc("status", *server, env=bob).stdout.startswith("No streams")  # not bob's
    denied = s2uc("release", uid, *server, env=bob, check=False)
    # Refused as if the stream did not exist: bob learns nothing of what alice runs.
    assert denied.returncode == 5 and "NOT_FOUND" in denied.stderr, denied.stderr
    listing = s2uc("status", *server, "--json", env=alice).stdout
    assert uid in listing and second in listing  # alice sees her own, in full

    for stream in (uid, second):
        s2uc("release", stream, *server, env=alice)
    # Every request was checked, but Globus was asked once per token and minute.
    assert globus.calls["/v2/oauth2/token/introspect"] <= 3

    s2uc("logout", env=alice)
    after = s2uc(*request, env=alice, check=False)
    assert after.returncode == 4


def test_login_with_the_scope_id_of_the_user_guide_serves_requests(start_s2cs, globus, workdir):
    """5.6 as written: `s2uc login --scope YOUR_SCOPE_ID`, the ID a facility hands out."""
    hpc = secured_s2cs(start_s2cs, globus)
    # The operator sees at start what to tell users: the ID form of the guide.
    assert f"users log in with: s2uc login --scope {S2CS_ID}\n" in hpc.log.read_text()
    env = user_env(globus, workdir, "alice")
    sink = Sink()
    server = ["--s2cs", hpc.address, "--server_cert", str(hpc.cert)]
    request = ["inbound_request", *server, "--remote_ip", "127.0.0.1", "--receiver_ports", str(sink.port)]

    out = login(globus, env, "alice", scope=S2CS_ID.upper())  # as copied, in whatever case
    assert f"for {SCOPE}" in out  # what the ID stands for
    assert f"for {SCOPE}" in s2uc("check-auth", "--scope", S2CS_ID, env=env).stdout
    uid = field(s2uc(*request, "--scope", S2CS_ID, env=env).stdout, "UID")
    s2uc("release", uid, *server, "--scope", S2CS_ID, env=env)
    # The full scope string names the same login.
    assert s2uc("check-auth", "--scope", SCOPE, env=env).returncode == 0
    assert "1 login(s) revoked" in s2uc("logout", "--scope", S2CS_ID, env=env).stdout


def test_no_token_goes_to_a_server_that_advertises_a_scope_the_user_did_not_name(start_s2cs, globus, workdir):
    hpc = secured_s2cs(start_s2cs, globus)
    other = other_s2cs(start_s2cs, globus)  # asks for the hpc facility's scope
    assert other.call("info")["auth"]["scope"] == SCOPE
    env = user_env(globus, workdir, "alice")
    sink = Sink()
    service = ["--remote_ip", "127.0.0.1", "--receiver_ports", str(sink.port)]

    login(globus, env, "alice", S2CS_ID)  # for the hpc facility, at no server in particular
    for args in (["status", *at(other)], ["inbound_request", *at(other), *service], ["status", *at(hpc)]):
        refused = s2uc(*args, env=env, check=False)
        assert refused.returncode == 4, refused.stderr
        server = args[2]
        (line,) = refused.stderr.splitlines()
        assert f"--scope {S2CS_ID}" in line and f"s2uc login --s2cs {server}" in line  # what to do
    assert globus.introspected == []  # neither server saw the token

    # Logged in at the hpc S2CS: it gets the token without --scope; the other one still gets none.
    out = login(globus, env, "alice", "", *at(hpc))
    assert f"{hpc.address} asks for a Globus login for {SCOPE}" in out
    assert s2uc("status", *at(hpc), env=env).stdout.startswith("No streams")
    refused = s2uc("inbound_request", *at(other), *service, env=env, check=False)
    assert refused.returncode == 4
    assert {server for server, _ in globus.introspected} == {S2CS_ID}
    # Named with --scope, the token goes where the user sends it: that is her call.
    named = s2uc("status", *at(other), "--scope", S2CS_ID, env=env, check=False)
    assert "not for this server's scope" not in named.stderr
    assert OTHER_ID in {server for server, _ in globus.introspected}

    servers = workdir / "alice" / ".scistream" / "servers.json"
    assert stat.S_IMODE(servers.stat().st_mode) == 0o600
    bound = json.loads(servers.read_text())["servers"]
    assert hpc.address in bound and other.address not in bound
    s2uc("logout", env=env)
    # Logged out: no server gets a token any more; who each server is stays known (its pin).
    known = json.loads(servers.read_text())
    assert known["servers"] == {} and {hpc.address, other.address} <= set(known["certificates"])


def test_login_at_an_s2cs_takes_only_a_scistream_scope_unless_the_user_names_it(start_s2cs, globus, workdir):
    env = user_env(globus, workdir, "alice")
    plain = start_s2cs("plain")
    result = run_login(env, "", *at(plain))
    assert result.returncode == 2 and "authentication off" in result.stderr
    transfer = "urn:globus:auth:scope:transfer.api.globus.org:all"
    odd = other_s2cs(start_s2cs, globus, scope=transfer, name="odd")
    result = run_login(env, "", *at(odd))
    assert result.returncode == 2 and "https://" not in result.stdout  # no Globus address shown
    assert f"--scope {transfer}" in result.stderr  # only if its operators say so
    result = run_login(env, "", *at(odd), "--scope", S2CS_ID)
    assert result.returncode == 2 and f"asks for {transfer}, not {SCOPE}" in result.stderr
    # Named, it is the user's choice.
    login(globus, env, "alice", transfer, *at(odd))
    assert s2uc("status", *at(odd), env=env).returncode == 0
    assert result.stderr.count("\n") == 1
    missing = run_login(env, "")
    assert missing.returncode == 2 and "--s2cs" in missing.stderr and "--scope" in missing.stderr


def test_info_says_how_to_log_in(start_s2cs, globus):
    hpc = secured_s2cs(start_s2cs, globus)
    out = s2uc("info", *at(hpc)).stdout
    assert f"auth       on, scope {SCOPE}" in out
    assert (
        f"login      s2uc login --s2cs {hpc.address} --server_cert {hpc.cert} (or --scope {S2CS_ID})" in out
    )


def test_a_token_for_another_scope_is_refused(start_s2cs, globus, workdir):
    hpc = secured_s2cs(start_s2cs, globus)
    env = user_env(globus, workdir, "alice")
    other = "https://auth.globus.org/scopes/0000/other"
    login(globus, env, "alice", scope=other)
    refused = s2uc("info", "--s2cs", hpc.address, "--server_cert", str(hpc.cert), env=env)
    assert "auth       on" in refused.stdout
    result = s2uc(
        "status",
        "--s2cs",
        hpc.address,
        "--server_cert",
        str(hpc.cert),
        "--scope",
        other,
        env=env,
        check=False,
    )
    assert result.returncode == 4 and "not for this server's scope" in result.stderr
    assert f"s2uc login --scope {S2CS_ID} " in result.stderr  # the ID, as the facility hands it out


def run_login(env: dict[str, str], stdin: str = "", *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "s2uc"), "login", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize(
    "client_id", ["", NATIVE_CLIENT_ID, "not-a-client-id"], ids=["unset", "placeholder", "not-a-uuid"]
)
def test_login_without_a_registered_client_id_says_to_set_scistream_client_id(globus, workdir, client_id):
    env = {**user_env(globus, workdir, "alice"), "SCISTREAM_CLIENT_ID": client_id}
    result = run_login(env, "some-code\n", "--scope", S2CS_ID)
    assert result.returncode == 2, result.stderr
    assert "https://" not in result.stdout  # no address that cannot work
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and "set SCISTREAM_CLIENT_ID" in line
    assert globus.calls == {}
    assert not (workdir / "alice" / ".scistream" / "tokens.json").exists()


def test_login_help_says_that_it_needs_scistream_client_id():
    out = s2uc("login", "--help").stdout
    assert "SCISTREAM_CLIENT_ID" in out


def _printed_up_to(proc: subprocess.Popen[str], words: str) -> str:
    """What `proc` printed up to `words` (a prompt ends with no newline, so read by characters);
    fails when its output ends first, rather than waiting on for ever."""
    assert proc.stdout is not None and proc.stderr is not None
    printed = ""
    while not printed.endswith(words):
        char = proc.stdout.read(1)
        assert char, f"the output ended before {words!r}: {printed!r} {proc.stderr.read()!r}"
        printed += char
    return printed


def test_an_aborted_login_prompt_exits_with_the_auth_status_and_one_line(globus, workdir):
    env = user_env(globus, workdir, "alice")
    result = run_login(env, "", "--scope", S2CS_ID)  # the prompt meets the end of its input
    assert result.returncode == 4, result.stderr
    assert "Aborted" not in result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line == "error: login aborted: no authorization code pasted; nothing changed"

    # Ctrl-C at the prompt: the same.
    proc = subprocess.Popen(
        [str(BIN / "s2uc"), "login", "--scope", S2CS_ID],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    printed = _printed_up_to(proc, "Authorization code: ")  # at the prompt, waiting for the code
    assert "https://" in printed
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, err
    assert "Aborted" not in out + err and "Traceback" not in err
    assert not (workdir / "alice" / ".scistream" / "tokens.json").exists()


def test_half_configured_authentication_is_refused_at_start(workdir):
    result = subprocess.run(
        [str(BIN / "s2cs"), "--client-id", S2CS_ID, "--state-dir", str(workdir / "x")],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "SCISTREAM_CLIENT_SECRET"},
    )
    assert result.returncode == 2
    assert "needs both --client-id and --client-secret" in result.stderr


def test_the_proxies_of_a_secured_s2cs_do_not_inherit_its_client_secret(start_s2cs, globus, workdir):
    """s2cs takes its Globus secret from the environment; the proxies and shapers it starts need
    none of it, and a copy in every process's environment is one more place it can leak from."""
    hpc = secured_s2cs(start_s2cs, globus)
    alice = user_env(globus, workdir, "alice")
    login(globus, alice, "alice", "", *at(hpc))
    sink = Sink()
    request = ["inbound_request", *at(hpc), "--remote_ip", "127.0.0.1", "--receiver_ports", str(sink.port)]
    uid = field(s2uc(*request, "--rate", "1000", env=alice).stdout, "UID")
    status = json.loads(s2uc("status", uid, *at(hpc), "--json", env=alice).stdout)
    pids = [p["pid"] for stream in status["streams"] for p in stream["processes"]]
    assert len(pids) == 2, status  # the proxy and its shaper
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"SCISTREAM_CLIENT_SECRET" not in environ and S2CS_SECRET.encode() not in environ, pid
        assert b"PATH=" in environ  # what a process needs is still there
    s2uc("release", uid, *at(hpc), env=alice)


def test_login_while_globus_auth_cannot_be_reached_names_it_and_the_cause(globus, workdir):
    """Offline: one line that says which address could not be reached, and why; soon."""
    env = user_env(globus, workdir, "alice")
    globus.stop()  # nothing answers there now
    started = time.monotonic()
    result = run_login(env, "some-code\n", "--scope", S2CS_ID)
    took = time.monotonic() - started
    assert result.returncode == 3, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: Globus Auth: exchanging the code failed: cannot reach {globus.url}")
    assert "Connection refused" in line
    assert "ConnectionError" not in line
    assert took < 8, f"{took:.1f}s: the login retried an address that refuses connections"


def test_a_secured_s2cs_that_cannot_reach_globus_auth_says_so_at_once_in_its_own_words(
    start_s2cs, globus, workdir
):
    hpc = secured_s2cs(start_s2cs, globus)
    env = user_env(globus, workdir, "alice")
    login(globus, env, "alice")
    globus.stop()
    started = time.monotonic()
    result = s2uc("status", "--scope", S2CS_ID, *at(hpc), env=env, check=False)
    took = time.monotonic() - started
    assert result.returncode != 0
    (line,) = result.stderr.splitlines()
    assert "this server cannot reach Globus Auth" in line, line
    assert took < 8, f"{took:.1f}s: s2cs retried an address that refuses connections"
    said = f"cannot check a token: Globus Auth: cannot reach {globus.url} (Connection refused)"
    logged = wait_for(lambda: said in hpc.log.read_text() and hpc.log.read_text())
    before = str(logged).split(said)[0]
    assert "request done" not in before  # globus-sdk's own line, which says less, is not shown


def test_a_scope_given_to_a_gateway_without_authentication_is_no_obstacle(start_s2cs, globus, workdir):
    """README: pass the same --scope to every command; a gateway with authentication off takes it."""
    hpc = start_s2cs("hpc")
    env = user_env(globus, workdir, "alice")  # never logged in
    result = s2uc("status", "--scope", S2CS_ID, *at(hpc), env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("No streams on ")
