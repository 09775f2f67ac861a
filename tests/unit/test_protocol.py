from __future__ import annotations

import json

import pytest

from scistream.errors import (
    BackendFailed,
    BadRequest,
    Conflict,
    Forbidden,
    Internal,
    NoPorts,
    NotFound,
    ScistreamError,
    Unauthenticated,
    Unsupported,
)
from scistream.protocol import (
    MAX_MESSAGE,
    Address,
    InboundRequest,
    InfoRequest,
    Limits,
    OutboundRequest,
    ReleaseRequest,
    StatusRequest,
    check_reply,
    decode,
    decode_request,
    encode,
    error,
    format_rate,
    listing,
    ok,
    parse_address,
    parse_request,
    rate_bytes_per_second,
    request,
)

UID = "0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"


def inbound(**fields):
    """A valid inbound request with `fields` changed; a value of None removes the field."""
    message = {"v": 1, "op": "inbound", "token": None, "remote_ip": "10.0.1.5", "receiver_ports": [5001]}
    message.update(fields)
    return parse_request({k: v for k, v in message.items() if v is not None})


def outbound(**fields):
    message = {"v": 1, "op": "outbound", "token": None, "uid": UID, "remote_listeners": ["192.0.2.7:5100"]}
    message.update(fields)
    return parse_request({k: v for k, v in message.items() if v is not None})


def test_inbound_request_round_trips_with_defaults():
    req = decode_request(encode(request("inbound", remote_ip="10.0.1.5", receiver_ports=[5001, 5002])))
    assert req.op == "inbound"
    assert req.body == InboundRequest("10.0.1.5", (5001, 5002), Limits(num_conn=5, rate=10_000))


def test_outbound_request_without_an_address_listens_everywhere():
    line = encode(request("outbound", uid=UID, remote_listeners=["[::1]:5100"]))
    body = decode_request(line).body
    assert body == OutboundRequest(UID, (Address("::1", 5100),), None, (), Limits())


@pytest.mark.parametrize(
    ("kbps", "shown"),
    [
        (10_000, "10 Mbit/s"),
        (8_000, "8 Mbit/s"),
        (1_500, "1.5 Mbit/s"),
        (500, "500 kbit/s"),
        (0, "unlimited"),
        (1, "1 kbit/s"),
        (999, "999 kbit/s"),
        (1_000, "1 Mbit/s"),
        (1_000_000, "1 Gbit/s"),
        (1_234_567, "1.235 Gbit/s"),
        (400_000_000, "400 Gbit/s"),
    ],
)
def test_rates_are_shown_in_human_units(kbps, shown):
    assert format_rate(kbps) == shown


def test_a_rate_that_rounds_up_to_the_next_unit_is_shown_in_that_unit():
    assert format_rate(999_999) == "1 Gbit/s"


def test_rate_in_kilobits_becomes_bytes_per_second():
    assert rate_bytes_per_second(10_000) == 1_250_000


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"v": 2, "op": "info"}, "version 2"),
        ({"v": 1, "op": "shell"}, "unknown op"),
        (
            {"v": 1, "op": "inbound", "remote_ip": "1.2.3.4\n    bind *:22", "receiver_ports": [1]},
            "not an IP",
        ),
        ({"v": 1, "op": "inbound", "remote_ip": "1.2.3.4", "receiver_ports": [70000]}, "not a TCP port"),
        ({"v": 1, "op": "inbound", "remote_ip": "1.2.3.4", "receiver_ports": [True]}, "must be a port"),
        ({"v": 1, "op": "inbound", "remote_ip": "1.2.3.4", "receiver_ports": [1], "rate": -1}, "between 0"),
        ({"v": 1, "op": "release", "uid": "../../etc/passwd"}, "not a stream UID"),
        ({"v": 1, "op": "status", "extra": 1}, "unknown field"),
    ],
)
def test_bad_requests_name_what_is_wrong(fields, complaint):
    with pytest.raises(BadRequest, match=complaint):
        decode_request(encode(fields))


# --- framing -----------------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid info request of exactly `size` bytes, newline included."""
    core = b'{"v":1,"op":"info"}'
    return core + b" " * (size - len(core) - 1) + b"\n"


def test_a_request_of_exactly_64_kib_is_accepted():
    assert decode_request(padded(MAX_MESSAGE)).body == InfoRequest()


def test_a_request_over_64_kib_is_refused_before_parsing():
    with pytest.raises(BadRequest, match="larger than 64 KiB"):
        decode(padded(MAX_MESSAGE + 1))


