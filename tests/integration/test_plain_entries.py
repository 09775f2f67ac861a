"""Plain entries: where an outbound proxy listens for the instrument's plain TCP, and from whom.

A plain entry carries no cryptographic check: whoever reaches it sends into the stream, no UID
needed. So it listens only on the gateway's entry addresses (`s2cs --entry-ip`, loopback by
default), never on every interface, and admits only the sources the operator allows
(`--allow-sources`, policy `sources`; by default the networks of the entry addresses).

Each test runs in a private network namespace where the gateway has a non-loopback address too
(10.9.7.1/24, the instruments' network) and a second network (10.9.6.1/24) stands for every
other place a client may come from: the partner facilities' side, say.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest

from scistream.errors import Forbidden
from scistream.loopback import BIN, S2csProcess, Sink, free_port

from ..needs import require_netns
from .conftest import field, port_of, s2uc, wait_for

ENTRY = "10.9.7.1"  # the gateway on the instruments' network, 10.9.7.0/24
ELSEWHERE = "10.9.6.1"  # the gateway on another network: a source no default allows


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def networks() -> Iterator[None]:
    """Two interfaces of the test's own network namespace, never of a real host."""
    require_netns("adds interfaces")
    for name, address in (("ss-inst", f"{ENTRY}/24"), ("ss-other", f"{ELSEWHERE}/24")):
        ip("link", "add", name, "type", "veth", "peer", "name", f"{name}-p")
        ip("addr", "add", address, "dev", name)
        ip("link", "set", name, "up")
        ip("link", "set", f"{name}-p", "up")
    try:
        yield
    finally:
        ip("link", "del", "ss-inst")
        ip("link", "del", "ss-other")


def inbound(hpc: S2csProcess, sink: Sink, rate: int = 0) -> dict:
    return hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=rate)


def send_from(source: str, address: tuple[str, int], data: bytes) -> tuple[int, str]:
    """Send `data` from `source`, half-close, and return what the service says it received."""
    with socket.create_connection(address, timeout=120, source_address=(source, 0)) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = sock.makefile("rb").readline().split()
    return int(reply[0]), reply[1].decode()


def inject_from(source: str, address: tuple[str, int]) -> str:
    """What a client of `source` that is not allowed sees: its connection reset, nothing answered.
    The reset may come at any step, the connect included: the kernel completes the handshake
    before the proxy accepts, and the proxy resets at once."""
    try:
        with socket.create_connection(address, timeout=60, source_address=(source, 0)) as sock:
            sock.sendall(b"INJECTED: data of someone without the UID\n" * 100)
            sock.shutdown(socket.SHUT_WR)
            answer = sock.recv(100)
    except OSError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
            return "reset"
        raise
    return f"answered {answer!r}"


def outbound_status(gw: S2csProcess, uid: str) -> dict:
    (entry,) = [s for s in gw.call("status", uid=uid)["streams"] if s["role"] == "outbound"]
    return entry


# --- where plain entries listen ------------------------------------------------------------------


def test_an_outbound_request_without_remote_ip_listens_on_loopback_only(networks, start_s2cs):
    hpc, inst = start_s2cs("hpc"), start_s2cs("inst")  # inst: no --entry-ip, the default
    sink = Sink()
    stream = inbound(hpc, sink)
    reply = inst.call("outbound", uid=stream["uid"], remote_listeners=stream["listeners"], rate=0)
    port = port_of(reply["listeners"][0])
    assert reply["listeners"] == [f"127.0.0.1:{port}"] and reply["bind"] == "127.0.0.1"  # what it listens on
    with pytest.raises(ConnectionRefusedError):  # the kernel refuses: nothing listens there
        socket.create_connection((ENTRY, port), timeout=30).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ELSEWHERE, port), timeout=30).close()
    data = os.urandom(1 << 20)
    assert send_from("127.0.0.1", ("127.0.0.1", port), data) == (len(data), hashlib.sha256(data).hexdigest())


def test_a_request_naming_an_address_that_is_not_an_entry_address_is_refused(networks, start_s2cs):
    hpc, inst = start_s2cs("hpc"), start_s2cs("inst")
    stream = inbound(hpc, Sink())
    for wanted in (ENTRY, "0.0.0.0", "::", "192.0.2.10"):  # the host's own, every interface, not the host's
        with pytest.raises(Forbidden) as refused:
            inst.call("outbound", uid=stream["uid"], remote_listeners=stream["listeners"], remote_ip=wanted)
        assert "s2cs --entry-ip" in refused.value.message, refused.value.message
    assert inst.call("info")["streams"] == 0  # nothing taken
    assert inst.call("info")["free_ports"] == inst.port_range[1] - inst.port_range[0] + 1

    # What the user sees: one line naming the option its operator changes, "not allowed" (4).
    args = ["--s2cs", inst.address, "--server_cert", str(inst.cert), "--remote_ip", ENTRY]
    out = s2uc("outbound_request", *args, stream["uid"], stream["listeners"][0], check=False)
    assert out.returncode == 4
    assert out.stderr.strip().count("\n") == 0
    assert f"remote_ip {ENTRY} is not an entry address of this gateway (127.0.0.1)" in out.stderr
    assert f"s2cs --entry-ip {ENTRY}" in out.stderr


