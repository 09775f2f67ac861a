"""`s2uc`: the SciStream user client.

Thin commands (STYLE.md rule 7): parse the options, make one call of the Python API
(scistream/api.py), print a short summary of its result, or the reply itself with --json.
Failures print one line and exit with the status of errors.ExitStatus; a mistake on the command
line prints the usage and one line, and exits 2.

Every command a user runs pays for this module's imports before it sends anything, so it is
built on argparse, builds the parser of the one command that runs, and imports what a command
needs (the API, the token store, globus-sdk) inside that command. It must not import typer,
the server (scistream.s2cs), the data plane (scistream.s2ds) or cryptography.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import ConfigError, ExitStatus, NotFound, ScistreamError, Unauthenticated

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path
    from typing import Any, NoReturn

    from ..api import Client, Outcome, Stream
    from .client import Server
    from .replies import Limits
    from .reports import Failure, Policy
    from .uids import UidFile

PROG = "s2uc"
ABOUT = "SciStream user client: set up, inspect and release data streams between facilities."
DEFAULT_S2CS = "localhost:5000"
DEFAULT_CERT = "server.crt"
_debug = False


class UsageError(Exception):
    """A mistake on the command line that only the command can see: usage, one line, exit 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _uid(given: str | None, uid_file: Path | None) -> str:
    """The stream's UID, from the command line or from --uid-file (exactly one of them)."""
    from .uids import normalize_uid, read_uid

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


def _ports(text: str) -> list[int] | None:
    """--receiver_ports and --local_port: ports separated by commas; None when blank."""
    if not text.strip():
        return None
    try:
        ports = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ports separated by commas, like 5001,5002; got {text!r}"
        ) from None
    for port in ports:
        if not 1 <= port <= 65535:
            raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return ports


def _fail(exc: ScistreamError, server: str | None = None) -> NoReturn:
    """One line and the exit status of the error; a traceback only with --debug."""
    if _debug:
        import traceback

        traceback.print_exc()
    if server:
        from ..api import described

        told = described(exc, server)
    else:
        told = exc.message
    print(f"error: {told}", file=sys.stderr)
    raise SystemExit(int(exc.exit_status)) from None


def _expand(scope: str) -> str:
    from .scopes import expand  # loads globus-sdk: only commands given a scope pay for it

    return expand(scope)


def _run(
    server_text: str,
    server_cert: Path,
    scope: str | None,
    body: Callable[[Client], None],
    accept_new_cert: bool = False,
) -> None:
    """Run one command against one S2CS; turn its failure into one line and an exit status."""
    from ..api import Client

    client: Client | None = None
    try:
        client = Client(server_text, server_cert, scope, accept_new_cert=accept_new_cert)
        body(client)
    except ScistreamError as exc:
        _fail(exc, client.server if client is not None else None)


def _print_json(reply: Mapping[str, Any]) -> None:
    import json

    print(json.dumps(dict(reply), indent=2))


def _warn_unenforced(limits: Limits, note: str | None = None, by: str = "this server") -> None:
    for name, limit in limits.unenforced():
        print(f"warning: {name} is NOT enforced by {by}: {limit.reason or ''}", file=sys.stderr)
    if note:
        print(f"note: {note}", file=sys.stderr)


def _is_default_cert(path: Path) -> bool:
    from pathlib import Path

    return path == Path(DEFAULT_CERT)


def _quoted(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))


def inbound_request(
    remote_ip: str,
    receiver_ports: list[int] | None,
    s2cs: str,
    num_conn: int,
    rate: int,
    server_cert: Path,
    scope: str | None,
    as_json: bool,
    uid_file: Path | None,
    accept_new_cert: bool = False,
) -> None:
    """Create the inbound proxy in front of a service at this facility; prints the UID and listeners."""
    from ..protocol import DEFAULT_NUM_CONN, DEFAULT_RATE

    ports = receiver_ports

    def body(client: Client) -> None:
        from .uids import UidFile

        target = UidFile.prepare(uid_file) if uid_file is not None else None
        try:
            made = client.inbound(remote_ip, ports or [], num_conn=num_conn, rate=rate)
        except BaseException:
            if target is not None:
                target.discard()
            raise
        uid, listeners = made.uid, made.listeners
        if target is not None:
            try:
                target.write(uid)
            except ConfigError as exc:  # the stream exists: its owner must learn its UID somehow
                exc.message += f"; the stream's UID is {uid}: release it with s2uc release --uid-file -"
                raise
        if as_json:
            return _print_json(made.reply)
        _warn_unenforced(made.limits)
        _uid_lines(uid, uid_file)
        print(f"Listeners: {','.join(listeners)}")
        pairs = ", ".join(f"{lst} -> {remote_ip}:{p}" for lst, p in zip(listeners, ports or [], strict=True))
        print(f"Inbound proxy on {client.server}: {pairs}; {made.limits.summary()}.")
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
        if not _is_default_cert(server_cert):
            extra = f" --server_cert INSTRUMENT_CERT{extra}"
        handed = uid if uid_file is None else f"--uid-file {_quoted(uid_file)}"
        print("On the instrument side, run:")
        print(f"  s2uc outbound_request --s2cs INSTRUMENT_S2CS:5000{extra} {handed} {','.join(listeners)}")

    _run(s2cs, server_cert, scope, body, accept_new_cert)


