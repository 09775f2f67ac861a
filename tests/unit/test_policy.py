from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scistream.errors import ConfigError, Forbidden
from scistream.protocol import Limits
from scistream.s2cs.policy import (
    HOW_TO_ALLOW,
    Own,
    Policy,
    PolicyFile,
    Quota,
    TargetRule,
    attached_networks,
    build_policy,
    interface_addresses,
    limits_verdict,
    parse_policy,
    parse_target,
    parse_targets,
    ports_verdict,
    streams_verdict,
)

GATEWAY = ipaddress.ip_address("10.0.1.1")
OWN = Own(
    frozenset({GATEWAY, ipaddress.ip_address("fd00::1"), ipaddress.ip_address("192.0.2.7")}),
    control_port=5000,
    port_range=(5100, 5200),
)
# What psutil reports for a gateway with a LAN, an IPv6 ULA, a link-local and loopback.
INTERFACES = [
    ("127.0.0.1", "255.0.0.0"),
    ("::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("10.0.1.1", "255.255.255.0"),
    ("fd00::1", "ffff:ffff:ffff:ffff::"),
    ("fe80::1%eth0", "ffff:ffff:ffff:ffff::"),
    ("169.254.3.4", "255.255.0.0"),
    ("02:42:ac:11:00:02", None),  # the interface's MAC address
]
GUIDE_TOML = """\
# A beamline gets its own detector subnet and a quota; operators see everything.
targets = ["10.20.0.0/16:5000-5999"]
max_streams = 2
max_rate = 100000

[[allow]]
groups = ["6f9a1c52-7b4e-4d1f-9a3e-2c8b5d7e0f11"]
targets = ["10.32.5.0/24:5000-5100", "[fd00:32::/64]:5000-5100"]
max_streams = 8
max_rate = 0
max_num_conn = 32

[[allow]]
users = ["ops@facility.org"]
admin = true
"""
BEAMLINE = "6f9a1c52-7b4e-4d1f-9a3e-2c8b5d7e0f11"
HERE = interface_addresses(INTERFACES)  # the addresses the interfaces have when a request comes


@dataclass(frozen=True)
class Caller:
    id: str
    name: str
    groups: frozenset[str] | None = frozenset()


ALICE = Caller("a1b2c3d4-0000-4000-8000-000000000001", "alice@example.org")


def default_policy(**changes) -> Policy:
    return build_policy(OWN, INTERFACES, **changes)


def refusal(policy: Policy, ip: str, port: int, who=None, here=HERE) -> str:
    verdict = policy.target(policy.grant(who), ip, port, here)
    return "" if verdict.allowed else verdict.reason


# --- the syntax of targets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "network", "ports", "shown"),
    [
        ("10.0.1.0/24", "10.0.1.0/24", None, "10.0.1.0/24"),
        ("10.0.1.5", "10.0.1.5/32", None, "10.0.1.5/32"),
        ("10.0.1.5:5001", "10.0.1.5/32", (5001, 5001), "10.0.1.5/32:5001"),
        ("10.0.1.0/24:5000-5100", "10.0.1.0/24", (5000, 5100), "10.0.1.0/24:5000-5100"),
        ("10.0.1.7/24", "10.0.1.0/24", None, "10.0.1.0/24"),  # host bits are forgiven
        (" fd00::/64 ", "fd00::/64", None, "fd00::/64"),
        ("[fd00::/64]:5001", "fd00::/64", (5001, 5001), "[fd00::/64]:5001"),
        ("[fd00::5]:5001-5010", "fd00::5/128", (5001, 5010), "[fd00::5/128]:5001-5010"),
        ("[::1/128]", "::1/128", None, "::1/128"),
    ],
)
def test_target_specs_of_the_operator_guide(spec, network, ports, shown):
    rule = parse_target(spec)
    assert rule == TargetRule(ipaddress.ip_network(network), ports)
    assert str(rule) == shown


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("", "empty"),
        ("10.0.1.0/33", "not a network"),
        ("10.0.1.0/24:0", "from 1 to 65535"),
        ("10.0.1.0/24:65536", "from 1 to 65535"),
        ("10.0.1.0/24:5100-5000", "no higher than the last"),
        ("10.0.1.0/24:http", "ports are PORT or PORT-PORT"),
        ("10.0.1.0/24:5000-", "ports are PORT or PORT-PORT"),
        ("fd00::/64:5001", "IPv6 with ports goes in brackets: [fd00::/64]:5001"),
        ("[fd00::/64:5001", "does not close"),
        ("[fd00::/64]5001", "after ']' comes ':PORT'"),
        ("fe80::1%eth0", "zone ids"),
        ("::ffff:10.0.0.0/104", "write IPv4-mapped networks as IPv4"),
        ("gateway.example.org", "not a network"),
    ],
)
def test_a_bad_target_spec_says_what_is_wrong(spec, reason):
    with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse_target(spec)


