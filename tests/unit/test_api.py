"""The Python API (scistream/api.py) and the typed replies it returns, against stand-in gateways.

What runs here is pure logic: how replies are read, how a stream's limits come from its two sides,
what `connect` does when a side fails, how `s2uc release` reports several gateways. The stand-in
replaces the one function that talks to a gateway (`scistream.client.transport.call`); real gateways
are in tests/integration/test_connect.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import scistream
from scistream import api
from scistream.client import replies, reports
from scistream.client.transport import NoReply
from scistream.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    Forbidden,
    Internal,
    NotFound,
    ScistreamError,
    Unreachable,
    from_wire,
)

HPC, INST = "hpc.facility.org:5000", "instrument.facility.org:5000"
UID = "5d2f8a61-3b7e-4c09-9a1d-6e4b2c8f0a37"


def _limits(rate_enforced: bool = True, num_conn: int = 5, rate: int = 10000) -> dict[str, Any]:
    rate_cap: dict[str, Any] = {"enforced": True, "by": "the session's shaper"}
    if not rate_enforced:
        rate_cap = {"enforced": False, "reason": "this system has no splice(2)"}
    human = replies.Limit(rate, True).human
    return {
        "num_conn": {"value": num_conn, "enforced": True, "by": "HAProxy maxconn"},
        "rate": {"value": rate, "unit": "kb/s", "human": human, **rate_cap},
    }


class Gateways:
    """Stands in for `client.call`: gateways that keep their sessions, and fail where told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.sessions: dict[str, dict[str, str]] = {HPC: {}, INST: {}}
        self.failures: dict[tuple[str, str], BaseException] = {}
        self.limits: dict[str, dict[str, Any]] = {HPC: _limits(), INST: _limits()}

    def fail(self, server: str, op: str, error: BaseException) -> None:
        self.failures[(server, op)] = error

    def ops(self) -> list[tuple[str, str]]:
        return [(server, op) for server, op, _ in self.calls]

    def __call__(self, server: Any, context: Any, op: str, token: str | None = None, **fields: Any):
        where = str(server)
        self.calls.append((where, op, fields))
        if (where, op) in self.failures:
            raise self.failures[(where, op)]
        here = self.sessions[where]
        if op == "inbound":
            here[UID] = "inbound"
            listeners = [f"203.0.113.7:{5100 + i}" for i in range(len(fields["receiver_ports"]))]
            return {
                "ok": True,
                "uid": UID,
                "role": "inbound",
                "listeners": listeners,
                "limits": self.limits[where],
            }
        if op == "outbound":
            here[fields["uid"]] = "outbound"
            ports = fields.get("receiver_ports") or [5100 + i for i in range(len(fields["remote_listeners"]))]
            listeners = [f"198.51.100.20:{p}" for p in ports]
            reply = {"ok": True, "uid": fields["uid"], "role": "outbound", "listeners": listeners}
            return {**reply, "bind": "0.0.0.0", "limits": self.limits[where]}
        if op == "release":
            if fields["uid"] not in here:
                raise from_wire(
                    "NOT_FOUND", f"no stream {fields['uid'][:8]} on this server (already released?)"
                )
            return {"ok": True, "uid": fields["uid"], "released": [here.pop(fields["uid"])]}
        raise AssertionError(f"unexpected op {op}")


@pytest.fixture
def cert(tmp_path: Path) -> Path:
    import datetime

    from tests.certificates import pair_pem

    now = datetime.datetime.now(datetime.UTC)
    pem, _ = pair_pem(now - datetime.timedelta(days=1), now + datetime.timedelta(days=1))
    path = tmp_path / "gateways.pem"
    path.write_bytes(pem)
    return path