def outbound_request(
    uid: str | None,
    remote_listeners: str | None,
    remote_ip: str | None,
    receiver_ports: list[int] | None,
    s2cs: str,
    num_conn: int,
    rate: int,
    server_cert: Path,
    scope: str | None,
    as_json: bool,
    uid_file: Path | None,
    accept_new_cert: bool = False,
) -> None:
    """Create the outbound proxy that carries an instrument's data to the inbound listener(s)."""
    ports = receiver_ports
    given, addresses = _outbound_arguments(uid, remote_listeners, uid_file)
    listeners = [a.strip() for a in addresses.split(",") if a.strip()]

    def body(client: Client) -> None:
        uid = _uid(given, uid_file)
        made = client.outbound(
            uid, listeners, remote_ip=remote_ip, receiver_ports=ports, num_conn=num_conn, rate=rate
        )
        if as_json:
            return _print_json(made.reply)
        _warn_unenforced(made.limits, made.note)
        local = made.listeners
        if uid_file is None:
            print(f"UID: {made.uid}")
        else:
            print(f"Stream: {_named(uid, uid_file)}")
        print(f"Listeners: {','.join(local)}")
        pairs = ", ".join(f"{a} -> {b}" for a, b in zip(local, listeners, strict=True))
        print(f"Outbound proxy on {client.server}: {pairs} (TLS); {made.limits.summary()}.")
        print(f"Send the instrument's data to {_ports_phrase(local)} of this gateway.")

    _run(s2cs, server_cert, scope, body, accept_new_cert)


def _ports_phrase(addresses: Sequence[str]) -> str:
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
        raise UsageError("give the UID as an argument or with --uid-file, not both")
    raise UsageError("give UID HPC_LISTENER, or --uid-file FILE HPC_LISTENER")


def release(
    uid: str | None,
    s2cs: list[str] | None,
    server_cert: Path,
    scope: str | None,
    as_json: bool,
    uid_file: Path | None,
    accept_new_cert: bool = False,
) -> int:
    """Stop a stream's proxy (or proxies) on a server and free its ports; with several --s2cs, on
    each of them.

    With several --s2cs, a server where the stream is not (NOT_FOUND: released already) is
    reported, and counts as a failure only when the stream was on none of them. The exit status
    is that of the first server that failed, 0 when there is none.
    """
    from .. import api

    try:
        stream = _uid(uid, uid_file)
        outcomes = api.release(
            stream,
            s2cs=s2cs or [DEFAULT_S2CS],
            server_cert=server_cert,
            scope=scope,
            accept_new_cert=accept_new_cert,
        )
    except ScistreamError as exc:
        _fail(exc)
    if len(outcomes) == 1:  # as it always was: the server's reply, or its error
        (outcome,) = outcomes
        if outcome.released is None:
            _fail(outcome.error or ScistreamError("the server released nothing"), outcome.server)
        if as_json:
            _print_json(outcome.released.reply)
        else:
            print(_released_line(outcome, _named(stream, uid_file)))
        return 0
    return _report_releases(stream, outcomes, _named(stream, uid_file), as_json)


def _released_line(outcome: Outcome, named: str) -> str:
    return f"Released {' and '.join(outcome.roles)} proxy of stream {named} on {outcome.server}."


