"""Who may open a proxy to what: the gateway's target policy and what each identity is granted.

An inbound proxy is a way into the facility network, so it opens only to the targets the operator
allows (`--allow-targets`, the policy file), by default the networks directly attached to the
gateway's own interfaces. Loopback and link-local addresses (the gateway itself, a cloud's
metadata service) and the gateway's own addresses (whatever its interfaces have when the request
comes) are reached only when a rule names them on purpose, never through a broad network such as
0.0.0.0/0 or an attached network; the gateway's own control port, metrics port and port range are
never reached at all.

With authentication on, the operator may also say who may use the gateway (`--allow-users`,
`--allow-groups`, `[[allow]]` entries of the policy file) and give each identity or Globus group
its own targets and quotas.

Pure: no sockets, no files. The shell reads the policy file and the interface addresses (these
again for every request: an address added later is the gateway's too) and passes them in; the
gateway turns a refusal into a FORBIDDEN reply.

Target syntax, one spec or several separated by commas:

    10.0.1.0/24             every port of a network (a bare address is a /32 or /128)
    10.0.1.5:5001           one port
    10.0.1.0/24:5000-5100   a range of ports, both ends included
    fd00::/64               IPv6: every port
    [fd00::/64]:5001-5010   IPv6 with ports: the network in brackets, as in [::1]:5000
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ..errors import ConfigError, Forbidden
from ..protocol import Limits, format_rate, hostport

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
HOW_TO_ALLOW = "its operator allows targets with --allow-targets CIDR[:PORT[-PORT]]"

_PORTS = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")


# --- targets -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetRule:
    """One allowed network, with every port or a range of them."""

    network: IPNetwork
    ports: tuple[int, int] | None = None  # both ends included; None = every port

    def __str__(self) -> str:
        if self.ports is None:
            return str(self.network)
        first, last = self.ports
        shown = str(first) if first == last else f"{first}-{last}"
        return f"[{self.network}]:{shown}" if self.network.version == 6 else f"{self.network}:{shown}"

    def covers(self, ip: IPAddress, port: int) -> bool:
        if ip.version != self.network.version or ip not in self.network:
            return False
        return self.ports is None or self.ports[0] <= port <= self.ports[1]

    @property
    def special(self) -> str | None:
        """ "loopback" or "link-local" when the whole network lies inside one: named on purpose."""
        for kind, nets in (("loopback", LOOPBACK), ("link-local", LINK_LOCAL)):
            if any(_inside(self.network, net) for net in nets):
                return kind
        return None

    def reaches(self, ip: IPAddress, port: int, kind: str | None) -> bool:
        """Covers ip:port, and names it on purpose where its `kind` (_kind) asks for that: a
        loopback or link-local network of its own, or the one address of the gateway itself."""
        if not self.covers(ip, port):
            return False
        if kind == OWN_ADDRESS:
            return self.network.num_addresses == 1
        return kind is None or self.special == kind


def _inside(inner: IPNetwork, outer: IPNetwork) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


# The default sources of plain entries on loopback: this host, whatever it connects from.
LOOPBACK_SOURCES = tuple(TargetRule(net) for net in LOOPBACK)


def parse_target(spec: str) -> TargetRule:
    """`10.0.1.0/24:5000-5100`, `[fd00::/64]:5001`, ...; ValueError with the reason."""
    text = spec.strip()
    if not text:
        raise ValueError("an empty target")
    ports: tuple[int, int] | None = None
    if text.startswith("["):
        network, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError(f"{spec!r} opens a bracket it does not close")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{spec!r}: after ']' comes ':PORT' or ':PORT-PORT'")
            ports = _parse_ports(rest[1:], spec)
    elif text.count(":") == 1:  # IPv4 with ports; IPv6 has two colons at least
        network, _, rest = text.partition(":")
        ports = _parse_ports(rest, spec)
    else:
        network = text
    if "%" in network:
        raise ValueError(f"{spec!r}: zone ids (%eth0) are not allowed")
    try:
        net = ipaddress.ip_network(network, strict=False)
    except ValueError:
        hint = "; IPv6 with ports goes in brackets: [fd00::/64]:5001" if text.count(":") > 1 else ""
        raise ValueError(f"{spec!r} is not a network (CIDR) or address{hint}") from None
    if _inside(net, _MAPPED):  # targets are compared as the IPv4 addresses they carry
        raise ValueError(f"{spec!r}: write IPv4-mapped networks as IPv4")
    return TargetRule(net, ports)


def _parse_ports(text: str, spec: str) -> tuple[int, int]:
    match = _PORTS.fullmatch(text)
    if not match:
        raise ValueError(f"{spec!r}: ports are PORT or PORT-PORT, not {text!r}")
    first = int(match.group(1))
    last = int(match.group(2) or first)
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"{spec!r}: ports go from 1 to 65535, the first no higher than the last")
    return first, last


def parse_targets(values: Iterable[str], option: str) -> tuple[TargetRule, ...]:
    """Specs from a repeatable option, each value possibly a comma-separated list."""
    rules = []
    for value in values:
        for spec in value.split(","):
            try:
                rules.append(parse_target(spec))
            except ValueError as exc:
                raise ConfigError(f"{option}: {exc}") from None
    return tuple(rules)


def attached_networks(interfaces: Iterable[tuple[str, str | None]]) -> tuple[TargetRule, ...]:
    """The default targets: networks of the (address, netmask) pairs of this gateway's interfaces,
    but never loopback, link-local, multicast or unspecified ones."""
    rules: list[TargetRule] = []
    for address, netmask in interfaces:
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            continue  # a MAC address, among psutil's entries
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            continue
        prefix = _prefix_length(netmask, ip.max_prefixlen)
        rule = TargetRule(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
        if rule not in rules:
            rules.append(rule)
    return tuple(rules)


def _prefix_length(netmask: str | None, full: int) -> int:
    if not netmask:
        return full
    try:
        bits = int(ipaddress.ip_address(netmask))
    except ValueError:
        return full
    return bin(bits).count("1")


def interface_addresses(interfaces: Iterable[tuple[str, str | None]]) -> frozenset[IPAddress]:
    """Every IP address of the (address, netmask) pairs psutil reports, zone ids dropped."""
    found = set()
    for address, _ in interfaces:
        try:
            found.add(normalised(address.split("%")[0]))
        except ValueError:
            continue  # a MAC address
    return frozenset(found)


def normalised(ip: str | IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:127.0.0.1) is the IPv4 address it carries."""
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