def test_an_option_takes_comma_separated_specs_and_names_itself_in_errors():
    assert [str(r) for r in parse_targets(["10.0.1.0/24:5001,10.0.2.0/24", "[fd00::/64]:1"], "--x")] == [
        "10.0.1.0/24:5001",
        "10.0.2.0/24",
        "[fd00::/64]:1",
    ]
    with pytest.raises(ConfigError, match=r"--allow-targets: '10\.0\.1\.0/24:99999'"):
        parse_targets(["10.0.2.0/24,10.0.1.0/24:99999"], "--allow-targets")


networks = st.one_of(
    st.builds(lambda a, p: ipaddress.ip_network(f"{ipaddress.IPv4Address(a)}/{p}", strict=False),
              st.integers(0, 2**32 - 1), st.integers(0, 32)),
    st.builds(lambda a, p: ipaddress.ip_network(f"{ipaddress.IPv6Address(a)}/{p}", strict=False),
              st.integers(0, 2**128 - 1), st.integers(0, 128)),
)  # fmt: skip
port_ranges = st.none() | st.tuples(st.integers(1, 65535), st.integers(0, 1000)).map(
    lambda p: (p[0], min(65535, p[0] + p[1]))
)


@given(
    networks.filter(
        lambda n: not n.subnet_of(ipaddress.ip_network("::ffff:0:0/96")) if n.version == 6 else True
    ),
    port_ranges,
)
def test_every_rule_reads_back_as_itself(network, ports):
    rule = TargetRule(network, ports)
    assert parse_target(str(rule)) == rule


# --- the default: the networks of the gateway's interfaces ----------------------------------------


def test_the_default_is_the_attached_networks_without_loopback_or_link_local():
    assert [str(r) for r in attached_networks(INTERFACES)] == ["10.0.1.0/24", "fd00::/64"]


def test_the_default_refuses_loopback_and_link_local_and_allows_the_lan():
    policy = default_policy()
    assert policy.default_targets
    assert refusal(policy, "10.0.1.5", 5001) == ""
    assert refusal(policy, "fd00::5", 5001) == ""
    for ip in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"):
        assert refusal(policy, ip, 5001).endswith(
            " (loopback) is not allowed on this gateway; " + HOW_TO_ALLOW
        ), ip
    for ip in ("169.254.169.254", "fe80::2"):
        assert refusal(policy, ip, 80).endswith(
            " (link-local) is not allowed on this gateway; " + HOW_TO_ALLOW
        ), ip
    reason = refusal(policy, "10.0.2.5", 5001)
    assert reason == (
        "target 10.0.2.5:5001 is not allowed on this gateway; "
        "its operator allows targets with --allow-targets CIDR[:PORT[-PORT]]"
    )


