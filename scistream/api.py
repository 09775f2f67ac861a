"""The Python API of SciStream: ask facility gateways for streams from a program.

`Client` talks to one S2CS (`inbound`, `outbound`, `release`, `status`, `info`) and returns the
typed results of scistream/client/replies.py; `connect` sets up both sides of a stream and returns
a `Stream` that releases both when its `with` block ends. Failures raise the exceptions of
scistream/errors.py, each with its wire code. `s2uc` is built on this module: its commands call
these functions and print their results. docs/python-api.md is the guide.

Imports nothing of the server (scistream.s2cs), of the data plane (scistream.s2ds) or of
cryptography, and no typer: `import scistream` stays light. Tokens come from the store of
`s2uc login`; globus-sdk is imported only when a token is needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .client import replies, transport
from .client.address import Server, parse_server
from .client.naming import PYTHON, Names
from .client.replies import Capabilities, Capability, Inbound, Limit, Limits, Outbound, Released
from .client.transport import Connection, NoReply
from .client.trust import trust
from .client.uids import normalize_uid
from .errors import BadRequest, NotFound, ScistreamError
from .protocol import (
    DEFAULT_NUM_CONN,
    DEFAULT_RATE,
    parse_address,
    parse_ip,
    parse_port,
    parse_request,
    request,
)

TYPE_CHECKING = False  # typing's, without importing typing: nothing here needs it to run
if TYPE_CHECKING:
    from typing import Any

    from .client.reports import Auth, Backend, Failure, Info, Policy, Process, Quota, Session, Status

# What `status` and `info` return (client/reports.py) is made at its first use, as
# `scistream.api.Status` or by the call: a request of a stream needs none of it.
_REPORTS = {"Auth", "Backend", "Failure", "Info", "Policy", "Process", "Quota", "Session", "Status"}


def __getattr__(name: str) -> Any:
    if name in _REPORTS:
        from .client import reports

        return getattr(reports, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Auth",
    "Backend",
    "Capabilities",
    "Capability",
    "Client",
    "Failure",
    "Inbound",
    "Info",
    "Limit",
    "Limits",
    "NoReply",
    "Outbound",
    "Outcome",
    "Policy",
    "Process",
    "Quota",
    "Released",
    "Session",
    "Status",
    "Stream",
    "connect",
    "described",
    "release",
]

CertPath = str | os.PathLike[str]


def described(exc: ScistreamError, server: object) -> str:
    """The one line that tells a failure: a gateway's message ends with its code and the gateway."""
    return f"{exc.message} ({exc.code} from {server})" if exc.remote else exc.message


