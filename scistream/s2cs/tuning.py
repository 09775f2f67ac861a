"""`s2cs --check`'s look at the host as a data transfer node for wide-area streams.

Pure: the verdicts over values read elsewhere (examine.py reads /proc/sys and the descriptor
limit). The reference is ESnet's fasterdata host-tuning guide (https://fasterdata.es.net/host-
tuning/linux/): socket buffers that hold a path's window (its rate x its round-trip time), a
congestion control made for long fast paths (BBR or H-TCP), fair queueing (fq) to pace each
connection's packets. None of these stops a stream, so each is at worst a WARN, with the sysctl
that sets it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import ConfigError
from .doctor import Check, Status

# Congestion controls that fasterdata recommends for long, fast paths. After a loss at 10 Gbit/s
# over 50 ms, reno takes minutes to regain its rate and cubic about half a minute; htcp grows
# faster a second after the loss, and bbr paces by the rate it measures rather than by losses.
FOR_LONG_PATHS = ("bbr", "htcp")
# Descriptors s2cs holds whatever its streams: its state files, lock, logs, the metrics listener,
# the interpreter's own.
OWN_FILES = 64
LOGS_PER_STREAM = 2  # the proxy's and the shaper's log, open in s2cs as long as they run
SERVICE_UNIT_FILES = 65536  # LimitNOFILE of the shipped service unit (containers/s2cs.service)
NO_PATH_RTT = 0.1  # the round trip the buffers are described for when no path is given


@dataclass(frozen=True)
class NetworkPath:
    """The wide-area path streams are to fill: `--path-rate` and `--path-rtt`."""

    rate: float  # bit/s
    rtt: float  # seconds

    @property
    def window(self) -> int:
        """Bytes in flight that keep the path full: its bandwidth-delay product."""
        return math.ceil(round(self.rate / 8 * self.rtt, 3))  # 10G x 50ms is 62500000, not one more

    def describe(self) -> str:
        return f"a {bit_rate(self.rate)} path of {self.rtt * 1000:g} ms"


@dataclass(frozen=True)
class HostTuning:
    """What this host shows; None where it does not (another network namespace hides some)."""

    rmem_max: int | None  # net.core.rmem_max: the most a program may ask with SO_RCVBUF
    wmem_max: int | None  # net.core.wmem_max
    tcp_rmem: tuple[int, int, int] | None  # net.ipv4.tcp_rmem: autotuning's min, default, max
    tcp_wmem: tuple[int, int, int] | None  # net.ipv4.tcp_wmem
    congestion_control: str | None  # net.ipv4.tcp_congestion_control
    available_congestion_control: tuple[str, ...]  # those loaded (tcp_available_congestion_control)
    default_qdisc: str | None  # net.core.default_qdisc
    open_files: int | None  # the hard RLIMIT_NOFILE, which s2cs raises its soft limit to
    nr_open: int | None  # fs.nr_open: the most a hard limit may be raised to


# --- the options ---------------------------------------------------------------------------------

_RTT = re.compile(r"(\d+(?:\.\d+)?)\s*(us|ms|s)", re.IGNORECASE)
_RTT_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
# Case matters in the suffix: 10GB would be bytes.
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT])(?:bit/s|bps|b)?")
_RATE_UNITS = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_rtt(text: str) -> float:
    """'50ms' -> 0.05 (seconds); us, ms or s."""
    match = _RTT.fullmatch(text.strip())
    seconds = float(match[1]) * _RTT_UNITS[match[2].lower()] if match else 0.0
    if not 0 < seconds <= 10:
        raise ConfigError(
            f"--path-rtt {text!r}: give the path's round-trip time with its unit, such as 50ms or "
            "0.2s (at most 10s)"
        )
    return seconds


def parse_rate(text: str) -> float:
    """'10G' -> 1e10 (bit/s); k, M, G or T, decimal, optionally followed by bit/s or bps."""
    match = _RATE.fullmatch(text.strip())
    rate = float(match[1]) * _RATE_UNITS[match[2].lower()] if match else 0.0
    if rate <= 0:
        raise ConfigError(
            f"--path-rate {text!r}: give the rate streams should reach on the path in bits per "
            "second, with its unit, such as 10G or 400M"
        )
    return rate


def path_of(rtt: str | None, rate: str | None) -> NetworkPath | None:
    if rtt is None and rate is None:
        return None
    if rtt is None or rate is None:
        raise ConfigError(
            "give --path-rtt and --path-rate together: the window a path needs is its rate times "
            "its round-trip time"
        )
    return NetworkPath(rate=parse_rate(rate), rtt=parse_rtt(rtt))


# --- units -----------------------------------------------------------------------------------------


def size(n: int) -> str:
    """67108864 -> '64 MiB', 62500000 -> '59.6 MiB', 212992 -> '208 KiB'."""
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f}".removesuffix(".0") + " MiB"
    return f"{n / 1024:.1f}".removesuffix(".0") + " KiB"


def bit_rate(bits: float) -> str:
    """1e10 -> '10 Gbit/s', 5.03e8 -> '503 Mbit/s'."""
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}"
    return f"{bits:.3g} bit/s"


def _power_of_two(n: int) -> int:
    """The buffer limit to set for a window of `n` bytes: the next power of two, at least 1 MiB
    (fasterdata's figures are powers of two; a little more than the window costs nothing until a
    connection uses it)."""
    return max(1 << 20, 1 << (n - 1).bit_length())


# --- the verdicts ----------------------------------------------------------------------------------


def checks(host: HostTuning, path: NetworkPath | None, ports: int, control_clients: int) -> list[Check]:
    """`ports`: how many the port range holds; `control_clients`: the control connections s2cs
    holds at most at once (server.MAX_CLIENTS)."""
    return [
        buffer_check(
            "receive buffers",
            ("net.core.rmem_max", host.rmem_max),
            ("net.ipv4.tcp_rmem", host.tcp_rmem),
            path,
        ),
        buffer_check(
            "send buffers", ("net.core.wmem_max", host.wmem_max), ("net.ipv4.tcp_wmem", host.tcp_wmem), path
        ),
        congestion_check(host.congestion_control, host.available_congestion_control),
        qdisc_check(host.default_qdisc),
        open_files_check(host.open_files, host.nr_open, ports, control_clients),
    ]


def buffer_check(
    name: str,
    core: tuple[str, int | None],
    autotuning: tuple[str, tuple[int, int, int] | None],
    path: NetworkPath | None,
) -> Check:
    """`core`: the most a program may ask for (SO_RCVBUF, SO_SNDBUF); `autotuning`: how far the
    kernel grows a socket's buffer on its own, which is how the proxies' sockets grow (they set
    no size: docs/performance.md). A connection can have no more than its buffer in flight."""
    (core_name, core_max), (tcp_name, tcp) = core, autotuning
    target = _power_of_two(path.window) if path else 0
    limits: list[tuple[str, int, str]] = []  # what is shown, the limit, the setting that raises it
    if core_max is not None:  # a kernel older than 6.x shows it only in the host's namespace
        limits.append((f"{core_name} {size(core_max)}", core_max, f"{core_name}={target}"))
    if tcp is not None:
        limits.append((f"{tcp_name} max {size(tcp[2])}", tcp[2], f"{tcp_name}='{tcp[0]} {tcp[1]} {target}'"))
    if not limits:
        return Check(name, Status.OK, f"not visible here: {core_name} and {tcp_name} are not in /proc/sys")
    shown = ", ".join(shown for shown, _, _ in limits)
    if path is None:
        carries = bit_rate(limits[-1][1] * 8 / NO_PATH_RTT)  # autotuning's, where it shows
        return Check(
            name,
            Status.OK,
            f"{shown}: at most {carries} per connection over {NO_PATH_RTT * 1000:g} ms; give "
            "--path-rtt and --path-rate to check them against your path",
        )
    window = path.window
    short = [(shown, setting) for shown, limit, setting in limits if limit < window]
    needs = f"the {size(window)} window ({window} bytes) {path.describe()} needs (rate x RTT)"
    if short:
        return Check(
            name,
            Status.WARN,
            f"{' and '.join(s for s, _ in short)} {'are' if len(short) > 1 else 'is'} below {needs}: "
            "one connection cannot fill the path",
            f"sysctl -w {' '.join(s for _, s in short)} (and the same in /etc/sysctl.d/ to keep it)",
        )
    return Check(name, Status.OK, f"{shown}: hold the {size(window)} window {path.describe()} needs")


def congestion_check(algorithm: str | None, available: tuple[str, ...]) -> Check:
    name = "congestion control"
    if algorithm is None:
        return Check(name, Status.OK, "not visible here: net.ipv4.tcp_congestion_control is not in /proc/sys")
    if algorithm in FOR_LONG_PATHS:
        return Check(name, Status.OK, f"{algorithm}: made for long, fast paths")
    choice = next((a for a in FOR_LONG_PATHS if a in available), None)
    fix = (
        f"sysctl -w net.ipv4.tcp_congestion_control={choice}"
        if choice
        else "modprobe tcp_bbr && sysctl -w net.ipv4.tcp_congestion_control=bbr"
    )
    return Check(
        name,
        Status.WARN,
        f"net.ipv4.tcp_congestion_control is {algorithm}: it backs off at each loss and regains "
        "speed slowly on a long, fast path; fasterdata recommends bbr or htcp",
        fix,
    )


def qdisc_check(qdisc: str | None) -> Check:
    name = "queueing"
    if qdisc is None:  # global to the kernel: only the host's first network namespace shows it
        return Check(
            name,
            Status.OK,
            "not visible here: net.core.default_qdisc is set for the whole host (look there)",
        )
    if qdisc == "fq":
        return Check(name, Status.OK, "net.core.default_qdisc fq: each connection's packets are paced")
    return Check(
        name,
        Status.WARN,
        f"net.core.default_qdisc is {qdisc}: without fq's pacing, a fast connection sends bursts "
        "that overflow the shallow buffers of wide-area switches",
        "sysctl -w net.core.default_qdisc=fq (it applies to interfaces set up afterwards: put it in "
        "/etc/sysctl.d/ and reboot, or re-create the qdisc of each interface)",
    )


def open_files_check(limit: int | None, nr_open: int | None, ports: int, control_clients: int) -> Check:
    """The worst case s2cs itself meets: a stream on each port of its range (each takes one at
    least), its control port full. The proxies inherit the same limit; one with the default
    num_conn needs far fewer."""
    name = "open files"
    need = control_clients + LOGS_PER_STREAM * ports + OWN_FILES
    why = (
        f"with a stream on each of the {ports} ports of the range, s2cs holds up to {need} "
        f"({control_clients} control connections, {LOGS_PER_STREAM} logs per stream, {OWN_FILES} of its own)"
    )
    if limit is None or limit >= need:
        shown = "unlimited" if limit is None else str(limit)
        return Check(name, Status.OK, f"{shown} (the hard limit, which s2cs raises its own to): {why}")
    target = max(SERVICE_UNIT_FILES, -(-need // 1024) * 1024)
    fix = (
        f"LimitNOFILE={target} in the service unit, or a nofile limit of {target} for its user "
        "in /etc/security/limits.conf"
    )
    if nr_open is not None and target > nr_open:
        fix = f"sysctl -w fs.nr_open={target}, then " + fix
    return Check(
        name,
        Status.WARN,
        f"the hard limit is {limit} (s2cs raises its own to it), below what it may need: {why}",
        fix,
    )