def test_the_gateways_own_ports_are_refused_on_every_address_it_has():
    policy = default_policy(allow_targets=["0.0.0.0/0", "::/0", "127.0.0.0/8", "::1/128"])
    for ip in ("10.0.1.1", "192.0.2.7", "127.0.0.1", "127.0.0.53", "::1", "fd00::1", "::ffff:10.0.1.1"):
        assert "own control port; no policy allows it" in refusal(policy, ip, 5000), ip
        assert "own port range 5100-5200" in refusal(policy, ip, 5100), ip
        assert "own port range 5100-5200" in refusal(policy, ip, 5200), ip
    for ip in ("127.0.0.1", "127.0.0.53", "::1"):  # loopback, named by 127.0.0.0/8 and ::1/128
        assert refusal(policy, ip, 5201) == "", ip
    for ip in ("10.0.1.1", "192.0.2.7", "fd00::1", "::ffff:10.0.1.1"):  # inside 0.0.0.0/0 or ::/0 only
        assert "(this gateway's own address) is not allowed" in refusal(policy, ip, 5201), ip
    assert refusal(policy, "10.0.1.2", 5000) == ""  # the same port on another host is not ours
    assert refusal(policy, "0.0.0.0", 8080) == "target 0.0.0.0:8080 is not the address of a host"
    assert refusal(policy, "::", 8080) == "target [::]:8080 is not the address of a host"


@given(
    st.lists(st.builds(TargetRule, networks, port_ranges), max_size=5),
    st.sampled_from([*sorted(OWN.addresses, key=str), ipaddress.ip_address("127.0.0.1")]),
    st.sampled_from([5000, 5100, 5150, 5200]),
)
def test_no_policy_reaches_the_gateways_own_ports(rules, ip, port):
    policy = Policy(OWN, tuple(rules))
    assert not policy.target(policy.grant(None), str(ip), port, HERE).allowed


def test_allow_targets_allows_exactly_what_it_names():
    policy = default_policy(allow_targets=["10.0.3.0/24:5001-5003,[fd00:3::/64]:7000"])
    assert not policy.default_targets
    assert refusal(policy, "10.0.3.9", 5001) == ""
    assert refusal(policy, "10.0.3.9", 5003) == ""
    assert "10.0.3.9:5004 is not allowed" in refusal(policy, "10.0.3.9", 5004)  # the neighbour
    assert "10.0.3.9:5000 is not allowed" in refusal(policy, "10.0.3.9", 5000)
    assert "10.0.4.1:5001 is not allowed" in refusal(policy, "10.0.4.1", 5001)
    assert "10.0.1.5:5001 is not allowed" in refusal(policy, "10.0.1.5", 5001)  # no more the default
    assert refusal(policy, "fd00:3::42", 7000) == ""
    assert "[fd00:3::42]:7001 is not allowed" in refusal(policy, "fd00:3::42", 7001)
    assert "10.0.3.9:5001" in refusal(policy, "::ffff:10.0.3.9", 5004).replace("5004", "5001")


def test_a_broad_network_never_reaches_loopback_or_link_local_unless_named():
    broad = default_policy(allow_targets=["0.0.0.0/0", "::/0"])
    assert refusal(broad, "192.0.2.99", 22) == ""
    assert refusal(broad, "127.0.0.1", 8080).startswith("target 127.0.0.1:8080 (loopback) is not allowed")
    assert refusal(broad, "169.254.169.254", 80).endswith(
        " (link-local) is not allowed on this gateway; " + HOW_TO_ALLOW
    )
    assert refusal(broad, "::1", 8080).startswith("target [::1]:8080 (loopback)")
    named = default_policy(allow_targets=["127.0.0.1/32", "::1/128", "169.254.169.254:80"])
    assert refusal(named, "127.0.0.1", 8080) == ""
    assert refusal(named, "::1", 8080) == ""
    assert refusal(named, "169.254.169.254", 80) == ""
    assert refusal(named, "127.0.0.1", 5000).endswith("own control port; no policy allows it")