OWN_ADDRESS = "this gateway's own address"


def _kind(ip: IPAddress, own: Own) -> str | None:
    """What a rule must name on purpose to reach `ip`; None: any rule that covers it will do."""
    if any(ip.version == net.version and ip in net for net in LOOPBACK):
        return "loopback"
    # Before link-local: an own link-local address is the gateway too, and needs its own name.
    if ip in own.addresses:
        return OWN_ADDRESS
    if any(ip.version == net.version and ip in net for net in LINK_LOCAL):
        return "link-local"
    return None


@dataclass(frozen=True)
class Own:
    """The gateway itself: no stream may reach these ports on any of its addresses, and its other
    ports only where a rule names the address.

    `addresses`: those it was told at start (--listener-ip, --bind-ip, --control-ip: behind NAT,
    an address of no interface); `at` adds those its interfaces have when a request comes."""

    addresses: frozenset[IPAddress]
    control_port: int
    port_range: tuple[int, int]
    metrics_port: int | None = None

    def at(self, interfaces: frozenset[IPAddress]) -> Own:
        return replace(self, addresses=self.addresses | interfaces)

    def refusal(self, ip: IPAddress, port: int, what: str) -> str | None:
        """`what`: "target 10.0.1.1:5000", say."""
        if not (ip in self.addresses or ip.is_loopback or ip.is_unspecified):
            return None
        first, last = self.port_range
        if port == self.control_port:
            return f"{what} is this gateway's own control port; no policy allows it"
        if port == self.metrics_port:
            return f"{what} is this gateway's own metrics port; no policy allows it"
        if first <= port <= last:
            return f"{what} is in this gateway's own port range {first}-{last}; no policy allows it"
        return None

    @property
    def never(self) -> list[str]:
        """The ports no stream reaches on any of its addresses, for `info` and the start-up output."""
        first, last = self.port_range
        metrics = [f"metrics port {self.metrics_port}"] if self.metrics_port else []
        return [f"control port {self.control_port}", *metrics, f"ports {first}-{last}"]


