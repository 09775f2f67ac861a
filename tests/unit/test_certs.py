"""The control-plane certificate (scistream/s2cs/certs.py)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from scistream.errors import ConfigError
from scistream.s2cs.certs import check_pair, server_certificate


def expired_pair(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    crt, pem = directory / "server.crt", directory / "server.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return crt, pem


def test_an_operators_expired_certificate_is_refused_with_its_date(tmp_path):
    crt, key = expired_pair(tmp_path)
    with pytest.raises(ConfigError, match=r"server\.crt expired on \d{4}-\d\d-\d\d .*: renew it"):
        check_pair(crt, key)


def test_a_generated_certificate_that_expired_is_made_anew(tmp_path):
    old, _ = expired_pair(tmp_path)
    before = old.read_bytes()
    crt, key, generated = server_certificate(None, None, tmp_path, "127.0.0.1")
    assert generated and crt.read_bytes() != before
    check_pair(crt, key)  # valid now
