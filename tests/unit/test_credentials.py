from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from scistream.credentials import STREAM_CERT_NAME, StreamCredentials, stream_credentials

UID = "0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"
OTHER_UID = "7f3e9a10-5c2b-4d8e-9a6f-1b2c3d4e5f60"


def certificate(creds: StreamCredentials) -> x509.Certificate:
    return x509.load_pem_x509_certificate(creds.cert_pem)


def test_the_same_uid_gives_byte_identical_key_and_certificate():
    first, second = stream_credentials(UID), stream_credentials(UID)
    assert first.key_pem == second.key_pem
    assert first.cert_pem == second.cert_pem


def test_the_derivation_is_pinned_so_gateways_of_different_releases_agree():
    # If this changes, a gateway with this code cannot stream with one running the previous release.
    assert stream_credentials(UID).fingerprint == (
        "ce9a931e93d04e755fc60b327ff274d7c76090480eb52106d593061914a54ab1"
    )


def test_different_uids_give_different_keys_certificates_and_serials():
    mine, other = stream_credentials(UID), stream_credentials(OTHER_UID)
    assert mine.key_pem != other.key_pem
    assert mine.cert_pem != other.cert_pem
    assert mine.fingerprint != other.fingerprint
    assert certificate(mine).serial_number != certificate(other).serial_number


def test_the_certificate_is_a_self_signed_ed25519_stream_certificate():
    creds = stream_credentials(UID)
    cert = certificate(creds)
    assert isinstance(cert.public_key(), Ed25519PublicKey)
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)  # raises if the signature is not its own
    assert cert.subject.rfc4514_string() == f"CN={STREAM_CERT_NAME}"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["scistream-stream"]


def test_the_validity_is_fixed_so_certificates_never_expire_mid_stream():
    cert = certificate(stream_credentials(UID))
    assert cert.not_valid_before_utc == datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    assert cert.not_valid_after_utc == datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


def test_the_key_is_an_unencrypted_pkcs8_ed25519_key_matching_the_certificate():
    creds = stream_credentials(UID)
    assert creds.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(creds.key_pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert key.public_key().public_bytes(*raw) == certificate(creds).public_key().public_bytes(*raw)


# --- a TLS handshake between two in-memory endpoints, as two proxies would do it ------------------


def context(side: str, present: str | None, trust: str, tmp_path: Path) -> ssl.SSLContext:
    """A proxy's TLS settings: TLS 1.3 only, verify required, CA = exactly the stream certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if side == "server" else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=stream_credentials(trust).cert_pem.decode())
    if present is not None:
        creds = stream_credentials(present)
        pem = tmp_path / f"{side}.pem"
        pem.write_bytes(creds.cert_pem + creds.key_pem)
        ctx.load_cert_chain(pem)
    return ctx


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> dict[str, object]:
    """Shuttle bytes between the two until neither has more to say; then send one message.

    Returns what each side ended with: the bytes it received, or the SSLError it raised.
    """
    to_server, from_server, to_client, from_client = (ssl.MemoryBIO() for _ in range(4))
    ends = {
        "server": server_ctx.wrap_bio(to_server, from_server, server_side=True),
        "client": client_ctx.wrap_bio(to_client, from_client, server_hostname=STREAM_CERT_NAME),
    }
    outcome: dict[str, object] = {}
    finished: set[str] = set()

    def shuttle() -> bool:
        moved = from_client.pending + from_server.pending
        to_server.write(from_client.read())
        to_client.write(from_server.read())
        return moved > 0

    for _ in range(10):  # TLS 1.3 needs two round trips; more would be a bug in this helper
        for name, end in ends.items():
            if name in finished or name in outcome:
                continue
            try:
                end.do_handshake()
                finished.add(name)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                outcome[name] = exc
        if not shuttle():
            break
    if "server" not in outcome and "client" not in outcome:
        ends["client"].write(b"scan 0001")
        shuttle()
        try:
            outcome["server"] = ends["server"].read(100)
        except ssl.SSLError as exc:
            outcome["server"] = exc
    if "client" not in outcome:
        shuttle()
        try:
            ends["client"].read(100)  # in TLS 1.3 a client learns of its refusal only now
        except ssl.SSLWantReadError:
            outcome["client"] = b""
        except ssl.SSLError as exc:
            outcome["client"] = exc
    return outcome


def test_two_proxies_of_the_same_stream_complete_a_tls13_handshake(tmp_path):
    outcome = handshake(
        context("server", UID, UID, tmp_path),
        context("client", UID, UID, tmp_path),
    )
    assert outcome == {"server": b"scan 0001", "client": b""}


def test_a_peer_of_another_stream_is_refused_during_the_handshake(tmp_path):
    outcome = handshake(
        context("server", UID, UID, tmp_path),
        context("client", OTHER_UID, OTHER_UID, tmp_path),
    )
    assert isinstance(outcome["client"], ssl.SSLCertVerificationError)
    assert isinstance(outcome["server"], ssl.SSLError)
    assert outcome["server"].reason == "TLSV1_ALERT_UNKNOWN_CA"


def test_a_peer_that_knows_the_certificate_but_not_the_uid_is_refused(tmp_path):
    # The certificate is public (anyone on the path sees it); only the UID gives its key.
    outcome = handshake(
        context("server", UID, UID, tmp_path),
        context("client", OTHER_UID, UID, tmp_path),
    )
    assert isinstance(outcome["server"], ssl.SSLCertVerificationError)
    assert isinstance(outcome["client"], ssl.SSLError)
    assert outcome["client"].reason == "TLSV1_ALERT_UNKNOWN_CA"


def test_a_peer_without_a_certificate_is_refused(tmp_path):
    outcome = handshake(
        context("server", UID, UID, tmp_path),
        context("client", None, UID, tmp_path),
    )
    assert isinstance(outcome["server"], ssl.SSLError)
    assert outcome["server"].reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert isinstance(outcome["client"], ssl.SSLError)
    assert outcome["client"].reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"


@pytest.mark.parametrize("uid", [UID, OTHER_UID])
def test_the_certificate_names_the_host_name_the_outbound_proxy_verifies(uid, tmp_path):
    # The outbound HAProxy says `verifyhost scistream-stream`; Python's check_hostname does the same.
    client = context("client", uid, uid, tmp_path)
    assert client.check_hostname
    outcome = handshake(context("server", uid, uid, tmp_path), client)
    assert outcome["server"] == b"scan 0001"