def target_refusal(
    rules: Sequence[TargetRule],
    own: Own,
    ip: str,
    port: int,
    whom: str = "",
    how: str = HOW_TO_ALLOW,
    noun: str = "target",
    option: str = "--allow-targets",
) -> str | None:
    """None when `rules` allow ip:port, else the one line that says why not and what to do.
    `own`: with the addresses the interfaces have now (Own.at)."""
    addr = normalised(ip)
    shown = hostport(str(addr), port)
    if addr.is_unspecified:
        return f"{noun} {shown} is not the address of a host"
    refused = own.refusal(addr, port, f"{noun} {shown}")
    if refused:
        return refused
    kind = _kind(addr, own)
    if any(rule.reaches(addr, port, kind) for rule in rules):
        return None
    if kind == OWN_ADDRESS:
        named = TargetRule(ipaddress.ip_network(addr), (port, port))
        how = f"its operator allows it only with a rule that names the address, such as {option} {named}"
    what = f" ({kind})" if kind else ""
    for_whom = f" for {whom}" if whom else ""
    return f"{noun} {shown}{what} is not allowed{for_whom} on this gateway; {how}"


# --- identities and what they are granted -------------------------------------------------------


class Who(Protocol):
    """An authenticated caller (scistream.s2cs.auth.Identity)."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def groups(self) -> frozenset[str] | None:
        """Its Globus group ids; None when they could not be looked up."""
        ...


@dataclass(frozen=True)
class Quota:
    """The most an identity may use at once on this gateway; None = no limit of its own."""

    max_streams: int | None = None
    max_rate: int | None = None  # kb/s; 0 = unlimited
    max_num_conn: int | None = None
    max_ports: int | None = None  # listener ports of all its streams together

    def overridden(self, others: Sequence[Quota]) -> Quota:
        """This quota with what `others` set instead; where several set a limit, the highest."""
        return Quota(
            _highest(self.max_streams, [o.max_streams for o in others]),
            _highest(self.max_rate, [o.max_rate for o in others], zero_is_unlimited=True),
            _highest(self.max_num_conn, [o.max_num_conn for o in others]),
            _highest(self.max_ports, [o.max_ports for o in others]),
        )

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class ContainerLimits:
    """What each proxy or shaper container may use (`[containers]` of the policy file), for
    `--runtime docker` and `swarm`; None = the runtime's default (containers.DEFAULT_LIMITS),
    0 = no limit."""

    memory: int | None = None  # bytes
    cpus: float | None = None
    pids: int | None = None

    def as_dict(self) -> dict[str, int | float]:
        return {k: v for k, v in vars(self).items() if v is not None}


def _highest(base: int | None, values: list[int | None], zero_is_unlimited: bool = False) -> int | None:
    given = [v for v in values if v is not None]
    if not given:
        return base
    if zero_is_unlimited and 0 in given:
        return 0
    return max(given)


@dataclass(frozen=True)
class Allow:
    """One `[[allow]]` entry of a policy file: whom it names and what it grants them."""

    users: frozenset[str] = frozenset()  # identity ids or usernames, lower case
    groups: frozenset[str] = frozenset()  # Globus group ids, lower case
    targets: tuple[TargetRule, ...] = ()
    quota: Quota = Quota()
    admin: bool = False

    def names(self, who: Who) -> bool:
        return _named(who, self.users, self.groups)


def _named(who: Who, users: frozenset[str], groups: frozenset[str]) -> bool:
    if who.id.lower() in users or who.name.lower() in users:
        return True
    return bool(groups & {g.lower() for g in who.groups or ()})


@dataclass(frozen=True)
class Grant:
    """What one caller may do here, after the policy has been applied to it."""

    whom: str  # "alice@example.org", or "" with authentication off
    targets: tuple[TargetRule, ...]
    quota: Quota
    admin: bool = False


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""

    def enforce(self) -> None:
        if not self.allowed:
            raise Forbidden(self.reason)


ALLOWED = Verdict(True)


def _verdict(reason: str | None) -> Verdict:
    return ALLOWED if reason is None else Verdict(False, reason)


@dataclass(frozen=True)
class Policy:
    """Everything the operator decided: the command-line options and the policy file together."""

    own: Own
    targets: tuple[TargetRule, ...]  # for everybody
    default_targets: bool = False  # True: the attached networks, as no option or file named any
    peers: tuple[TargetRule, ...] | None = None  # remote listeners outbound proxies may reach; None = any
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    quota: Quota = Quota()
    allows: tuple[Allow, ...] = ()
    containers: ContainerLimits = ContainerLimits()
    # Who may send to the plain entries of outbound proxies (s2cs --allow-sources): networks only.
    sources: tuple[TargetRule, ...] = LOOPBACK_SOURCES
    default_sources: bool = True  # True: the networks of the entry addresses, as nothing named any

    @property
    def restricts_identities(self) -> bool:
        return bool(self.users or self.groups or self.allows)

    @property
    def needs_groups(self) -> bool:
        return bool(self.groups or any(a.groups for a in self.allows))

    def grant(self, who: Who | None) -> Grant:
        """What `who` may do; None is the caller of a server without authentication."""
        if who is None:
            return Grant("", self.targets, self.quota)
        named = [a for a in self.allows if a.names(who)]
        if self.restricts_identities and not named and not _named(who, self.users, self.groups):
            reason = "not in --allow-users, --allow-groups or the policy file"
            if who.groups is None and self.needs_groups:
                reason += " (its Globus groups could not be looked up; try again later)"
            raise Forbidden(f"{who.name} ({who.id}) may not use this gateway: {reason}")
        targets = self.targets + tuple(t for a in named for t in a.targets)
        return Grant(
            who.name, targets, self.quota.overridden([a.quota for a in named]), any(a.admin for a in named)
        )

    def target(self, grant: Grant, ip: str, port: int, interfaces: frozenset[IPAddress]) -> Verdict:
        """`interfaces`: the addresses this host's interfaces have now (read for each request)."""
        how = HOW_TO_ALLOW + (" or in the policy file" if self.allows else "")
        own = self.own.at(interfaces)
        return _verdict(target_refusal(grant.targets, own, ip, port, grant.whom, how))

    def peer(self, ip: str, port: int, interfaces: frozenset[IPAddress]) -> Verdict:
        """Without --allow-peers, any: the remote listener proves itself with the stream's
        certificate. With them, the rules of targets, the gateway's own addresses included."""
        if self.peers is None:
            return ALLOWED
        how = "its operator allows remote listeners with --allow-peers CIDR[:PORT[-PORT]]"
        own = self.own.at(interfaces)
        return _verdict(
            target_refusal(self.peers, own, ip, port, how=how, noun="remote listener", option="--allow-peers")
        )

    def describe(self) -> dict[str, Any]:
        """For `info` and the start-up output; names no identity."""
        return {
            "targets": [str(t) for t in self.targets],
            "targets_default": self.default_targets,
            "peers": None if self.peers is None else [str(p) for p in self.peers],
            "never": self.own.never,
            "identities": "listed" if self.restricts_identities else "any",
            "quota": self.quota.as_dict(),
            "sources": [str(s) for s in self.sources],
            # Only where set: what each proxy's container may use, with --runtime docker.
            **({"containers": self.containers.as_dict()} if self.containers.as_dict() else {}),
        }


