"""The control-plane certificate (scistream/s2cs/certs.py)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from scistream.errors import ConfigError
from scistream.s2cs.certs import check_pair, server_certificate

from ..certificates import write_pair

DAY = datetime.timedelta(days=1)


def expired_pair(directory: Path) -> tuple[Path, Path]:
    now = datetime.datetime.now(datetime.UTC)
    return write_pair(directory / "server.crt", directory / "server.key", now - 30 * DAY, now - DAY)


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


# --- a leaf, never a CA: one gateway's key must not vouch for another gateway (issue 23) ---------


def _ca_pair(directory: Path, listener_ip: str = "127.0.0.1") -> tuple[Path, Path]:
    """A pair as earlier versions of s2cs generated it: a CA (`BasicConstraints ca=True`)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"scistream s2cs {listener_ip}")])
    now = datetime.datetime.now(datetime.UTC)
    ips = {ipaddress.ip_address(ip) for ip in (listener_ip, "127.0.0.1", "::1")}
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + 3650 * DAY)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip) for ip in ips]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(private, hashes.SHA256())
    )
    crt, key = directory / "server.crt", directory / "server.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key.chmod(0o600)
    return crt, key


def test_the_generated_certificate_is_a_leaf_for_tls_servers_only(tmp_path):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    crt, key, generated = server_certificate(None, None, tmp_path, "10.0.1.5", "10.0.1.6")
    assert generated
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign and not usage.value.crl_sign  # it can sign no certificate
    purposes = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(purposes) == [ExtendedKeyUsageOID.SERVER_AUTH]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert ips == {"10.0.1.5", "10.0.1.6", "127.0.0.1", "::1"}
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    check_pair(crt, key)  # and the control port can use it


def test_a_generated_ca_certificate_of_an_earlier_s2cs_is_replaced_by_a_leaf(tmp_path):
    from cryptography import x509

    old, _ = _ca_pair(tmp_path)
    before = old.read_bytes()
    crt, key, generated = server_certificate(None, None, tmp_path, "127.0.0.1")
    assert generated and crt.read_bytes() != before
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    check_pair(crt, key)
    # and a leaf it made is kept from then on: users keep the file they were given
    assert server_certificate(None, None, tmp_path, "127.0.0.1") == (crt, key, None)


# --- --cert-name: the addresses and names users inside the facility reach the gateway by ---------


def _sans(crt: Path) -> set[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in sans.get_values_for_type(x509.IPAddress)} | set(
        sans.get_values_for_type(x509.DNSName)
    )


def test_the_names_given_with_cert_name_are_in_the_generated_certificate(tmp_path):
    crt, key, generated = server_certificate(
        None, None, tmp_path, "203.0.113.7", names=("10.20.0.5", "dtn.internal.example.org")
    )
    assert generated
    assert {"203.0.113.7", "10.20.0.5", "dtn.internal.example.org", "127.0.0.1"} <= _sans(crt)
    check_pair(crt, key)
    again = server_certificate(
        None, None, tmp_path, "203.0.113.7", names=("dtn.internal.example.org", "10.20.0.5")
    )
    assert again[2] is None  # the same names, in any order: the same certificate for users


def test_a_certificate_is_made_anew_when_the_names_change_and_says_which(tmp_path):
    crt, _, _ = server_certificate(None, None, tmp_path, "203.0.113.7", names=("10.20.0.5",))
    first = crt.read_bytes()
    crt, _, why = server_certificate(
        None, None, tmp_path, "203.0.113.7", names=("10.20.0.5", "dtn.example.org")
    )
    assert why == "--cert-name named 10.20.0.5 at its making, now 10.20.0.5, dtn.example.org"
    assert crt.read_bytes() != first and "dtn.example.org" in _sans(crt)
    crt, _, why = server_certificate(None, None, tmp_path, "203.0.113.7")
    assert why == "--cert-name named 10.20.0.5, dtn.example.org at its making, now nothing"
    assert "dtn.example.org" not in _sans(crt)
    assert server_certificate(None, None, tmp_path, "203.0.113.7")[2] is None