def _report_releases(uid: str, outcomes: tuple[Outcome, ...], named: str, as_json: bool) -> int:
    """One line per server (or the JSON of all), and the exit status: that of the first failure;
    NOT_FOUND when no server had the stream; else 0."""
    from ..api import described

    anywhere = any(o.roles for o in outcomes)
    status = 0 if anywhere else int(ExitStatus.NOT_FOUND)
    for outcome in outcomes:
        if outcome.error is None:
            if not as_json:
                print(_released_line(outcome, named))
            continue
        gone = isinstance(outcome.error, NotFound)
        if gone and anywhere:  # released already: what the user wanted
            if not as_json:
                print(f"note: {described(outcome.error, outcome.server)}", file=sys.stderr)
            continue
        print(f"error: {described(outcome.error, outcome.server)}", file=sys.stderr)
        if not gone and status in (0, ExitStatus.NOT_FOUND):
            status = int(outcome.error.exit_status)
    if as_json:
        _print_json({"ok": status == 0, "uid": uid, "gateways": [_outcome_json(o) for o in outcomes]})
    return status


def _outcome_json(outcome: Outcome) -> dict[str, Any]:
    if outcome.error is None:
        return {"s2cs": outcome.server, "ok": True, "released": list(outcome.roles)}
    error = {"code": outcome.error.code, "message": outcome.error.message}
    return {"s2cs": outcome.server, "ok": False, "error": error}


def connect(
    inbound_s2cs: str,
    outbound_s2cs: str,
    remote_ip: str,
    receiver_ports: list[int] | None,
    local_port: list[int] | None,
    local_ip: str | None,
    num_conn: int,
    rate: int,
    server_cert: Path,
    scope: str | None,
    as_json: bool,
    uid_file: Path | None,
    accept_new_cert: bool = False,
) -> None:
    """Set up both sides of a stream at once: the inbound proxy in front of the service, then the
    outbound proxy the instrument sends to; prints the UID and the address(es) to send to.

    When the outbound side fails, the inbound side is released again: nothing is left half made.
    """
    from .. import api
    from .uids import UidFile

    service, local = receiver_ports, local_port
    try:
        target = UidFile.prepare(uid_file) if uid_file is not None else None
        try:
            stream = api.connect(
                inbound=inbound_s2cs,
                outbound=outbound_s2cs,
                remote_ip=remote_ip,
                receiver_ports=service or [],
                server_cert=server_cert,
                num_conn=num_conn,
                rate=rate,
                scope=scope,
                local_ports=local,
                local_ip=local_ip,
                accept_new_cert=accept_new_cert,
            )
        except BaseException:
            if target is not None:
                target.discard()
            raise
        if target is not None:
            _write_uid(target, stream)
    except ScistreamError as exc:
        _fail(exc)  # connect's messages name the server of each side
    if as_json:
        return _print_json(_stream_json(stream))
    _warn_unenforced(stream.limits, stream.outbound.note, by="either server")
    _uid_lines(stream.uid, uid_file)
    print(f"Listeners: {','.join(stream.listeners)}")
    inbound, outbound = stream.inbound, stream.outbound
    pairs = ", ".join(
        f"{a} -> {remote_ip}:{p}" for a, p in zip(inbound.listeners, service or [], strict=True)
    )
    print(f"Inbound proxy on {inbound.server}: {pairs}; {inbound.limits.summary()}.")
    pairs = ", ".join(f"{a} -> {b}" for a, b in zip(outbound.listeners, inbound.listeners, strict=True))
    print(f"Outbound proxy on {outbound.server}: {pairs} (TLS); {outbound.limits.summary()}.")
    print(f"Send the instrument's data to {_ports_phrase(stream.listeners)} of the instrument gateway.")
    handed = stream.uid if uid_file is None else f"--uid-file {_quoted(uid_file)}"
    both = f"--s2cs {outbound.server} --s2cs {inbound.server}"
    cert = "" if _is_default_cert(server_cert) else f" --server_cert {_quoted(server_cert)}"
    print(f"When done, release both sides: s2uc release {handed} {both}{cert}")


def _uid_lines(uid: str, uid_file: Path | None) -> None:
    if uid_file is None:
        print(f"UID: {uid}")
    else:
        print(f"UID file: {uid_file} (readable by you only; hand it over privately)")


def _write_uid(target: UidFile, stream: Stream) -> None:
    """The UID into --uid-file; if that fails, release the stream: unnamed, nobody could use it."""
    try:
        target.write(stream.uid)
    except ConfigError as exc:
        try:
            stream.release()
            exc.message += "; the stream was released on both servers"
        except ScistreamError as also:
            exc.message += f"; {also.message}"
        raise


