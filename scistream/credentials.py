"""Per-stream data-plane credentials, derived from the stream UID alone.

Both gateways of a stream compute the same Ed25519 key and the same self-signed certificate from
the UID, so each proxy can present it and require the peer to present exactly it. Whoever holds
the UID can join the stream; whoever does not is refused during the TLS handshake.

Pure: no files, sockets or processes. The caller writes the PEM bytes where a proxy can read them.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Changing any of these changes every stream's certificate: old and new gateways would no longer
# recognise each other. Treat them as part of the wire protocol.
_SALT = b"scistream/stream-credentials/v1"
_INFO = b"ed25519 private key"
STREAM_CERT_NAME = "scistream-stream"
_NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


@dataclass(frozen=True)
class StreamCredentials:
    key_pem: bytes
    cert_pem: bytes

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate (DER), for logs: it identifies the stream without revealing it."""
        der = x509.load_pem_x509_certificate(self.cert_pem).public_bytes(serialization.Encoding.DER)
        return hashlib.sha256(der).hexdigest()


def derive_key(uid: str) -> Ed25519PrivateKey:
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=_INFO).derive(uid.encode())
    return Ed25519PrivateKey.from_private_bytes(seed)


def stream_credentials(uid: str) -> StreamCredentials:
    """The key and certificate of stream `uid`; the same bytes on every machine."""
    key = derive_key(uid)
    public = key.public_key()
    raw_public = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    # A serial fixed by the key keeps the certificate deterministic yet distinct per stream.
    serial = int.from_bytes(hashlib.sha256(raw_public).digest()[:16], "big") >> 1
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, STREAM_CERT_NAME)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(STREAM_CERT_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(key, algorithm=None)  # Ed25519 signs deterministically: same UID, same certificate
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return StreamCredentials(key_pem=key_pem, cert_pem=cert.public_bytes(serialization.Encoding.PEM))