class Client:
    """Requests to one S2CS.

    `s2cs` is `HOST:PORT` (`[IPV6]:PORT`; without a port, 5000); `server_cert` the file of its
    certificate, from its operators, or a bundle that also holds it. With `scope` (a scope ID,
    or the full scope), the token `s2uc login --scope` stored for it goes with each request;
    without, a token goes only to a gateway the user logged in at with `s2uc login --s2cs`.
    A bad address, a missing certificate or a scope that is none raises `ConfigError` here.

    The gateway must present exactly a certificate of `server_cert` that names its host, and, once
    used, the same one as the first time (pinned in servers.json beside the tokens); with
    `accept_new_cert`, a new one of `server_cert` replaces the pinned one (the operator replaced it).
    `names`: how error messages name these settings; s2uc passes its options' names.
    """

    def __init__(
        self,
        s2cs: str,
        server_cert: CertPath,
        scope: str | None = None,
        *,
        accept_new_cert: bool = False,
        names: Names = PYTHON,
    ) -> None:
        self.server_cert = Path(server_cert)
        self._server: Server = parse_server(s2cs, names)
        named = None
        if scope is not None:
            from .scopes import expand  # loads globus-sdk: only a client given a scope pays

            named = expand(scope, names.scope)
        self.scope = named
        from .client.servers import ServerPins
        from .client.tokens import home

        pins = ServerPins(home())
        checked = trust(self.server_cert, pins, accept_new_cert, names)
        self._connection = Connection(self._server, checked, named, self.server_cert)

    @property
    def server(self) -> str:
        """The gateway, as messages name it: HOST:PORT."""
        return str(self._server)

    def __repr__(self) -> str:
        return f"Client({self.server!r}, {str(self.server_cert)!r})"

    def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        return self._connection.call(op, **fields)

    def inbound(
        self,
        remote_ip: str,
        receiver_ports: Sequence[int],
        *,
        num_conn: int = DEFAULT_NUM_CONN,
        rate: int = DEFAULT_RATE,
    ) -> Inbound:
        """Create the inbound proxy in front of a service at `remote_ip`:`receiver_ports`; the
        gateway makes the stream's UID and one listener per receiver port."""
        ports = _port_list(receiver_ports, "receiver_ports")
        reply = self._call("inbound", remote_ip=remote_ip, receiver_ports=ports, num_conn=num_conn, rate=rate)
        return replies.inbound(self.server, reply)

    def outbound(
        self,
        uid: str,
        remote_listeners: Sequence[str],
        *,
        remote_ip: str | None = None,
        receiver_ports: Sequence[int] | None = None,
        num_conn: int = DEFAULT_NUM_CONN,
        rate: int = DEFAULT_RATE,
    ) -> Outbound:
        """Create the outbound proxy that carries what the instrument sends to `remote_ip` (an
        entry address of the gateway; its first when None) and `receiver_ports` (the gateway
        picks when None) to the inbound listeners `remote_listeners`, listener i to remote
        listener i."""
        if isinstance(remote_listeners, str):
            raise BadRequest(f"remote_listeners is a list of addresses, like [{remote_listeners!r}]")
        reply = self._call(
            "outbound",
            uid=normalize_uid(uid),
            remote_listeners=list(remote_listeners),
            remote_ip=remote_ip,
            receiver_ports=None if receiver_ports is None else _port_list(receiver_ports, "receiver_ports"),
            num_conn=num_conn,
            rate=rate,
        )
        return replies.outbound(self.server, reply)

    def release(self, uid: str) -> Released:
        """Stop this gateway's proxies of the stream and free their ports; `NotFound` when it has
        none (released already, another gateway's side, or another user's stream)."""
        uid = normalize_uid(uid)
        return replies.released(self.server, self._call("release", uid=uid))

    def status(self, uid: str | None = None, *, log: bool = False) -> Status:
        """The streams this gateway shows the caller, or one of them in full; with `log`, the
        last lines of its proxies' logs (needs the UID)."""
        if log and uid is None:
            raise BadRequest("log shows the logs of one stream: give its UID")
        named = None if uid is None else normalize_uid(uid)
        # `log` only when asked: a server older than it refuses a field it does not know.
        from .client import reports

        return reports.status(self.server, self._call("status", uid=named, log=log or None))

    def info(self) -> Info:
        """What the gateway offers: version, backend, enforced limits, authentication, ports, policy.
        Sends no token: `info` needs none."""
        from .client import reports

        return reports.info(self.server, transport.call(self._server, self._connection.trust, "info"))


def _port_list(ports: Sequence[int], name: str) -> list[int]:
    if isinstance(ports, str | int):
        raise BadRequest(f"{name} is a list of ports, like [5001], not {ports!r}")
    return list(ports)


@dataclass(frozen=True)
class Outcome:
    """What releasing a stream did on one gateway."""

    server: str
    released: Released | None = None  # what the gateway released, when it did
    error: ScistreamError | None = None  # why not; NotFound when the stream was not there

    @property
    def roles(self) -> tuple[str, ...]:
        """The proxies released there: "inbound", "outbound"; () when none."""
        return self.released.roles if self.released is not None else ()

    @property
    def gone(self) -> bool:
        """The gateway has no side of this stream (NOT_FOUND): released already, or never there."""
        return isinstance(self.error, NotFound)

    @property
    def failed(self) -> bool:
        """Releasing it really failed: the gateway may still carry its side of the stream."""
        return self.error is not None and not self.gone


def release_each(uid: str, clients: Sequence[Client]) -> tuple[Outcome, ...]:
    """Release the stream at each gateway in turn; a failure at one never skips the others."""
    uid = normalize_uid(uid)
    outcomes = []
    for client in clients:
        try:
            outcomes.append(Outcome(client.server, released=client.release(uid)))
        except ScistreamError as exc:
            outcomes.append(Outcome(client.server, error=exc))
    return tuple(outcomes)


