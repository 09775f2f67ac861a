"""The control-plane certificate: the operator's, or one generated on first start.

A generated certificate is self-signed for the listener IP, the loopback addresses and this host's
names, and kept in the state dir so users can be given the same file every time.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..errors import ConfigError
from ..s2ds.backend import write_private


def generate(crt: Path, key: Path, listener_ip: str, *more_ips: str) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    names = {socket.gethostname(), socket.getfqdn(), "localhost"}
    ips = {ipaddress.ip_address(ip) for ip in (listener_ip, "127.0.0.1", "::1", *more_ips)}
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
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(private, hashes.SHA256())
    )
    write_private(
        key,
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def server_certificate(
    crt: Path | None, key: Path | None, state_dir: Path, listener_ip: str, *more_ips: str
) -> tuple[Path, Path, bool]:
    """(certificate, key, generated). Both given, or neither (then generated once in state_dir)."""
    if crt and key:
        for path in (crt, key):
            if not path.is_file():
                raise ConfigError(f"{path} does not exist")
        return crt, key, False
    if crt or key:
        raise ConfigError("give both --server-crt and --server-key, or neither to use a generated pair")
    crt, key = state_dir / "server.crt", state_dir / "server.key"
    if not (crt.is_file() and key.is_file()) or not all(_names(crt, ip) for ip in (listener_ip, *more_ips)):
        generate(crt, key, listener_ip, *more_ips)  # also when an address changed: it must name it
        return crt, key, True
    return crt, key, False


def _names(crt: Path, ip: str) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    return ipaddress.ip_address(ip) in sans.get_values_for_type(x509.IPAddress)