def test_the_gateways_own_addresses_are_reached_only_by_a_rule_that_names_them():
    policy = default_policy()  # the attached networks: 10.0.1.0/24 holds the gateway's 10.0.1.1
    assert refusal(policy, "10.0.1.1", 22) == (
        "target 10.0.1.1:22 (this gateway's own address) is not allowed on this gateway; its operator "
        "allows it only with a rule that names the address, such as --allow-targets 10.0.1.1/32:22"
    )
    assert refusal(policy, "fd00::1", 22).endswith("such as --allow-targets [fd00::1/128]:22")
    assert "(this gateway's own address)" in refusal(policy, "::ffff:10.0.1.1", 22)
    # An address it was told is its own (--listener-ip behind NAT) is the gateway too.
    assert "(this gateway's own address)" in refusal(policy, "192.0.2.7", 22)
    broad = default_policy(allow_targets=["0.0.0.0/0", "::/0", "10.0.1.0/31:22"])
    assert "(this gateway's own address)" in refusal(broad, "10.0.1.1", 22)
    assert "(this gateway's own address)" in refusal(broad, "fd00::1", 22)
    named = default_policy(allow_targets=["10.0.1.1/32:22", "[fd00::1/128]:22", "192.0.2.7"])
    assert refusal(named, "10.0.1.1", 22) == ""
    assert refusal(named, "fd00::1", 22) == ""
    assert refusal(named, "192.0.2.7", 8080) == ""  # every port of it: still named on purpose
    assert "(this gateway's own address)" in refusal(named, "10.0.1.1", 23)  # only the port named
    assert refusal(named, "192.0.2.7", 5000).endswith("own control port; no policy allows it")
    # An own link-local address needs its name too, not only a rule inside link-local.
    link_local = default_policy(allow_targets=["169.254.0.0/16"])
    assert refusal(link_local, "169.254.9.9", 80) == ""
    assert "(this gateway's own address)" in refusal(link_local, "169.254.3.4", 80)


def test_own_addresses_are_those_of_the_interfaces_when_the_request_comes():
    policy = default_policy(allow_targets=["10.0.1.0/24"])
    assert refusal(policy, "10.0.1.2", 5000) == ""  # not this gateway's: another host's port 5000
    later = HERE | interface_addresses([("10.0.1.2", "255.255.255.0")])  # ip addr add 10.0.1.2/24
    assert refusal(policy, "10.0.1.2", 5000, here=later).endswith("own control port; no policy allows it")
    assert "own port range 5100-5200" in refusal(policy, "10.0.1.2", 5150, here=later)
    assert "(this gateway's own address)" in refusal(policy, "10.0.1.2", 22, here=later)
    assert refusal(policy, "10.0.1.2", 22) == ""  # once it is gone, another host's again


def test_the_metrics_port_is_refused_on_every_own_address_whatever_the_policy_says():
    own = Own(OWN.addresses, 5000, (5100, 5200), metrics_port=9100)
    policy = build_policy(own, INTERFACES, allow_targets=["10.0.1.1/32", "127.0.0.1/32", "0.0.0.0/0"])
    for ip in ("10.0.1.1", "127.0.0.1", "192.0.2.7"):
        assert refusal(policy, ip, 9100) == (
            f"target {ip}:9100 is this gateway's own metrics port; no policy allows it"
        )
    assert refusal(policy, "10.0.1.1", 9101) == ""
    assert refusal(policy, "10.0.9.9", 9100) == ""  # another host's
    assert policy.describe()["never"] == ["control port 5000", "metrics port 9100", "ports 5100-5200"]


def test_interface_addresses_are_every_ip_address_without_zones_or_macs():
    assert {
        ipaddress.ip_address(ip)
        for ip in ("127.0.0.1", "::1", "10.0.1.1", "fd00::1", "fe80::1", "169.254.3.4")
    } == HERE


def test_peers_are_any_unless_the_operator_names_them():
    assert default_policy().peer("203.0.113.9", 5100, HERE).allowed
    policy = default_policy(allow_peers=["203.0.113.0/24:5100-5200"])
    assert policy.peer("203.0.113.9", 5100, HERE).allowed
    verdict = policy.peer("198.51.100.1", 5100, HERE)
    assert verdict.reason == (
        "remote listener 198.51.100.1:5100 is not allowed on this gateway; "
        "its operator allows remote listeners with --allow-peers CIDR[:PORT[-PORT]]"
    )
    assert policy.peer("127.0.0.1", 5100, HERE).reason.startswith("remote listener 127.0.0.1:5100 is in this")


def test_a_peer_on_an_own_address_needs_a_rule_that_names_it_too():
    policy = default_policy(allow_peers=["10.0.0.0/8"])
    assert policy.peer("10.0.1.9", 5300, HERE).allowed
    assert policy.peer("10.0.1.1", 5300, HERE).reason == (
        "remote listener 10.0.1.1:5300 (this gateway's own address) is not allowed on this gateway; its "
        "operator allows it only with a rule that names the address, such as --allow-peers 10.0.1.1/32:5300"
    )
    named = default_policy(allow_peers=["10.0.0.0/8", "10.0.1.1/32:5300"])
    assert named.peer("10.0.1.1", 5300, HERE).allowed
    assert not named.peer("10.0.1.1", 5100, HERE).allowed  # its own port range: never