@pytest.fixture
def gateways(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Gateways:
    import scistream.client.transport as transport

    monkeypatch.setenv("SCISTREAM_HOME", str(tmp_path / "home"))  # no login: no token anywhere
    fake = Gateways()
    monkeypatch.setattr(transport, "call", fake)
    return fake


def _connect(cert: Path, **given: Any) -> api.Stream:
    fields: dict[str, Any] = {
        "inbound": HPC,
        "outbound": INST,
        "remote_ip": "10.0.1.5",
        "receiver_ports": [5001],
        "server_cert": cert,
    }
    return scistream.connect(**{**fields, **given})


# --- import scistream stays light --------------------------------------------------------------


def test_import_scistream_loads_no_server_data_plane_cryptography_or_cli():
    check = (
        "import sys, scistream\n"
        "heavy = ('scistream.s2cs', 'scistream.s2ds', 'scistream.credentials', 'cryptography', 'typer',\n"
        "         'click', 'globus_sdk', 'jinja2', 'docker', 'psutil')\n"
        "print(sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy)))\n"
        "print(callable(scistream.connect), scistream.Client.__name__, scistream.Stream.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "True Client Stream"]


def test_the_package_says_it_is_typed():
    assert (Path(scistream.__file__).parent / "py.typed").is_file()


# --- replies become typed results --------------------------------------------------------------


def test_an_inbound_reply_becomes_its_result_and_keeps_the_reply():
    reply = {
        "ok": True,
        "uid": UID,
        "role": "inbound",
        "listeners": ["203.0.113.7:5101"],
        "limits": _limits(),
    }
    made = replies.inbound(HPC, reply)
    assert made.uid == UID and made.listeners == ("203.0.113.7:5101",) and made.server == HPC
    assert made.limits.rate == replies.Limit(10000, True, by="the session's shaper")
    assert made.limits.rate.human == "10 Mbit/s"
    assert made.limits.summary() == "at most 5 connections, 10 Mbit/s each direction"
    assert dict(made.reply) == reply
    assert made.limits.as_dict() == _limits()  # the wire form again, for --json


def test_a_status_entry_has_what_the_gateway_sent_and_none_for_what_it_left_out():
    entry = {
        "uid": "4229423c",
        "role": "outbound",
        "state": "RUNNING",
        "listeners": ["198.51.100.20:5100"],
        "created": 1795483733.4528413,
        "restarts": 0,
        "limits": _limits(),
        "failures": [{"kind": "handshake", "message": "the peer ...", "count": 2, "last": 1795483801}],
        "processes": [{"name": "proxy", "pid": None, "state": "BACKOFF", "restarts": 1, "log": ["a"]}],
    }
    (session,) = reports.status(INST, {"ok": True, "streams": [entry]}).streams
    assert (session.uid, session.state, session.connections, session.bytes_in) == (
        "4229423c",
        "RUNNING",
        None,
        None,
    )
    assert session.failures == (reports.Failure("handshake", "the peer ...", 2, 1795483801.0),)
    assert session.processes == (reports.Process("proxy", None, "BACKOFF", 1, ("a",)),)
    assert session.targets is None and session.last_error is None


@pytest.mark.parametrize(
    ("reply", "says"),
    [
        ({"ok": True, "role": "inbound", "listeners": [], "limits": _limits()}, "no uid"),
        (
            {"ok": True, "uid": UID, "listeners": "203.0.113.7:5101", "limits": _limits()},
            "listeners is not a list",
        ),
        (
            {"ok": True, "uid": UID, "listeners": [5101], "limits": _limits()},
            "listeners is not a list of strings",
        ),
        ({"ok": True, "uid": UID, "listeners": [], "limits": {"num_conn": {}}}, "no limits.num_conn.value"),
        (
            {"ok": True, "uid": UID, "listeners": [], "limits": {**_limits(), "rate": {"value": True}}},
            "limits.rate.value is not an integer",
        ),
    ],
)
def test_a_reply_the_client_cannot_read_is_one_internal_error_naming_the_gateway(reply, says):
    with pytest.raises(Internal) as caught:
        replies.inbound(HPC, reply)
    assert caught.value.message == f"{HPC} sent a reply this client does not understand: {says}"


def test_info_reads_the_policy_and_an_older_gateway_without_one():
    reply = {
        "ok": True,
        "version": "0.1.0",
        "protocol": 1,
        "backend": {
            "type": "haproxy",
            "version": "HAProxy 2.8.25",
            "capabilities": {
                "num_conn": {"enforced": True, "by": "maxconn"},
                "rate": {"enforced": False, "reason": "r"},
            },
        },
        "auth": {"enabled": False, "scope": None},
        "listener_ip": "203.0.113.7",
        "port_range": "5100-5200",
        "free_ports": 101,
        "streams": 0,
        "policy": {
            "targets": ["10.0.1.0/24"],
            "targets_default": True,
            "peers": None,
            "never": ["control port 5000"],
            "identities": "any",
            "quota": {"max_streams": 2, "max_num_conn": 8},
        },
    }
    found = reports.info(HPC, reply)
    assert found.backend.capabilities.rate == replies.Capability(False, reason="r")
    assert found.policy is not None and found.policy.peers is None
    assert found.policy.quota.items() == [("max_streams", 2), ("max_num_conn", 8)]
    assert reports.info(HPC, {**reply, "policy": None}).policy is None
    assert found.entry_ips == () and found.policy.sources == ()  # an s2cs before plain entries


def test_info_reads_where_outbound_proxies_listen_and_for_whom():
    reply = {
        "ok": True,
        "version": "0.1.0",
        "protocol": 1,
        "backend": {
            "type": "haproxy",
            "version": "HAProxy 2.8.25",
            "capabilities": {"num_conn": {"enforced": True}, "rate": {"enforced": True}},
        },
        "auth": {"enabled": False, "scope": None},
        "listener_ip": "198.51.100.20",
        "entry_ips": ["192.168.2.10", "127.0.0.1"],
        "port_range": "5100-5200",
        "free_ports": 101,
        "streams": 0,
        "policy": {"targets": [], "never": [], "sources": ["192.168.2.0/24", "127.0.0.0/8"]},
    }
    found = reports.info(INST, reply)
    assert found.entry_ips == ("192.168.2.10", "127.0.0.1")
    assert found.policy is not None and found.policy.sources == ("192.168.2.0/24", "127.0.0.0/8")


# --- the limits of a whole stream ---------------------------------------------------------------


def _limit_pair(value: int, enforced: bool, text: str) -> replies.Limit:
    return replies.Limit(value, True, by=text) if enforced else replies.Limit(value, False, reason=text)


def test_a_stream_is_limited_where_either_side_limits_it():
    shaped = _limit_pair(10000, True, "the session's shaper")
    unshaped = _limit_pair(10000, False, "no splice(2)")
    conns = replies.Limit(5, True, by="maxconn")
    both = replies.stream_limits(replies.Limits(conns, shaped), replies.Limits(conns, shaped))
    assert both.rate == replies.Limit(10000, True, by="both sides: the session's shaper")
    one = replies.stream_limits(replies.Limits(conns, unshaped), replies.Limits(conns, shaped))
    assert one.rate == replies.Limit(10000, True, by="outbound: the session's shaper")
    assert one.unenforced() == []
    neither = replies.stream_limits(replies.Limits(conns, unshaped), replies.Limits(conns, unshaped))
    assert neither.unenforced() == [("rate", replies.Limit(10000, False, reason="both sides: no splice(2)"))]


def test_a_stream_gets_the_smaller_limit_of_each_and_a_rate_of_0_is_the_largest():
    unlimited = replies.Limits(replies.Limit(8, True), replies.Limit(0, True))
    limited = replies.Limits(replies.Limit(4, True), replies.Limit(50000, False, reason="no splice(2)"))
    joined = replies.stream_limits(unlimited, limited)
    assert (joined.num_conn.value, joined.rate.value) == (4, 50000)
    # the side with that rate cannot enforce it: the stream's rate is not enforced
    assert joined.rate == replies.Limit(50000, False, reason="outbound: no splice(2)")


# --- connect: both sides, or nothing -----------------------------------------------------------


def test_connect_makes_the_inbound_side_then_the_outbound_with_its_uid_and_listeners(gateways, cert):
    stream = _connect(cert, receiver_ports=[5001, 5002], local_ports=[5150, 5151], local_ip="198.51.100.20")
    assert gateways.ops() == [(HPC, "inbound"), (INST, "outbound")]
    outbound = gateways.calls[1][2]
    assert outbound["uid"] == UID and outbound["remote_listeners"] == ["203.0.113.7:5100", "203.0.113.7:5101"]
    assert outbound["receiver_ports"] == [5150, 5151] and outbound["remote_ip"] == "198.51.100.20"
    assert stream.uid == UID
    assert stream.listeners == ("198.51.100.20:5150", "198.51.100.20:5151")
    assert stream.addresses == (("198.51.100.20", 5150), ("198.51.100.20", 5151))
    assert stream.inbound.listeners == ("203.0.113.7:5100", "203.0.113.7:5101")
    assert stream.limits.rate.value == 10000 and stream.limits.rate.enforced
    assert not stream.released


def test_leaving_the_with_block_releases_both_sides_the_instruments_first(gateways, cert):
    with _connect(cert) as stream:
        pass
    assert gateways.ops()[2:] == [(INST, "release"), (HPC, "release")]
    assert stream.released and gateways.sessions == {HPC: {}, INST: {}}
    stream.release()  # once released, nothing more is asked
    assert len(gateways.calls) == 4


def test_an_exception_in_the_with_block_still_releases_both_sides_and_is_raised(gateways, cert):
    with pytest.raises(ZeroDivisionError), _connect(cert):
        print(1 / 0)
    assert gateways.sessions == {HPC: {}, INST: {}}


def test_when_releasing_fails_after_an_exception_the_exception_says_so_in_a_note(gateways, cert):
    with pytest.raises(ZeroDivisionError) as caught, _connect(cert):
        gateways.fail(HPC, "release", Unreachable(f"cannot reach s2cs at {HPC}: Connection refused"))
        print(1 / 0)
    (note,) = caught.value.__notes__
    assert f"releasing stream 5d2f8a61 on {HPC} failed: cannot reach s2cs at {HPC}" in note
    assert f"release the rest by hand: s2uc release {UID} --s2cs {HPC} --server_cert {cert}" in note
    assert gateways.sessions[INST] == {}  # the other side is released all the same


def test_a_side_that_fails_to_release_is_raised_and_released_on_a_second_try(gateways, cert):
    stream = _connect(cert)
    gateways.fail(INST, "release", Unreachable(f"cannot reach s2cs at {INST}: No route to host"))
    with pytest.raises(Unreachable) as caught:
        stream.release()
    assert caught.value.code == "UNREACHABLE"
    assert f"released on {HPC}" in caught.value.message
    assert gateways.sessions[HPC] == {} and not stream.released
    del gateways.failures[(INST, "release")]
    outcomes = stream.release()  # the HPC side is gone now: that counts as released
    assert [(o.server, o.roles, o.gone) for o in outcomes] == [(INST, ("outbound",), False), (HPC, (), True)]
    assert stream.released


def test_a_failing_outbound_side_releases_the_inbound_side_and_says_both(gateways, cert):
    refused = from_wire("CONFLICT", "port 5150 is already used by another stream")
    gateways.fail(INST, "outbound", refused)
    with pytest.raises(Conflict) as caught:
        _connect(cert, local_ports=[5150])
    assert caught.value.code == "CONFLICT" and caught.value.__cause__ is refused
    assert caught.value.message == (
        f"the outbound side failed: port 5150 is already used by another stream (CONFLICT from {INST}); "
        f"the inbound side on {HPC} was released: nothing is left"
    )
    # an error reply made nothing at the instrument's gateway: only the inbound side is released
    assert gateways.ops() == [(HPC, "inbound"), (INST, "outbound"), (HPC, "release")]
    assert gateways.sessions == {HPC: {}, INST: {}}


def test_when_the_inbound_side_cannot_be_released_either_the_error_gives_the_uid(gateways, cert):
    gateways.fail(INST, "outbound", from_wire("NO_PORTS", "no free port in 5100-5200"))
    gateways.fail(HPC, "release", Unreachable(f"cannot reach s2cs at {HPC}: Connection refused"))
    with pytest.raises(ScistreamError) as caught:
        _connect(cert)
    assert caught.value.code == "NO_PORTS"
    assert caught.value.message.endswith(
        f"releasing it on {HPC} failed too: cannot reach s2cs at {HPC}: Connection refused; "
        f"release it by hand: s2uc release {UID} --s2cs {HPC} --server_cert {cert}"
    )


def test_after_no_reply_from_the_outbound_side_both_sides_are_released(gateways, cert):
    gateways.fail(INST, "outbound", NoReply(f"{INST} did not answer within 120s"))
    with pytest.raises(NoReply):
        _connect(cert)
    # the outbound proxy may have been made: it is released too (NOT_FOUND there is fine)
    assert gateways.ops()[2:] == [(INST, "release"), (HPC, "release")]
    assert gateways.sessions[HPC] == {}


def test_an_interrupt_during_the_outbound_request_releases_what_was_made(gateways, cert):
    gateways.fail(INST, "outbound", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt) as caught:
        _connect(cert)
    assert gateways.sessions == {HPC: {}, INST: {}}
    assert caught.value.__notes__ == [f"the inbound side on {HPC} was released: nothing is left"]


def test_a_refused_inbound_side_makes_nothing_and_keeps_its_code(gateways, cert):
    gateways.fail(
        HPC, "inbound", from_wire("FORBIDDEN", "target 10.0.2.5:5001 is not allowed on this gateway")
    )
    with pytest.raises(Forbidden) as caught:
        _connect(cert, remote_ip="10.0.2.5")
    assert caught.value.code == "FORBIDDEN" and caught.value.exit_status == 4
    assert caught.value.message == (
        f"the inbound side failed: target 10.0.2.5:5001 is not allowed on this gateway "
        f"(FORBIDDEN from {HPC}); nothing was made"
    )
    assert gateways.ops() == [(HPC, "inbound")]


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({"local_ports": [5150, 5151]}, "local_ports names 2 port(s) for 1 receiver port(s)"),
        ({"receiver_ports": [5001, 5002], "local_ports": [5150, 5150]}, "local_ports names a port twice"),
        ({"local_ports": [0]}, "local_ports: 0 is not a TCP port (1-65535)"),
        ({"local_ip": "instrument-gw"}, "local_ip is not an IP address: 'instrument-gw'"),
        ({"remote_ip": "hpc-node-17"}, "remote_ip is not an IP address: 'hpc-node-17'"),
        ({"rate": -1}, "rate must be between 0 and 400000000, not -1"),
        ({"receiver_ports": 5001}, "receiver_ports is a list of ports, like [5001], not 5001"),
    ],
)
def test_what_either_side_would_refuse_is_refused_before_anything_is_asked(gateways, cert, given, says):
    with pytest.raises(BadRequest) as caught:
        _connect(cert, **given)
    assert says in caught.value.message
    assert gateways.calls == []


