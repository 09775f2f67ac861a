""" "My data does not arrive": `s2uc status UID` says why, in plain words, on the side that knows.

Real gateways, real proxies of both backends and of mixed pairs; the sender sees only a closed
connection, as a user would, and the status tells the cause within a bounded wait.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid

import pytest

from scistream.credentials import stream_credentials
from scistream.loopback import S2csProcess, Sink, free_port

from .conftest import BACKENDS, port_of, s2uc, wait_for

HANDSHAKE = "did not present this stream's certificate: is the UID the same on both sides?"
PAIRS = [(b, b) for b in BACKENDS] + [("haproxy", "stunnel"), ("stunnel", "haproxy")]


def status(gw: S2csProcess, uid: str, *extra: str) -> str:
    return s2uc("status", uid, "--s2cs", gw.address, "--server_cert", str(gw.cert), *extra).stdout


def send_and_lose(port: int) -> None:
    """What the instrument does: connect, send, close; what it sees of the failure does not matter."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.settimeout(30)
        sock.sendall(b"scan 0001 " * 1000)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(100)


def shows(gw: S2csProcess, uid: str, words: str, *extra: str) -> str:
    """The status once it says `words` (asked again while it does not: a proxy logs a failed
    connection when it ends, HAProxy after its retries)."""

    def said() -> str:
        out = status(gw, uid, *extra)
        return out if words in out else ""

    return str(wait_for(said, 60, f"{words!r} in status"))


@pytest.mark.parametrize(("inbound", "outbound"), PAIRS)
def test_a_wrong_uid_shows_as_a_refused_handshake_on_both_sides(start_s2cs, inbound, outbound):
    hpc = start_s2cs("hpc", backend=inbound)
    inst = start_s2cs("inst", backend=outbound)
    sink = Sink()
    uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])["uid"]
    listener = hpc.call("status", uid=uid)["streams"][0]["listeners"]
    wrong = str(uuid.uuid4())  # valid-looking, but not the inbound side's
    out = inst.call("outbound", uid=wrong, remote_listeners=listener)
    send_and_lose(port_of(out["listeners"][0]))

    inbound_status = shows(hpc, uid, HANDSHAKE)
    assert "failed: the peer at 127.0.0.1 did not present" in inbound_status
    outbound_status = shows(inst, wrong, HANDSHAKE)
    assert f"failed: the peer at {listener[0]} did not present" in outbound_status
    # Both streams still run: the status says so, and now also why nothing arrives.
    assert "RUNNING" in inbound_status and "RUNNING" in outbound_status
    assert sink.connections == 0


@pytest.mark.parametrize(
    ("inbound", "outbound", "rate"),
    [
        ("haproxy", "haproxy", 0),  # HAProxy connects to the service itself
        ("stunnel", "stunnel", 10000),  # through the shaper, as every stunnel session
        ("haproxy", "stunnel", 10000),  # HAProxy through the shaper
    ],
)
def test_a_service_that_is_not_running_is_named_on_the_inbound_side(start_s2cs, inbound, outbound, rate):
    hpc = start_s2cs("hpc", backend=inbound)
    inst = start_s2cs("inst", backend=outbound)
    down = free_port()  # nobody listens there
    inb = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[down], rate=rate)
    out = inst.call("outbound", uid=inb["uid"], remote_listeners=inb["listeners"], rate=rate)
    send_and_lose(port_of(out["listeners"][0]))

    words = f"the service at 127.0.0.1:{down} refused the connection: is it running?"
    shown = shows(hpc, inb["uid"], words)
    assert f"    failed: {words} (" in shown  # under the stream's line, with count and time
    reply = json.loads(status(hpc, inb["uid"], "--json"))
    failures = reply["streams"][0]["failures"]
    assert failures[0]["kind"] == "service-refused" and failures[0]["count"] >= 1
    assert -5 < time.time() - failures[0]["last"] < 300  # this host's time, not an hour off
    # The outbound side did connect and hand the data on: nothing failed there.
    assert "failed:" not in status(inst, inb["uid"])


def test_the_owner_sees_the_proxies_log_lines_and_no_key(start_s2cs):
    hpc = start_s2cs("hpc", backend="stunnel")
    inst = start_s2cs("inst", backend="haproxy")
    sink = Sink()
    inb = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])
    wrong = str(uuid.uuid4())
    out = inst.call("outbound", uid=wrong, remote_listeners=inb["listeners"])
    send_and_lose(port_of(out["listeners"][0]))
    shows(inst, wrong, HANDSHAKE)

    inbound_log = shows(hpc, inb["uid"], "SSL_accept", "--log")  # stunnel's own line
    assert "    proxy log, last " in inbound_log and "    shaper log, last " in inbound_log
    assert "tlsv1 alert unknown ca" in inbound_log
    outbound_log = status(inst, wrong, "--log")
    assert "certificate verify failed" in outbound_log  # HAProxy's log-format of the template
    for uid, text in ((inb["uid"], inbound_log), (wrong, outbound_log)):
        key = stream_credentials(uid).key_pem.decode().splitlines()[1]
        assert "PRIVATE KEY" not in text and key not in text
    # The listing, seen by anyone without authentication, has neither logs nor failures.
    listing = s2uc("status", "--s2cs", hpc.address, "--server_cert", str(hpc.cert)).stdout
    assert "failed:" not in listing and "log, last" not in listing
    refused = s2uc("status", "--log", "--s2cs", hpc.address, "--server_cert", str(hpc.cert), check=False)
    assert refused.returncode != 0 and "give its UID" in refused.stderr


def _foreign_client(port: int, workdir) -> None:
    """A client that presents another stream's certificate and takes any server's: the inbound
    proxy is the one to refuse it, for its certificate (HAProxy: "SSL client certificate not
    trusted"; stunnel: "certificate verify failed")."""
    import ssl

    other = stream_credentials(str(uuid.uuid4()))
    (workdir / "foreign.crt").write_bytes(other.cert_pem)
    (workdir / "foreign.key").write_bytes(other.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # it trusts the proxy; the proxy must not trust it
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(workdir / "foreign.crt", workdir / "foreign.key")
    with (
        contextlib.suppress(OSError),
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.settimeout(30)
        tls.sendall(b"scan 0001")
        tls.recv(100)  # TLS 1.3: the refusal of the client's certificate comes after its Finished


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_client_with_a_foreign_certificate_counts_as_a_refused_handshake(start_s2cs, workdir, backend):
    hpc = start_s2cs("hpc", backend=backend)
    sink = Sink()
    uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])["uid"]
    listener = hpc.call("status", uid=uid)["streams"][0]["listeners"][0]
    _foreign_client(port_of(listener), workdir)

    said = shows(hpc, uid, HANDSHAKE)
    assert "failed: the peer at 127.0.0.1 did not present this stream's certificate" in said
    assert sink.connections == 0
