"""Self-signed control-plane certificates with the dates and names a test needs."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def pair_pem(
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    ips: Sequence[str] = ("127.0.0.1",),
    dns: Sequence[str] = (),
    ca: bool = False,
) -> tuple[bytes, bytes]:
    """(certificate, key), both PEM, the key unencrypted; with `ca`, a CA certificate (CA:TRUE),
    as s2cs generated them before its certificates were leaves."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway")])
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_pair(
    crt: Path, key: Path, not_before: datetime.datetime, not_after: datetime.datetime
) -> tuple[Path, Path]:
    """A pair for 127.0.0.1 written to `crt` and `key` (mode 0600)."""
    crt_pem, key_pem = pair_pem(not_before, not_after)
    crt.write_bytes(crt_pem)
    key.write_bytes(key_pem)
    key.chmod(0o600)
    return crt, key
