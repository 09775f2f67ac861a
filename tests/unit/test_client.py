from __future__ import annotations

import ssl

import pytest

from scistream.client.address import Server, parse_server
from scistream.client.trust import tls_context
from scistream.credentials import stream_credentials
from scistream.errors import ConfigError, ScistreamError
from tests.needs import require_command


@pytest.mark.parametrize(
    ("text", "server", "shown"),
    [
        ("hpc.example.org", Server("hpc.example.org", 5000), "hpc.example.org:5000"),
        ("hpc.example.org:5001", Server("hpc.example.org", 5001), "hpc.example.org:5001"),
        ("10.0.1.5:5000", Server("10.0.1.5", 5000), "10.0.1.5:5000"),
        ("  localhost:5000 \n", Server("localhost", 5000), "localhost:5000"),
        ("[::1]:5001", Server("::1", 5001), "[::1]:5001"),
        ("[2001:db8::7]", Server("2001:db8::7", 5000), "[2001:db8::7]:5000"),
        ("::1", Server("::1", 5000), "[::1]:5000"),
        ("hpc:65535", Server("hpc", 65535), "hpc:65535"),
    ],
)
def test_parse_server_reads_the_forms_of_the_user_guide(text, server, shown):
    assert parse_server(text) == server
    assert str(server) == shown


@pytest.mark.parametrize(
    "text",
    ["", "   ", ":5000", "hpc:port", "hpc:0", "hpc:65536", "hpc:-1", "[]:5000", "[::1]:x", "hpc:50 00"],
)
def test_parse_server_refuses_what_is_not_host_port(text):
    with pytest.raises(ConfigError, match="--s2cs must look like HOST:PORT"):
        parse_server(text)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[::1]5001"),
        pytest.param("hpc:5\u00b2"),
    ],
)
def test_parse_server_refuses_typos_it_would_misread(text):
    with pytest.raises(ConfigError, match="--s2cs must look like HOST:PORT"):
        parse_server(text)


def test_a_missing_server_certificate_tells_the_user_to_pass_server_cert(tmp_path):
    missing = tmp_path / "server.crt"
    with pytest.raises(ConfigError) as caught:
        tls_context(missing)
    assert f"no server certificate at {missing}" in caught.value.message
    assert "pass --server_cert" in caught.value.message


def test_a_directory_is_not_a_server_certificate(tmp_path):
    with pytest.raises(ConfigError, match="pass --server_cert"):
        tls_context(tmp_path)


def test_the_context_trusts_the_given_certificate_and_checks_the_host_name(tmp_path):
    cert = tmp_path / "server.crt"
    cert.write_bytes(stream_credentials("0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e").cert_pem)
    ctx = tls_context(cert)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3  # the control port speaks nothing older
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "scistream-stream"),),)]


# --- a --server_cert that is there but unusable: one line naming the file, no traceback ----------


def _pem(tmp_path):
    cert = tmp_path / "server.crt"
    cert.write_bytes(stream_credentials("0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e").cert_pem)
    return cert


def _der(tmp_path):
    pem = _pem(tmp_path).read_text()
    der = tmp_path / "server.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(pem))
    return der


def test_an_empty_server_certificate_is_named_and_said_to_be_empty(tmp_path):
    empty = tmp_path / "server.crt"
    empty.touch()
    with pytest.raises(ConfigError) as caught:
        tls_context(empty)
    assert caught.value.message.startswith(f"{empty} is empty")
    assert "pass --server_cert" in caught.value.message


def test_a_der_server_certificate_is_named_with_the_command_that_converts_it(tmp_path):
    der = _der(tmp_path)
    with pytest.raises(ConfigError) as caught:
        tls_context(der)
    message = caught.value.message
    assert message.startswith(f"{der} is a DER (binary) certificate")
    assert f"openssl x509 -inform der -in {der} -out server.crt" in message