def release(
    uid: str,
    *,
    s2cs: Sequence[str],
    server_cert: CertPath,
    scope: str | None = None,
    accept_new_cert: bool = False,
    names: Names = PYTHON,
) -> tuple[Outcome, ...]:
    """Release a stream on each gateway of `s2cs`, in that order: one `Outcome` each. Raises only
    for a local mistake (an address, the certificate, the scope), before anything is released."""
    if isinstance(s2cs, str):
        s2cs = [s2cs]
    clients: dict[str, Client] = {}
    for text in s2cs:
        client = Client(text, server_cert, scope, accept_new_cert=accept_new_cert, names=names)
        clients.setdefault(client.server.lower(), client)  # the same gateway named twice: once
    return release_each(uid, list(clients.values()))


class Stream:
    """Both sides of a stream that `connect` set up. Use it in a `with` block: leaving the block,
    normally or by an exception, releases both sides.

    `uid` is the stream's UID (its secret); `listeners` the addresses (IP:PORT) of the outbound
    proxy, where the instrument sends its data, one per receiver port of the service; `limits`
    the stream's limits (the smaller of its two sides', enforced when either side enforces it).
    `inbound` and `outbound` are each side's own result.
    """

    def __init__(self, inbound: Inbound, outbound: Outbound, hpc: Client, instrument: Client) -> None:
        self.inbound = inbound
        self.outbound = outbound
        self.uid = inbound.uid
        self.listeners: tuple[str, ...] = outbound.listeners
        self.limits: Limits = replies.stream_limits(inbound.limits, outbound.limits)
        self._clients = (instrument, hpc)  # released in this order: the data's entry first
        self._released: tuple[Outcome, ...] | None = None

    def __repr__(self) -> str:
        state = "released" if self.released else "open"
        return f"<Stream {self.uid[:8]} {','.join(self.listeners)} ({state})>"

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        """`listeners` as (host, port) pairs, for socket.create_connection (IPv6 without brackets)."""
        found = (parse_address(listener, "listener") for listener in self.listeners)
        return tuple((a.ip, a.port) for a in found)

    @property
    def released(self) -> bool:
        """Whether both sides are released (by `release` or the end of the `with` block)."""
        return self._released is not None

    def release(self) -> tuple[Outcome, ...]:
        """Release both sides, the instrument's first; a side already gone counts as released.
        When a side fails, the other is still released, and the failure is raised with the
        command that releases the rest by hand (or call this again). Once done, does nothing."""
        if self._released is not None:
            return self._released
        outcomes = release_each(self.uid, self._clients)
        failed = _failures(outcomes)
        if not failed:
            self._released = outcomes
            return outcomes
        uid = self.uid[:8]
        told = [f"releasing stream {uid} on {o.server} failed: {described(e, o.server)}" for o, e in failed]
        told += [f"released on {o.server}" for o in outcomes if o.roles]
        left = [c for c in self._clients if c.server in {o.server for o, _ in failed}]
        told.append(f"release the rest by hand: {_release_command(self.uid, left)}")
        raise _again(failed[0][1], "; ".join(told)) from failed[0][1]

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.release()
            return
        try:
            self.release()
        except ScistreamError as failed:  # the block's own exception is the one to see
            exc.add_note(failed.message)


def _failures(outcomes: Sequence[Outcome]) -> list[tuple[Outcome, ScistreamError]]:
    """The gateways where releasing really failed (not merely found nothing), with their errors."""
    return [(o, o.error) for o in outcomes if o.error is not None and not isinstance(o.error, NotFound)]


def _again(exc: ScistreamError, message: str) -> ScistreamError:
    """An error of the same kind and code as `exc`, told by this client in its own words."""
    new = type(exc)(message)
    new.code = exc.code
    return new


