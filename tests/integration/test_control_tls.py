"""The control port's TLS: which certificate speaks for which gateway, and which TLS version.

A user's `--server_cert` may be a bundle of several gateways' certificates (the user guide's
`cat hpc.crt instrument.crt > gateways.pem`). Each certificate of it vouches for the gateway it
names and for nothing else: a certificate made with another gateway's key is refused before a
token is sent, and a gateway keeps the certificate s2uc first saw it present (servers.json).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import shutil
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from scistream.loopback import free_port
from scistream.s2cs.certs import generate

from .conftest import s2uc

S2CS_ID = "3a1b6c2d-0e4f-4a5b-8c7d-9e0f1a2b3c4d"
SCOPE = f"https://auth.globus.org/scopes/{S2CS_ID}/scistream"
TOKEN = "token-meant-for-gateway-a"
GATEWAY_A = "127.0.0.2"  # both on loopback (all of 127/8 is this host's): no address to add
GATEWAY_B = "127.0.0.3"
DAY = datetime.timedelta(days=1)


def logged_in(home: Path) -> dict[str, str]:
    """The environment of a user who holds a Globus token for gateway A's scope, stored as
    `s2uc login --scope` stores it (globus-sdk's own token storage)."""
    from globus_sdk.token_storage import JSONTokenStorage, TokenStorageData

    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    storage = JSONTokenStorage(home / "tokens.json", namespace="s2uc")
    data = TokenStorageData(S2CS_ID, None, SCOPE, TOKEN, None, int(time.time()) + 3600, "Bearer")
    storage.store_token_data_by_resource_server({S2CS_ID: data})
    return {"SCISTREAM_HOME": str(home)}


def forged_for(name: str, issuer_crt: Path, issuer_key: Path, directory: Path) -> tuple[Path, Path]:
    """A certificate for `name` (an IP) signed with another gateway's key: what the operator (or a
    thief) of that key can make. Its own key pair is new; its issuer is that gateway."""
    issuer = x509.load_pem_x509_certificate(issuer_crt.read_bytes())
    signer = serialization.load_pem_private_key(issuer_key.read_bytes(), password=None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    private = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"scistream s2cs {name}")]))
        .issuer_name(issuer.subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + 30 * DAY)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(name))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())
    )
    crt, key = directory / "forged.crt", directory / "forged.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return crt, key


def earlier_ca(directory: Path, listener_ip: str) -> tuple[Path, Path]:
    """A gateway's pair as earlier versions of s2cs generated it: a CA (CA:TRUE, pathlen 0)."""
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"scistream s2cs {listener_ip}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + 3650 * DAY)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(listener_ip))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(private, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    crt, key = directory / "server.crt", directory / "server.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return crt, key


class Impostor:
    """A TLS server on `host` that presents `crt` and keeps every byte a client sends it, and
    answers a request as an S2CS would, so that a client that trusts it goes on."""

    def __init__(self, host: str, crt: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(crt, key)
        self.listener = socket.create_server((host, free_port(host)))
        self.address = f"{host}:{self.listener.getsockname()[1]}"
        self.received = b""
        self.handshakes = 0
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            conn.settimeout(30)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1
                    while chunk := tls.recv(65536):
                        self.received += chunk
                        if chunk.endswith(b"\n"):
                            tls.sendall(b'{"ok": true, "v": 1, "streams": []}\n')
                            break
            except (ssl.SSLError, OSError):
                pass  # the client refused the certificate

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=30)


@pytest.mark.parametrize("bundled", ["generated-now", "earlier-ca"])
def test_a_certificate_signed_with_another_gateways_key_gets_no_token(workdir, bundled):
    """Gateway B's key signs a certificate naming gateway A; the user's bundle holds both
    gateways' own certificates. s2uc refuses it, and the impostor reads nothing: no token."""
    a_dir, b_dir = workdir / "a", workdir / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    generate(a_dir / "server.crt", a_dir / "server.key", GATEWAY_A)
    if bundled == "generated-now":  # what this s2cs generates
        generate(b_dir / "server.crt", b_dir / "server.key", GATEWAY_B)
        b_crt, b_key = b_dir / "server.crt", b_dir / "server.key"
    else:  # a bundle a user made before this version: B's certificate is a CA
        b_crt, b_key = earlier_ca(b_dir, GATEWAY_B)
    bundle = workdir / "gateways.pem"
    bundle.write_bytes((a_dir / "server.crt").read_bytes() + b_crt.read_bytes())
    impostor = Impostor(GATEWAY_A, *forged_for(GATEWAY_A, b_crt, b_key, workdir))
    try:
        env = logged_in(workdir / "home")
        args = ("status", "--s2cs", impostor.address, "--server_cert", str(bundle), "--scope", S2CS_ID)
        refused = s2uc(*args, check=False, env=env)
    finally:
        impostor.close()
    assert impostor.received == b""  # not a byte of the request, so no token
    assert refused.returncode == 3, refused.stdout  # UNREACHABLE: a TLS failure
    (line,) = refused.stderr.splitlines()
    assert line.startswith(f"error: {impostor.address} presented a certificate "), line
    assert "ask its operator" in line
    servers = workdir / "home" / "servers.json"
    assert not servers.exists() or impostor.address not in servers.read_text()  # nothing pinned