def test_encode_never_produces_a_line_the_peer_would_refuse():
    overhead = len(encode({"x": ""}))
    at_limit = encode({"x": "a" * (MAX_MESSAGE - overhead)})
    assert len(at_limit) == MAX_MESSAGE
    assert decode(at_limit) == {"x": "a" * (MAX_MESSAGE - overhead)}
    with pytest.raises(BadRequest, match="larger than 64 KiB"):
        encode({"x": "a" * (MAX_MESSAGE - overhead + 1)})


def _streams(count: int) -> list[dict[str, object]]:
    return [
        {"uid": f"{i:08x}", "role": "inbound", "state": "RUNNING", "note": "x" * 400} for i in range(count)
    ]


def test_a_listing_that_fits_a_reply_is_whole():
    assert listing(_streams(3)) == {"ok": True, "streams": _streams(3)}


def test_a_listing_larger_than_a_reply_keeps_the_first_streams_that_fit_and_counts_the_others():
    """`status` of a few hundred streams: the reply was not sent at all (it was over 64 KiB)."""
    for count in (150, 160, 400, 1000):
        reply = listing(_streams(count))
        line = encode(reply)  # within MAX_MESSAGE, or this raises
        kept = reply["streams"]
        assert kept == _streams(count)[: len(kept)]
        assert reply.get("omitted", 0) == count - len(kept)
        if reply.get("omitted"):  # and no further stream would have fit
            more = {**reply, "streams": _streams(len(kept) + 1)}
            assert len(json.dumps(more, separators=(",", ":")).encode()) + 1 > MAX_MESSAGE
        assert len(line) <= MAX_MESSAGE


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        (b'{"v":1,"op":"info","note":"\xff"}\n', "not UTF-8"),
        (b'{"v":1,"op":"info"\n', "not JSON"),
        (b"\n", "not JSON"),
        (b'[{"v":1,"op":"info"}]\n', "must be a JSON object"),
        (b'"info"\n', "must be a JSON object"),
        (b'{"v":1,"op":"info","op":"inbound"}\n', "'op' appears twice"),
        (b'{"v":1,"op":"status","x":{"a":1,"a":2}}\n', "'a' appears twice"),
        (b'{"v":1,"op":"inbound","rate":NaN}\n', "NaN is not a JSON number"),
        (b'{"v":1,"op":"inbound","rate":Infinity}\n', "Infinity is not a JSON number"),
        (b'{"v":1,"op":"inbound","rate":-Infinity}\n', "-Infinity is not a JSON number"),
    ],
)
def test_malformed_messages_are_bad_requests(line, complaint):
    with pytest.raises(BadRequest, match=complaint):
        decode_request(line)


def test_deeply_nested_json_is_a_bad_request_not_a_crash():
    depth = 30_000  # fits in 64 KiB, far beyond Python's recursion limit
    line = b'{"v":1,"op":"status","uid":' + b"[" * depth + b"]" * depth + b"}\n"
    assert len(line) < MAX_MESSAGE
    with pytest.raises(BadRequest, match="nested too deeply"):
        decode_request(line)


def test_a_number_too_large_for_a_float_is_not_taken_as_an_unlimited_rate():
    with pytest.raises(BadRequest, match="rate must be an integer"):
        decode_request(b'{"v":1,"op":"inbound","remote_ip":"10.0.1.5","receiver_ports":[1],"rate":1e400}\n')


# --- the envelope: version, op, token ------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "complaint"),
    [
        (None, "must be an integer"),
        ("1", "must be an integer"),
        (True, "must be an integer"),
        (1.0, "must be an integer"),
        (0, "version 0 is not supported"),
        (2, "version 2 is not supported; this server speaks 1"),
    ],
)
def test_only_protocol_version_1_is_spoken(version, complaint):
    message = {"op": "info"} if version is None else {"v": version, "op": "info"}
    with pytest.raises(BadRequest, match=complaint):
        parse_request(message)


@pytest.mark.parametrize("op", [None, 1, "INFO", "info ", "shell", ["info"]])
def test_unknown_ops_list_the_ones_that_exist(op):
    message = {"v": 1} if op is None else {"v": 1, "op": op}
    with pytest.raises(BadRequest, match="expected one of info, inbound, outbound, release, status"):
        parse_request(message)


