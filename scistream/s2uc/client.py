"""One request to one S2CS: connect with TLS, send a line, read a line.

The client trusts exactly the certificates in the file given with --server_cert (the one the S2CS
operator hands out, or a bundle of several gateways' certificates), and checks that the server's
certificate names the host it connects to.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadRequest, ConfigError, ScistreamError, Unauthenticated, Unreachable
from ..protocol import DEFAULT_PORT, MAX_MESSAGE, check_reply, decode, encode, hostport, request

TYPE_CHECKING = False  # typing's, without importing typing: nothing here needs it to run
if TYPE_CHECKING:
    from typing import Any

CONNECT_TIMEOUT = 15.0
# A request waits for a proxy to start, and maybe behind other requests: be generous.
REPLY_TIMEOUT = 120.0
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class Server:
    """An S2CS: the host and port a request goes to."""

    host: str
    port: int

    def __str__(self) -> str:
        return hostport(self.host, self.port)


def parse_server(text: str) -> Server:
    """`host:port`, `host` (port 5000), `[v6]:port`."""
    text = text.strip()
    rest = ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"--s2cs must look like HOST:PORT or [IPV6]:PORT, not {text!r}")
        port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    good_port = port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
    if not host or (port and not good_port) or (rest == ":"):
        raise ConfigError(f"--s2cs must look like HOST:PORT or [IPV6]:PORT, not {text!r}")
    return Server(host, int(port) if port else DEFAULT_PORT)


class NoReply(Unreachable):
    """The request went out but no reply came back: the server may have carried it out."""


def tls_context(server_cert: Path) -> ssl.SSLContext:
    """A context that trusts the certificate(s) of `server_cert` and nothing else."""
    if not server_cert.is_file():
        raise ConfigError(
            f"no server certificate at {server_cert}: pass --server_cert with the certificate of the "
            "S2CS (its operator has it; a generated one is printed by s2cs at start)"
        )
    try:
        data = server_cert.read_bytes()  # read once: what is checked is what is trusted
    except OSError as exc:
        raise ConfigError(f"cannot read {server_cert}: {exc.strerror}") from None
    ask = "pass --server_cert with the certificate of the S2CS (PEM; its operator has it)"
    if not data.strip():
        raise ConfigError(f"{server_cert} is empty: {ask}")
    if _PEM_CERT not in data:
        if data[:1] == b"\x30":  # an ASN.1 SEQUENCE: a certificate in binary form
            raise ConfigError(
                f"{server_cert} is a DER (binary) certificate; s2uc needs PEM: "
                f"openssl x509 -inform der -in {server_cert} -out server.crt"
            )
        raise ConfigError(f"{server_cert} holds no PEM certificate (no {_PEM_CERT.decode()} line): {ask}")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=data.decode("ascii", "replace"))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{server_cert} holds no PEM certificate that can be read ({exc.reason or exc}): {ask}"
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Each certificate of the file is trusted as it is. Without this flag OpenSSL looks for a
    # server certificate's issuer by name and takes the first it finds: in a bundle of two
    # gateways' generated certificates with the same name (the same listener IP at both, as on
    # one test host), the second gateway is then refused as self-signed, and an operator's
    # certificate handed out without its CA could never be trusted at all.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


def call(
    server: Server, context: ssl.SSLContext, op: str, token: str | None = None, **fields: Any
) -> dict[str, Any]:
    """Send one request, return the reply's fields; error replies raise their ScistreamError."""
    data = encode(request(op, token, **fields))
    sent = False
    try:
        with (
            socket.create_connection((server.host, server.port), timeout=CONNECT_TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=server.host) as sock,
        ):
            sock.settimeout(REPLY_TIMEOUT)
            sent = True  # from here on, the server may have read the request
            sock.sendall(data)
            line = _read_line(sock)
    except ssl.SSLCertVerificationError as exc:
        raise Unreachable(
            f"{server} presented a certificate that --server_cert does not vouch for "
            f"({exc.verify_message}); ask its operator for the right one"
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

    With --scope, the token of that scope goes with every request. Without it, a token goes only
    to a server the user logged in at (`s2uc login --s2cs`), the token of the scope that server
    advertised then (servers.py). Else a request goes without one; if the server answers
    UNAUTHENTICATED, the user is told how to log in there, and no token is sent.
    """

    def __init__(
        self,
        server: Server,
        context: ssl.SSLContext,
        scope: str | None = None,
        server_cert: Path | None = None,
    ) -> None:
        self.server = server
        self.context = context
        self.scope = scope
        self.server_cert = server_cert  # for the login hint

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        from .tokens import home, token_for

        token = None
        if self.scope:
            from .scopes import login_form

            token = token_for(self.scope)
            if token is None:
                hint = f"s2uc login --scope {login_form(self.scope)}"
                raise Unauthenticated(f"not logged in for {self.scope}: {hint}")
        else:
            from .servers import ServerScopes

            bound = ServerScopes(home()).scope_of(self.server)
            token = token_for(bound) if bound else None  # logged out since: as if never bound
        try:
            return call(self.server, self.context, op, token, **fields)
        except Unauthenticated as exc:
            if token is not None:
                raise  # the server's own words: expired, revoked, not its scope
            raise self._login_needed(exc) from None

    def _login_needed(self, refused: Unauthenticated) -> Unauthenticated:
        """What to do when the server wants a token s2uc may not send it: log in there."""
        from .scopes import login_form

        try:
            scope = call(self.server, self.context, "info")["auth"]["scope"]
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
