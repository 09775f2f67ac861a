"""Which clients a plain entry admits: the shaper's check at accept, apart from its loop.

A plain entry (an outbound proxy's listener, where the instrument sends plain TCP) carries no
cryptographic check: whoever reaches it sends into the stream. So it admits only the sources the
operator allows (`s2cs --allow-sources`, the policy file's `sources`, by default the networks of
the entry addresses); the shaper, when it has the entry, refuses any other at accept, before it
reads a byte. HAProxy without a shaper does the same with `tcp-request connection reject`
(templates/haproxy.cfg.j2).

Pure: addresses in, a yes or no out. Standard library only, and what the shaper imports anyway.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

_MAPPED = 0xFFFF  # ::ffff:0:0/96, above the 32 bits of the IPv4 address an IPv6 one carries


def _raw(text: str) -> tuple[int, int] | None:
    """(bits, value) of an IP address as written; None when `text` is none. socket.inet_pton,
    not ipaddress: the shaper starts with what it has imported already, and every outbound
    request waits for it to listen."""
    text = text.split("%")[0]
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    try:
        raw = socket.inet_pton(family, text)
    except (OSError, ValueError):
        return None
    return len(raw) * 8, int.from_bytes(raw, "big")


def _address(text: str) -> tuple[int, int] | None:
    """(bits, value) of a client's address: an IPv4-mapped IPv6 address (an IPv4 client of a
    dual-stack socket) is the IPv4 address it carries."""
    found = _raw(text)
    if found is not None and found[0] == 128 and found[1] >> 32 == _MAPPED:
        return 32, found[1] & 0xFFFFFFFF
    return found


class Sources:
    """The networks a plain entry admits, each as (bits, network value, mask)."""

    def __init__(self, networks: Iterable[tuple[int, int, int]], shown: Iterable[str]) -> None:
        self.networks = tuple(networks)
        self.shown = tuple(shown)

    @classmethod
    def parse(cls, texts: Iterable[str]) -> Sources:
        """`10.0.2.0/24`, `::1/128`, a bare address; ValueError naming the first that is none."""
        networks, shown = [], []
        for text in texts:
            address, slash, prefix = text.strip().partition("/")
            found = _raw(address) if "%" not in address else None
            if found is None or (slash and not (prefix.isascii() and prefix.isdigit())):
                raise ValueError(f"{text!r} is not a network (CIDR) or address")
            bits, value = found
            length = int(prefix) if slash else bits
            if length > bits:
                raise ValueError(f"{text!r} is not a network (CIDR) or address")
            if bits == 128 and length >= 96 and value >> 32 == _MAPPED:
                # Inside ::ffff:0:0/96: the IPv4 network it carries, as its clients are matched.
                # A broader IPv6 network stays IPv6, and admits no IPv4 client.
                bits, value, length = 32, value & 0xFFFFFFFF, length - 96
            mask = ((1 << length) - 1) << (bits - length)
            networks.append((bits, value & mask, mask))
            shown.append(text.strip())
        return cls(networks, shown)

    def admits(self, address: str) -> bool:
        """Whether a client of this address may send; an IPv4-mapped IPv6 address (an IPv4
        client of a dual-stack socket) is the IPv4 address it carries."""
        found = _address(address)
        if found is None:
            return False  # not an IP client at all: nothing the operator allowed
        bits, value = found
        return any(bits == b and value & mask == network for b, network, mask in self.networks)

    def __str__(self) -> str:
        return ", ".join(self.shown)
