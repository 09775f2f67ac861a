"""Random requests against a live s2cs (hypothesis): stable error codes, never INTERNAL, still serving."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scistream.loopback import proxies_of
from scistream.protocol import OPS

from .test_hardening import NASTY, raw_exchange

CODES = {"BAD_REQUEST", "NOT_FOUND", "CONFLICT", "NO_PORTS"}  # what random requests may earn

scalars = (
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=30) | st.sampled_from(NASTY)
)
values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3)
)
ips = st.sampled_from(["127.0.0.1", "::1", "0.0.0.0", "10.0.0.1", "1.2.3", "::g", *NASTY])
ports = st.lists(st.integers(-5, 70_000), max_size=4) | values
fields = st.fixed_dictionaries(
    {},
    optional={
        "remote_ip": ips | values,
        "receiver_ports": ports,
        "num_conn": st.integers(-3, 20_000) | values,
        "rate": st.integers(-3, 10**9) | values,
        "uid": st.uuids(version=4).map(str) | values,
        "remote_listeners": st.lists(st.sampled_from(["127.0.0.1:1", "[::1]:2", "x:3", *NASTY]), max_size=3)
        | values,
        "token": st.none() | st.text(max_size=20),
    },
)
requests = st.builds(
    lambda v, op, f: {"v": v, "op": op, **f},
    st.just(1) | values,
    st.sampled_from(OPS) | values,
    fields,
)


def test_random_requests_never_break_the_server(start_s2cs):
    hpc = start_s2cs("hpc", ports=4)
    seen: set[str] = set()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(requests)
    def one(message):
        reply = raw_exchange(hpc, json.dumps(message).encode() + b"\n")
        assert reply is not None
        if reply["ok"]:
            seen.add("ok")
            if "uid" in reply and message.get("op") in ("inbound", "outbound"):
                hpc.call("release", uid=reply["uid"])
        else:
            assert reply["error"]["code"] in CODES, reply
            seen.add(reply["error"]["code"])

    one()
    assert "BAD_REQUEST" in seen
    assert hpc.call("info")["free_ports"] == 4  # every stream that random requests made is gone
    assert hpc.call("status")["streams"] == []
    assert proxies_of(hpc.state_dir) == []