def test_a_client_with_a_bad_address_or_no_certificate_fails_before_any_request(gateways, tmp_path):
    with pytest.raises(ConfigError, match="the S2CS address must look like HOST:PORT"):
        scistream.Client("hpc:port", tmp_path / "x.crt")
    with pytest.raises(ConfigError, match="no server certificate at"):
        scistream.Client(HPC, tmp_path / "x.crt")
    assert gateways.calls == []


def test_release_everywhere_reports_each_gateway_and_names_a_gateway_once(gateways, cert):
    gateways.sessions[HPC][UID] = "inbound"
    outcomes = scistream.release(UID.upper(), s2cs=[INST, HPC, "HPC.facility.org:5000"], server_cert=cert)
    assert [(o.server, o.roles, o.gone, o.failed) for o in outcomes] == [
        (INST, (), True, False),
        (HPC, ("inbound",), False, False),
    ]
    assert isinstance(outcomes[0].error, NotFound)


# --- s2uc release with several gateways, s2uc connect: what the user sees -----------------------


@pytest.fixture
def s2uc():
    """Run s2uc's typer app with typer's test runner; its result: exit_code, stdout, stderr."""
    from typer.testing import CliRunner

    from scistream.s2uc.cli import app

    def run(*args: str):
        return CliRunner().invoke(app, list(args), prog_name="s2uc")

    return run


