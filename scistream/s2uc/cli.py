"""`s2uc`: the SciStream user client.

Thin commands (STYLE.md rule 7): parse the options, make one call, print a short summary, or the
reply itself with --json. Failures print one line and exit with the status of errors.ExitStatus.
"""

from __future__ import annotations

import datetime
import json
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from .. import __version__
from ..errors import ConfigError, ExitStatus, ScistreamError, Unauthenticated
from ..protocol import DEFAULT_NUM_CONN, DEFAULT_RATE, MAX_NUM_CONN, MAX_RATE
from .client import Connection, Server, advertised_auth, parse_server, tls_context
from .servers import ServerScopes
from .tokens import TokenStore, home, registered_client_id
from .uids import UidFile, normalize_uid, read_uid

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="SciStream user client: set up, inspect and release data streams between facilities.",
)
_debug = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"s2uc {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show a traceback on errors.")] = False,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    global _debug
    _debug = debug


S2cs = Annotated[str, typer.Option("--s2cs", help="The S2CS to ask, HOST:PORT.")]
ServerCert = Annotated[
    Path,
    typer.Option("--server_cert", "--server-cert", help="Certificate of the S2CS (PEM), from its operator."),
]
Scope = Annotated[
    str | None,
    typer.Option(
        "--scope", help="Scope ID (or full scope) of the S2CS, for secured endpoints: send its token."
    ),
]
NumConn = Annotated[
    int,
    typer.Option(
        "--num_conn", "--num-conn", min=1, max=MAX_NUM_CONN, help="Most concurrent connections; more wait."
    ),
]
Rate = Annotated[
    int,
    typer.Option(
        "--rate",
        min=0,
        max=MAX_RATE,
        help="Most data per second in kb/s (1 kb = 1000 bit), each direction; 0 = unlimited.",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print the server's reply as JSON, for scripts.")]
UidFileIn = Annotated[
    Path | None,
    typer.Option(
        "--uid-file",
        "--uid_file",
        help="Read the stream's UID from this file (- for stdin), not from the command line, where "
        "other users can see it.",
    ),
]


def _uid(given: str | None, uid_file: Path | None) -> str:
    """The stream's UID, from the command line or from --uid-file (exactly one of them)."""
    if given is not None and uid_file is not None:
        raise ConfigError("give the UID as an argument or with --uid-file, not both")
    if uid_file is not None:
        return read_uid(uid_file, sys.stdin)
    if given is None:
        raise ConfigError("which stream? --uid-file FILE (the file inbound_request wrote), or the UID")
    return normalize_uid(given)


def _named(uid: str, uid_file: Path | None) -> str:
    """How output names a stream: in full as the user typed it; by its prefix when it came from a
    file, so that output kept in a log does not give the secret away."""
    return uid if uid_file is None else f"{uid[:8]} (UID in {uid_file})"


def _ports(text: str | None) -> list[int] | None:
    if text is None or not text.strip():
        return None
    try:
        ports = [int(p) for p in text.split(",")]
    except ValueError:
        raise typer.BadParameter(
            f"expected ports separated by commas, like 5001,5002; got {text!r}"
        ) from None
    for port in ports:
        if not 1 <= port <= 65535:
            raise typer.BadParameter(f"{port} is not a TCP port (1-65535)")
    return ports


def _fail(exc: ScistreamError, server: Server | None = None) -> NoReturn:
    """One line and the exit status of the error; a traceback only with --debug."""
    if _debug:
        traceback.print_exc()
    origin = f" ({exc.code} from {server})" if server and exc.remote else ""
    typer.echo(f"error: {exc.message}{origin}", err=True)
    raise typer.Exit(exc.exit_status) from None


def _expand(scope: str) -> str:
    from .scopes import expand  # loads globus-sdk: only commands given a scope pay for it

    return expand(scope)


def _run(server_text: str, server_cert: Path, scope: str | None, body: Callable[[Connection], None]) -> None:
    """Run one command against one S2CS; turn its failure into one line and an exit status."""
    server: Server | None = None
    try:
        named = _expand(scope) if scope is not None else None
        server = parse_server(server_text)
        body(Connection(server, tls_context(server_cert), named, server_cert))
    except ScistreamError as exc:
        _fail(exc, server)


def _print_json(reply: dict[str, Any]) -> None:
    typer.echo(json.dumps(reply, indent=2))


def _limits_line(reply: dict[str, Any]) -> str:
    limits = reply["limits"]
    rate = limits["rate"]
    shown = "no rate limit" if rate["value"] == 0 else f"{rate['human']} each direction"
    return f"at most {limits['num_conn']['value']} connections, {shown}"


def _warn_unenforced(reply: dict[str, Any]) -> None:
    for name, limit in reply.get("limits", {}).items():
        if not limit.get("enforced", True):
            typer.echo(f"warning: {name} is NOT enforced by this server: {limit.get('reason', '')}", err=True)
    if reply.get("note"):
        typer.echo(f"note: {reply['note']}", err=True)


def inbound_request(
    remote_ip: Annotated[
        str,
        typer.Option("--remote_ip", "--remote-ip", help="IP address of the service that receives the data."),
    ],
    receiver_ports: Annotated[
        str,
        typer.Option("--receiver_ports", "--receiver-ports", help="Port(s) of the service, comma separated."),
    ],
    s2cs: S2cs = "localhost:5000",
    num_conn: NumConn = DEFAULT_NUM_CONN,
    rate: Rate = DEFAULT_RATE,
    server_cert: ServerCert = Path("server.crt"),
    scope: Scope = None,
    as_json: Json = False,
    uid_file: Annotated[
        Path | None,
        typer.Option(
            "--uid-file",
            "--uid_file",
            help="Write the UID to this file (mode 0600) instead of printing it, to hand over privately.",
        ),
    ] = None,
) -> None:
    """Create the inbound proxy in front of a service at this facility; prints the UID and listeners."""
    ports = _ports(receiver_ports)

    def body(conn: Connection) -> None:
        target = UidFile.prepare(uid_file) if uid_file is not None else None
        try:
            reply = conn.call(
                "inbound", remote_ip=remote_ip, receiver_ports=ports, num_conn=num_conn, rate=rate
            )
        except BaseException:
            if target is not None:
                target.discard()
            raise
        uid, listeners = reply["uid"], reply["listeners"]
        if target is not None:
            try:
                target.write(uid)
            except ConfigError as exc:  # the stream exists: its owner must learn its UID somehow
                exc.message += f"; the stream's UID is {uid}: release it with s2uc release --uid-file -"
                raise
        if as_json:
            return _print_json(reply)
        _warn_unenforced(reply)
        if uid_file is None:
            typer.echo(f"UID: {uid}")
        else:
            typer.echo(f"UID file: {uid_file} (readable by you only; hand it over privately)")
        typer.echo(f"Listeners: {','.join(listeners)}")
        pairs = ", ".join(f"{lst} -> {remote_ip}:{p}" for lst, p in zip(listeners, ports or [], strict=True))
        typer.echo(f"Inbound proxy on {conn.server}: {pairs}; {_limits_line(reply)}.")
        extra = "".join(
            f" --{name} {value}"
            for name, value, default in (
                ("num_conn", num_conn, DEFAULT_NUM_CONN),
                ("rate", rate, DEFAULT_RATE),
            )
            if value != default
        )
        # A user who names this gateway's certificate keeps certificates apart from the working
        # directory: the other side's default, ./server.crt, would then not be there either.
        if server_cert != Path("server.crt"):
            extra = f" --server_cert INSTRUMENT_CERT{extra}"
        handed = uid if uid_file is None else f"--uid-file {shlex.quote(str(uid_file))}"
        typer.echo("On the instrument side, run:")
        typer.echo(
            f"  s2uc outbound_request --s2cs INSTRUMENT_S2CS:5000{extra} {handed} {','.join(listeners)}"
        )

    _run(s2cs, server_cert, scope, body)


def outbound_request(
    uid: Annotated[
        str | None,
        typer.Argument(
            metavar="UID",
            help="UID of the stream, from the inbound side (or --uid-file).",
            show_default=False,
        ),
    ] = None,
    remote_listeners: Annotated[
        str | None,
        typer.Argument(
            metavar="HPC_LISTENER",
            help="Listener address(es) from the inbound side, comma separated.",
            show_default=False,
        ),
    ] = None,
    remote_ip: Annotated[
        str | None,
        typer.Option(
            "--remote_ip", "--remote-ip", help="Address the instrument sends to. [default: all interfaces]"
        ),
    ] = None,
    receiver_ports: Annotated[
        str | None,
        typer.Option(
            "--receiver_ports",
            "--receiver-ports",
            help="Local port(s) the instrument sends to. [default: the server picks]",
        ),
    ] = None,
    s2cs: S2cs = "localhost:5000",
    num_conn: NumConn = DEFAULT_NUM_CONN,
    rate: Rate = DEFAULT_RATE,
    server_cert: ServerCert = Path("server.crt"),
    scope: Scope = None,
    as_json: Json = False,
    uid_file: UidFileIn = None,
) -> None:
    """Create the outbound proxy that carries an instrument's data to the inbound listener(s)."""
    ports = _ports(receiver_ports)
    given, addresses = _outbound_arguments(uid, remote_listeners, uid_file)
    listeners = [a.strip() for a in addresses.split(",") if a.strip()]

    def body(conn: Connection) -> None:
        uid = _uid(given, uid_file)
        reply = conn.call(
            "outbound",
            uid=uid,
            remote_listeners=listeners,
            remote_ip=remote_ip,
            receiver_ports=ports,
            num_conn=num_conn,
            rate=rate,
        )
        if as_json:
            return _print_json(reply)
        _warn_unenforced(reply)
        local = reply["listeners"]
        if uid_file is None:
            typer.echo(f"UID: {reply['uid']}")
        else:
            typer.echo(f"Stream: {_named(uid, uid_file)}")
        typer.echo(f"Listeners: {','.join(local)}")
        pairs = ", ".join(f"{a} -> {b}" for a, b in zip(local, listeners, strict=True))
        typer.echo(f"Outbound proxy on {conn.server}: {pairs} (TLS); {_limits_line(reply)}.")
        typer.echo(f"Send the instrument's data to {_ports_phrase(local)} of this gateway.")

    _run(s2cs, server_cert, scope, body)


def _ports_phrase(addresses: list[str]) -> str:
    """'port 5100', or 'ports 5101 and 5102' for several listeners, in their order."""
    ports = [a.rpartition(":")[2] for a in addresses]
    if len(ports) == 1:
        return f"port {ports[0]}"
    return f"ports {', '.join(ports[:-1])} and {ports[-1]}"


def _outbound_arguments(
    first: str | None, second: str | None, uid_file: Path | None
) -> tuple[str | None, str]:
    """(UID or None, listeners) of `[UID] HPC_LISTENER`: with --uid-file, the one argument is the
    listeners."""
    if uid_file is not None and second is None and first is not None:
        return None, first
    if uid_file is None and second is not None:
        return first, second
    if uid_file is not None and second is not None:
        raise typer.BadParameter("give the UID as an argument or with --uid-file, not both")
    raise typer.BadParameter("give UID HPC_LISTENER, or --uid-file FILE HPC_LISTENER")


def release(
    uid: Annotated[
        str | None,
        typer.Argument(
            metavar="UID", help="UID of the stream to release (or --uid-file).", show_default=False
        ),
    ] = None,
    s2cs: S2cs = "localhost:5000",
    server_cert: ServerCert = Path("server.crt"),
    scope: Scope = None,
    as_json: Json = False,
    uid_file: UidFileIn = None,
) -> None:
    """Stop this server's proxy (or proxies) of a stream and free its ports."""

    def body(conn: Connection) -> None:
        stream = _uid(uid, uid_file)
        reply = conn.call("release", uid=stream)
        if as_json:
            return _print_json(reply)
        released = " and ".join(reply["released"])
        typer.echo(f"Released {released} proxy of stream {_named(stream, uid_file)} on {conn.server}.")

    _run(s2cs, server_cert, scope, body)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def status(
    uid: Annotated[
        str | None, typer.Argument(help="A stream's UID; all visible streams when absent.")
    ] = None,
    s2cs: S2cs = "localhost:5000",
    server_cert: ServerCert = Path("server.crt"),
    scope: Scope = None,
    as_json: Json = False,
    log: Annotated[
        bool, typer.Option("--log", help="With the last lines of the stream's proxy logs (needs the UID).")
    ] = False,
) -> None:
    """Show streams on a server: state, listeners, limits, connections, bytes, restarts, and why
    connections failed."""
    if log and uid is None:
        _fail(ConfigError("--log shows the logs of one stream: give its UID"))

    def body(conn: Connection) -> None:
        # `log` only when asked: a server older than it refuses a field it does not know.
        reply = conn.call("status", uid=None if uid is None else normalize_uid(uid), log=log or None)
        if as_json:
            return _print_json(reply)
        streams = reply["streams"]
        if not streams:
            typer.echo(f"No streams on {conn.server}.")
            return
        header = (
            f"{'UID':36}  {'ROLE':8}  {'STATE':8}  {'CONN':>4}  {'IN':>10}  {'OUT':>10}  {'RESTARTS':>8}  "
            "LISTENERS"
        )
        typer.echo(header)
        for s in streams:
            typer.echo(
                f"{s['uid']:36}  {s['role']:8}  {s['state']:8}  {s.get('connections', '-')!s:>4}  "
                f"{_bytes(s.get('bytes_in')):>10}  {_bytes(s.get('bytes_out')):>10}  {s['restarts']:>8}  "
                f"{','.join(s['listeners'])}"
            )
            if s.get("last_error"):
                lines = s["last_error"].splitlines()
                typer.echo(f"    last error: {lines[0]}")
                for line in lines[1:]:
                    typer.echo(f"                {line}")
            for failure in s.get("failures", []):
                typer.echo(f"    failed: {failure['message']} ({_occurrences(failure)})")
            for proc in s.get("processes", []):
                if "log" in proc:
                    typer.echo(f"    {proc['name']} log, last {len(proc['log'])} line(s):")
                    for line in proc["log"]:
                        typer.echo(f"      {line}")

    _run(s2cs, server_cert, scope, body)


def _occurrences(failure: dict[str, Any]) -> str:
    """'3 times, last at 14:12:50' (with the date when not today)."""
    count = failure["count"]
    times = "once" if count == 1 else f"{count} times"
    if failure.get("last") is None:
        return times
    when = datetime.datetime.fromtimestamp(failure["last"])
    shown = when.strftime("%H:%M:%S" if when.date() == datetime.date.today() else "%Y-%m-%d %H:%M:%S")
    return f"{times}, last at {shown}"


def _policy_lines(policy: dict[str, Any]) -> list[str]:
    """What `info` says of the server's target policy: where a user's proxies may lead."""
    targets = ", ".join(policy.get("targets") or []) or "none"
    if policy.get("targets_default"):
        targets += " (the networks of the gateway's interfaces)"
    peers = policy.get("peers")
    lines = [
        f"  targets    {targets}",
        f"  never      {', '.join(policy.get('never') or [])}",
        f"  peers      {'any' if peers is None else ', '.join(peers) or 'none'}",
    ]
    quota = policy.get("quota") or {}
    if quota:
        lines.append(f"  quota      {', '.join(f'{k} {v}' for k, v in quota.items())}")
    return lines


def info(
    s2cs: S2cs = "localhost:5000",
    server_cert: ServerCert = Path("server.crt"),
    as_json: Json = False,
) -> None:
    """Show what a server offers: version, backend, enforced limits, authentication, ports."""

    def body(conn: Connection) -> None:
        reply = conn.call("info")
        if as_json:
            return _print_json(reply)
        backend = reply["backend"]
        caps = backend["capabilities"]
        typer.echo(f"{conn.server}: s2cs {reply['version']}, protocol {reply['protocol']}")
        typer.echo(f"  backend    {backend['type']} ({backend['version']})")
        for name, cap in caps.items():
            state = "enforced" if cap["enforced"] else f"NOT enforced: {cap.get('reason', '')}"
            typer.echo(f"  {name:10} {state}")
        auth = reply["auth"]
        typer.echo(f"  auth       {'on, scope ' + str(auth['scope']) if auth['enabled'] else 'off'}")
        if auth["enabled"] and isinstance(auth.get("scope"), str):
            from .scopes import login_form

            here = f"s2uc login --s2cs {conn.server}"
            if server_cert != Path("server.crt"):
                here += f" --server_cert {shlex.quote(str(server_cert))}"
            typer.echo(f"  login      {here} (or --scope {login_form(auth['scope'])})")
        typer.echo(
            f"  ports      {reply['port_range']} ({reply['free_ports']} free), {reply['streams']} stream(s)"
        )
        policy = reply.get("policy")  # s2cs before the target policy sends none
        if isinstance(policy, dict):
            for line in _policy_lines(policy):
                typer.echo(line)

    _run(s2cs, server_cert, None, body)


def login(
    scope: Annotated[
        str | None,
        typer.Option(
            "--scope", help="Scope ID of the S2CS, from its operators, or the full scope `s2uc info` shows."
        ),
    ] = None,
    s2cs: Annotated[
        str | None,
        typer.Option(
            "--s2cs",
            help="Log in for the scope this S2CS (HOST:PORT) advertises; its token then goes to it "
            "without --scope.",
        ),
    ] = None,
    server_cert: ServerCert = Path("server.crt"),
) -> None:
    """Log in with Globus for a secured S2CS; the tokens are kept in ~/.scistream/tokens.json.

    Needs SCISTREAM_CLIENT_ID: the id of the Globus native-app client your facility registered
    (the one built into s2uc is a placeholder until the project registers its own).
    """

    def ask(url: str) -> str:
        typer.echo("Open this address in a browser, log in, then paste the authorization code here:")
        typer.echo(f"\n  {url}\n")
        try:
            code: str = typer.prompt("Authorization code")
        except typer.Abort:  # Ctrl-C or the end of the input: click would say only "Aborted!"
            typer.echo()  # end the prompt's line
            raise Unauthenticated("login aborted: no authorization code pasted; nothing changed") from None
        return code

    server: Server | None = None
    try:
        registered_client_id()
        named = _expand(scope) if scope is not None else None
        if s2cs is not None:
            server = parse_server(s2cs)
            named = _scope_of(server, server_cert, named)
            typer.echo(f"{server} asks for a Globus login for {named}.")
        if named is None:
            raise ConfigError(
                "say what to log in for: --s2cs HOST:PORT (the S2CS tells its scope) or --scope SCOPE_ID"
            )
        found = TokenStore().login(named, ask)
        if server is not None:
            ServerScopes(home()).bind(server, named)
    except ScistreamError as exc:
        _fail(exc, server)
    who = f" as {found.identity}" if found.identity else ""
    typer.echo(f"Logged in{who} for {named}; the token is valid until {found.until}, then refreshed.")
    if server is not None:
        typer.echo(f"s2uc sends this token to {server} without --scope, and to no other S2CS.")


def _scope_of(server: Server, server_cert: Path, named: str | None) -> str:
    from .scopes import to_bind

    return to_bind(advertised_auth(server, tls_context(server_cert)), named, str(server))


def check_auth(
    scope: Annotated[str, typer.Option("--scope", help="The scope ID (or full scope) to check.")],
    show_token: Annotated[bool, typer.Option("--show-token", help="Also print the access token.")] = False,
) -> None:
    """Tell whether a valid token for a scope is stored (exit 0) or not (exit 4)."""
    from .scopes import login_form

    try:
        scope = _expand(scope)
        found = TokenStore().find(scope)
    except ScistreamError as exc:
        _fail(exc)
    if found is None:
        typer.echo(f"Not logged in for {scope}: run s2uc login --scope {login_form(scope)}", err=True)
        raise typer.Exit(ExitStatus.AUTH)
    who = f" as {found.identity}" if found.identity else ""
    typer.echo(f"Logged in{who} for {scope}; the token is valid until {found.until}.")
    if show_token:
        typer.echo(found.access_token)


def logout(
    scope: Annotated[
        str | None, typer.Option("--scope", help="Only this scope (ID or full). [default: every scope]")
    ] = None,
) -> None:
    """Revoke stored tokens at Globus Auth and delete them."""
    try:
        scope = _expand(scope) if scope is not None else None
        store = TokenStore()
        gone = store.logout(scope)
        servers = ServerScopes(home()).forget(scope)
    except ScistreamError as exc:
        _fail(exc)
    what = f"for {scope}" if scope else "for every scope"
    typer.echo(f"Logged out {what}: {gone} login(s) revoked and deleted from {store.path}.")
    if servers:
        typer.echo(f"Forgot the {servers} S2CS you had logged in at with --s2cs: none gets a token now.")


# The user guide spells commands with underscores; dashes are accepted too.
for _name, _fn in (("inbound_request", inbound_request), ("outbound_request", outbound_request)):
    app.command(_name)(_fn)
    app.command(_name.replace("_", "-"), hidden=True)(_fn)
app.command()(release)
app.command()(status)
app.command()(info)
app.command()(login)
app.command("check-auth")(check_auth)
app.command("check_auth", hidden=True)(check_auth)
app.command()(logout)


def main() -> None:
    app(prog_name="s2uc")


if __name__ == "__main__":
    main()