def connect(
    *,
    inbound: str,
    outbound: str,
    remote_ip: str,
    receiver_ports: Sequence[int],
    server_cert: CertPath,
    num_conn: int = DEFAULT_NUM_CONN,
    rate: int = DEFAULT_RATE,
    scope: str | None = None,
    local_ports: Sequence[int] | None = None,
    local_ip: str | None = None,
    accept_new_cert: bool = False,
    names: Names = PYTHON,
) -> Stream:
    """Set up a whole stream: the inbound proxy at the `inbound` S2CS in front of the service at
    `remote_ip`:`receiver_ports`, then the outbound proxy at the `outbound` S2CS with the UID and
    listeners it gave. `server_cert` is a PEM file with both gateways' certificates (or the
    one, when both present it). `local_ports` are the ports the instrument sends to (the
    instrument's gateway picks them when None), one per receiver port; `local_ip` the address
    they listen on (an entry address of that gateway; its first when None). `num_conn`, `rate`
    and `scope` go to both sides; `accept_new_cert` as for `Client`.

    When the outbound side fails, the inbound side is released before the error is raised:
    nothing is left half made. The error says so, or, when that release failed too, gives the
    UID to release it by hand.
    """
    hpc = Client(inbound, server_cert, scope, accept_new_cert=accept_new_cert, names=names)
    instrument = Client(outbound, server_cert, scope, accept_new_cert=accept_new_cert, names=names)
    service = _port_list(receiver_ports, "receiver_ports")
    local = None if local_ports is None else _port_list(local_ports, "local_ports")
    _check(remote_ip, service, num_conn, rate, local, local_ip)
    try:
        made = hpc.inbound(remote_ip, service, num_conn=num_conn, rate=rate)
    except ScistreamError as exc:
        if isinstance(exc, NoReply):
            after = f"it may have been made: s2uc status --s2cs {hpc.server} shows the streams there"
        else:
            after = "nothing was made"
        raise _again(exc, f"the inbound side failed: {described(exc, hpc.server)}; {after}") from exc
    try:
        sent = instrument.outbound(
            made.uid,
            made.listeners,
            remote_ip=local_ip,
            receiver_ports=local,
            num_conn=num_conn,
            rate=rate,
        )
    except BaseException as exc:
        # An error reply made nothing there; after no reply, the outbound proxy may exist.
        maybe_made = not isinstance(exc, ScistreamError) or isinstance(exc, NoReply)
        message = _undo(made, hpc, instrument if maybe_made else None)
        if isinstance(exc, ScistreamError):
            what = f"the outbound side failed: {described(exc, instrument.server)}"
            raise _again(exc, f"{what}; {message}") from exc
        exc.add_note(message)
        raise
    return Stream(made, sent, hpc, instrument)


def _check(
    remote_ip: str,
    service: list[int],
    num_conn: int,
    rate: int,
    local: list[int] | None,
    local_ip: str | None,
) -> None:
    """Refuse, before anything is asked, what either request would be refused for by its form;
    what only a gateway knows (its port range, its policy) it tells."""
    limits = {"num_conn": num_conn, "rate": rate}
    parse_request(request("inbound", None, remote_ip=remote_ip, receiver_ports=service, **limits))
    if local_ip is not None:
        parse_ip(local_ip, "local_ip")
    if local is None:
        return
    for port in local:
        parse_port(port, "local_ports")
    if len(local) != len(service):
        raise BadRequest(
            f"local_ports names {len(local)} port(s) for {len(service)} receiver port(s): "
            "give one local port per receiver port, in the same order"
        )
    if len(set(local)) != len(local):
        raise BadRequest("local_ports names a port twice")


def _undo(made: Inbound, hpc: Client, instrument: Client | None) -> str:
    """Release what connect made before its outbound side failed; what to tell the user."""
    outcomes = release_each(made.uid, [c for c in (instrument, hpc) if c is not None])
    failed = _failures(outcomes)
    if not failed:
        return f"the inbound side on {hpc.server} was released: nothing is left"
    told = "; ".join(f"releasing it on {o.server} failed too: {described(e, o.server)}" for o, e in failed)
    left = [c for c in (instrument, hpc) if c is not None and c.server in {o.server for o, _ in failed}]
    return f"{told}; release it by hand: {_release_command(made.uid, left)}"


def _release_command(uid: str, clients: Sequence[Client]) -> str:
    """The s2uc command that releases the stream at these gateways."""
    import shlex

    words = ["s2uc", "release", uid, *(f"--s2cs {c.server}" for c in clients)]
    cert = clients[0].server_cert if clients else Path("server.crt")
    if cert != Path("server.crt"):
        words.append(f"--server_cert {shlex.quote(str(cert))}")
    if clients and clients[0].scope is not None:
        words.append(f"--scope {shlex.quote(clients[0].scope)}")
    return " ".join(words)