def _stream_json(stream: Stream) -> dict[str, Any]:
    return {
        "ok": True,
        "uid": stream.uid,
        "listeners": list(stream.listeners),
        "inbound_listeners": list(stream.inbound.listeners),
        "limits": stream.limits.as_dict(),
        "inbound": {"s2cs": stream.inbound.server, **stream.inbound.reply},
        "outbound": {"s2cs": stream.outbound.server, **stream.outbound.reply},
    }


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
    uid: str | None,
    s2cs: str,
    server_cert: Path,
    scope: str | None,
    as_json: bool,
    log: bool,
    accept_new_cert: bool = False,
) -> None:
    """Show streams on a server: state, listeners, limits, connections, bytes, restarts, and why
    connections failed."""
    if log and uid is None:
        _fail(ConfigError("--log shows the logs of one stream: give its UID"))

    def body(client: Client) -> None:
        found = client.status(uid, log=log)
        if as_json:
            return _print_json(found.reply)
        if not found.streams:
            print(f"No streams on {client.server}.")
            return
        header = (
            f"{'UID':36}  {'ROLE':8}  {'STATE':8}  {'CONN':>4}  {'IN':>10}  {'OUT':>10}  {'RESTARTS':>8}  "
            "LISTENERS"
        )
        print(header)
        for s in found.streams:
            conns = "-" if s.connections is None else str(s.connections)
            print(
                f"{s.uid:36}  {s.role:8}  {s.state:8}  {conns:>4}  "
                f"{_bytes(s.bytes_in):>10}  {_bytes(s.bytes_out):>10}  {s.restarts:>8}  "
                f"{','.join(s.listeners)}"
            )
            if s.last_error:
                lines = s.last_error.splitlines()
                print(f"    last error: {lines[0]}")
                for line in lines[1:]:
                    print(f"                {line}")
            for failure in s.failures:
                print(f"    failed: {failure.message} ({_occurrences(failure)})")
            for proc in s.processes:
                if proc.log is not None:
                    print(f"    {proc.name} log, last {len(proc.log)} line(s):")
                    for line in proc.log:
                        print(f"      {line}")

    _run(s2cs, server_cert, scope, body, accept_new_cert)


def _occurrences(failure: Failure) -> str:
    """'3 times, last at 14:12:50' (with the date when not today)."""
    import datetime

    times = "once" if failure.count == 1 else f"{failure.count} times"
    if failure.last is None:
        return times
    when = datetime.datetime.fromtimestamp(failure.last)
    shown = when.strftime("%H:%M:%S" if when.date() == datetime.date.today() else "%Y-%m-%d %H:%M:%S")
    return f"{times}, last at {shown}"


def _policy_lines(policy: Policy) -> list[str]:
    """What `info` says of the server's target policy: where a user's proxies may lead."""
    targets = ", ".join(policy.targets) or "none"
    if policy.targets_default:
        targets += " (the networks of the gateway's interfaces)"
    peers = policy.peers
    lines = [
        f"  targets    {targets}",
        f"  never      {', '.join(policy.never)}",
        f"  peers      {'any' if peers is None else ', '.join(peers) or 'none'}",
    ]
    quota = policy.quota.items()
    if quota:
        lines.append(f"  quota      {', '.join(f'{k} {v}' for k, v in quota)}")
    return lines


def info(s2cs: str, server_cert: Path, as_json: bool, accept_new_cert: bool = False) -> None:
    """Show what a server offers: version, backend, enforced limits, authentication, ports."""

    def body(client: Client) -> None:
        found = client.info()
        if as_json:
            return _print_json(found.reply)
        backend = found.backend
        print(f"{client.server}: s2cs {found.version}, protocol {found.protocol}")
        print(f"  backend    {backend.type} ({backend.version})")
        for name, cap in (("num_conn", backend.capabilities.num_conn), ("rate", backend.capabilities.rate)):
            state = "enforced" if cap.enforced else f"NOT enforced: {cap.reason or ''}"
            print(f"  {name:10} {state}")
        auth = found.auth
        print(f"  auth       {'on, scope ' + str(auth.scope) if auth.enabled else 'off'}")
        if auth.enabled and auth.scope is not None:
            from .scopes import login_form

            here = f"s2uc login --s2cs {client.server}"
            if not _is_default_cert(server_cert):
                here += f" --server_cert {_quoted(server_cert)}"
            print(f"  login      {here} (or --scope {login_form(auth.scope)})")
        print(f"  ports      {found.port_range} ({found.free_ports} free), {found.streams} stream(s)")
        if found.policy is not None:  # s2cs before the target policy sends none
            for line in _policy_lines(found.policy):
                print(line)

    _run(s2cs, server_cert, None, body, accept_new_cert)