def limits_verdict(grant: Grant, limits: Limits) -> Verdict:
    quota, whom = grant.quota, grant.whom or "a stream"
    if quota.max_rate not in (None, 0) and (limits.rate == 0 or limits.rate > quota.max_rate):
        asked = (
            "rate 0 (unlimited)"
            if limits.rate == 0
            else f"rate {limits.rate} kb/s ({format_rate(limits.rate)})"
        )
        return Verdict(
            False,
            f"{asked} is above the {quota.max_rate} kb/s ({format_rate(quota.max_rate)}) {whom} may use "
            f"on this gateway; ask for --rate {quota.max_rate} or less",
        )
    if quota.max_num_conn is not None and limits.num_conn > quota.max_num_conn:
        return Verdict(
            False,
            f"num_conn {limits.num_conn} is above the {quota.max_num_conn} {whom} may use on this gateway; "
            f"ask for --num_conn {quota.max_num_conn} or less",
        )
    return ALLOWED


def streams_verdict(grant: Grant, owned: int) -> Verdict:
    """`owned`: the streams (inbound or outbound proxies) the caller has here already."""
    most = grant.quota.max_streams
    if most is None or owned < most:
        return ALLOWED
    whom = grant.whom or "everybody together"
    return Verdict(
        False,
        f"{whom} may have at most {most} stream(s) at once on this gateway and has {owned}; "
        "release one first (s2uc release UID)",
    )


