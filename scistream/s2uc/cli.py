"""`s2uc`: the SciStream user client.

Thin commands (STYLE.md rule 7): parse the options, make one call of the Python API
(scistream/api.py), print a short summary of its result, or the reply itself with --json.
Failures print one line and exit with the status of errors.ExitStatus; a mistake on the command
line prints typer's usage and one line, and exits 2.

A typer app, as every command line of the project (s2cs, scistream): one style of help pages.
Every command a user runs pays for this module's imports before it sends anything, so the
commands import what they need (the API, the token store, UID files, globus-sdk) inside their
bodies. It must not import the server (scistream.s2cs), the data plane (scistream.s2ds),
cryptography or globus-sdk (tests/unit/test_s2uc_cli.py checks a whole request).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from .. import __version__
from ..errors import ConfigError, ExitStatus, NotFound, ScistreamError, Unauthenticated
from ..protocol import DEFAULT_NUM_CONN, DEFAULT_RATE, MAX_NUM_CONN, MAX_RATE

if TYPE_CHECKING:
    from ..api import Client, Failure, Limits, Outcome, Policy, Stream
    from ..client.address import Server
    from ..client.uids import UidFile

DEFAULT_S2CS = "localhost:5000"
DEFAULT_CERT = Path("server.crt")

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


class Ports(tuple[int, ...]):
    """TCP ports, as --receiver_ports and --local_port take them: 5001,5002."""


def _ports(text: str) -> Ports | None:
    """--receiver_ports and --local_port: ports separated by commas; None when blank."""
    if not text.strip():
        return None
    try:
        ports = Ports(int(p) for p in text.split(","))
    except ValueError:
        raise typer.BadParameter(
            f"expected ports separated by commas, like 5001,5002; got {text!r}"
        ) from None
    for port in ports:
        if not 1 <= port <= 65535:
            raise typer.BadParameter(f"{port} is not a TCP port (1-65535)")
    return ports


# The options that several commands share, each with its help; a command that says more of one
# has its own.
S2cs = Annotated[str, typer.Option("--s2cs", metavar="HOST:PORT", help="The S2CS to ask, HOST:PORT.")]
ServerCert = Annotated[
    Path,
    typer.Option(
        "--server_cert",
        "--server-cert",
        metavar="FILE",
        help="Certificate of the S2CS (PEM), from its operator.",
    ),
]
AcceptNewCert = Annotated[
    bool,
    typer.Option(
        "--accept-new-cert",
        "--accept_new_cert",
        help="A gateway presents another certificate than the one s2uc pinned for it, and its operator "
        "says it replaced it: pin the new one, if --server_cert holds it.",
    ),
]
Scope = Annotated[
    str | None,
    typer.Option(
        "--scope",
        metavar="SCOPE",
        help="Scope ID (or full scope) of the S2CS, for secured endpoints: send its token.",
    ),
]
NumConn = Annotated[
    int,
    typer.Option(
        "--num_conn",
        "--num-conn",
        metavar="N",
        min=1,
        max=MAX_NUM_CONN,
        help="Most concurrent connections; more wait.",
    ),
]
Rate = Annotated[
    int,
    typer.Option(
        "--rate",
        metavar="KBPS",
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
        metavar="FILE",
        help="Read the stream's UID from this file (- for stdin), not from the command line, where "
        "other users can see it.",
    ),
]
ServicePorts = Annotated[
    Ports | None,
    typer.Option(
        "--receiver_ports",
        "--receiver-ports",
        metavar="PORTS",
        parser=_ports,
        help="Port(s) of the service, comma separated.",
    ),
]


def _uid(given: str | None, uid_file: Path | None) -> str:
    """The stream's UID, from the command line or from --uid-file (exactly one of them)."""
    from ..client.uids import normalize_uid, read_uid

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
    if uid_file is None:
        return uid
    return f"{uid[:8]} (UID from stdin)" if str(uid_file) == "-" else f"{uid[:8]} (UID in {uid_file})"


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
    typer.echo(f"error: {told}", err=True)
    raise typer.Exit(int(exc.exit_status)) from None


