"""Who may answer for an S2CS: the certificates of --server_cert, and the one each server is pinned to.

The file given with --server_cert holds the certificate the S2CS operator hands out, or a bundle
of several gateways' certificates. A server must present exactly one of them, one that names the
host the user typed (HOST of HOST:PORT): no certificate of the file is a CA for any other, so one
gateway's key can never sign its way into speaking for another. The certificate a server presents
the first time it is used is then pinned to it (servers.py), and another is refused until the user
accepts it on purpose. transport.py checks all of this after the handshake and before the
request, and its token, is written.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, Unreachable
from .naming import S2UC, Names

TYPE_CHECKING = False  # typing's, without importing typing: nothing here needs it to run
if TYPE_CHECKING:
    from .address import Server
    from .servers import ServerPins

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def fingerprint(der: bytes) -> str:
    """How servers.json names a certificate: the SHA-256 of its DER form."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Bundle:
    """The certificates of a --server_cert file: each vouches, as it is, for the hosts it names."""

    source: Path
    context: ssl.SSLContext  # trusts them, TLS 1.3 only, and checks the host name
    fingerprints: frozenset[str]
    names: Names = S2UC  # how messages ask the user for this file

    def holds(self, der: bytes) -> bool:
        return fingerprint(der) in self.fingerprints


def read_bundle(server_cert: Path, names: Names = S2UC) -> Bundle:
    """The certificate(s) of `server_cert`; ConfigError, in the user's words, when there are none."""
    if not server_cert.is_file():
        raise ConfigError(
            f"no server certificate at {server_cert}: {names.give_cert} (its operator has it; "
            "a generated one is printed by s2cs at start)"
        )
    try:
        data = server_cert.read_bytes()  # read once: what is checked is what is trusted
    except OSError as exc:
        raise ConfigError(f"cannot read {server_cert}: {exc.strerror}") from None
    ask = f"{names.give_cert} (PEM; its operator has it)"
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
    return Bundle(server_cert, ctx, frozenset(fingerprint(der) for der in ders), names)


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
                f"the command again with {self.bundle.names.accept_new_cert}"
            )


def _short(fp: str) -> str:
    return fp[: len("sha256:") + 16]


def trust(
    server_cert: Path, pins: ServerPins | None = None, accept_new: bool = False, names: Names = S2UC
) -> Trust:
    return Trust(read_bundle(server_cert, names), pins, accept_new)
