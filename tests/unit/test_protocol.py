from __future__ import annotations

import pytest

from scistream.errors import BadRequest
from scistream.protocol import (
    Address,
    InboundRequest,
    Limits,
    OutboundRequest,
    decode_request,
    encode,
    format_rate,
    rate_bytes_per_second,
    request,
)

UID = "0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"


def test_inbound_request_round_trips_with_defaults():
    req = decode_request(encode(request("inbound", remote_ip="10.0.1.5", receiver_ports=[5001, 5002])))
    assert req.op == "inbound"
    assert req.body == InboundRequest("10.0.1.5", (5001, 5002), Limits(num_conn=5, rate=10_000))


def test_outbound_request_treats_all_interfaces_as_no_bind_address():
    line = encode(request("outbound", uid=UID, remote_listeners=["[::1]:5100"], remote_ip="0.0.0.0"))
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
    ],
)
def test_rates_are_shown_in_human_units(kbps, shown):
    assert format_rate(kbps) == shown


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