def _expand(scope: str) -> str:
    from ..scopes import expand  # loads globus-sdk: only commands given a scope pay for it

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
    from ..client.naming import S2UC

    client: Client | None = None
    try:
        client = Client(server_text, server_cert, scope, accept_new_cert=accept_new_cert, names=S2UC)
        body(client)
    except ScistreamError as exc:
        _fail(exc, client.server if client is not None else None)


def _print_json(reply: Mapping[str, Any]) -> None:
    import json

    typer.echo(json.dumps(dict(reply), indent=2))


def _warn_unenforced(limits: Limits, note: str | None = None, by: str = "this server") -> None:
    for name, limit in limits.unenforced():
        typer.echo(f"warning: {name} is NOT enforced by {by}: {limit.reason or ''}", err=True)
    if note:
        typer.echo(f"note: {note}", err=True)


def _quoted(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))


def inbound_request(
    remote_ip: Annotated[
        str,
        typer.Option(
            "--remote_ip",
            "--remote-ip",
            metavar="IP",
            help="IP address of the service that receives the data.",
        ),
    ],
    receiver_ports: ServicePorts,
    s2cs: S2cs = DEFAULT_S2CS,
    num_conn: NumConn = DEFAULT_NUM_CONN,
    rate: Rate = DEFAULT_RATE,
    server_cert: ServerCert = DEFAULT_CERT,
    accept_new_cert: AcceptNewCert = False,
    scope: Scope = None,
    as_json: Json = False,
    uid_file: Annotated[
        Path | None,
        typer.Option(
            "--uid-file",
            "--uid_file",
            metavar="FILE",
            help="Write the UID to this file (mode 0600) instead of printing it, to hand over privately.",
        ),
    ] = None,
) -> None:
    """Create the inbound proxy in front of a service at this facility; prints the UID and listeners."""
    ports = receiver_ports or Ports()

    def body(client: Client) -> None:
        from ..client.uids import UidFile

        target = UidFile.prepare(uid_file) if uid_file is not None else None
        try:
            made = client.inbound(remote_ip, ports, num_conn=num_conn, rate=rate)
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
        typer.echo(f"Listeners: {','.join(listeners)}")
        pairs = ", ".join(f"{lst} -> {remote_ip}:{p}" for lst, p in zip(listeners, ports, strict=True))
        typer.echo(f"Inbound proxy on {client.server}: {pairs}; {made.limits.summary()}.")
        extra = "".join(
            f" --{name} {value}"
            for name, value, default in (
                ("num_conn", num_conn, DEFAULT_NUM_CONN),
                ("rate", rate, DEFAULT_RATE),
            )
            if value != default
        )
        # The instrument side talks to another gateway, with another certificate: whatever this
        # side's was called, ./server.crt there is not this gateway's, nor necessarily its own.
        extra = f" --server_cert INSTRUMENT_CERT{extra}"
        handed = uid if uid_file is None else f"--uid-file {_quoted(uid_file)}"
        typer.echo("On the instrument side, run:")
        typer.echo(
            f"  s2uc outbound_request --s2cs INSTRUMENT_S2CS:5000{extra} {handed} {','.join(listeners)}"
        )

    _run(s2cs, server_cert, scope, body, accept_new_cert)


