"""The control-plane certificate: the operator's, or one generated on first start.

A generated certificate is self-signed for the listener IP, the loopback addresses, this host's
names and those the operator adds (--cert-name: an internal address users reach the gateway by),
and kept in the state dir so users can be given the same file every time; it is made anew when
it no longer names what it must, or when the --cert-name names change (kept in server.names). It is a leaf for
TLS servers only (CA:FALSE, digitalSignature, serverAuth): s2uc pins each gateway to exactly its
own certificate, and a CA in a user's bundle of several gateways' certificates would let this
gateway's key sign a certificate for another one (as earlier versions generated it; such a pair
is replaced at start). An operator's
pair is checked at start (readable, PEM, the key that of the certificate), so that a wrong file is
one line of the operator's words, not a TLS traceback.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigError
from ..s2ds.backend import write_private

# An EC key signs the handshake (digitalSignature); it enciphers nothing (no keyEncipherment, which
# is for RSA key transport), and it signs no certificate (no keyCertSign) and no CRL.
_SERVER_ONLY = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def generate(crt: Path, key: Path, listener_ip: str, *more_ips: str, extra: Sequence[str] = ()) -> None:
    """A new pair for the listener IP, `more_ips`, the loopback addresses, this host's names and
    `extra` (host names and addresses, as --cert-name gives them)."""
    private = ec.generate_private_key(ec.SECP256R1())
    names = {socket.gethostname(), socket.getfqdn(), "localhost", *(n for n in extra if not is_ip(n))}
    wanted = (listener_ip, "127.0.0.1", "::1", *more_ips, *(n for n in extra if is_ip(n)))
    ips = {ipaddress.ip_address(ip) for ip in wanted}
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in sorted(names) if n]
    sans += [x509.IPAddress(ip) for ip in sorted(ips, key=str)]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"scistream s2cs {listener_ip}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_SERVER_ONLY, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(private, hashes.SHA256())
    )
    write_private(
        key,
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


FIRST = "none in the state dir yet"  # why a pair is generated on a gateway's first start
NAMES_FILE = "server.names"  # the --cert-name names the generated pair was made with, one a line


def server_certificate(
    crt: Path | None,
    key: Path | None,
    state_dir: Path,
    listener_ip: str,
    *more_ips: str,
    names: Sequence[str] = (),
) -> tuple[Path, Path, str | None]:
    """(certificate, key, why it was generated now or None). Both given, or neither (then
    generated once in state_dir, and again when it no longer fits). `names`: --cert-name's."""
    if crt and key:
        check_pair(crt, key)
        return crt, key, None
    if crt or key:
        raise ConfigError("give both --server-crt and --server-key, or neither to use a generated pair")
    crt, key, kept = state_dir / "server.crt", state_dir / "server.key", state_dir / NAMES_FILE
    wanted = sorted(set(names))
    why = _unfit(crt, key, (listener_ip, *more_ips)) or _renamed(kept, wanted)
    if why is not None:
        generate(crt, key, listener_ip, *more_ips, extra=wanted)
        kept.write_text("".join(f"{name}\n" for name in wanted), encoding="utf-8")
    return crt, key, why


def _renamed(kept: Path, wanted: list[str]) -> str | None:
    """Why the pair must be made anew for --cert-name: the names it was made with differ."""
    try:
        made = sorted(kept.read_text(encoding="utf-8").split())
    except FileNotFoundError:
        made = []  # made by an s2cs before --cert-name, or with none
    except (OSError, UnicodeDecodeError) as exc:
        return f"{kept} could not be read: {exc}"
    if made == wanted:
        return None
    before, now = ", ".join(made) or "nothing", ", ".join(wanted) or "nothing"
    return f"--cert-name named {before} at its making, now {now}"


def _unfit(crt: Path, key: Path, ips: tuple[str, ...]) -> str | None:
    """Why the generated pair in the state dir must be made anew; None when it may stay."""
    if not crt.exists() and not key.exists():
        return FIRST
    try:
        check_pair(crt, key)
    except ConfigError as exc:
        return f"the one in the state dir was unusable: {exc.message}"
    missing = [ip for ip in ips if not _names(crt, ip)]
    if missing:  # an address changed: the certificate must name it
        return f"the one in the state dir did not name {', '.join(missing)}"
    if is_ca(crt):
        return (
            "the one in the state dir was a CA certificate, made by an earlier s2cs: it could vouch "
            "for other gateways, so users must replace it with this one"
        )
    return None


def is_ca(crt: Path) -> bool:
    """Whether the certificate may sign others (BasicConstraints CA:TRUE)."""
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def check_pair(crt: Path, key: Path) -> None:
    """A certificate and key the control port can use; ConfigError says what is wrong."""
    crt_pem, key_pem = _read(crt), _read(key)
    try:
        cert = x509.load_pem_x509_certificate(crt_pem)
    except ValueError:
        raise ConfigError(f"{crt} is not a PEM certificate (BEGIN CERTIFICATE)") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"{key} is encrypted; s2cs needs the key without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{key} is not a PEM private key (BEGIN PRIVATE KEY)") from None
    # Every client would refuse it: one line now, not a TLS error at each user's request. A
    # generated pair that expired is made anew (server_certificate), an operator's must be renewed.
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc <= now:
        raise ConfigError(f"{crt} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: renew it")
    if _public(cert.public_key()) != _public(private.public_key()):
        raise ConfigError(f"{key} is not the key of {crt}: give the key the certificate was made for")
    try:  # as the control port will load them: what the checks above cannot foresee
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(crt, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot use {crt} with {key} for TLS: {exc}") from None


def _read(path: Path) -> bytes:
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{path} is not a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _public(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _names(crt: Path, ip: str) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    return ipaddress.ip_address(ip) in sans.get_values_for_type(x509.IPAddress)