@pytest.mark.parametrize(
    "content",
    [b"hello, this is not a certificate\n", b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n"],
    ids=["text", "broken-pem"],
)
def test_a_file_without_a_certificate_is_named_and_said_to_hold_none(tmp_path, content):
    junk = tmp_path / "server.crt"
    junk.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        tls_context(junk)
    assert caught.value.message.startswith(f"{junk} holds no PEM certificate")


def test_an_unreadable_server_certificate_is_named_with_the_reason(tmp_path):
    import os
    import subprocess
    import sys

    cert = _pem(tmp_path)
    cert.chmod(0o000)
    check = (
        "import sys; from pathlib import Path; from scistream.errors import ConfigError\n"
        "from scistream.client.trust import tls_context\n"
        "try:\n    tls_context(Path(sys.argv[1]))\n"
        "except ConfigError as exc:\n    print(exc.message)\n"
    )
    argv = [sys.executable, "-c", check, str(cert)]
    if os.geteuid() == 0:  # root reads any file: take away the capabilities that let it
        require_command("setpriv", "reading a file as root cannot, with util-linux's setpriv")
        drop = "-dac_override,-dac_read_search"
        argv = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == f"cannot read {cert}: Permission denied", result.stderr


@pytest.mark.parametrize("make", [lambda p: (p / "server.crt").touch() or p / "server.crt", _der])
def test_s2uc_says_what_is_wrong_with_the_certificate_in_one_line(tmp_path, make):
    from typer.testing import CliRunner

    from scistream.s2uc.cli import app

    cert = make(tmp_path)
    result = CliRunner().invoke(app, ["info", "--s2cs", "127.0.0.1:9", "--server_cert", str(cert)])
    assert result.exit_code == 2  # fix the command line
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {cert} is ")


# --- which token goes to which server ------------------------------------------------------------

HPC_SCOPE = "https://auth.globus.org/scopes/3a1b6c2d-0e4f-4a5b-8c7d-9e0f1a2b3c4d/scistream"


class _Gateway:
    """Stands in for `client.call`: an S2CS with authentication on that advertises `scope`."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self.tokens: list[str | None] = []

    def __call__(self, server, context, op, token=None, **fields):
        from scistream.errors import Unauthenticated

        if op == "info":
            return {"auth": {"enabled": True, "scope": self.scope}}
        self.tokens.append(token)
        if token is None:
            raise Unauthenticated("this server requires a Globus login")
        return {"streams": []}


@pytest.fixture
def gateway(monkeypatch, tmp_path):
    import scistream.client.tokens as tokens
    import scistream.client.transport as transport

    monkeypatch.setenv("SCISTREAM_HOME", str(tmp_path))
    stored = {HPC_SCOPE: "hpc-token"}  # the user is logged in for the hpc facility's scope
    monkeypatch.setattr(tokens, "token_for", stored.get)
    fake = _Gateway(HPC_SCOPE)
    monkeypatch.setattr(transport, "call", fake)
    return fake


def test_no_token_goes_to_a_server_the_user_did_not_name_whatever_it_advertises(gateway, tmp_path):
    from scistream.client.transport import Connection
    from scistream.errors import Unauthenticated

    other = Server("other.facility.org", 5000)
    with pytest.raises(Unauthenticated) as caught:
        Connection(other, ssl.create_default_context(), None, tmp_path / "other.crt").call("status")
    assert gateway.tokens == [None]
    message = caught.value.message
    assert message.startswith("other.facility.org:5000 requires a Globus login: run s2uc login --s2cs ")
    assert "--server_cert" in message and "--scope 3a1b6c2d-0e4f-4a5b-8c7d-9e0f1a2b3c4d" in message


def test_the_token_goes_where_the_user_named_its_scope_or_logged_in(gateway, tmp_path):
    from scistream.client.servers import ServerScopes
    from scistream.client.transport import Connection

    hpc = Server("hpc.facility.org", 5000)
    Connection(hpc, ssl.create_default_context(), HPC_SCOPE).call("status")
    assert gateway.tokens == ["hpc-token"]
    ServerScopes(tmp_path).bind(hpc, HPC_SCOPE)
    Connection(Server("HPC.facility.org", 5000), ssl.create_default_context()).call("status")
    assert gateway.tokens == ["hpc-token", "hpc-token"]
    with pytest.raises(ScistreamError):
        Connection(Server("hpc.facility.org", 5001), ssl.create_default_context()).call("status")
    assert gateway.tokens[-1] is None  # another port is another server


# --- a bundle: the certificates of several gateways in one --server_cert -------------------------


def _tls_server(tmp_path, name: str, ips=("127.0.0.1",)):
    """A TLS server on 127.0.0.1 with a certificate of its own (all of them named alike, as two
    gateways' generated certificates are when they have the same listener IP); its port, its PEM."""
    import datetime
    import socket
    import threading

    from tests.certificates import pair_pem

    now = datetime.datetime.now(datetime.UTC)
    cert_pem, key_pem = pair_pem(now - datetime.timedelta(days=1), now + datetime.timedelta(days=1), ips)
    (tmp_path / f"{name}.crt").write_bytes(cert_pem)
    (tmp_path / f"{name}.key").write_bytes(key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello\n")
            except (ssl.SSLError, OSError):
                pass  # the client refused this certificate

    threading.Thread(target=serve, daemon=True).start()
    return listener, cert_pem


def _greeting(context: ssl.SSLContext, port: int, host: str = "127.0.0.1") -> bytes:
    import socket

    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return tls.recv(16)


def test_a_bundle_of_two_gateways_certificates_vouches_for_each_of_them_and_no_other(tmp_path):
    hpc, hpc_pem = _tls_server(tmp_path, "hpc")
    inst, inst_pem = _tls_server(tmp_path, "instrument")
    other, _ = _tls_server(tmp_path, "other")
    try:
        bundle = tmp_path / "gateways.pem"
        bundle.write_bytes(hpc_pem + b"# the instrument gateway\n" + inst_pem)
        ctx = tls_context(bundle)
        assert ctx.cert_store_stats()["x509"] == 2
        assert _greeting(ctx, hpc.getsockname()[1]) == b"hello\n"
        assert _greeting(ctx, inst.getsockname()[1]) == b"hello\n"  # the second of the same name too
        with pytest.raises(ssl.SSLCertVerificationError, match="self-signed"):
            _greeting(ctx, other.getsockname()[1])
        # and the certificate must still name the host: one trusted for 127.0.0.1 is not for another
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            _greeting(ctx, hpc.getsockname()[1], host="hpc.facility.org")
    finally:
        for listener in (hpc, inst, other):
            listener.close()


# --- who may answer for a server: a certificate of the bundle, exactly, and the one pinned --------


def _der_of(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def test_a_server_keeps_the_certificate_it_first_presented(tmp_path):
    import datetime

    from scistream.client.servers import ServerPins
    from scistream.client.trust import fingerprint, trust
    from scistream.errors import Unreachable
    from tests.certificates import pair_pem

    now = datetime.datetime.now(datetime.UTC)
    first, _ = pair_pem(now - datetime.timedelta(days=1), now + datetime.timedelta(days=1))
    second, _ = pair_pem(now - datetime.timedelta(days=1), now + datetime.timedelta(days=1))
    bundle = tmp_path / "gateways.pem"
    bundle.write_bytes(first + second)
    pins = ServerPins(tmp_path / "home")
    hpc, other = Server("127.0.0.1", 5000), Server("127.0.0.1", 5001)
    trust(bundle, pins).check(hpc, _der_of(first))  # first use: pinned
    assert pins.pinned(hpc) == fingerprint(_der_of(first))
    trust(bundle, pins).check(hpc, _der_of(first))  # the same again
    trust(bundle, pins).check(other, _der_of(second))  # another port is another server
    with pytest.raises(Unreachable) as caught:
        trust(bundle, pins).check(hpc, _der_of(second))
    message = caught.value.message
    assert message.startswith(
        f"127.0.0.1:5000 presented another certificate than the one pinned for it in {pins.path}"
    )
    assert message.endswith("run the command again with --accept-new-cert")
    assert pins.pinned(hpc) == fingerprint(_der_of(first))  # refused: nothing changed
    trust(bundle, pins, accept_new=True).check(hpc, _der_of(second))
    assert pins.pinned(hpc) == fingerprint(_der_of(second))
    # A certificate not in the bundle is refused, pinned or not, accepted or not.
    stranger, _ = pair_pem(now - datetime.timedelta(days=1), now + datetime.timedelta(days=1))
    for checker in (trust(bundle), trust(bundle, pins, accept_new=True)):
        with pytest.raises(Unreachable, match="presented a certificate that is not in"):
            checker.check(hpc, _der_of(stranger))
    assert pins.pinned(hpc) == fingerprint(_der_of(second))


def test_a_scope_given_to_a_gateway_without_authentication_needs_no_login(monkeypatch, tmp_path):
    """README: pass the same --scope to every command. A gateway with authentication off needs no
    token: the request goes without one, and only a gateway that wants one gets the login hint."""
    import scistream.client.tokens as tokens
    import scistream.client.transport as transport
    from scistream.client.transport import Connection
    from scistream.errors import Unauthenticated

    monkeypatch.setenv("SCISTREAM_HOME", str(tmp_path))
    monkeypatch.setattr(tokens, "token_for", lambda scope: None)  # not logged in for it
    sent: list[str | None] = []

    def open_gateway(server, trust, op, token=None, **fields):
        sent.append(token)
        return {"streams": []}

    monkeypatch.setattr(transport, "call", open_gateway)
    hpc = Server("hpc.facility.org", 5000)
    assert Connection(hpc, ssl.create_default_context(), HPC_SCOPE).call("status") == {"streams": []}
    assert sent == [None]

    secured = _Gateway(HPC_SCOPE)
    monkeypatch.setattr(transport, "call", secured)
    with pytest.raises(Unauthenticated) as caught:
        Connection(hpc, ssl.create_default_context(), HPC_SCOPE).call("status")
    assert caught.value.message == (
        f"not logged in for {HPC_SCOPE}: s2uc login --scope 3a1b6c2d-0e4f-4a5b-8c7d-9e0f1a2b3c4d"
    )
    assert secured.tokens == [None]


def test_a_certificate_that_does_not_vouch_for_the_server_names_the_file(tmp_path):
    """Run from another directory, ./server.crt is not the gateway's: the error names the file."""
    from scistream.client.address import Server as At
    from scistream.client.transport import call
    from scistream.client.trust import trust
    from scistream.errors import Unreachable

    listener, _ = _tls_server(tmp_path, "hpc")
    _tls_server(tmp_path, "other")
    try:
        with pytest.raises(Unreachable) as caught:
            call(At("127.0.0.1", listener.getsockname()[1]), trust(tmp_path / "other.crt"), "info")
    finally:
        listener.close()
    assert f"certificate that {tmp_path / 'other.crt'} (--server_cert) does not vouch for" in (
        caught.value.message
    )