# --- identities ------------------------------------------------------------------------------------


def test_without_identity_rules_every_authenticated_identity_is_served():
    grant = default_policy().grant(ALICE)
    assert grant.whom == "alice@example.org" and not grant.admin


def test_allow_users_accepts_ids_and_usernames_in_any_case():
    by_name = default_policy(allow_users=["Alice@Example.org"])
    assert by_name.grant(ALICE).whom == "alice@example.org"
    by_id = default_policy(allow_users=[ALICE.id.upper() + ",bob@example.org"])
    assert by_id.grant(ALICE)
    with pytest.raises(Forbidden) as refused:
        by_name.grant(Caller("b0b00000-0000-4000-8000-000000000002", "bob@example.org"))
    assert refused.value.message == (
        "bob@example.org (b0b00000-0000-4000-8000-000000000002) may not use this gateway: "
        "not in --allow-users, --allow-groups or the policy file"
    )


def test_allow_groups_accepts_members_and_says_when_groups_could_not_be_looked_up():
    policy = default_policy(allow_groups=[BEAMLINE.upper()])
    assert policy.needs_groups
    assert policy.grant(Caller("x", "carol@example.org", frozenset({BEAMLINE})))
    with pytest.raises(
        Forbidden, match=r"carol@example\.org \(x\) may not use this gateway: not in --allow-users"
    ):
        policy.grant(Caller("x", "carol@example.org", frozenset({"0" * 8 + "-0000-4000-8000-" + "0" * 12})))
    with pytest.raises(Forbidden, match="groups could not be looked up; try again later"):
        policy.grant(Caller("x", "carol@example.org", None))
    with pytest.raises(ConfigError, match="--allow-groups: 'beamline' is not a Globus group id"):
        default_policy(allow_groups=["beamline"])


def test_a_group_gets_its_own_subnet_and_quota_from_the_policy_file():
    policy = default_policy(policy_file=parse_policy(GUIDE_TOML, "policy.toml"))
    member = Caller("m", "mona@anl.gov", frozenset({BEAMLINE}))
    grant = policy.grant(member)
    assert grant.quota == Quota(max_streams=8, max_rate=0, max_num_conn=32)
    assert policy.target(grant, "10.32.5.9", 5050, HERE).allowed
    assert policy.target(grant, "fd00:32::9", 5050, HERE).allowed
    assert policy.target(grant, "10.20.1.1", 5999, HERE).allowed  # and what everybody may reach
    reason = policy.target(grant, "10.32.6.9", 5050, HERE).reason
    assert reason == (
        "target 10.32.6.9:5050 is not allowed for mona@anl.gov on this gateway; its operator allows "
        "targets with --allow-targets CIDR[:PORT[-PORT]] or in the policy file"
    )
    ops = policy.grant(Caller("o", "ops@facility.org"))
    assert ops.admin and ops.quota == Quota(max_streams=2, max_rate=100000)
    assert not policy.target(ops, "10.32.5.9", 5050, HERE).allowed  # the beamline's subnet is its own
    with pytest.raises(Forbidden, match="may not use this gateway"):
        policy.grant(ALICE)  # the file names who may


def test_where_several_entries_name_one_identity_the_highest_limit_wins():
    toml = GUIDE_TOML + '\n[[allow]]\nusers = ["mona@anl.gov"]\nmax_streams = 20\nmax_num_conn = 4\n'
    policy = default_policy(policy_file=parse_policy(toml, "p.toml"))
    grant = policy.grant(Caller("m", "mona@anl.gov", frozenset({BEAMLINE})))
    assert grant.quota == Quota(max_streams=20, max_rate=0, max_num_conn=32)