def login(scope: str | None, s2cs: str | None, server_cert: Path, accept_new_cert: bool = False) -> None:
    """Log in with Globus for a secured S2CS; the tokens are kept in ~/.scistream/tokens.json.

    Needs SCISTREAM_CLIENT_ID: the id of the Globus native-app client your facility registered
    (the one built into s2uc is a placeholder until the project registers its own).
    """
    from .client import parse_server
    from .servers import ServerScopes
    from .tokens import TokenStore, home, registered_client_id

    def ask(url: str) -> str:
        print("Open this address in a browser, log in, then paste the authorization code here:")
        print(f"\n  {url}\n")
        code = ""
        try:
            while not code:  # an empty line asks again
                code = input("Authorization code: ")
        except (EOFError, KeyboardInterrupt):  # the end of the input, or Ctrl-C
            print()  # end the prompt's line
            raise Unauthenticated("login aborted: no authorization code pasted; nothing changed") from None
        return code

    server: Server | None = None
    try:
        registered_client_id()
        named = _expand(scope) if scope is not None else None
        if s2cs is not None:
            server = parse_server(s2cs)
            named = _scope_of(server, server_cert, named, accept_new_cert)
            print(f"{server} asks for a Globus login for {named}.")
        if named is None:
            raise ConfigError(
                "say what to log in for: --s2cs HOST:PORT (the S2CS tells its scope) or --scope SCOPE_ID"
            )
        found = TokenStore().login(named, ask)
        if server is not None:
            ServerScopes(home()).bind(server, named)
    except ScistreamError as exc:
        _fail(exc, None if server is None else str(server))
    who = f" as {found.identity}" if found.identity else ""
    print(f"Logged in{who} for {named}; the token is valid until {found.until}, then refreshed.")
    if server is not None:
        print(f"s2uc sends this token to {server} without --scope, and to no other S2CS.")


def _scope_of(server: Server, server_cert: Path, named: str | None, accept_new_cert: bool) -> str:
    from ..api import Client
    from .scopes import to_bind

    auth = Client(str(server), server_cert, accept_new_cert=accept_new_cert).info().auth
    return to_bind({"enabled": auth.enabled, "scope": auth.scope}, named, str(server))


def check_auth(scope: str, show_token: bool) -> int:
    """Tell whether a valid token for a scope is stored (exit 0) or not (exit 4)."""
    from .scopes import login_form
    from .tokens import TokenStore

    try:
        scope = _expand(scope)
        found = TokenStore().find(scope)
    except ScistreamError as exc:
        _fail(exc)
    if found is None:
        print(f"Not logged in for {scope}: run s2uc login --scope {login_form(scope)}", file=sys.stderr)
        return int(ExitStatus.AUTH)
    who = f" as {found.identity}" if found.identity else ""
    print(f"Logged in{who} for {scope}; the token is valid until {found.until}.")
    if show_token:
        print(found.access_token)
    return 0


def logout(scope: str | None) -> None:
    """Revoke stored tokens at Globus Auth and delete them."""
    from .servers import ServerScopes
    from .tokens import TokenStore, home

    try:
        scope = _expand(scope) if scope is not None else None
        store = TokenStore()
        gone = store.logout(scope)
        servers = ServerScopes(home()).forget(scope)
    except ScistreamError as exc:
        _fail(exc)
    what = f"for {scope}" if scope else "for every scope"
    print(f"Logged out {what}: {gone} login(s) revoked and deleted from {store.path}.")
    if servers:
        print(f"Forgot the {servers} S2CS you had logged in at with --s2cs: none gets a token now.")


# --- the command line ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A usage error: the usage line, one `error:` line, exit 2 (as every s2uc error says it)."""
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(int(ExitStatus.USAGE))


class _Help(argparse.HelpFormatter):
    """argparse's help with the paragraphs of a docstring kept apart, lines that start with two
    spaces (the list of commands) kept as they are, and an option's aliases before its one
    metavar: `--num_conn, --num-conn N`."""

    def __init__(self, prog: str) -> None:
        # argparse makes a formatter for each option it adds: the width its own way would import
        # shutil (with bz2 and lzma) for each command.
        super().__init__(prog, max_help_position=34, width=_columns() - 2)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(
            part if "\n  " in part else super(_Help, self)._fill_text(part, width, indent)
            for part in text.split("\n\n")
        )

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {metavar}"


