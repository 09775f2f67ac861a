"""Properties of the protocol parser over inputs nobody thought of (hypothesis).

Whatever arrives, the parser either returns a validated request or raises BadRequest: never
another exception (which the server would turn into INTERNAL), never a value outside its ranges.
"""

from __future__ import annotations

import ipaddress
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from scistream.errors import BadRequest
from scistream.protocol import (
    MAX_LISTENERS,
    MAX_NUM_CONN,
    MAX_RATE,
    OPS,
    InboundRequest,
    OutboundRequest,
    decode,
    encode,
    parse_request,
    request,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    ["remote_ip", "receiver_ports", "num_conn", "rate", "uid", "remote_listeners", "token", "v", "op"]
)
messages = st.fixed_dictionaries(
    {"v": st.one_of(st.just(1), json_values), "op": st.one_of(st.sampled_from(OPS), json_values)},
    optional={"token": json_values},
).flatmap(
    lambda base: st.dictionaries(field_names, json_values, max_size=5).map(lambda extra: {**extra, **base})
)


@settings(max_examples=400)
@given(messages)
def test_any_message_is_either_a_valid_request_or_a_bad_request(message):
    try:
        req = parse_request(message)
    except BadRequest as exc:
        assert exc.message  # something a user can read
        return
    body = req.body
    if isinstance(body, InboundRequest | OutboundRequest):
        assert 1 <= body.limits.num_conn <= MAX_NUM_CONN
        assert 0 <= body.limits.rate <= MAX_RATE
        assert len(body.receiver_ports) <= MAX_LISTENERS
        assert all(1 <= p <= 65535 for p in body.receiver_ports)
    if isinstance(body, InboundRequest):
        assert str(ipaddress.ip_address(body.remote_ip)) == body.remote_ip


@settings(max_examples=400)
@given(st.binary(max_size=2000))
def test_any_bytes_are_either_a_json_object_or_a_bad_request(data):
    try:
        assert isinstance(decode(data), dict)
    except BadRequest:
        pass


@given(
    ip=st.ip_addresses().map(str),
    ports=st.lists(st.integers(1, 65535), min_size=1, max_size=MAX_LISTENERS),
    num_conn=st.integers(1, MAX_NUM_CONN),
    rate=st.integers(0, MAX_RATE),
)
def test_every_valid_inbound_request_survives_the_wire_unchanged(ip, ports, num_conn, rate):
    line = encode(request("inbound", remote_ip=ip, receiver_ports=ports, num_conn=num_conn, rate=rate))
    body = parse_request(json.loads(line)).body
    assert isinstance(body, InboundRequest)
    assert body.remote_ip == ipaddress.ip_address(ip).compressed
    assert list(body.receiver_ports) == ports
    assert (body.limits.num_conn, body.limits.rate) == (num_conn, rate)