def _fingerprint(pem: bytes) -> str:
    return "sha256:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()


def test_a_pinned_gateway_that_presents_another_certificate_is_refused(workdir, start_s2cs):
    """s2uc keeps the certificate a gateway first presented; later, another one (even one of the
    bundle) is refused with what to do, until the user accepts it on purpose."""
    hpc = start_s2cs("hpc")
    first = hpc.cert.read_bytes()
    bundle = workdir / "gateways.pem"
    bundle.write_bytes(first)
    home = workdir / "home"
    env = {"SCISTREAM_HOME": str(home)}
    s2uc("info", "--s2cs", hpc.address, "--server_cert", str(bundle), env=env)
    pins = json.loads((home / "servers.json").read_text())["certificates"]
    assert pins == {hpc.address: _fingerprint(first)}

    # The gateway comes back, on the same port, with a new pair; the user's bundle holds both.
    hpc.stop()
    shutil.rmtree(hpc.state_dir)
    hpc.start()
    second = hpc.cert.read_bytes()
    assert second != first
    bundle.write_bytes(first + second)
    refused = s2uc("info", "--s2cs", hpc.address, "--server_cert", str(bundle), check=False, env=env)
    assert refused.returncode == 3, refused.stdout
    (line,) = refused.stderr.splitlines()
    assert line.startswith(
        f"error: {hpc.address} presented another certificate than the one pinned for it in "
        f"{home / 'servers.json'}"
    ), line
    assert "--accept-new-cert" in line
    assert json.loads((home / "servers.json").read_text())["certificates"] == pins  # unchanged

    accepted = s2uc("info", "--s2cs", hpc.address, "--server_cert", str(bundle), "--accept-new-cert", env=env)
    assert f"S2CS {hpc.address}" in accepted.stdout or hpc.address in accepted.stdout
    pins = json.loads((home / "servers.json").read_text())["certificates"]
    assert pins == {hpc.address: _fingerprint(second)}
    s2uc("info", "--s2cs", hpc.address, "--server_cert", str(bundle), env=env)  # and from now on


def test_the_control_port_speaks_tls_1_3_only(start_s2cs):
    hpc = start_s2cs("hpc")
    host, port = hpc.listener_ip, hpc.port
    old = ssl.create_default_context(cafile=str(hpc.cert))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((host, port), timeout=30) as raw, pytest.raises(ssl.SSLError):
        old.wrap_socket(raw, server_hostname=host).close()
    new = ssl.create_default_context(cafile=str(hpc.cert))
    with (
        socket.create_connection((host, port), timeout=30) as raw,
        new.wrap_socket(raw, server_hostname=host) as tls,
    ):
        assert tls.version() == "TLSv1.3"
        tls.sendall(b'{"v": 1, "op": "info", "token": null}\n')
        assert json.loads(tls.recv(65536))["ok"] is True


def test_a_user_who_reaches_the_gateway_by_another_address_gets_it_named_with_cert_name(start_s2cs, workdir):
    """Inside the facility, users reach the gateway by an internal address that the generated
    certificate does not name: 'IP address mismatch', until the operator names it."""
    env = {"SCISTREAM_HOME": str(workdir / "user")}
    hpc = start_s2cs("hpc")
    internal = f"127.0.0.2:{hpc.port}"  # the control port listens on every address, loopback's too
    refused = s2uc("info", "--s2cs", internal, "--server_cert", str(hpc.cert), env=env, check=False)
    assert refused.returncode == 3, refused.stderr
    assert "IP address mismatch" in refused.stderr
    assert "(--server_cert) does not vouch for" in refused.stderr

    hpc.stop()
    hpc.extra = (*hpc.extra, "--cert-name", "127.0.0.2", "--cert-name", "dtn.internal.example.org")
    hpc.start()
    said = "generated that certificate anew (--cert-name named nothing at its making, now 127.0.0.2, "
    assert said in hpc.log.read_text()
    shutil.copy(hpc.cert, workdir / "hpc.crt")
    found = s2uc("info", "--s2cs", internal, "--server_cert", str(workdir / "hpc.crt"), env=env)
    assert found.stdout.startswith(f"{internal}: s2cs ")
