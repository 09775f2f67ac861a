"""The ports the demo, the tests and the bench take at run time."""

from __future__ import annotations

import socket
from pathlib import Path

from scistream.loopback import free_port, free_port_range


def ephemeral() -> range:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(low, high + 1)


def test_a_free_port_is_one_no_outgoing_connection_can_take_before_it_is_bound():
    """A port the kernel may give to any outgoing connection was handed out for a gateway to bind
    later: under load a connection took it first and the gateway failed, "Address already in use"."""
    ports = [free_port() for _ in range(200)]
    assert not set(ports) & set(ephemeral())
    assert len(set(ports)) == len(ports)  # never the same one twice to two gateways
    first, last = free_port_range(10)
    assert not set(range(first, last + 1)) & set(ports)
    with socket.socket() as sock:  # and it is free indeed
        sock.bind(("127.0.0.1", ports[-1]))
