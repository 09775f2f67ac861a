"""One request to one S2CS: connect with TLS 1.3, check who answered, send a line, read a line.

Who may answer is trust.py's to say, after the handshake and before the request, and its token,
is written. Which token goes with it, if any, is `Connection`'s: only where the user said it may.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from ..errors import BadRequest, ScistreamError, Unauthenticated, Unreachable
from ..protocol import MAX_MESSAGE, check_reply, decode, encode, request

TYPE_CHECKING = False  # typing's, without importing typing: nothing here needs it to run
if TYPE_CHECKING:
    from typing import Any

    from .address import Server
    from .trust import Trust

CONNECT_TIMEOUT = 15.0
# A request waits for a proxy to start, and maybe behind other requests: be generous.
REPLY_TIMEOUT = 120.0


class NoReply(Unreachable):
    """The request went out but no reply came back: the server may have carried it out."""


def call(server: Server, trust: Trust, op: str, token: str | None = None, **fields: Any) -> dict[str, Any]:
    """Send one request, return the reply's fields; error replies raise their ScistreamError."""
    data = encode(request(op, token, **fields))
    sent = False
    try:
        with (
            socket.create_connection((server.host, server.port), timeout=CONNECT_TIMEOUT) as raw,
            trust.bundle.context.wrap_socket(raw, server_hostname=server.host) as sock,
        ):
            # The handshake is done (Python's wrap_socket completes it): who answered is known
            # before the request, and the token in it, is written.
            trust.check(server, sock.getpeercert(binary_form=True) or b"")
            sock.settimeout(REPLY_TIMEOUT)
            sent = True  # from here on, the server may have read the request
            sock.sendall(data)
            line = _read_line(sock)
    except ssl.SSLCertVerificationError as exc:
        raise Unreachable(
            f"{server} presented a certificate that {trust.bundle.source} "
            f"({trust.bundle.names.server_cert}) does not vouch for ({exc.verify_message}); "
            "ask its operator for the right one"
        ) from None
    except ssl.SSLError as exc:
        raise Unreachable(f"TLS with {server} failed: {exc.reason or exc}") from None
    except TimeoutError:
        failed = NoReply if sent else Unreachable
        raise failed(f"{server} did not answer within {REPLY_TIMEOUT:.0f}s") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if sent:
            raise NoReply(f"the connection to s2cs at {server} failed before its reply: {reason}") from None
        raise Unreachable(f"cannot reach s2cs at {server}: {reason}") from None
    if not line:
        raise NoReply(f"{server} closed the connection without a reply")
    try:
        message = decode(line)
    except BadRequest:
        raise Unreachable(f"{server} sent something that is not a SciStream reply") from None
    return check_reply(message)


class Connection:
    """Requests to one S2CS, with a Globus token only where the user said it may go.

    With --scope, the token of that scope goes with every request (none when the user is not
    logged in for it: a gateway without authentication needs none). Without it, a token goes only
    to a server the user logged in at (`s2uc login --s2cs`), the token of the scope that server
    advertised then (servers.py). Else a request goes without one; if the server answers
    UNAUTHENTICATED, the user is told how to log in there, and no token is sent. Either way, only
    once `trust` has checked who answered (`call`).
    """

    def __init__(
        self,
        server: Server,
        trust: Trust,
        scope: str | None = None,
        server_cert: Path | None = None,
    ) -> None:
        self.server = server
        self.trust = trust
        self.scope = scope
        self.server_cert = server_cert  # for the login hint

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        from .tokens import home, token_for

        if self.scope:
            # Not logged in for it: the request goes without a token all the same, since a gateway
            # with authentication off needs none (README: the same --scope to every command).
            token = token_for(self.scope)
        else:
            from .servers import ServerScopes

            bound = ServerScopes(home()).scope_of(self.server)
            token = token_for(bound) if bound else None  # logged out since: as if never bound
        try:
            return call(self.server, self.trust, op, token, **fields)
        except Unauthenticated as exc:
            if token is not None:
                raise  # the server's own words: expired, revoked, not its scope
            if self.scope:
                from ..scopes import login_form

                hint = f"s2uc login --scope {login_form(self.scope)}"
                raise Unauthenticated(f"not logged in for {self.scope}: {hint}") from None
            raise self._login_needed(exc) from None

    def _login_needed(self, refused: Unauthenticated) -> Unauthenticated:
        """What to do when the server wants a token s2uc may not send it: log in there."""
        from ..scopes import login_form

        try:
            scope = call(self.server, self.trust, "info")["auth"]["scope"]
        except (ScistreamError, KeyError, TypeError):
            return refused
        if not isinstance(scope, str) or not scope:
            return refused
        here = f"s2uc login --s2cs {self.server}"
        if self.server_cert is not None and self.server_cert != Path("server.crt"):
            import shlex

            here += f" --server_cert {shlex.quote(str(self.server_cert))}"
        return Unauthenticated(
            f"{self.server} requires a Globus login: run {here} once "
            f"(or pass --scope {login_form(scope)} if you are logged in for it)"
        )


def _read_line(sock: ssl.SSLSocket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < MAX_MESSAGE:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return b"".join(chunks)
