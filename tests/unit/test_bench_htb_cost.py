"""What bench/htb_cost.py asks of the kernel: the rate of a stream's htb class and its tc commands."""

from __future__ import annotations

from bench.htb_cost import htb_commands, wire_rate


def test_the_class_rate_leaves_the_payload_rate_to_the_stream_after_every_header() -> None:
    # At MTU 1500 a packet carries 1448 bytes of TCP payload in 1514 on the wire, and a TLS record
    # 16384 bytes of plaintext in 16406: a class at the payload rate would leave a user 4.5% short.
    assert wire_rate(100_000_000, 1500) == round(100_000_000 * 1514 / 1448 * 16406 / 16384)
    assert 1.045 < wire_rate(100_000_000, 1500) / 100_000_000 < 1.048
    # On loopback's 64 kB packets the headers weigh almost nothing.
    assert 1.0 < wire_rate(100_000_000, 65536) / 100_000_000 < 1.0025


def test_one_class_per_direction_chosen_by_the_inbound_proxys_port() -> None:
    first = htb_commands("htbv0", "dport", 40123, 100_000_000, "1:10", root=True)
    second = htb_commands("lo", "sport", 40123, 100_000_000, "1:11", root=False)
    assert first[0] == ["tc", "qdisc", "add", "dev", "htbv0", "root", "handle", "1:", "htb"]
    assert [argv[1] for argv in second] == ["class", "filter"]  # the root is the device's, added once
    rule = " ".join(first[-1])
    assert "u32 match ip dport 40123 0xffff flowid 1:10" in rule
    clazz = first[1]
    assert clazz[clazz.index("rate") + 1] == clazz[clazz.index("ceil") + 1] == "100000000bit"
    # The bucket holds two of loopback's and veth's 64 kB segments at least, 10 ms of a high rate.
    assert clazz[clazz.index("burst") + 1] == str(2 * 65536)
    high = htb_commands("htbv0", "dport", 1, 40_000_000_000, "1:10", root=True)[1]
    assert high[high.index("burst") + 1] == str(40_000_000_000 // 8 // 100)