def test_s2uc_release_of_two_sides_with_one_gone_exits_0_with_a_note(gateways, cert, s2uc):
    gateways.sessions[HPC][UID] = "inbound"
    result = s2uc("release", UID, "--s2cs", INST, "--s2cs", HPC, "--server_cert", str(cert))
    assert result.exit_code == 0
    assert result.stdout == f"Released inbound proxy of stream {UID} on {HPC}.\n"
    assert result.stderr == (
        f"note: no stream 5d2f8a61 on this server (already released?) (NOT_FOUND from {INST})\n"
    )


def test_s2uc_release_on_no_gateway_that_has_the_stream_exits_5(gateways, cert, s2uc):
    result = s2uc("release", UID, "--s2cs", INST, "--s2cs", HPC, "--server_cert", str(cert))
    assert result.exit_code == 5 and result.stdout == ""
    assert [line.split(" (NOT_FOUND from ")[1] for line in result.stderr.splitlines()] == [
        f"{INST})",
        f"{HPC})",
    ]


def test_s2uc_release_still_releases_the_other_side_and_exits_with_the_failures_status(gateways, cert, s2uc):
    gateways.sessions[HPC][UID] = "inbound"
    gateways.fail(INST, "release", Unreachable(f"cannot reach s2cs at {INST}: Connection refused"))
    result = s2uc("release", UID, "--s2cs", INST, "--s2cs", HPC, "--server_cert", str(cert), "--json")
    assert result.exit_code == 3
    assert result.stderr == f"error: cannot reach s2cs at {INST}: Connection refused\n"
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["uid"] == UID
    assert report["gateways"] == [
        {
            "s2cs": INST,
            "ok": False,
            "error": {"code": "UNREACHABLE", "message": f"cannot reach s2cs at {INST}: Connection refused"},
        },
        {"s2cs": HPC, "ok": True, "released": ["inbound"]},
    ]
    assert gateways.sessions[HPC] == {}