def _columns() -> int:
    """The terminal's width, as shutil.get_terminal_size tells it."""
    import os

    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    terminal = sys.__stdout__
    if columns <= 0 and terminal is not None:
        try:
            columns = os.get_terminal_size(terminal.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


def _doc(command: Callable[..., Any]) -> str:
    """A command's docstring as the text of its help: paragraphs, each on one line."""
    lines = (command.__doc__ or "").strip().splitlines()
    return "\n".join(line.strip() for line in lines)


def _summary(command: Callable[..., Any], room: int) -> str:
    """A command's line in the list of commands: its docstring's first sentence, shortened to fit
    `room` characters with "..." as typer did."""
    text = " ".join(_doc(command).split("\n\n")[0].split())
    end = text.find(". ")
    text = text if end < 0 else text[: end + 1]
    if len(text) <= room:
        return text
    return text[: room - 3].rsplit(" ", 1)[0] + "..."


def _s2cs(p: argparse.ArgumentParser, about: str = "The S2CS to ask, HOST:PORT.") -> None:
    p.add_argument(
        "--s2cs", default=DEFAULT_S2CS, metavar="HOST:PORT", help=f"{about} [default: {DEFAULT_S2CS}]"
    )


def _server_cert(
    p: argparse.ArgumentParser, about: str = "Certificate of the S2CS (PEM), from its operator."
) -> None:
    from pathlib import Path

    p.add_argument(
        "--server_cert",
        "--server-cert",
        dest="server_cert",
        type=Path,
        default=Path(DEFAULT_CERT),
        metavar="FILE",
        help=f"{about} [default: {DEFAULT_CERT}]",
    )
    p.add_argument(
        "--accept-new-cert",
        "--accept_new_cert",
        dest="accept_new_cert",
        action="store_true",
        help="A gateway presents another certificate than the one s2uc pinned for it, and its operator "
        "says it replaced it: pin the new one, if --server_cert holds it.",
    )


def _scope(
    p: argparse.ArgumentParser,
    about: str = "Scope ID (or full scope) of the S2CS, for secured endpoints: send its token.",
) -> None:
    p.add_argument("--scope", metavar="SCOPE", help=about)


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in the range {low}<=x<={high}")
        return value

    return number


def _limits(p: argparse.ArgumentParser) -> None:
    from ..protocol import DEFAULT_NUM_CONN, DEFAULT_RATE, MAX_NUM_CONN, MAX_RATE

    p.add_argument(
        "--num_conn",
        "--num-conn",
        dest="num_conn",
        type=_int_range(1, MAX_NUM_CONN),
        default=DEFAULT_NUM_CONN,
        metavar="N",
        help=f"Most concurrent connections; more wait. [default: {DEFAULT_NUM_CONN}; 1<=x<={MAX_NUM_CONN}]",
    )
    p.add_argument(
        "--rate",
        type=_int_range(0, MAX_RATE),
        default=DEFAULT_RATE,
        metavar="KBPS",
        help="Most data per second in kb/s (1 kb = 1000 bit), each direction; 0 = unlimited. "
        f"[default: {DEFAULT_RATE}; 0<=x<={MAX_RATE}]",
    )


def _json(p: argparse.ArgumentParser, about: str = "Print the server's reply as JSON, for scripts.") -> None:
    p.add_argument("--json", dest="as_json", action="store_true", help=about)


def _uid_file(p: argparse.ArgumentParser, about: str) -> None:
    from pathlib import Path

    p.add_argument("--uid-file", "--uid_file", dest="uid_file", type=Path, metavar="FILE", help=about)


_READ_UID = (
    "Read the stream's UID from this file (- for stdin), not from the command line, where other "
    "users can see it."
)


def _remote_ip(p: argparse.ArgumentParser, about: str, required: bool = True) -> None:
    shown = f"{about} [required]" if required else about
    p.add_argument(
        "--remote_ip", "--remote-ip", dest="remote_ip", metavar="IP", required=required, help=shown
    )


def _receiver_ports(p: argparse.ArgumentParser, about: str, required: bool = True) -> None:
    shown = f"{about} [required]" if required else about
    p.add_argument(
        "--receiver_ports",
        "--receiver-ports",
        dest="receiver_ports",
        type=_ports,
        metavar="PORTS",
        required=required,
        help=shown,
    )


def _inbound_request_options(p: argparse.ArgumentParser) -> None:
    _remote_ip(p, "IP address of the service that receives the data.")
    _receiver_ports(p, "Port(s) of the service, comma separated.")
    _s2cs(p)
    _limits(p)
    _server_cert(p)
    _scope(p)
    _json(p)
    _uid_file(p, "Write the UID to this file (mode 0600) instead of printing it, to hand over privately.")


def _outbound_request_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "uid", nargs="?", metavar="UID", help="UID of the stream, from the inbound side (or --uid-file)."
    )
    p.add_argument(
        "remote_listeners",
        nargs="?",
        metavar="HPC_LISTENER",
        help="Listener address(es) from the inbound side, comma separated.",
    )
    _remote_ip(p, "Address the instrument sends to. [default: all interfaces]", required=False)
    _receiver_ports(p, "Local port(s) the instrument sends to. [default: the server picks]", required=False)
    _s2cs(p)
    _limits(p)
    _server_cert(p)
    _scope(p)
    _json(p)
    _uid_file(p, _READ_UID)


