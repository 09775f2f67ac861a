"""Experiment: an `htb` class per stream in place of the shaper's hop, in CPU seconds per GB.

`python -m bench.htb_cost [--link veth|lo] [--seconds S] [--rounds N] [--seed N]`, as root in a
private network namespace (scripts/run-isolated): one iperf3 stream through a HAProxy 2.8 TLS 1.3
pair as bench/throughput.py writes it (SciStream's throughput settings), no shaper anywhere, and
for each configuration in turns, in an order shuffled every round: no queueing discipline (the
unlimited path), then an htb class limiting the stream at 40 Gbit/s (above what the machine
reaches), 1 Gbit/s and 100 Mbit/s. The reference, unless `--no-shaper`: the same pair with
today's limit, a shaper in front of the outbound proxy and one behind the inbound proxy over Unix
sockets of 4 MiB, as SciStream renders a limited session, at the same three rates.

Where the classes sit: each direction of a stream leaves one gateway through its wide-area
interface, instrument -> service on the outbound gateway, service -> instrument on the inbound one.
So each gateway has an htb root on that interface's egress, with one class for the stream,
chosen by a u32 filter on the inbound proxy's listener port: destination port on the outbound
gateway, source port on the inbound one. Packets no filter matches are sent unclassified
(htb's direct queue), as the rest of a gateway's traffic would be.

`--link veth` (the default): the outbound gateway (iperf3 client, outbound HAProxy) is this
namespace, the inbound gateway (inbound HAProxy, iperf3 server) a namespace of its own, joined by
a veth pair of MTU 1500 that carries the TLS hop; the plain hops stay on each side's loopback.
`--link lo`: everything on this namespace's loopback (MTU 65536), both classes on `lo`, where
every hop, the plain ones too, passes the htb root (unclassified).

htb counts what it sends on the wire: TLS records, TCP/IP and Ethernet headers. A rate a user
asks for is payload, so the class's rate is the payload rate times the headers' share at the
link's MTU (wire_rate), as `s2cs` would have to set it; `--no-allowance` sets the payload rate
as it is, to see what the headers take.

The CPU of a run, as bench/throughput.py counts it: utime + stime of the path's processes (the
two HAProxy; the shapers too in the reference) from /proc/PID/stat. The kernel's work done in
their context, softirqs included, is in their stime: this kernel accounts CPU time by tick,
without CONFIG_IRQ_TIME_ACCOUNTING. Apart: the `ksoftirqd` threads (softirq work deferred out of
any process: htb's timer-driven sends when a class is over its rate) and the machine's whole
softirq time from /proc/stat, which also holds other programs' and other namespaces' traffic:
an upper bound, not the path's.
"""

from __future__ import annotations

import enum
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from scistream.loopback import free_port
from scistream.s2ds.haproxy import find_binary
from scistream.s2ds.render import default_templates

from .figures import cpu_per_gb, cpu_seconds, round_orders, round_ratios, spread
from .throughput import (
    HERTZ,
    Configuration,
    Run,
    _credentials,
    iperf3,
    processes,
    read_ticks,
    throughput_settings,
)

OUTBOUND_IP, INBOUND_IP = "10.77.0.1", "10.77.0.2"  # the veth pair's two ends, a /30
ETHERNET, TCP_IP = 14, 52  # header bytes per packet: Ethernet; IPv4 + TCP with timestamps
TLS_RECORD, TLS_OVERHEAD = 16384, 22  # TLS 1.3: plaintext bytes per full record, bytes it adds


@dataclass(frozen=True)
class Limit:
    name: str
    bits: int | None  # payload bits per second; None: no queueing discipline at all
    allowance: bool = True  # the class's rate raised by the headers' share (wire_rate)
    shaper: bool = False  # no qdisc: the stream through a shaper on each gateway instead


LIMITS = (
    Limit("unlimited, no qdisc", None),
    Limit("htb 40 Gbit/s", 40_000_000_000),
    Limit("htb 1 Gbit/s", 1_000_000_000),
    Limit("htb 100 Mbit/s", 100_000_000),
)
ABOVE_REACH = 40_000_000_000  # bits/s: a limit no stream reaches here; its accuracy is not shown
SHAPER = Limit("shaper hops, 40 Gbit/s", 40_000_000_000, shaper=True)
SHAPERS = (
    SHAPER,
    Limit("shaper hops, 1 Gbit/s", 1_000_000_000, shaper=True),
    Limit("shaper hops, 100 Mbit/s", 100_000_000, shaper=True),
)
NO_ALLOWANCE = Limit("htb 100 Mbit/s, no allowance", 100_000_000, allowance=False)