def ports_verdict(grant: Grant, held: int, wanted: int) -> Verdict:
    """`held`: the listener ports of the caller's streams here already; `wanted`: the new one's."""
    most = grant.quota.max_ports
    if most is None or held + wanted <= most:
        return ALLOWED
    whom = grant.whom or "everybody together"
    limit = f"{whom} may hold at most {most} listener port(s) at once on this gateway (max_ports)"
    if wanted > most:
        return Verdict(False, f"{limit}; this stream needs {wanted}: ask for {most} port(s) or fewer")
    return Verdict(
        False,
        f"{limit} and holds {held}; this stream needs {wanted} more: release a stream first "
        "(s2uc release UID)",
    )


# --- the policy file -------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyFile:
    """What a `--policy` file holds. Unset top-level keys are None: the options decide then."""

    targets: tuple[TargetRule, ...] | None = None
    peers: tuple[TargetRule, ...] | None = None
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    quota: Quota = Quota()
    allows: tuple[Allow, ...] = field(default_factory=tuple)
    containers: ContainerLimits = ContainerLimits()
    sources: tuple[TargetRule, ...] | None = None


_QUOTA_KEYS = ("max_streams", "max_rate", "max_num_conn", "max_ports")
_TOP_KEYS = {"targets", "peers", "users", "groups", *_QUOTA_KEYS, "allow", "containers", "sources"}
_CONTAINER_KEYS = {"memory", "cpus", "pids"}
_CONTAINERS = -1  # the entry number _Invalid and _line_of give the [containers] table
_ALLOW_KEYS = {"users", "groups", "targets", "admin", *_QUOTA_KEYS}


class _Invalid(Exception):
    def __init__(self, reason: str, key: str | None = None, entry: int | None = None) -> None:
        super().__init__(reason)
        self.reason, self.key, self.entry = reason, key, entry