def test_quotas_refuse_what_is_beyond_them_and_say_what_to_ask_for():
    policy = default_policy(policy_file=parse_policy(GUIDE_TOML, "policy.toml"))
    grant = policy.grant(Caller("o", "ops@facility.org"))
    assert limits_verdict(grant, Limits(num_conn=5, rate=100000)).allowed
    assert limits_verdict(grant, Limits(num_conn=500, rate=10)).allowed  # num_conn is not limited
    assert limits_verdict(grant, Limits(rate=100001)).reason == (
        "rate 100001 kb/s (100 Mbit/s) is above the 100000 kb/s (100 Mbit/s) ops@facility.org may use "
        "on this gateway; ask for --rate 100000 or less"
    )
    assert limits_verdict(grant, Limits(rate=0)).reason.startswith("rate 0 (unlimited) is above")
    beamline = policy.grant(Caller("m", "mona@anl.gov", frozenset({BEAMLINE})))
    assert limits_verdict(beamline, Limits(rate=0, num_conn=32)).allowed
    assert "ask for --num_conn 32 or less" in limits_verdict(beamline, Limits(num_conn=33)).reason
    assert streams_verdict(grant, 1).allowed
    assert streams_verdict(grant, 2).reason == (
        "ops@facility.org may have at most 2 stream(s) at once on this gateway and has 2; "
        "release one first (s2uc release UID)"
    )
    anonymous = Policy(OWN, (), quota=Quota(max_streams=1)).grant(None)
    assert "everybody together may have at most 1" in streams_verdict(anonymous, 1).reason


def test_max_ports_counts_the_listener_ports_an_identity_holds():
    toml = "max_ports = 4\nusers = ['bob@example.org']\n\n"
    toml += "[[allow]]\nusers = ['mona@anl.gov']\nmax_ports = 2\n\n"
    toml += "[[allow]]\nusers = ['mona@anl.gov']\nmax_ports = 10\n"
    policy = default_policy(policy_file=parse_policy(toml, "p.toml"))
    assert policy.quota == Quota(max_ports=4)
    assert policy.describe()["quota"] == {"max_ports": 4}
    mona = policy.grant(Caller("m", "mona@anl.gov"))
    assert mona.quota.max_ports == 10  # several entries: the highest wins
    bob = policy.grant(Caller("b", "bob@example.org"))
    assert ports_verdict(bob, 0, 4).allowed
    assert ports_verdict(bob, 3, 1).allowed
    assert ports_verdict(bob, 3, 2).reason == (
        "bob@example.org may hold at most 4 listener port(s) at once on this gateway (max_ports) and "
        "holds 3; this stream needs 2 more: release a stream first (s2uc release UID)"
    )
    assert ports_verdict(bob, 0, 5).reason == (
        "bob@example.org may hold at most 4 listener port(s) at once on this gateway (max_ports); "
        "this stream needs 5: ask for 4 port(s) or fewer"
    )
    anonymous = Policy(OWN, (), quota=Quota(max_ports=1)).grant(None)
    assert ports_verdict(anonymous, 1, 1).reason.startswith("everybody together may hold at most 1")
    assert ports_verdict(default_policy().grant(None), 1000, 1000).allowed  # no max_ports: no limit
    with pytest.raises(
        ConfigError, match=r"p\.toml:1: max_ports must be a whole number of at least 1, not 0"
    ):
        parse_policy("max_ports = 0\n", "p.toml")


# --- the policy file ---------------------------------------------------------------------------------