def _connect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--inbound-s2cs",
        "--inbound_s2cs",
        dest="inbound_s2cs",
        metavar="HOST:PORT",
        required=True,
        help="The S2CS of the service's facility (the HPC side): it makes the inbound proxy and the "
        "stream's UID. [required]",
    )
    p.add_argument(
        "--outbound-s2cs",
        "--outbound_s2cs",
        dest="outbound_s2cs",
        metavar="HOST:PORT",
        required=True,
        help="The S2CS of the instrument's facility: it makes the outbound proxy the instrument sends "
        "to. [required]",
    )
    _remote_ip(p, "IP address of the service that receives the data, as the inbound gateway reaches it.")
    _receiver_ports(p, "Port(s) of the service, comma separated.")
    p.add_argument(
        "--local_port",
        "--local-port",
        dest="local_port",
        type=_ports,
        metavar="PORTS",
        help="Port(s) of the instrument's gateway the instrument sends to, one per receiver port, "
        "comma separated; inside that gateway's port range (s2uc info shows it). "
        "[default: the gateway picks]",
    )
    p.add_argument(
        "--local_ip",
        "--local-ip",
        dest="local_ip",
        metavar="IP",
        help="Address of the instrument's gateway the outbound proxy listens on. [default: all interfaces]",
    )
    _limits(p)
    _server_cert(
        p,
        "PEM file with the certificates of both S2CS, from their operators: "
        "cat hpc.crt instrument.crt > gateways.pem.",
    )
    _scope(
        p,
        "Scope ID (or full scope) for secured endpoints: its token goes to both S2CS. "
        "[default: each S2CS you logged in at with s2uc login --s2cs gets its own token]",
    )
    _json(p, "Print the stream and both servers' replies as JSON, for scripts.")
    _uid_file(p, "Write the UID to this file (mode 0600) instead of printing it.")


def _release_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("uid", nargs="?", metavar="UID", help="UID of the stream to release (or --uid-file).")
    p.add_argument(
        "--s2cs",
        action="append",
        metavar="HOST:PORT",
        help="The S2CS to ask. Give it once per gateway to release both sides of the stream: each is "
        f"released even when another fails. [default: {DEFAULT_S2CS}]",
    )
    _server_cert(
        p,
        "Certificate of the S2CS (PEM), from its operator; with several --s2cs, a file with the "
        "certificates of all of them.",
    )
    _scope(p)
    _json(p, "Print the server's reply as JSON (with several --s2cs, each one's result).")
    _uid_file(p, _READ_UID)


def _status_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("uid", nargs="?", metavar="UID", help="A stream's UID; all visible streams when absent.")
    _s2cs(p)
    _server_cert(p)
    _scope(p)
    _json(p)
    p.add_argument(
        "--log", action="store_true", help="With the last lines of the stream's proxy logs (needs the UID)."
    )


def _info_options(p: argparse.ArgumentParser) -> None:
    _s2cs(p)
    _server_cert(p)
    _json(p)


def _login_options(p: argparse.ArgumentParser) -> None:
    _scope(p, "Scope ID of the S2CS, from its operators, or the full scope `s2uc info` shows.")
    p.add_argument(
        "--s2cs",
        metavar="HOST:PORT",
        help="Log in for the scope this S2CS (HOST:PORT) advertises; its token then goes to it without "
        "--scope.",
    )
    _server_cert(p)


def _check_auth_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scope", metavar="SCOPE", required=True, help="The scope ID (or full scope) to check. [required]"
    )
    p.add_argument(
        "--show-token", dest="show_token", action="store_true", help="Also print the access token."
    )