def parse_policy(text: str, path: str) -> PolicyFile:
    """The policy file's model; ConfigError `PATH:LINE: reason` when it is not valid."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(match.group(1)) if match else max(1, len(text.splitlines()))  # at its end
        reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(exc))
        raise ConfigError(f"{path}:{line}: {reason} (not valid TOML)") from None
    try:
        return _policy(data)
    except _Invalid as exc:
        line = _line_of(text, exc.key, exc.entry)
        raise ConfigError(f"{path}:{line}: {exc.reason}") from None


def _policy(data: Mapping[str, Any]) -> PolicyFile:
    _known(data, _TOP_KEYS, None)
    allows = data.get("allow", [])
    if not isinstance(allows, list) or not all(isinstance(a, dict) for a in allows):
        raise _Invalid("allow must be a list of [[allow]] tables", "allow")
    return PolicyFile(
        targets=_targets(data, "targets", None) if "targets" in data else None,
        peers=_targets(data, "peers", None) if "peers" in data else None,
        users=_users(data, None),
        groups=_groups(data, None),
        quota=_quota(data, None),
        allows=tuple(_allow(entry, i) for i, entry in enumerate(allows)),
        containers=_containers(data.get("containers", {})),
        sources=_sources(data) if "sources" in data else None,
    )


def _sources(data: Mapping[str, Any]) -> tuple[TargetRule, ...]:
    rules = _targets(data, "sources", None)
    if not rules:
        raise _Invalid(
            "sources = [] would refuse every instrument: name a network, or leave it out", "sources"
        )
    for rule in rules:
        if rule.ports is not None:
            raise _Invalid(f"sources: {rule} names ports; a source is a network (CIDR) only", "sources")
    return rules


_SIZE = re.compile(r"(\d+)\s*([kmg]?)i?b?", re.IGNORECASE)


def _containers(table: Any) -> ContainerLimits:
    if not isinstance(table, dict):
        raise _Invalid("containers must be a table: [containers]", "containers")
    for key in table:
        if key not in _CONTAINER_KEYS:
            known = ", ".join(sorted(_CONTAINER_KEYS))
            raise _Invalid(f"unknown key {key!r} in [containers] (known: {known})", key, _CONTAINERS)
    memory, cpus, pids = table.get("memory"), table.get("cpus"), table.get("pids")
    if memory is not None:
        found = _SIZE.fullmatch(memory.strip()) if isinstance(memory, str) else None
        if isinstance(memory, bool) or not (isinstance(memory, int) or found):
            raise _Invalid(
                f'memory must be bytes or a size such as "256M", not {memory!r}', "memory", _CONTAINERS
            )
        if found:
            memory = int(found.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[found.group(2).lower()]
        if 0 < memory < 6 << 20:
            raise _Invalid(
                f"memory must be at least 6M (the engine's floor) or 0 (no limit), not {memory} bytes",
                "memory",
                _CONTAINERS,
            )
    if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, int | float) or cpus < 0):
        raise _Invalid(f"cpus must be a number, such as 0.5 (0: no limit), not {cpus!r}", "cpus", _CONTAINERS)
    if pids is not None and (isinstance(pids, bool) or not isinstance(pids, int) or pids < 0):
        raise _Invalid(f"pids must be a whole number (0: no limit), not {pids!r}", "pids", _CONTAINERS)
    return ContainerLimits(memory, None if cpus is None else float(cpus), pids)


def _allow(entry: Mapping[str, Any], index: int) -> Allow:
    _known(entry, _ALLOW_KEYS, index)
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise _Invalid(f"admin must be true or false, not {admin!r}", "admin", index)
    allow = Allow(
        users=_users(entry, index),
        groups=_groups(entry, index),
        targets=_targets(entry, "targets", index) if "targets" in entry else (),
        quota=_quota(entry, index),
        admin=admin,
    )
    if not (allow.users or allow.groups):
        raise _Invalid("an [[allow]] entry names nobody: give it users or groups", None, index)
    return allow


def _known(table: Mapping[str, Any], known: set[str], entry: int | None) -> None:
    for key in table:
        if key not in known:
            where = "an [[allow]] entry" if entry is not None else "the top level"
            raise _Invalid(f"unknown key {key!r} in {where} (known: {', '.join(sorted(known))})", key, entry)


def _strings(table: Mapping[str, Any], key: str, entry: int | None) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _Invalid(f"{key} must be a list of non-empty strings", key, entry)
    return [v.strip() for v in value]


def _targets(table: Mapping[str, Any], key: str, entry: int | None) -> tuple[TargetRule, ...]:
    try:
        return tuple(parse_target(spec) for spec in _strings(table, key, entry))
    except ValueError as exc:
        raise _Invalid(f"{key}: {exc}", key, entry) from None


def _users(table: Mapping[str, Any], entry: int | None) -> frozenset[str]:
    return frozenset(u.lower() for u in _strings(table, "users", entry))


def _groups(table: Mapping[str, Any], entry: int | None) -> frozenset[str]:
    try:
        return parse_groups(_strings(table, "groups", entry))
    except ValueError as exc:
        raise _Invalid(f"groups: {exc}", "groups", entry) from None


def parse_groups(values: Iterable[str]) -> frozenset[str]:
    """Globus group ids (UUIDs), lower case; ValueError naming the first that is not one."""
    groups = set()
    for value in values:
        try:
            groups.add(str(uuid.UUID(value.strip())))
        except ValueError:
            raise ValueError(f"{value.strip()!r} is not a Globus group id (a UUID)") from None
    return frozenset(groups)


def _quota(table: Mapping[str, Any], entry: int | None) -> Quota:
    values: dict[str, int | None] = {}
    for key in _QUOTA_KEYS:
        value = table.get(key)
        if value is not None:
            low = 0 if key == "max_rate" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                unlimited = " (0 = unlimited)" if key == "max_rate" else ""
                raise _Invalid(
                    f"{key} must be a whole number of at least {low}{unlimited}, not {value!r}", key, entry
                )
        values[key] = value
    return Quota(**values)


_HEADER = re.compile(r"\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?")
_KEY = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=")


def _line_of(text: str, key: str | None, entry: int | None) -> int:
    """Where `key` is set, at the top level (entry None) or in the entry-th [[allow]] table;
    the table's header when the key is not found, line 1 for the top level."""
    table: int | None = None  # None: the top level
    seen = -1
    header = 1
    for number, line in enumerate(text.splitlines(), 1):
        match = _HEADER.match(line)
        if match and not _KEY.match(line):
            if match.group(1) == "[[" and match.group(2) == "allow":
                seen += 1
                table = seen
            elif match.group(2) == "containers":
                table = _CONTAINERS
            else:
                table = -2  # another table: none that holds policy keys
            if table == entry:
                header = number
            continue
        if table == entry and key is not None:
            found = _KEY.match(line)
            if found and found.group(1) == key:
                return number
    return header