def test_s2uc_release_of_one_side_is_as_it_always_was(gateways, cert, s2uc):
    result = s2uc("release", UID, "--s2cs", HPC, "--server_cert", str(cert))
    assert result.exit_code == 5 and result.stdout == ""
    assert (
        result.stderr
        == f"error: no stream 5d2f8a61 on this server (already released?) (NOT_FOUND from {HPC})\n"
    )
    gateways.sessions[HPC][UID] = "inbound"
    result = s2uc("release", UID, "--s2cs", HPC, "--server_cert", str(cert), "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"ok": True, "uid": UID, "released": ["inbound"]}


def test_s2uc_connect_prints_the_uid_where_to_send_and_how_to_release(gateways, cert, s2uc):
    args = ["connect", "--inbound-s2cs", HPC, "--outbound_s2cs", INST, "--remote_ip", "10.0.1.5"]
    result = s2uc(*args, "--receiver_ports", "5001", "--local-port", "5150", "--server_cert", str(cert))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"UID: {UID}",
        "Listeners: 198.51.100.20:5150",
        f"Inbound proxy on {HPC}: 203.0.113.7:5100 -> 10.0.1.5:5001; at most 5 connections, "
        "10 Mbit/s each direction.",
        f"Outbound proxy on {INST}: 198.51.100.20:5150 -> 203.0.113.7:5100 (TLS); at most 5 connections, "
        "10 Mbit/s each direction.",
        "Send the instrument's data to port 5150 of the instrument gateway.",
        f"When done, release both sides: s2uc release {UID} --s2cs {INST} --s2cs {HPC} --server_cert {cert}",
    ]
    assert result.stderr == ""


