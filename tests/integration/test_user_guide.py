"""The user guide's commands, as written, against real gateways on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

from scistream.loopback import Sink, send

from .conftest import BACKENDS, field, port_of, s2uc

PAIRS = pytest.mark.parametrize(("inbound", "outbound"), [(a, b) for a in BACKENDS for b in BACKENDS])


@PAIRS
def test_user_guide_flow_carries_data_exactly(start_s2cs, workdir, inbound, outbound):
    hpc = start_s2cs("hpc", backend=inbound)
    inst = start_s2cs("instrument", backend=outbound)
    sink = Sink()
    # 5.4.1, as written: --server_cert is left at its default, ./server.crt
    (workdir / "server.crt").write_bytes(hpc.cert.read_bytes())
    args = ["--s2cs", hpc.address, "--remote_ip", "127.0.0.1", "--receiver_ports", str(sink.port)]
    out = s2uc("inbound_request", *args, cwd=workdir).stdout
    uid, listener = field(out, "UID"), field(out, "Listeners")
    printed = (
        f"s2uc outbound_request --s2cs INSTRUMENT_S2CS:5000 --server_cert INSTRUMENT_CERT {uid} {listener}"
    )
    assert printed in out
    # 5.5.2, as written, at the instrument's gateway
    (workdir / "server.crt").write_bytes(inst.cert.read_bytes())
    port = inst.port_range[0]
    args = ["--s2cs", inst.address, "--remote_ip", "127.0.0.1", "--receiver_ports", str(port)]
    out = s2uc("outbound_request", *args, uid, listener, cwd=workdir).stdout
    assert field(out, "Listeners") == f"127.0.0.1:{port}"

    # 5.5.3: what the instrument sends to its gateway's port arrives at the service, byte for byte
    data = os.urandom(2_000_000)  # at the default 10 Mbit/s: under two seconds
    assert send(("127.0.0.1", port), data) == (len(data), hashlib.sha256(data).hexdigest())
    sink.close()

    # 5.7: release, each side
    s2uc("release", uid, "--s2cs", inst.address, cwd=workdir)
    (workdir / "server.crt").write_bytes(hpc.cert.read_bytes())
    s2uc("release", uid, "--s2cs", hpc.address, cwd=workdir)
    for gw in (hpc, inst):
        assert gw.call("status")["streams"] == []


@PAIRS
def test_data_flows_both_directions(start_s2cs, inbound, outbound):
    hpc = start_s2cs("hpc", backend=inbound)
    inst = start_s2cs("instrument", backend=outbound)
    server = socket.create_server(("127.0.0.1", 0))

    def swapcase_service() -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(65536):
                conn.sendall(chunk.swapcase())

    threading.Thread(target=swapcase_service, daemon=True).start()
    hpc_args = ["--s2cs", hpc.address, "--server_cert", str(hpc.cert)]
    service = ["--remote_ip", "127.0.0.1", "--receiver_ports", str(server.getsockname()[1])]
    out = s2uc("inbound_request", *hpc_args, *service).stdout
    uid, listener = field(out, "UID"), field(out, "Listeners")
    inst_args = ["--s2cs", inst.address, "--server_cert", str(inst.cert)]
    out = s2uc("outbound_request", *inst_args, uid, listener).stdout
    local = port_of(field(out, "Listeners"))

    payload = b"Beamline Frame " * 70_000
    with socket.create_connection(("127.0.0.1", local), timeout=60) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        back = b""
        while chunk := sock.recv(65536):
            back += chunk
    assert back == payload.swapcase()