def build_policy(
    own: Own,
    interfaces: Iterable[tuple[str, str | None]],
    allow_targets: Sequence[str] = (),
    allow_peers: Sequence[str] = (),
    allow_users: Sequence[str] = (),
    allow_groups: Sequence[str] = (),
    policy_file: PolicyFile | None = None,
    allow_sources: Sequence[str] = (),
    entry_networks: Sequence[TargetRule] = LOOPBACK_SOURCES,
) -> Policy:
    """The options and the file together: what both name is allowed; the defaults fill the rest."""
    file = policy_file or PolicyFile()
    targets = parse_targets(allow_targets, "--allow-targets")
    peers = parse_targets(allow_peers, "--allow-peers")
    default = not allow_targets and file.targets is None
    if default:
        targets = attached_networks(interfaces)
    else:
        targets += file.targets or ()
    if allow_peers or file.peers is not None:
        all_peers: tuple[TargetRule, ...] | None = peers + (file.peers or ())
    else:
        all_peers = None
    users = frozenset(u.strip().lower() for value in allow_users for u in value.split(",") if u.strip())
    try:
        groups = parse_groups(g for value in allow_groups for g in value.split(",") if g.strip())
    except ValueError as exc:
        raise ConfigError(f"--allow-groups: {exc}") from None
    return Policy(
        own=own,
        targets=targets,
        default_targets=default,
        peers=all_peers,
        users=users | file.users,
        groups=groups | file.groups,
        quota=file.quota,
        allows=file.allows,
        containers=file.containers,
        **_sources_of(allow_sources, file, entry_networks),
    )


def _sources_of(
    allow_sources: Sequence[str], file: PolicyFile, entry_networks: Sequence[TargetRule]
) -> dict[str, Any]:
    """Who may send to plain entries: what --allow-sources and the file's `sources` name
    together, else the networks of the entry addresses."""
    named = parse_targets(allow_sources, "--allow-sources")
    for rule in named:
        if rule.ports is not None:
            raise ConfigError(f"--allow-sources: {rule} names ports; a source is a network (CIDR) only")
    if not named and file.sources is None:
        return {"sources": tuple(entry_networks), "default_sources": True}
    return {"sources": named + (file.sources or ()), "default_sources": False}


def entry_networks(
    entries: Iterable[str], interfaces: Iterable[tuple[str, str | None]]
) -> tuple[TargetRule, ...]:
    """The default sources: the networks of the entry addresses, as their interfaces have them
    (an address without a netmask is a network of its own); for loopback, 127.0.0.0/8 and ::1."""
    masks: dict[IPAddress, str | None] = {}
    for address, netmask in interfaces:
        try:
            masks.setdefault(ipaddress.ip_address(address.split("%")[0]), netmask)
        except ValueError:
            continue  # a MAC address, among psutil's entries
    rules: list[TargetRule] = []
    for entry in entries:
        ip = normalised(entry)
        if ip.is_loopback:
            found = LOOPBACK_SOURCES
        else:
            prefix = _prefix_length(masks.get(ip), ip.max_prefixlen)
            found = (TargetRule(ipaddress.ip_network(f"{ip}/{prefix}", strict=False)),)
        rules += [rule for rule in found if rule not in rules]
    return tuple(rules)
