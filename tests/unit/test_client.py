from __future__ import annotations

import ssl

import pytest

from scistream.credentials import stream_credentials
from scistream.errors import ConfigError
from scistream.s2uc.client import Server, parse_server, tls_context


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
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "scistream-stream"),),)]