def _logout_options(p: argparse.ArgumentParser) -> None:
    _scope(p, "Only this scope (ID or full). [default: every scope]")


# Each command: what runs it, what adds its options, and the words of its usage line, in the order
# of `s2uc --help`. The user guide spells commands with underscores; the dashed spellings (and
# check_auth) are accepted too, and not listed.
_COMMANDS: dict[str, tuple[Callable[..., int | None], Callable[[argparse.ArgumentParser], None], str]] = {
    "inbound_request": (inbound_request, _inbound_request_options, "[OPTIONS]"),
    "outbound_request": (outbound_request, _outbound_request_options, "[OPTIONS] [UID] HPC_LISTENER"),
    "connect": (connect, _connect_options, "[OPTIONS]"),
    "release": (release, _release_options, "[OPTIONS] [UID]"),
    "status": (status, _status_options, "[OPTIONS] [UID]"),
    "info": (info, _info_options, "[OPTIONS]"),
    "login": (login, _login_options, "[OPTIONS]"),
    "check-auth": (check_auth, _check_auth_options, "[OPTIONS]"),
    "logout": (logout, _logout_options, "[OPTIONS]"),
}
_ALIASES = {
    "inbound-request": "inbound_request",
    "outbound-request": "outbound_request",
    "check_auth": "check-auth",
}


def _top_parser() -> _Parser:
    width = max(len(name) for name in _COMMANDS) + 2
    rows = [f"  {name:{width}}{_summary(run, 78 - width - 2)}" for name, (run, _, _) in _COMMANDS.items()]
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} [--debug] [--version] [-h] COMMAND [OPTIONS] ...",
        description=ABOUT,
        epilog="commands:\n" + "\n".join(rows) + f"\n\n{PROG} COMMAND --help shows the options of a command.",
        formatter_class=_Help,
        allow_abbrev=False,
    )
    parser.add_argument("--debug", action="store_true", help="Show a traceback on errors.")
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {__version__}", help="Show the version and exit."
    )
    return parser


def _command_parser(
    name: str, command: Callable[..., Any], options: Callable[[argparse.ArgumentParser], None], usage: str
) -> _Parser:
    parser = _Parser(
        prog=f"{PROG} {name}",
        usage=f"%(prog)s {usage}",
        description=_doc(command),
        formatter_class=_Help,
        allow_abbrev=False,
    )
    options(parser)
    return parser


def _main(argv: Sequence[str]) -> int:
    """Parse, run one command; its exit status."""
    global _debug
    # The options of s2uc itself come before the command, those of the command after it.
    at = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))
    top = _top_parser()
    _debug = top.parse_args(argv[:at]).debug  # --help and --version exit here
    if at == len(argv):
        top.print_help(sys.stderr)
        return int(ExitStatus.USAGE)
    name = argv[at]
    found = _COMMANDS.get(_ALIASES.get(name, name))
    if found is None:
        top.error(f"no such command {name!r}")
    run, options, usage = found
    parser = _command_parser(name, run, options, usage)
    # Intermixed: `outbound_request UID --s2cs HOST:PORT HPC_LISTENER` takes both arguments.
    given = parser.parse_intermixed_args(argv[at + 1 :])
    try:
        return run(**vars(given)) or 0
    except UsageError as exc:
        parser.error(exc.message)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The `s2uc` command: run the command of `argv` (sys.argv[1:] when None), exit with its status."""
    # Each line goes out when printed, as typer's echo did: output and warnings stay in order.
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)
    try:
        status = _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:  # Ctrl-C: no traceback, as typer (click) said it
        print("\nAborted!", file=sys.stderr)
        status = int(ExitStatus.ERROR)
    raise SystemExit(status)


def run() -> NoReturn:
    """The `s2uc` program (the entry point pyproject.toml names): `main`, then out at once.
    Whatever a command writes is written and closed by the time it returns; the interpreter's
    clean-up of every module after it took 15-30 ms of each command on a 2-core VM, for nothing
    (docs/performance.md). An error of s2uc itself still ends the ordinary way, traceback and all."""
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    status = code if isinstance(code, int) else 0 if code is None else 1
    if isinstance(code, str):
        print(code, file=sys.stderr)
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # `s2uc status | head`: the reader has gone, nothing to tell it
        status = status or int(ExitStatus.ERROR)
    try:
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(status)


if __name__ == "__main__":
    run()