def outbound_request(
    ctx: typer.Context,
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
            "--remote_ip",
            "--remote-ip",
            metavar="IP",
            help="Address the instrument sends to: an entry address of the gateway (s2cs --entry-ip). "
            "[default: its first]",
        ),
    ] = None,
    receiver_ports: Annotated[
        Ports | None,
        typer.Option(
            "--receiver_ports",
            "--receiver-ports",
            metavar="PORTS",
            parser=_ports,
            help="Local port(s) the instrument sends to. [default: the server picks]",
        ),
    ] = None,
    s2cs: S2cs = DEFAULT_S2CS,
    num_conn: NumConn = DEFAULT_NUM_CONN,
    rate: Rate = DEFAULT_RATE,
    server_cert: ServerCert = DEFAULT_CERT,
    accept_new_cert: AcceptNewCert = False,
    scope: Scope = None,
    as_json: Json = False,
    uid_file: UidFileIn = None,
) -> None:
    """Create the outbound proxy that carries an instrument's data to the inbound listener(s)."""
    ports = receiver_ports
    try:
        given, addresses = _outbound_arguments(uid, remote_listeners, uid_file)
    except ValueError as exc:
        ctx.fail(str(exc))
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
            typer.echo(f"UID: {made.uid}")
        else:
            typer.echo(f"Stream: {_named(uid, uid_file)}")
        typer.echo(f"Listeners: {','.join(local)}")
        pairs = ", ".join(f"{a} -> {b}" for a, b in zip(local, listeners, strict=True))
        typer.echo(f"Outbound proxy on {client.server}: {pairs} (TLS); {made.limits.summary()}.")
        typer.echo(f"Send the instrument's data to {_ports_phrase(local)} of this gateway.")

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
    listeners. ValueError, a usage error, when the arguments do not fit."""
    if uid_file is not None and second is None and first is not None:
        return None, first
    if uid_file is None and second is not None:
        return first, second
    if uid_file is not None and second is not None:
        raise ValueError("give the UID as an argument or with --uid-file, not both")
    raise ValueError("give UID HPC_LISTENER, or --uid-file FILE HPC_LISTENER")


def release(
    uid: Annotated[
        str | None,
        typer.Argument(
            metavar="UID", help="UID of the stream to release (or --uid-file).", show_default=False
        ),
    ] = None,
    s2cs: Annotated[
        list[str] | None,
        typer.Option(
            "--s2cs",
            metavar="HOST:PORT",
            help="The S2CS to ask. Give it once per gateway to release both sides of the stream: "
            f"each is released even when another fails. [default: {DEFAULT_S2CS}]",
            show_default=False,
        ),
    ] = None,
    server_cert: Annotated[
        Path,
        typer.Option(
            "--server_cert",
            "--server-cert",
            metavar="FILE",
            help="Certificate of the S2CS (PEM), from its operator; with several --s2cs, a file "
            "with the certificates of all of them.",
        ),
    ] = DEFAULT_CERT,
    accept_new_cert: AcceptNewCert = False,
    scope: Scope = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the server's reply as JSON (with several --s2cs, each one's result)."
        ),
    ] = False,
    uid_file: UidFileIn = None,
) -> None:
    """Stop a stream's proxy (or proxies) on a server and free its ports; with several --s2cs, on
    each of them.

    With several --s2cs, a server where the stream is not (NOT_FOUND: released already) is
    reported, and counts as a failure only when the stream was on none of them. The exit status
    is that of the first server that failed, 0 when there is none.
    """
    from .. import api
    from ..client.naming import S2UC

    try:
        stream = _uid(uid, uid_file)
        outcomes = api.release(
            stream,
            s2cs=s2cs or [DEFAULT_S2CS],
            server_cert=server_cert,
            scope=scope,
            accept_new_cert=accept_new_cert,
            names=S2UC,
        )
    except ScistreamError as exc:
        _fail(exc)
    if len(outcomes) == 1:  # as it always was: the server's reply, or its error
        (outcome,) = outcomes
        if outcome.released is None:
            _fail(outcome.error or ScistreamError("the server released nothing"), outcome.server)
        if as_json:
            return _print_json(outcome.released.reply)
        typer.echo(_released_line(outcome, _named(stream, uid_file)))
        return
    raise typer.Exit(_report_releases(stream, outcomes, _named(stream, uid_file), as_json))


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
                typer.echo(_released_line(outcome, named))
            continue
        gone = isinstance(outcome.error, NotFound)
        if gone and anywhere:  # released already: what the user wanted
            if not as_json:
                typer.echo(f"note: {described(outcome.error, outcome.server)}", err=True)
            continue
        typer.echo(f"error: {described(outcome.error, outcome.server)}", err=True)
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
    inbound_s2cs: Annotated[
        str,
        typer.Option(
            "--inbound-s2cs",
            "--inbound_s2cs",
            metavar="HOST:PORT",
            help="The S2CS of the service's facility (the HPC side): it makes the inbound proxy and "
            "the stream's UID.",
        ),
    ],
    outbound_s2cs: Annotated[
        str,
        typer.Option(
            "--outbound-s2cs",
            "--outbound_s2cs",
            metavar="HOST:PORT",
            help="The S2CS of the instrument's facility: it makes the outbound proxy the instrument "
            "sends to.",
        ),
    ],
    remote_ip: Annotated[
        str,
        typer.Option(
            "--remote_ip",
            "--remote-ip",
            metavar="IP",
            help="IP address of the service that receives the data, as the inbound gateway reaches it.",
        ),
    ],
    receiver_ports: ServicePorts,
    local_port: Annotated[
        Ports | None,
        typer.Option(
            "--local_port",
            "--local-port",
            metavar="PORTS",
            parser=_ports,
            help="Port(s) of the instrument's gateway the instrument sends to, one per receiver port, "
            "comma separated; inside that gateway's port range (s2uc info shows it). "
            "[default: the gateway picks]",
        ),
    ] = None,
    local_ip: Annotated[
        str | None,
        typer.Option(
            "--local_ip",
            "--local-ip",
            metavar="IP",
            help="Address of the instrument's gateway the outbound proxy listens on: one of its entry "
            "addresses (s2cs --entry-ip). [default: its first]",
        ),
    ] = None,
    num_conn: NumConn = DEFAULT_NUM_CONN,
    rate: Rate = DEFAULT_RATE,
    server_cert: Annotated[
        Path,
        typer.Option(
            "--server_cert",
            "--server-cert",
            metavar="FILE",
            help="PEM file with the certificates of both S2CS, from their operators: "
            "cat hpc.crt instrument.crt > gateways.pem.",
        ),
    ] = DEFAULT_CERT,
    accept_new_cert: AcceptNewCert = False,
    scope: Annotated[
        str | None,
        typer.Option(
            "--scope",
            metavar="SCOPE",
            help="Scope ID (or full scope) for secured endpoints: its token goes to both S2CS. "
            "[default: each S2CS you logged in at with s2uc login --s2cs gets its own token]",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the stream and both servers' replies as JSON, for scripts.")
    ] = False,
    uid_file: Annotated[
        Path | None,
        typer.Option(
            "--uid-file",
            "--uid_file",
            metavar="FILE",
            help="Write the UID to this file (mode 0600) instead of printing it.",
        ),
    ] = None,
) -> None:
    """Set up both sides of a stream at once: the inbound proxy in front of the service, then the
    outbound proxy the instrument sends to; prints the UID and the address(es) to send to.

    When the outbound side fails, the inbound side is released again: nothing is left half made.
    """
    from .. import api
    from ..client.naming import S2UC
    from ..client.uids import UidFile

    service, local = receiver_ports or Ports(), local_port
    try:
        target = UidFile.prepare(uid_file) if uid_file is not None else None
        try:
            stream = api.connect(
                inbound=inbound_s2cs,
                outbound=outbound_s2cs,
                remote_ip=remote_ip,
                receiver_ports=service,
                server_cert=server_cert,
                num_conn=num_conn,
                rate=rate,
                scope=scope,
                local_ports=local,
                local_ip=local_ip,
                accept_new_cert=accept_new_cert,
                names=S2UC,
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
    typer.echo(f"Listeners: {','.join(stream.listeners)}")
    inbound, outbound = stream.inbound, stream.outbound
    pairs = ", ".join(f"{a} -> {remote_ip}:{p}" for a, p in zip(inbound.listeners, service, strict=True))
    typer.echo(f"Inbound proxy on {inbound.server}: {pairs}; {inbound.limits.summary()}.")
    pairs = ", ".join(f"{a} -> {b}" for a, b in zip(outbound.listeners, inbound.listeners, strict=True))
    typer.echo(f"Outbound proxy on {outbound.server}: {pairs} (TLS); {outbound.limits.summary()}.")
    typer.echo(f"Send the instrument's data to {_ports_phrase(stream.listeners)} of the instrument gateway.")
    handed = stream.uid if uid_file is None else f"--uid-file {_quoted(uid_file)}"
    both = f"--s2cs {outbound.server} --s2cs {inbound.server}"
    cert = "" if server_cert == DEFAULT_CERT else f" --server_cert {_quoted(server_cert)}"
    typer.echo(f"When done, release both sides: s2uc release {handed} {both}{cert}")


def _uid_lines(uid: str, uid_file: Path | None) -> None:
    if uid_file is None:
        typer.echo(f"UID: {uid}")
    else:
        typer.echo(f"UID file: {uid_file} (readable by you only; hand it over privately)")


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
    uid: Annotated[
        str | None,
        typer.Argument(
            metavar="UID", help="A stream's UID; all visible streams when absent.", show_default=False
        ),
    ] = None,
    s2cs: S2cs = DEFAULT_S2CS,
    server_cert: ServerCert = DEFAULT_CERT,
    accept_new_cert: AcceptNewCert = False,
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

    def body(client: Client) -> None:
        found = client.status(uid, log=log)
        if as_json:
            return _print_json(found.reply)
        if not found.streams:
            typer.echo(f"No streams on {client.server}.")
            return
        header = (
            f"{'UID':36}  {'ROLE':8}  {'STATE':8}  {'CONN':>4}  {'IN':>10}  {'OUT':>10}  {'RESTARTS':>8}  "
            "LISTENERS"
        )
        typer.echo(header)
        for s in found.streams:
            conns = "-" if s.connections is None else str(s.connections)
            typer.echo(
                f"{s.uid:36}  {s.role:8}  {s.state:8}  {conns:>4}  "
                f"{_bytes(s.bytes_in):>10}  {_bytes(s.bytes_out):>10}  {s.restarts:>8}  "
                f"{','.join(s.listeners)}"
            )
            if s.last_error:
                lines = s.last_error.splitlines()
                typer.echo(f"    last error: {lines[0]}")
                for line in lines[1:]:
                    typer.echo(f"                {line}")
            for failure in s.failures:
                typer.echo(f"    failed: {failure.message} ({_occurrences(failure)})")
            if s.refused_sources:
                typer.echo(
                    f"    refused: {s.refused_sources} connection(s) from sources this gateway does not "
                    "allow (its operator's s2cs --allow-sources); nothing of them reached the stream"
                )
            for proc in s.processes:
                if proc.log is not None:
                    typer.echo(f"    {proc.name} log, last {len(proc.log)} line(s):")
                    for line in proc.log:
                        typer.echo(f"      {line}")
        if found.omitted:
            typer.echo(
                f"... and {found.omitted} more stream(s): a reply holds at most 64 KiB; "
                "ask for one by its UID (s2uc status UID)"
            )

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


def info(
    s2cs: S2cs = DEFAULT_S2CS,
    server_cert: ServerCert = DEFAULT_CERT,
    as_json: Json = False,
    accept_new_cert: AcceptNewCert = False,
) -> None:
    """Show what a server offers: version, backend, enforced limits, authentication, ports."""

    def body(client: Client) -> None:
        found = client.info()
        if as_json:
            return _print_json(found.reply)
        backend = found.backend
        typer.echo(f"{client.server}: s2cs {found.version}, protocol {found.protocol}")
        typer.echo(f"  backend    {backend.type} ({backend.version})")
        for name, cap in (("num_conn", backend.capabilities.num_conn), ("rate", backend.capabilities.rate)):
            state = "enforced" if cap.enforced else f"NOT enforced: {cap.reason or ''}"
            typer.echo(f"  {name:10} {state}")
        auth = found.auth
        typer.echo(f"  auth       {'on, scope ' + str(auth.scope) if auth.enabled else 'off'}")
        if auth.enabled and auth.scope is not None:
            from ..scopes import login_form

            here = f"s2uc login --s2cs {client.server}"
            if server_cert != DEFAULT_CERT:
                here += f" --server_cert {_quoted(server_cert)}"
            typer.echo(f"  login      {here} (or --scope {login_form(auth.scope)})")
        typer.echo(f"  ports      {found.port_range} ({found.free_ports} free), {found.streams} stream(s)")
        if found.entry_ips:  # s2cs before plain entries sends none
            entries = ", ".join(found.entry_ips)
            typer.echo(
                f"  entries    {entries} (where outbound proxies listen: outbound_request --remote_ip)"
            )
        if found.policy is not None and found.policy.sources:
            sources = ", ".join(found.policy.sources)
            typer.echo(f"  sources    {sources} (the hosts that may send to an entry)")
        if found.policy is not None:  # s2cs before the target policy sends none
            for line in _policy_lines(found.policy):
                typer.echo(line)

    _run(s2cs, server_cert, None, body, accept_new_cert)


def login(
    scope: Annotated[
        str | None,
        typer.Option(
            "--scope",
            metavar="SCOPE",
            help="Scope ID of the S2CS, from its operators, or the full scope `s2uc info` shows.",
        ),
    ] = None,
    s2cs: Annotated[
        str | None,
        typer.Option(
            "--s2cs",
            metavar="HOST:PORT",
            help="Log in for the scope this S2CS (HOST:PORT) advertises; its token then goes to it "
            "without --scope.",
        ),
    ] = None,
    server_cert: ServerCert = DEFAULT_CERT,
    accept_new_cert: AcceptNewCert = False,
) -> None:
    """Log in with Globus for a secured S2CS; the tokens are kept in ~/.scistream/tokens.json.

    Needs SCISTREAM_CLIENT_ID: the id of the Globus native-app client your facility registered
    (the one built into s2uc is a placeholder until the project registers its own).
    """
    from ..client.address import parse_server
    from ..client.servers import ServerScopes
    from ..client.tokens import TokenStore, home, registered_client_id

    def ask(url: str) -> str:
        typer.echo("Open this address in a browser, log in, then paste the authorization code here:")
        typer.echo(f"\n  {url}\n")
        code = ""
        try:
            while not code:  # an empty line asks again
                code = input("Authorization code: ")
        except (EOFError, KeyboardInterrupt):  # the end of the input, or Ctrl-C
            typer.echo()  # end the prompt's line
            raise Unauthenticated("login aborted: no authorization code pasted; nothing changed") from None
        return code

    server: Server | None = None
    try:
        registered_client_id()
        named = _expand(scope) if scope is not None else None
        if s2cs is not None:
            server = parse_server(s2cs)
            named = _scope_of(server, server_cert, named, accept_new_cert)
            typer.echo(f"{server} asks for a Globus login for {named}.")
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
    typer.echo(f"Logged in{who} for {named}; the token is valid until {found.until}, then refreshed.")
    if server is not None:
        typer.echo(f"s2uc sends this token to {server} without --scope, and to no other S2CS.")


def _scope_of(server: Server, server_cert: Path, named: str | None, accept_new_cert: bool) -> str:
    from ..api import Client
    from ..client.naming import S2UC
    from ..scopes import to_bind

    auth = Client(str(server), server_cert, accept_new_cert=accept_new_cert, names=S2UC).info().auth
    return to_bind({"enabled": auth.enabled, "scope": auth.scope}, named, str(server))


def check_auth(
    scope: Annotated[
        str, typer.Option("--scope", metavar="SCOPE", help="The scope ID (or full scope) to check.")
    ],
    show_token: Annotated[bool, typer.Option("--show-token", help="Also print the access token.")] = False,
) -> None:
    """Tell whether a valid token for a scope is stored (exit 0) or not (exit 4)."""
    from ..client.tokens import TokenStore
    from ..scopes import login_form

    try:
        scope = _expand(scope)
        found = TokenStore().find(scope)
    except ScistreamError as exc:
        _fail(exc)
    if found is None:
        typer.echo(f"Not logged in for {scope}: run s2uc login --scope {login_form(scope)}", err=True)
        raise typer.Exit(int(ExitStatus.AUTH))
    who = f" as {found.identity}" if found.identity else ""
    typer.echo(f"Logged in{who} for {scope}; the token is valid until {found.until}.")
    if show_token:
        typer.echo(found.access_token)


def logout(
    scope: Annotated[
        str | None,
        typer.Option("--scope", metavar="SCOPE", help="Only this scope (ID or full). [default: every scope]"),
    ] = None,
) -> None:
    """Revoke stored tokens at Globus Auth and delete them."""
    from ..client.servers import ServerScopes
    from ..client.tokens import TokenStore, home

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


# In the order of `s2uc --help`. The user guide spells commands with underscores; the dashed
# spellings (and check_auth) are accepted too, and not listed.
app.command("inbound_request")(inbound_request)
app.command("inbound-request", hidden=True)(inbound_request)
app.command("outbound_request")(outbound_request)
app.command("outbound-request", hidden=True)(outbound_request)
app.command()(connect)
app.command()(release)
app.command()(status)
app.command()(info)
app.command()(login)
app.command("check-auth")(check_auth)
app.command("check_auth", hidden=True)(check_auth)
app.command()(logout)


def main(argv: Sequence[str] | None = None) -> None:
    """The `s2uc` command (the entry point pyproject.toml names): run the command of `argv`
    (sys.argv[1:] when None) and exit with its status."""
    app(args=None if argv is None else list(argv), prog_name="s2uc")


if __name__ == "__main__":
    main()