@pytest.mark.parametrize(
    "token",
    [None, "Agx3Vb9l0r", "eyJhbGciOi.J9-_~+/=", "x" * 8192],
)
def test_bearer_tokens_are_passed_on_unchanged(token):
    assert parse_request({"v": 1, "op": "info", "token": token}).token == token


@pytest.mark.parametrize(
    "token",
    [
        *("", "two words", "tab\there", "line\nbreak", "t\u00f6ken", "x" * 8193, 12345, True, ["a"]),
        *("{{7*7}}", "{%raw%}", "a#b", 'a"b', "a'b", "../../etc/passwd", "a=b"),
    ],
)
def test_tokens_that_could_not_be_bearer_tokens_are_refused(token):
    with pytest.raises(BadRequest, match="token must be null or a bearer token string"):
        parse_request({"v": 1, "op": "info", "token": token})


# --- each op ------------------------------------------------------------------------------------


def test_info_takes_no_fields():
    assert parse_request({"v": 1, "op": "info"}).body == InfoRequest()
    with pytest.raises(BadRequest, match="unknown field for info: 'uid'"):
        parse_request({"v": 1, "op": "info", "uid": UID})


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("10.0.1.5", "10.0.1.5"),
        ("::1", "::1"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("fe80:0000::0abc", "fe80::abc"),
    ],
)
def test_inbound_remote_ip_is_normalised(given, normalised):
    assert inbound(remote_ip=given).body.remote_ip == normalised


@pytest.mark.parametrize(
    ("remote_ip", "complaint"),
    [
        ("hpc.example.org", "not an IP address"),
        ("localhost", "not an IP address"),
        ("fe80::1%eth0", "not an IP address"),
        ("fe80::1%1", "not an IP address"),
        ("10.0.1.0/24", "not an IP address"),
        ("10.0.1.5 ", "not an IP address"),
        ("010.0.1.5", "not an IP address"),
        ("", "not an IP address"),
        ("1" * 1000, "not an IP address"),
        (167772421, "must be an IP address string, not int"),
        (True, "must be an IP address string, not bool"),
        (["10.0.1.5"], "must be an IP address string, not list"),
    ],
)
def test_inbound_remote_ip_must_be_a_literal_address(remote_ip, complaint):
    with pytest.raises(BadRequest, match=complaint):
        inbound(remote_ip=remote_ip)


def test_inbound_remote_ip_is_required():
    with pytest.raises(BadRequest, match="remote_ip is required"):
        inbound(remote_ip=None)


def test_inbound_accepts_up_to_64_receiver_ports():
    ports = list(range(5001, 5065))
    assert inbound(receiver_ports=ports).body.receiver_ports == tuple(ports)
    with pytest.raises(BadRequest, match="at most 64 ports"):
        inbound(receiver_ports=[*ports, 5065])


@pytest.mark.parametrize(
    ("ports", "complaint"),
    [
        (None, "receiver_ports is required"),
        ([], "at least one port"),
        (5001, "must be a list of ports, not int"),
        ("5001", "must be a list of ports, not str"),
        ([0], "0 is not a TCP port"),
        ([65536], "65536 is not a TCP port"),
        ([-1], "is not a TCP port"),
        ([True], "must be a port number, not bool"),
        ([5001.0], "must be a port number, not float"),
        (["5001"], "must be a port number, not str"),
        ([[5001]], "must be a port number, not list"),
    ],
)
def test_inbound_receiver_ports_must_be_tcp_ports(ports, complaint):
    with pytest.raises(BadRequest, match=complaint):
        inbound(receiver_ports=ports)


@pytest.mark.parametrize(
    ("fields", "limits"),
    [
        ({}, Limits(num_conn=5, rate=10_000)),
        ({"num_conn": 1, "rate": 0}, Limits(num_conn=1, rate=0)),
        ({"num_conn": 10_000, "rate": 400_000_000}, Limits(num_conn=10_000, rate=400_000_000)),
    ],
)
def test_limits_default_and_bounds(fields, limits):
    assert inbound(**fields).body.limits == limits
    assert outbound(**fields).body.limits == limits


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"num_conn": 0}, "num_conn must be between 1 and 10000, not 0"),
        ({"num_conn": 10_001}, "num_conn must be between 1 and 10000, not 10001"),
        ({"num_conn": True}, "num_conn must be an integer, not bool"),
        ({"num_conn": 5.0}, "num_conn must be an integer, not float"),
        ({"num_conn": "5"}, "num_conn must be an integer, not str"),
        ({"rate": -1}, "rate must be between 0 and 400000000, not -1"),
        ({"rate": 400_000_001}, "rate must be between 0 and 400000000"),
        ({"rate": False}, "rate must be an integer, not bool"),
        ({"rate": 1.5}, "rate must be an integer, not float"),
    ],
)
def test_limits_out_of_range_or_of_the_wrong_type_are_refused(fields, complaint):
    with pytest.raises(BadRequest, match=complaint):
        inbound(**fields)
    with pytest.raises(BadRequest, match=complaint):
        outbound(**fields)


