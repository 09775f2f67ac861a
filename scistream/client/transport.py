"""One request to one S2CS: connect with TLS 1.3, check who answered, send a line, read a line.

The file given with --server_cert holds the certificate the S2CS operator hands out, or a bundle
of several gateways' certificates. A server must present exactly one of them, one that names the
host the user typed (HOST of HOST:PORT): no certificate of the file is a CA for any other, so one
gateway's key can never sign its way into speaking for another. The certificate a server presents
the first time it is used is then pinned to it (servers.py), and another is refused until the user
accepts it on purpose. All of this happens after the handshake and before the request, and its
token, is written.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadRequest, ConfigError, ScistreamError, Unauthenticated, Unreachable
from ..protocol import DEFAULT_PORT, MAX_MESSAGE, check_reply, decode, encode, hostport, request

TYPE_CHECKING = False  # typing's, without importing typing: nothing here needs it to run
if TYPE_CHECKING:
    from typing import Any

    from .servers import ServerPins

CONNECT_TIMEOUT = 15.0
# A request waits for a proxy to start, and maybe behind other requests: be generous.
REPLY_TIMEOUT = 120.0
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
ACCEPT_NEW = "--accept-new-cert"


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


def fingerprint(der: bytes) -> str:
    """How servers.json names a certificate: the SHA-256 of its DER form."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Bundle:
    """The certificates of a --server_cert file: each vouches, as it is, for the hosts it names."""

    source: Path
    context: ssl.SSLContext  # trusts them, TLS 1.3 only, and checks the host name
    fingerprints: frozenset[str]

    def holds(self, der: bytes) -> bool:
        return fingerprint(der) in self.fingerprints


def read_bundle(server_cert: Path) -> Bundle:
    """The certificate(s) of `server_cert`; ConfigError, in the user's words, when there are none."""
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
    text = data.decode("ascii", "replace")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=text)
        ders = [ssl.PEM_cert_to_DER_cert(block) for block in _PEM_BLOCK.findall(text)]
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ConfigError(
            f"{server_cert} holds no PEM certificate that can be read ({reason}): {ask}"
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # as the control port: nothing older is spoken
    # Each certificate of the file is trusted as it is. Without this flag OpenSSL looks for a
    # server certificate's issuer by name and takes the first it finds: in a bundle of two
    # gateways' generated certificates with the same name (the same listener IP at both, as on
    # one test host), the second gateway is then refused as self-signed, and an operator's
    # certificate handed out without its CA could never be trusted at all. What the handshake
    # accepts is then narrowed to the certificates themselves (Trust.check).
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return Bundle(server_cert, ctx, frozenset(fingerprint(der) for der in ders))


def tls_context(server_cert: Path) -> ssl.SSLContext:
    """The TLS context of a --server_cert file (the handshake's half of Trust)."""
    return read_bundle(server_cert).context


@dataclass(frozen=True)
class Trust:
    """Who may answer for a server: one certificate of the bundle, exactly, that names it, and,
    with `pins`, the one it presented before. Without pins (a gateway the caller has just started
    itself, as the demo and the tests do), the bundle alone."""

    bundle: Bundle
    pins: ServerPins | None = None
    accept_new: bool = False  # the user said the server's new certificate is meant

    def check(self, server: Server, der: bytes) -> None:
        """After the handshake, before a byte is sent: Unreachable when `der` may not speak for
        `server`; pins it when it is the first certificate seen there (or the user accepts it)."""
        if not self.bundle.holds(der):
            # The handshake took it because a certificate of the file signed it: one made with
            # another gateway's key (a CA certificate of an earlier s2cs), never this server's own.
            raise Unreachable(
                f"{server} presented a certificate that is not in {self.bundle.source}, only signed "
                "by one of its certificates (as another gateway's key can sign one): nothing was "
                "sent to it; ask its operator for the right one"
            )
        if self.pins is None:
            return
        presented = fingerprint(der)
        if self.pins.pinned(server) == presented:
            return  # as every time but the first: read only, no lock
        pinned = self.pins.settle(server, presented, self.accept_new)
        if pinned is not None:
            raise Unreachable(
                f"{server} presented another certificate than the one pinned for it in "
                f"{self.pins.path} ({_short(pinned)}, now {_short(presented)}); nothing was sent to "
                f"it. If its operator replaced it and {self.bundle.source} holds the new one, run "
                f"the command again with {ACCEPT_NEW}"
            )


def _short(fp: str) -> str:
    return fp[: len("sha256:") + 16]


def trust(server_cert: Path, pins: ServerPins | None = None, accept_new: bool = False) -> Trust:
    return Trust(read_bundle(server_cert), pins, accept_new)


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

        token = None
        if self.scope:
            from ..scopes import login_form

            token = token_for(self.scope)
            if token is None:
                hint = f"s2uc login --scope {login_form(self.scope)}"
                raise Unauthenticated(f"not logged in for {self.scope}: {hint}")
        else:
            from .servers import ServerScopes

            bound = ServerScopes(home()).scope_of(self.server)
            token = token_for(bound) if bound else None  # logged out since: as if never bound
        try:
            return call(self.server, self.trust, op, token, **fields)
        except Unauthenticated as exc:
            if token is not None:
                raise  # the server's own words: expired, revoked, not its scope
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