def test_a_policy_file_adds_its_targets_to_the_options():
    file = parse_policy(GUIDE_TOML, "policy.toml")
    policy = default_policy(allow_targets=["10.0.9.0/24"], policy_file=file)
    assert [str(t) for t in policy.targets] == ["10.0.9.0/24", "10.20.0.0/16:5000-5999"]
    assert policy.describe() == {
        "targets": ["10.0.9.0/24", "10.20.0.0/16:5000-5999"],
        "targets_default": False,
        "peers": None,
        "never": ["control port 5000", "ports 5100-5200"],
        "identities": "listed",
        "quota": {"max_streams": 2, "max_rate": 100000},
        "sources": ["127.0.0.0/8", "::1/128"],
    }
    nothing = default_policy(policy_file=parse_policy("targets = []\n", "p.toml"))
    assert nothing.targets == () and not nothing.default_targets  # no network for everybody


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("targets = [\n", "p.toml:1: Invalid value (not valid TOML)"),
        ("max_streams = 2\nmax_rate = = 3\n", "p.toml:2: Invalid value (not valid TOML)"),
        ("max_streams = 2\nmax_stream = 3\n", "p.toml:2: unknown key 'max_stream' in the top level (known: "),
        (GUIDE_TOML.replace('"10.32.5.0/24:5000-5100"', '"10.32.5.0/24:5100-5000"'),
         "p.toml:8: targets: '10.32.5.0/24:5100-5000': ports go from 1 to 65535"),
        (GUIDE_TOML.replace("max_rate = 0", "max_rate = true"),
         "p.toml:10: max_rate must be a whole number of at least 0 (0 = unlimited), not True"),
        (GUIDE_TOML.replace("max_streams = 8", "max_streams = 0"),
         "p.toml:9: max_streams must be a whole number of at least 1, not 0"),
        (GUIDE_TOML.replace('users = ["ops@facility.org"]', "users = []"),
         "p.toml:13: an [[allow]] entry names nobody: give it users or groups"),
        (GUIDE_TOML.replace("admin = true", 'admin = "yes"'), "p.toml:15: admin must be true or false"),
        (GUIDE_TOML.replace(BEAMLINE, "beamline-32"),
         "p.toml:7: groups: 'beamline-32' is not a Globus group id (a UUID)"),
        ('users = "alice"\n', "p.toml:1: users must be a list of non-empty strings"),
        ("[allow]\nusers = ['a']\n", "p.toml:1: allow must be a list of [[allow]] tables"),
        ("[[allow]]\nuser = ['a']\n", "p.toml:2: unknown key 'user' in an [[allow]] entry"),
    ],
)  # fmt: skip
def test_a_bad_policy_file_is_named_with_its_line_and_reason(text, error):
    with pytest.raises(ConfigError) as bad:
        parse_policy(text, "p.toml")
    assert bad.value.message.startswith(error), bad.value.message


def test_an_empty_policy_file_changes_nothing():
    assert parse_policy("# nothing yet\n", "p.toml") == PolicyFile()
    assert default_policy(policy_file=PolicyFile()) == default_policy()


def test_containers_limits_read_as_the_engine_takes_them():
    text = 'max_streams = 2\n\n[containers]\nmemory = "256M"\ncpus = 0.5\npids = 64\n'
    limits = parse_policy(text, "p.toml").containers
    assert (limits.memory, limits.cpus, limits.pids) == (256 << 20, 0.5, 64)
    assert parse_policy('[containers]\nmemory = "1g"\n', "p.toml").containers.memory == 1 << 30
    assert parse_policy("[containers]\nmemory = 67108864\n", "p.toml").containers.memory == 64 << 20
    assert default_policy(policy_file=parse_policy(text, "p.toml")).describe()["containers"] == {
        "memory": 256 << 20,
        "cpus": 0.5,
        "pids": 64,
    }
    assert "containers" not in default_policy().describe()  # unset: no limit, and nothing said


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('max_streams = 2\n[containers]\nmemory = "lots"\n',
         'p.toml:3: memory must be bytes or a size such as "256M", not \'lots\''),
        ("[containers]\nmemory = 1024\n", "p.toml:2: memory must be at least 6M (the engine's floor)"),
        ("[containers]\n\ncpus = -1\n", "p.toml:3: cpus must be a number, such as 0.5 (0: no limit), not -1"),
        ("[containers]\npids = true\n", "p.toml:2: pids must be a whole number (0: no limit), not True"),
        ("[containers]\nswap = 1\n", "p.toml:2: unknown key 'swap' in [containers] (known: cpus, memory"),
        ("containers = 4\n", "p.toml:1: containers must be a table: [containers]"),
    ],
)  # fmt: skip
def test_a_bad_containers_table_is_named_with_its_line_and_reason(text, error):
    with pytest.raises(ConfigError) as bad:
        parse_policy(text, "p.toml")
    assert bad.value.message.startswith(error), bad.value.message