def test_s2uc_connect_warns_only_of_a_limit_neither_side_enforces(gateways, cert, s2uc):
    gateways.limits[INST] = _limits(rate_enforced=False)
    args = ["connect", "--inbound-s2cs", HPC, "--outbound-s2cs", INST, "--remote_ip", "10.0.1.5"]
    assert s2uc(*args, "--receiver_ports", "5001", "--server_cert", str(cert)).stderr == ""
    gateways.sessions = {HPC: {}, INST: {}}
    gateways.limits[HPC] = _limits(rate_enforced=False)
    result = s2uc(*args, "--receiver_ports", "5001", "--server_cert", str(cert))
    assert result.stderr == (
        "warning: rate is NOT enforced by either server: both sides: this system has no splice(2)\n"
    )


def test_s2uc_connect_json_has_the_stream_and_both_replies(gateways, cert, s2uc):
    args = ["connect", "--inbound-s2cs", HPC, "--outbound-s2cs", INST, "--remote_ip", "10.0.1.5"]
    result = s2uc(*args, "--receiver_ports", "5001", "--server_cert", str(cert), "--json")
    found = json.loads(result.stdout)
    assert found["uid"] == UID and found["listeners"] == ["198.51.100.20:5100"]
    assert found["inbound_listeners"] == ["203.0.113.7:5100"]
    assert found["limits"]["rate"]["value"] == 10000 and found["limits"]["rate"]["enforced"] is True
    assert found["inbound"]["s2cs"] == HPC and found["outbound"]["bind"] == "0.0.0.0"


