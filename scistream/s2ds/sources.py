"""Which clients a plain entry admits: the shaper's check at accept, apart from its loop.

A plain entry (an outbound proxy's listener, where the instrument sends plain TCP) carries no
cryptographic check: whoever reaches it sends into the stream. So it admits only the sources the
operator allows (`s2cs --allow-sources`, the policy file's `sources`, by default the networks of
the entry addresses); the shaper, when it has the entry, refuses any other at accept, before it
reads a byte. HAProxy without a shaper does the same with `tcp-request connection reject`
(templates/haproxy.cfg.j2).

Pure: addresses in, a yes or no out. Standard library only, as the shaper (shaper.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Sources:
    """The networks a plain entry admits."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)

    @classmethod
    def parse(cls, texts: Iterable[str]) -> Sources:
        """`10.0.2.0/24`, `::1/128`, a bare address; ValueError naming the first that is none."""
        found = []
        for text in texts:
            try:
                found.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                raise ValueError(f"{text!r} is not a network (CIDR) or address") from None
        return cls(found)

    def admits(self, address: str) -> bool:
        """Whether a client of this address may send; an IPv4-mapped IPv6 address (an IPv4
        client of a dual-stack socket) is the IPv4 address it carries."""
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False  # not an IP client at all: nothing the operator allowed
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)

    def __str__(self) -> str:
        return ", ".join(str(net) for net in self.networks)