def test_inbound_refuses_unknown_fields_by_name():
    with pytest.raises(BadRequest, match="unknown field for inbound: 'remote_port'"):
        inbound(remote_port=5001)


def test_outbound_keeps_a_local_bind_address_and_normalises_v6_listeners():
    body = outbound(remote_ip="127.0.0.1", remote_listeners=["[2001:DB8::1]:5100", "192.0.2.7:5101"]).body
    assert body.bind_ip == "127.0.0.1"
    assert body.remote_listeners == (Address("2001:db8::1", 5100), Address("192.0.2.7", 5101))
    assert [str(a) for a in body.remote_listeners] == ["[2001:db8::1]:5100", "192.0.2.7:5101"]


@pytest.mark.parametrize(("everywhere", "kept"), [("0.0.0.0", "0.0.0.0"), ("::", "::"), ("0:0::0", "::")])
def test_outbound_all_interfaces_is_kept_with_its_address_family(everywhere, kept):
    assert outbound(remote_ip=everywhere).body.bind_ip == kept  # "::" listens on IPv6 too


@pytest.mark.parametrize(
    ("uid", "complaint"),
    [
        (None, "uid is not a stream UID"),
        (UID.upper(), "not a stream UID"),
        ("0b7c1f2e-3d4a-1b5c-8d9e-0f1a2b3c4d5e", "not a stream UID"),  # a version-1 UUID
        (UID + "0", "not a stream UID"),
        (UID.replace("-", ""), "not a stream UID"),
        (42, "not a stream UID"),
    ],
)
def test_outbound_uid_must_be_a_lowercase_uuid4(uid, complaint):
    with pytest.raises(BadRequest, match=complaint):
        outbound(uid=uid)


@pytest.mark.parametrize(
    ("listeners", "complaint"),
    [
        (None, "remote_listeners must be a non-empty list"),
        ([], "remote_listeners must be a non-empty list"),
        ("192.0.2.7:5100", "remote_listeners must be a non-empty list"),
        (["hpc.example.org:5100"], "not an IP address"),
        (["192.0.2.7"], "must look like IP:PORT"),
        (["192.0.2.7:"], "must look like IP:PORT"),
        (["192.0.2.7:0"], "0 is not a TCP port"),
        (["192.0.2.7:65536"], "65536 is not a TCP port"),
        (["[fe80::1%eth0]:5100"], "not an IP address"),
        ([5100], "must be an address string 'IP:PORT', not int"),
        ([f"192.0.2.7:{p}" for p in range(5000, 5065)], "at most 64 per stream"),
    ],
)
def test_outbound_remote_listeners_must_be_ip_port_addresses(listeners, complaint):
    with pytest.raises(BadRequest, match=complaint):
        outbound(remote_listeners=listeners)


def test_outbound_remote_ip_must_be_an_address_of_this_host_not_a_name():
    with pytest.raises(BadRequest, match="remote_ip is not an IP address"):
        outbound(remote_ip="instrument.example.org")


def test_outbound_receiver_ports_pair_with_remote_listeners():
    body = outbound(remote_listeners=["192.0.2.7:5100", "192.0.2.7:5101"], receiver_ports=[6000, 6001]).body
    assert body.receiver_ports == (6000, 6001)
    assert outbound(receiver_ports=[]).body.receiver_ports == ()
    with pytest.raises(BadRequest, match="listener i forwards to remote listener i"):
        outbound(receiver_ports=[6000, 6001])
    with pytest.raises(BadRequest, match="names a port twice"):
        outbound(remote_listeners=["192.0.2.7:5100", "192.0.2.7:5101"], receiver_ports=[6000, 6000])


def test_outbound_refuses_unknown_fields_by_name():
    with pytest.raises(BadRequest, match="unknown field for outbound: 'listeners'"):
        outbound(listeners=["192.0.2.7:5100"])