def test_an_entry_address_the_operator_named_is_where_the_proxy_listens(networks, start_s2cs):
    hpc = start_s2cs("hpc")
    inst = start_s2cs("inst", "--entry-ip", ENTRY, "--entry-ip", "127.0.0.1")
    sink = Sink()
    stream = inbound(hpc, sink)
    args = ["--s2cs", inst.address, "--server_cert", str(inst.cert), "--remote_ip", ENTRY]
    out = s2uc("outbound_request", *args, stream["uid"], stream["listeners"][0])
    port = port_of(field(out.stdout, "Listeners"))
    assert field(out.stdout, "Listeners") == f"{ENTRY}:{port}"
    with pytest.raises(ConnectionRefusedError):  # on that address only
        socket.create_connection(("127.0.0.1", port), timeout=30).close()
    data = os.urandom(1 << 20)
    assert send_from(ENTRY, (ENTRY, port), data) == (len(data), hashlib.sha256(data).hexdigest())
    # Without --remote_ip: the first entry address.
    other = inbound(hpc, sink)
    reply = inst.call("outbound", uid=other["uid"], remote_listeners=other["listeners"], rate=0)
    assert reply["listeners"][0].startswith(f"{ENTRY}:")


def test_an_entry_ip_that_is_not_an_address_of_this_host_stops_s2cs_at_start(networks, workdir):
    for wanted, words in (
        ("192.0.2.10", "--entry-ip 192.0.2.10 is not an address of this host"),
        ("0.0.0.0", "--entry-ip 0.0.0.0 would open plain entries on every interface"),
    ):
        gw = S2csProcess("inst", workdir / wanted, (20000, 20009), ("--entry-ip", wanted))
        gw.launch()
        assert gw.proc is not None
        assert gw.proc.wait(timeout=60) != 0
        assert f"error: {words}" in gw.log.read_text()


# --- from whom they accept --------------------------------------------------------------------------

BOTH = pytest.mark.parametrize(
    ("backend", "rate"),
    [("haproxy", 0), ("haproxy", 10000), ("stunnel", 0)],
    ids=["haproxy-unlimited", "haproxy-limited", "stunnel"],
)


@BOTH
def test_a_plain_entry_refuses_a_source_outside_its_allowed_networks(networks, start_s2cs, backend, rate):
    metrics = free_port()
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("inst", "--entry-ip", ENTRY, "--metrics-port", str(metrics), backend=backend)
    assert inst.call("info")["policy"]["sources"] == ["10.9.7.0/24"]  # the entry address's network
    sink = Sink()
    stream = inbound(hpc, sink, rate)
    reply = inst.call("outbound", uid=stream["uid"], remote_listeners=stream["listeners"], rate=rate)
    entry = (ENTRY, port_of(reply["listeners"][0]))
    assert reply["listeners"][0] == f"{ENTRY}:{entry[1]}"

    # From the other network, though it reaches the entry: reset at accept, and nothing arrives.
    assert inject_from(ELSEWHERE, entry) == "reset"
    wait_for(lambda: outbound_status(inst, stream["uid"]).get("refused_sources") == 1, what="the count")
    # From the instruments' network: every byte, intact; and the service saw that connection only.
    data = os.urandom(1 << 20)
    assert send_from(ENTRY, entry, data) == (len(data), hashlib.sha256(data).hexdigest())
    assert sink.connections == 1 and sink.received == len(data)

    # Counted in the metrics, per stream, and logged by s2cs without the UID.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=30) as got:
        text = got.read().decode()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("scistream_stream_refused_sources_total{")]
    assert f'stream="{stream["uid"][:8]}"' in line and line.endswith(" 1.0")
    shown = s2uc("status", stream["uid"], "--s2cs", inst.address, "--server_cert", str(inst.cert)).stdout
    assert "    refused: 1 connection(s) from sources this gateway does not allow" in shown
    log = inst.log.read_text()
    assert "its plain entry refused 1 connection(s) from sources that are not allowed" in log
    assert stream["uid"] not in log
    shaper = (inst.state_dir / "sessions").glob("*/shaper.log")  # it has the entry: its log names the source
    assert any(f"refused a connection from {ELSEWHERE}" in p.read_text() for p in shaper)


def test_allow_sources_replaces_the_default(networks, start_s2cs, workdir):
    policy = workdir / "policy.toml"
    policy.write_text(f'sources = ["{ELSEWHERE}/32"]\n')
    hpc = start_s2cs("hpc")
    inst = start_s2cs("inst", "--entry-ip", ENTRY, "--policy", str(policy))
    assert inst.call("info")["policy"]["sources"] == [f"{ELSEWHERE}/32"]
    sink = Sink()
    stream = inbound(hpc, sink)
    reply = inst.call("outbound", uid=stream["uid"], remote_listeners=stream["listeners"], rate=0)
    entry = (ENTRY, port_of(reply["listeners"][0]))
    assert inject_from(ENTRY, entry) == "reset"  # the entry's own network is no longer allowed
    data = os.urandom(1 << 16)
    assert send_from(ELSEWHERE, entry, data) == (len(data), hashlib.sha256(data).hexdigest())
    assert sink.connections == 1


def test_s2cs_check_names_an_entry_ip_that_is_not_an_address_of_this_host(networks, workdir):
    argv = [str(BIN / "s2cs"), "--check", "--state-dir", str(workdir / "s"), "--entry-ip", "192.0.2.10"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "--entry-ip 192.0.2.10 is not an address of this host" in result.stdout


def test_info_tells_users_where_instruments_send_and_from_which_networks(start_s2cs):
    inst = start_s2cs("inst", "--entry-ip", "127.0.0.1", "--allow-sources", "127.0.0.0/8")
    out = s2uc("info", "--s2cs", inst.address, "--server_cert", str(inst.cert)).stdout
    lines = out.splitlines()
    assert "  entries    127.0.0.1 (where outbound proxies listen: outbound_request --remote_ip)" in lines
    assert "  sources    127.0.0.0/8 (the hosts that may send to an entry)" in lines