def test_s2uc_connect_with_a_failing_outbound_side_exits_with_its_status(gateways, cert, tmp_path, s2uc):
    gateways.fail(
        INST, "outbound", from_wire("BAD_REQUEST", "port 80 is outside this server's port range 5100-5200")
    )
    args = ["connect", "--inbound-s2cs", HPC, "--outbound-s2cs", INST, "--remote_ip", "10.0.1.5"]
    uid_file = tmp_path / "stream.uid"
    result = s2uc(
        *args,
        "--receiver_ports",
        "5001",
        "--local_port",
        "80",
        "--server_cert",
        str(cert),
        "--uid-file",
        str(uid_file),
    )
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        f"error: the outbound side failed: port 80 is outside this server's port range 5100-5200 "
        f"(BAD_REQUEST from {INST}); the inbound side on {HPC} was released: nothing is left\n"
    )
    assert not uid_file.exists() and list(tmp_path.glob(".stream.uid.*")) == []
    assert gateways.sessions[HPC] == {}


def test_the_python_apis_errors_name_its_parameters_not_the_options_of_s2uc(gateways, tmp_path, cert):
    with pytest.raises(ConfigError) as caught:
        scistream.Client("hpc:port", cert)
    assert caught.value.message == "the S2CS address must look like HOST:PORT or [IPV6]:PORT, not 'hpc:port'"
    with pytest.raises(ConfigError) as caught:
        scistream.connect(
            inbound=HPC, outbound="inst:x", remote_ip="10.0.1.5", receiver_ports=[5001], server_cert=cert
        )
    assert caught.value.message.startswith("the S2CS address must look like HOST:PORT")
    with pytest.raises(ConfigError) as caught:
        scistream.Client(HPC, tmp_path / "x.crt")
    assert "pass server_cert the certificate of the S2CS" in caught.value.message
    with pytest.raises(ConfigError) as caught:
        scistream.Client(HPC, cert, scope="YOUR_SCOPE_ID")
    assert "scope takes the scope ID" in caught.value.message
    for message in (caught.value.message,):
        assert "--" not in message
    assert gateways.calls == []