@dataclass(frozen=True)
class Egress:
    """Where one direction of the stream is classed: a device, seen from a namespace."""

    device: str
    match: str  # "dport" or "sport": of the inbound proxy's listener
    run: Callable[[list[str]], list[str]]  # the argv, as run in the device's namespace


def wire_rate(payload_bits: int, mtu: int) -> int:
    """The rate of an htb class that lets `payload_bits` of TLS plaintext per second through a
    link of this MTU: htb counts every header, TCP/IP and Ethernet per packet, TLS per record. Pure."""
    segment = mtu - TCP_IP
    return round(
        payload_bits * (segment + TCP_IP + ETHERNET) / segment * (TLS_RECORD + TLS_OVERHEAD) / TLS_RECORD
    )


def htb_commands(device: str, match: str, port: int, bits: int, classid: str, root: bool) -> list[list[str]]:
    """tc commands that put one htb class of `bits` per second on `device`'s egress for the
    packets of this port (with the device's htb root first, if `root`), every other packet sent
    unclassified. The bucket holds 10 ms of the rate, two 64 kB segments at least (loopback and
    veth send 64 kB at once). Pure."""
    burst = str(max(2 * 65536, bits // 8 // 100))
    rate = f"{bits}bit"
    found = [["tc", "qdisc", "add", "dev", device, "root", "handle", "1:", "htb"]] if root else []
    return [
        *found,
        ["tc", "class", "add", "dev", device, "parent", "1:", "classid", classid, "htb", "rate", rate,
         "ceil", rate, "burst", burst, "cburst", burst, "quantum", "60000"],
        ["tc", "filter", "add", "dev", device, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
         "match", "ip", match, str(port), "0xffff", "flowid", classid],
    ]  # fmt: skip


def tc(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def clear(egresses: Sequence[Egress]) -> None:
    for egress in egresses:
        subprocess.run(
            egress.run(["tc", "qdisc", "del", "dev", egress.device, "root"]), capture_output=True, check=False
        )


def apply(limit: Limit, egresses: Sequence[Egress], port: int, mtu: int) -> None:
    clear(egresses)
    if limit.bits is None or limit.shaper:
        return
    bits = wire_rate(limit.bits, mtu) if limit.allowance else limit.bits
    rooted: set[str] = set()  # on loopback both directions' classes share one root
    for number, egress in enumerate(egresses, 10):
        root = egress.device not in rooted
        rooted.add(egress.device)
        for argv in htb_commands(egress.device, egress.match, port, bits, f"1:{number}", root):
            tc(egress.run(argv))


@dataclass(frozen=True)
class Topology:
    inbound_ip: str  # where the inbound proxy listens
    mtu: int
    egresses: tuple[Egress, ...]
    inbound: Callable[[list[str]], list[str]]  # an argv, as run on the inbound gateway


def ip(*args: str) -> None:
    tc(["ip", *args])


@contextmanager
def topology(link: str) -> Iterator[Topology]:
    """The two gateways and the link between them, until the block ends (module docstring)."""
    if link == "lo":
        same = list
        egresses = (Egress("lo", "dport", same), Egress("lo", "sport", same))
        yield Topology("127.0.0.1", 65536, egresses, same)
        return
    # The inbound gateway's namespace lives as long as this process that holds it: the veth pair,
    # its addresses and its queueing discipline end with it.
    holder = subprocess.Popen(["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep 100000"])
    try:
        time.sleep(0.3)

        def there(argv: list[str]) -> list[str]:
            return ["nsenter", "-t", str(holder.pid), "-n", *argv]

        ip("link", "add", "htbv0", "mtu", "1500", "type", "veth", "peer", "name", "htbv1", "mtu", "1500")
        ip("link", "set", "htbv1", "netns", str(holder.pid))
        ip("addr", "add", f"{OUTBOUND_IP}/30", "dev", "htbv0")
        ip("link", "set", "htbv0", "up")
        tc(there(["ip", "addr", "add", f"{INBOUND_IP}/30", "dev", "htbv1"]))
        tc(there(["ip", "link", "set", "htbv1", "up"]))
        egresses = (Egress("htbv0", "dport", list), Egress("htbv1", "sport", there))
        yield Topology(INBOUND_IP, 1500, egresses, there)
    finally:
        subprocess.run(["ip", "link", "del", "htbv0"], capture_output=True, check=False)
        holder.terminate()
        holder.wait(10)


def pair(
    directory: Path, inbound_ip: str, wan: int, service: int, shaped: int | None
) -> tuple[list[list[str]], int]:
    """bench/throughput.py's HAProxy pair, its inbound proxy listening on `inbound_ip`; if
    `shaped` (bits/s), with a shaper in front of the outbound proxy and one behind the inbound
    proxy, as SciStream renders a limited session (Unix sockets of 4 MiB between shaper and
    proxy), both at that rate. The argvs, outbound gateway's first, and the port the iperf3
    client connects to."""
    directory.mkdir()
    pem, crt = _credentials(directory)
    local = free_port()
    settings = throughput_settings((default_templates() / "haproxy.cfg.j2").read_text())
    common = "global\n" + "".join(f"  {line}\n" for line in settings)
    defaults = "defaults\n  mode tcp\n  timeout connect 10s\n  timeout client 1h\n  timeout server 1h\n"
    tls = f"ssl crt {pem} ca-file {crt} verify required ssl-min-ver TLSv1.3"
    entry, target = f"127.0.0.1:{local}", f"127.0.0.1:{service}"
    out_sock, in_sock = directory / "out.sock", directory / "in.sock"
    (directory / "in.cfg").write_text(
        common + ("  tune.sndbuf.server 4194304\n" if shaped else "") + defaults
        + f"frontend f\n  bind {inbound_ip}:{wan} {tls}\n  default_backend b\n"
        f"backend b\n  server s {f'unix@{in_sock}' if shaped else target}\n"
    )  # fmt: skip
    (directory / "out.cfg").write_text(
        common + ("  tune.sndbuf.client 4194304\n" if shaped else "") + defaults
        + f"frontend f\n  bind {f'unix@{out_sock} mode 600' if shaped else entry}\n  default_backend b\n"
        f"backend b\n  server s {inbound_ip}:{wan} {tls} verifyhost scistream-stream\n"
    )  # fmt: skip
    binary = find_binary(None)
    inbound, outbound = ([binary, "-db", "-f", str(directory / f"{n}.cfg")] for n in ("in", "out"))
    if not shaped:
        return [outbound, inbound], local
    shaper = [sys.executable, "-m", "scistream.s2ds.shaper", "--rate", str(shaped // 8)]
    return [
        outbound,
        [*shaper, "--route", entry, str(out_sock)],
        inbound,
        [*shaper, "--route", str(in_sock), target],
    ], local


def softirq_ticks() -> int:
    """The machine's softirq time, every CPU, in clock ticks (/proc/stat)."""
    return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[7])


def ksoftirqd() -> list[int]:
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().startswith("ksoftirqd/"):
                found.append(int(comm.parent.name))
        except OSError:
            continue
    return found


@dataclass(frozen=True)
class Measured:
    run: Run
    ksoftirqd_cpu: float  # CPU seconds of the ksoftirqd threads during the run
    softirq_cpu: float  # the machine's softirq seconds during the run


def measure(config: Configuration, server: int, seconds: int) -> Measured:
    threads = ksoftirqd()
    before, softirq = read_ticks(threads), softirq_ticks()
    run = iperf3(config, server, seconds)
    after, softirq_after = read_ticks(threads), softirq_ticks()
    return Measured(run, cpu_seconds(before, after, HERTZ), (softirq_after - softirq) / HERTZ)


class Link(enum.StrEnum):
    """What carries the TLS hop (--link)."""

    VETH = "veth"
    LO = "lo"


def experiment(
    link: str, seconds: int, rounds: int, seed: int, limits: Sequence[Limit]
) -> dict[str, list[Measured]]:
    with tempfile.TemporaryDirectory(prefix="htb-cost-") as name, ExitStack() as stack:
        directory = Path(name)
        net = stack.enter_context(topology(link))
        stack.callback(clear, net.egresses)
        service, wan = free_port(), free_port()
        server = stack.enter_context(
            processes(net.inbound(["iperf3", "-s", "-p", str(service)]), directory=directory)
        )[0]
        configs = {}
        for limit in limits:
            if limit.shaper or "plain" not in configs:
                key = limit.name if limit.shaper else "plain"
                sub = directory / key.replace(" ", "-").replace(",", "").replace("/", "")
                port = free_port() if limit.shaper else wan
                argvs, local = pair(sub, net.inbound_ip, port, service, limit.bits if limit.shaper else None)
                half = len(argvs) // 2  # the outbound gateway's processes, then the inbound one's
                argvs = argvs[:half] + [net.inbound(argv) for argv in argvs[half:]]
                configs[key] = Configuration(
                    key, local, stack.enter_context(processes(*argvs, directory=sub))
                )
        results: dict[str, list[Measured]] = {limit.name: [] for limit in limits}
        by_name = {limit.name: limit for limit in limits}
        for number, order in enumerate(round_orders(list(by_name), rounds, seed), 1):
            print(f"  round {number}: {', '.join(order)}", flush=True)
            for limit_name in order:
                limit = by_name[limit_name]
                apply(limit, net.egresses, wan, net.mtu)
                results[limit_name].append(
                    measure(configs[limit_name if limit.shaper else "plain"], server, seconds)
                )
        return results


def cell(values: Sequence[float], digits: int = 2) -> str:
    found = spread(values)
    return f"{found.median:.{digits}f} ({found.low:.{digits}f}-{found.high:.{digits}f})"


def show(results: dict[str, list[Measured]], limits: Sequence[Limit]) -> None:
    print(
        f"  {'configuration':30} {'Gbit/s':>20} {'off the limit':>22} {'path CPU s/GB':>18} "
        f"{'ksoftirqd s/GB':>18} {'all softirq s/GB':>18} {'iperf3 s/GB':>18}",
        flush=True,
    )
    for limit in limits:
        runs = results[limit.name]
        gbps = [m.run.gbps for m in runs]
        bits = limit.bits
        off = (
            "-"
            if bits is None or bits >= ABOVE_REACH
            else cell([(g * 1e9 / bits - 1) * 100 for g in gbps], 1) + " %"
        )
        columns = [
            cell(gbps),
            off,
            cell([cpu_per_gb(m.run.path_cpu, m.run.nbytes) for m in runs]),
            cell([cpu_per_gb(m.ksoftirqd_cpu, m.run.nbytes) for m in runs]),
            cell([cpu_per_gb(m.softirq_cpu, m.run.nbytes) for m in runs]),
            cell([cpu_per_gb(m.run.iperf3_cpu, m.run.nbytes) for m in runs]),
        ]
        widths = (20, 22, 18, 18, 18, 18)
        print(
            f"  {limit.name:30} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)),
            flush=True,
        )

    def path(name: str) -> list[float]:
        return [cpu_per_gb(m.run.path_cpu, m.run.nbytes) for m in results[name]]

    print("  path CPU per GB, one ratio per round:", flush=True)
    for limit in LIMITS[1:]:
        print(
            f"  {limit.name} / unlimited: {cell(round_ratios(path(limit.name), path(LIMITS[0].name)))}x",
            flush=True,
        )
    for limit in SHAPERS:
        if limit.name in results:
            unlimited = cell(round_ratios(path(limit.name), path(LIMITS[0].name)))
            print(f"  {limit.name} / unlimited: {unlimited}x", flush=True)
            same = next(htb.name for htb in LIMITS if htb.bits == limit.bits)
            print(f"  {same} / {limit.name}: {cell(round_ratios(path(same), path(limit.name)))}x", flush=True)


def main(argv: list[str] | None = None) -> None:
    """The command line. typer is imported here: tests import this module for its pure parts."""
    import typer

    def htb_cost(
        link: Link = typer.Option(Link.VETH, help="What carries the TLS hop: a veth pair, or loopback."),
        seconds: int = typer.Option(5, help="Each run, after one second omitted."),
        rounds: int = typer.Option(3, help="Rounds, each configuration once a round in a shuffled order."),
        seed: int = typer.Option(
            int(time.time()) % 10000,
            help="The seed of the rounds' order.  [default: the time]",
            show_default=False,
        ),
        no_allowance: bool = typer.Option(
            False, "--no-allowance", help="Also 100 Mbit/s with no header allowance."
        ),
        no_shaper: bool = typer.Option(
            False, "--no-shaper", help="Leave out the shaper hops, the reference."
        ),
    ) -> None:
        limits = [*LIMITS, *([] if no_shaper else SHAPERS), *([NO_ALLOWANCE] if no_allowance else [])]
        print(
            f"One iperf3 stream through a HAProxy TLS pair over {link.value}, {seconds} s after 1 s, "
            f"{rounds} rounds in turns (seed {seed}): median (lowest-highest)",
            flush=True,
        )
        results = experiment(link.value, seconds, rounds, seed, limits)
        show(results, limits)

    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    app.command(help=__doc__.split("\n", 1)[0])(htb_cost)
    app(args=argv, prog_name="python -m bench.htb_cost")


if __name__ == "__main__":
    main()