def test_release_needs_a_uid_and_nothing_else():
    assert parse_request({"v": 1, "op": "release", "uid": UID}).body == ReleaseRequest(UID)
    with pytest.raises(BadRequest, match="not a stream UID"):
        parse_request({"v": 1, "op": "release"})
    with pytest.raises(BadRequest, match="unknown field for release: 'force'"):
        parse_request({"v": 1, "op": "release", "uid": UID, "force": True})


def test_status_uid_is_optional_but_checked():
    assert parse_request({"v": 1, "op": "status"}).body == StatusRequest(None)
    assert parse_request({"v": 1, "op": "status", "uid": None}).body == StatusRequest(None)
    assert parse_request({"v": 1, "op": "status", "uid": UID}).body == StatusRequest(UID)
    with pytest.raises(BadRequest, match="not a stream UID"):
        parse_request({"v": 1, "op": "status", "uid": "0b7c1f2e"})


def test_status_log_is_a_boolean_and_only_for_one_stream():
    assert parse_request({"v": 1, "op": "status", "uid": UID, "log": True}).body == StatusRequest(UID, True)
    assert parse_request({"v": 1, "op": "status", "log": False}).body == StatusRequest(None)
    with pytest.raises(BadRequest, match="log must be true or false, not int"):
        parse_request({"v": 1, "op": "status", "uid": UID, "log": 1})
    with pytest.raises(BadRequest, match="log needs a uid"):
        parse_request({"v": 1, "op": "status", "log": True})


# --- addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address", "shown"),
    [
        ("192.0.2.7:5100", Address("192.0.2.7", 5100), "192.0.2.7:5100"),
        ("[::1]:5100", Address("::1", 5100), "[::1]:5100"),
        ("[2001:db8:0::7]:65535", Address("2001:db8::7", 65535), "[2001:db8::7]:65535"),
        ("192.0.2.7:1", Address("192.0.2.7", 1), "192.0.2.7:1"),
    ],
)
def test_parse_address_reads_v4_and_bracketed_v6(text, address, shown):
    assert parse_address(text, "remote_listeners") == address
    assert str(address) == shown


@pytest.mark.parametrize(
    "text",
    ["[::1]", "[::1]:", ":5100", "192.0.2.7:123456", "192.0.2.7:-1", "192.0.2.7:+51", "[::1:5100", ""],
)
def test_parse_address_refuses_what_is_not_ip_port(text):
    with pytest.raises(BadRequest, match="remote_listeners"):
        parse_address(text, "remote_listeners")


def test_parse_address_refuses_a_port_of_unicode_digits_as_a_bad_request():
    with pytest.raises(BadRequest, match="remote_listeners"):
        parse_address("192.0.2.7:5²", "remote_listeners")


# --- replies ------------------------------------------------------------------------------------


def test_an_ok_reply_gives_its_fields():
    assert check_reply(ok(uid=UID, listeners=["192.0.2.7:5100"])) == {
        "ok": True,
        "uid": UID,
        "listeners": ["192.0.2.7:5100"],
    }


@pytest.mark.parametrize(
    "cls", [BadRequest, Unauthenticated, Forbidden, NotFound, Conflict, NoPorts, Unsupported, BackendFailed]
)
def test_an_error_reply_raises_the_error_the_server_raised(cls):
    reply = json.loads(encode(error(cls("port 5100 is already used by another stream"))))
    with pytest.raises(cls) as caught:
        check_reply(reply)
    assert caught.value.code == cls.code
    assert caught.value.message == "port 5100 is already used by another stream"


def test_an_error_code_from_a_newer_server_is_kept():
    with pytest.raises(ScistreamError) as caught:
        check_reply({"ok": False, "error": {"code": "QUOTA_EXCEEDED", "message": "too many streams"}})
    assert type(caught.value) is ScistreamError
    assert caught.value.code == "QUOTA_EXCEEDED"
    assert caught.value.message == "too many streams"


def test_an_error_reply_without_code_or_message_is_still_an_error():
    with pytest.raises(Internal, match="no message"):
        check_reply({"ok": False, "error": {}})


@pytest.mark.parametrize(
    "reply",
    [{}, {"ok": "true"}, {"ok": 1}, {"ok": False}, {"ok": False, "error": "boom"}, {"ok": None}],
)
def test_a_reply_that_is_not_understood_is_an_internal_error(reply):
    with pytest.raises(Internal, match="does not understand"):
        check_reply(reply)
