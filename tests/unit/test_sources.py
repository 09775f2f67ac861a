"""Plain entries: where they listen (gateway.entry_address), whom they admit (s2ds/sources.py,
the policy's `sources`), and how that reaches the shaper and the HAProxy template."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scistream.errors import ConfigError, Forbidden
from scistream.s2cs.gateway import entry_address
from scistream.s2cs.policy import LOOPBACK_SOURCES, Own, build_policy, entry_networks, parse_policy
from scistream.s2cs.swarm import node_entries
from scistream.s2ds.render import (
    ListenerSpec,
    ProxySpec,
    SessionFiles,
    default_templates,
    environment,
    render,
)
from scistream.s2ds.shaper import UsageError, parse
from scistream.s2ds.sources import Sources

OWN = Own(frozenset(), 5000, (5100, 5200))
INTERFACES = [
    ("127.0.0.1", "255.0.0.0"),
    ("::1", None),
    ("10.0.2.1", "255.255.255.0"),
    ("fd00::1", "ffff:ffff:ffff:ffff::"),
]


# --- where a plain entry listens -------------------------------------------------------------------


def test_without_remote_ip_the_first_entry_address():
    assert entry_address(None, ("10.0.2.1", "127.0.0.1")) == "10.0.2.1"
    assert entry_address(None, ("127.0.0.1",)) == "127.0.0.1"


def test_an_entry_address_is_taken_in_any_spelling():
    assert entry_address("10.0.2.1", ("127.0.0.1", "10.0.2.1")) == "10.0.2.1"
    assert entry_address("fd00:0::1", ("fd00::1",)) == "fd00::1"


@pytest.mark.parametrize("wanted", ["0.0.0.0", "::", "10.0.2.2", "192.0.2.10", "::1"])
def test_any_other_address_is_refused_with_the_option_to_change(wanted):
    with pytest.raises(Forbidden) as refused:
        entry_address(wanted, ("127.0.0.1", "10.0.2.1"))
    message = refused.value.message
    assert "s2cs --entry-ip" in message and "(127.0.0.1, 10.0.2.1)" in message
    assert "\n" not in message


def test_every_interface_is_refused_as_such():
    with pytest.raises(Forbidden, match=r"^remote_ip 0\.0\.0\.0 would listen on every interface"):
        entry_address("0.0.0.0", ("127.0.0.1",))


# --- whom it admits ----------------------------------------------------------------------------------


def test_the_default_sources_are_the_networks_of_the_entry_addresses():
    assert entry_networks(["127.0.0.1"], INTERFACES) == LOOPBACK_SOURCES
    assert [str(r) for r in entry_networks(["10.0.2.1", "fd00::1"], INTERFACES)] == [
        "10.0.2.0/24",
        "fd00::/64",
    ]
    assert [str(r) for r in entry_networks(["10.0.2.1", "127.0.0.1"], INTERFACES)] == [
        "10.0.2.0/24",
        "127.0.0.0/8",
        "::1/128",
    ]
    assert [str(r) for r in entry_networks(["10.0.3.9"], INTERFACES)] == ["10.0.3.9/32"]  # no netmask known


def test_the_policy_takes_the_entry_networks_unless_sources_are_named():
    default = build_policy(OWN, INTERFACES, entry_networks=entry_networks(["10.0.2.1"], INTERFACES))
    assert [str(r) for r in default.sources] == ["10.0.2.0/24"] and default.default_sources
    named = build_policy(OWN, INTERFACES, allow_sources=["10.0.9.0/24,10.0.8.7"])
    assert [str(r) for r in named.sources] == ["10.0.9.0/24", "10.0.8.7/32"] and not named.default_sources
    file = parse_policy('sources = ["fd00:1::/64"]\n', "p.toml")
    both = build_policy(OWN, INTERFACES, policy_file=file, allow_sources=["10.0.9.0/24"])
    assert [str(r) for r in both.sources] == ["10.0.9.0/24", "fd00:1::/64"]
    assert build_policy(OWN, INTERFACES, policy_file=file).describe()["sources"] == ["fd00:1::/64"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('sources = ["10.0.0.0/8:5000"]\n', "p.toml:1: sources: 10.0.0.0/8:5000 names ports"),
        ("sources = []\n", "p.toml:1: sources = [] would refuse every instrument"),
        ('\n\nsources = ["a host"]\n', "p.toml:3: sources: 'a host' is not a network"),
        ("sources = 5\n", "p.toml:1: sources must be a list of non-empty strings"),
    ],
)
def test_a_policy_files_sources_are_networks(text, reason):
    with pytest.raises(ConfigError) as wrong:
        parse_policy(text, "p.toml")
    assert wrong.value.message.startswith(reason), wrong.value.message


def test_allow_sources_names_networks_without_ports():
    with pytest.raises(ConfigError, match=r"--allow-sources: 10\.0\.0\.0/8:5000 names ports"):
        build_policy(OWN, INTERFACES, allow_sources=["10.0.0.0/8:5000"])
    with pytest.raises(ConfigError, match="--allow-sources: 'nowhere' is not a network"):
        build_policy(OWN, INTERFACES, allow_sources=["nowhere"])


def test_sources_admit_their_networks_only():
    sources = Sources.parse(["10.0.2.0/24", "::1/128"])
    assert sources.admits("10.0.2.200") and sources.admits("::1")
    assert sources.admits("::ffff:10.0.2.7")  # an IPv4 client of a dual-stack socket
    assert not sources.admits("10.0.3.1") and not sources.admits("127.0.0.1") and not sources.admits("")
    assert not sources.admits("/run/a.sock")
    with pytest.raises(ValueError, match=r"'10\.0\.2\.0/33' is not a network"):
        Sources.parse(["10.0.2.0/33"])


# --- how they reach the proxies ----------------------------------------------------------------


def test_the_shaper_takes_its_sources_from_the_command_line():
    routes = ["--route", "127.0.0.1:5100", "/s/shaper-0.sock"]
    opts = parse(["--rate=0", "--allow-source=10.0.2.0/24", "--allow-source", "::1/128", *routes])
    assert opts.sources is not None and str(opts.sources) == "10.0.2.0/24, ::1/128"
    assert parse(["--rate=0", *routes]).sources is None  # no option: every client (not an entry)
    with pytest.raises(UsageError, match="--allow-source: 'x' is not a network"):
        parse(["--rate=0", "--allow-source=x", *routes])


def test_a_plain_entry_without_a_shaper_rejects_other_sources_in_haproxy():
    spec = ProxySpec("s1", "outbound", (ListenerSpec("10.0.2.1", 5100, "192.0.2.7", 5100),), 5, 0, False)
    env = environment(None, default_templates())
    text = render(
        replace(spec, sources=("10.0.2.0/24", "::1/128")),
        SessionFiles(Path("/s")),
        "haproxy.cfg.j2",
        env,
    )
    assert "    tcp-request connection reject unless { src 10.0.2.0/24 ::1/128 }\n" in text
    with pytest.raises(ConfigError, match="refusing to render unsafe value"):
        render(
            replace(spec, sources=("10.0.2.0/24 } || { always_true",)),
            SessionFiles(Path("/s")),
            "haproxy.cfg.j2",
            env,
        )


def test_swarm_nodes_take_their_entry_addresses_from_a_label():
    assert node_entries("", ("127.0.0.1",)) == ("127.0.0.1",)
    assert node_entries("10.0.2.11, fd00::0:11", ("127.0.0.1",)) == ("10.0.2.11", "fd00::11")
    assert node_entries("0.0.0.0", ("127.0.0.1",)) is None  # never every interface
    assert node_entries("dtn1.lan", ("127.0.0.1",)) is None


def test_a_swarm_request_goes_to_a_node_where_its_address_is_an_entry_or_is_refused():
    from scistream.s2cs.swarm import Node, _with_entry

    dtn1 = Node("dtn1", "192.0.2.11", "0.0.0.0", False, entries=("10.0.2.11",))
    dtn2 = Node("dtn2", "192.0.2.12", "0.0.0.0", False, entries=("10.0.2.12", "127.0.0.1"))
    assert _with_entry([dtn1, dtn2], "10.0.2.12") == [dtn2]
    assert _with_entry([dtn1, dtn2], "127.0.0.1") == [dtn2]
    with pytest.raises(Forbidden) as refused:
        _with_entry([dtn1, dtn2], "10.0.2.13")
    assert "s2cs --entry-ip" in refused.value.message and "scistream.entry-ip" in refused.value.message


@given(
    st.ip_addresses(),
    st.ip_addresses(),
    st.integers(min_value=0, max_value=128),
)
def test_sources_decide_as_the_ipaddress_module_does(network_address, client, prefix):
    prefix = min(prefix, network_address.max_prefixlen)
    network = ipaddress.ip_network(f"{network_address}/{prefix}", strict=False)
    sources = Sources.parse([f"{network_address}/{prefix}"])
    mapped = getattr(client, "ipv4_mapped", None)
    expected = (mapped or client) in network if (mapped or client).version == network.version else False
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(
        ipaddress.ip_network("::ffff:0:0/96")
    ):
        return  # written as IPv4 by whoever allows them (the policy refuses mapped networks)
    assert sources.admits(str(client)) == expected


def test_a_bare_address_admits_itself_only():
    sources = Sources.parse(["10.0.2.5", "fd00::5"])
    assert sources.admits("10.0.2.5") and sources.admits("fd00::5")
    assert not sources.admits("10.0.2.6") and not sources.admits("fd00::6")
    for wrong in ("10.0.2.0/24x", "10.0.2.0/", "fe80::1%eth0/64", "10.0.2.0/-1"):
        with pytest.raises(ValueError, match="is not a network"):
            Sources.parse([wrong])


def test_an_ipv6_network_broader_than_the_mapped_range_stays_ipv6():
    """Found by the property above: `::/0` admitted every IPv4 client, and `::ffff:0:0/33` could
    not be parsed, as the network's own address was read as the IPv4 address it would carry."""
    assert not Sources.parse(["::/0"]).admits("10.0.2.5")
    assert not Sources.parse(["::ffff:0:0/33"]).admits("10.0.2.5")
    assert Sources.parse(["::/0"]).admits("fd00::5")
    assert Sources.parse(["::ffff:10.0.2.0/120"]).admits("10.0.2.5")
    assert Sources.parse(["::ffff:10.0.2.0/120"]).admits("::ffff:10.0.2.5")
