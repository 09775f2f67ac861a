"""The throughput part of `make bench`: one iperf3 stream through SciStream and through
hand-written pairs, in Gbit/s and in CPU seconds per gigabyte carried.

Every configuration is started first; then each round runs iperf3 once through each of them, in
an order shuffled anew every round (seeded, the seed printed): what the machine does meanwhile
weighs on all of them alike, and none is always first or always after the same one. A ratio of
two configurations is taken within each round and reported as the median of the rounds' ratios
with their lowest and highest.

The CPU of a run: utime + stime from /proc/PID/stat of every process of the configuration's
path, sampled before and after the run: the proxies and shapers of both gateways of a SciStream
stream (found by their state directories, scistream.loopback.proxies_of; `s2cs` itself, which
carries no byte, is not among them), the two processes of a hand-written pair. iperf3 is shown
apart, not in the path's figure: its server sampled the same way, its client by the CPU of the
children this process reaped during the run (the client is one, and gone by the second sample).
Divided by every byte the client sent during the run, the omitted first second included, as the
CPU is of the whole run.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scistream.credentials import stream_credentials
from scistream.loopback import S2csProcess, free_port, free_port_range, proxies_of
from scistream.s2ds.haproxy import find_binary
from scistream.s2ds.render import default_templates

from .figures import Spread, cpu_per_gb, cpu_seconds, round_orders, round_ratios, spread, stat_ticks
from .goals import LIMITED_CPU, LIMITED_THROUGHPUT, OURS_OVER_HAPROXY_PAIR, Goal, Measured

UID = "7c9e6679-7425-40de-944b-e07fc1f90ae7"  # any UID: the pairs only need one stream's certificate
HERTZ = os.sysconf("SC_CLK_TCK")
HIGH_RATE = 40_000_000  # kb/s: a limit above what any configuration reaches here (direct ~20 Gbit/s)
LIMITED = "limit 40 Gbit/s"  # how a configuration with HIGH_RATE is named
DIRECT = "direct (no proxy)"
HAPROXY_PAIR = "hand-written HAProxy 2.8 TLS 1.3 pair"
TLS_PAIR = "hand-written stunnel TLS 1.3 pair"
BACKENDS = ("haproxy", "stunnel")


@dataclass(frozen=True)
class Configuration:
    name: str
    port: int  # where the iperf3 client connects
    path: tuple[int, ...]  # pids of the processes that carry its bytes: proxies, shapers


@dataclass(frozen=True)
class Run:
    gbps: float  # iperf3's receiver, after the omitted first second
    nbytes: int  # every byte the client sent, the whole run
    path_cpu: float  # CPU seconds of the configuration's processes during the run
    iperf3_cpu: float  # CPU seconds of iperf3's client and server during the run


@dataclass(frozen=True)
class Result:
    name: str
    processes: int
    runs: tuple[Run, ...]  # one per round, in the order of the rounds

    @property
    def gbps(self) -> float:
        return spread([r.gbps for r in self.runs]).median

    def path_cpu_per_gb(self) -> list[float]:
        return [cpu_per_gb(r.path_cpu, r.nbytes) for r in self.runs]

    def iperf3_cpu_per_gb(self) -> list[float]:
        return [cpu_per_gb(r.iperf3_cpu, r.nbytes) for r in self.runs]


@dataclass(frozen=True)
class Ratio:
    name: str
    rounds: tuple[float, ...]
    goal: Goal | None
    subject: str  # what the goal is checked for

    @property
    def spread(self) -> Spread:
        return spread(self.rounds)


def read_ticks(pids: Sequence[int]) -> dict[int, int]:
    """utime + stime of each of these processes that is still there, in clock ticks."""
    found = {}
    for pid in pids:
        try:
            found[pid] = stat_ticks(Path(f"/proc/{pid}/stat").read_text())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


BUSY_TRIES = 40  # an iperf3 server still ending the run before refuses the next; 0.25 s apart
# How that refusal reaches the client: the server's "busy" message, or, when the server closed
# before reading the client's first bytes, a reset of the control connection (seen with no proxy
# at all in the path, right after a SciStream run).
BUSY = ("busy", "unable to receive control message: Connection reset by peer")


def iperf3(config: Configuration, server: int, seconds: int) -> Run:
    """One iperf3 stream from a client to the configuration's port, for `seconds`, with the CPU
    of its path and of iperf3 (module docstring)."""
    for _ in range(BUSY_TRIES):
        before, client_before = read_ticks([*config.path, server]), children_cpu()
        out = subprocess.run(
            ["iperf3", "-c", "127.0.0.1", "-p", str(config.port), "-t", str(seconds), "-O", "1", "-J"],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        ).stdout
        client, after = children_cpu() - client_before, read_ticks([*config.path, server])
        report = json.loads(out)
        if not any(sign in str(report.get("error", "")) for sign in BUSY):
            break
        time.sleep(0.25)
    if "sum_received" not in report.get("end", {}):
        raise RuntimeError(f"iperf3 through {config.name}: {report.get('error', 'no result')}")
    server_after = {server: after.pop(server)} if server in after else {}
    return Run(
        gbps=float(report["end"]["sum_received"]["bits_per_second"]) / 1e9,
        nbytes=sum(int(interval["sum"]["bytes"]) for interval in report["intervals"]),
        path_cpu=cpu_seconds(before, after, HERTZ),
        iperf3_cpu=client + cpu_seconds(before, server_after, HERTZ),
    )


@contextmanager
def processes(*argvs: list[str], directory: Path, settle: float = 0.5) -> Iterator[tuple[int, ...]]:
    """These processes, running for the `with` block; their pids."""
    procs = []
    try:
        for i, argv in enumerate(argvs):
            log = open(directory / f"p{i}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(settle)
        for (proc, _), argv in zip(procs, argvs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited at its start: see {directory}")
        yield tuple(proc.pid for proc, _ in procs)
    finally:
        for proc, log in procs:
            proc.terminate()
            proc.wait(10)
            log.close()


def _credentials(directory: Path) -> tuple[Path, Path]:
    creds = stream_credentials(UID)
    pem, crt = directory / "stream.pem", directory / "stream.crt"
    pem.write_bytes(creds.cert_pem + creds.key_pem)
    pem.chmod(0o600)
    crt.write_bytes(creds.cert_pem)
    return pem, crt


# The lines of the session template's `global` section that bear on throughput. The others do
# not touch a byte in flight: maxconn sizes tables, tune.ssl.cachesize and no-tls-tickets concern
# resuming TLS sessions (a run is one connection, one handshake), log and the stats socket
# write nothing per byte, ssl-min-ver the pair sets on its own lines.
THROUGHPUT_SETTINGS = ("tune.bufsize", "ssl-default-bind-ciphersuites", "ssl-default-server-ciphersuites")


def throughput_settings(template: str) -> list[str]:
    """The `global` lines of a HAProxy session template that bear on throughput
    (THROUGHPUT_SETTINGS), as they are written there. Pure."""
    found = []
    in_global = False
    for raw in template.splitlines():
        line = raw.strip()
        if raw and not raw[0].isspace():
            in_global = line == "global"
        elif in_global and line.split(" ", 1)[0] in THROUGHPUT_SETTINGS:
            found.append(line)
    return found


def haproxy_pair(directory: Path, service: int) -> tuple[list[list[str]], int]:
    """Two HAProxy 2.8 with TLS 1.3 as anyone would write them, with the settings of SciStream's
    session template that bear on throughput (throughput_settings: its 64 KiB buffers,
    `tune.bufsize 65536`, and its TLS 1.3 suites, AES-128-GCM first), so that SciStream's HAProxy
    is compared with the same HAProxy, like with like; everything else at HAProxy's defaults."""
    pem, crt = _credentials(directory)
    wan, local = free_port(), free_port()
    settings = throughput_settings((default_templates() / "haproxy.cfg.j2").read_text())
    common = "global\n" + "".join(f"  {line}\n" for line in settings)
    common += "defaults\n  mode tcp\n  timeout connect 10s\n  timeout client 1h\n  timeout server 1h\n"
    (directory / "in.cfg").write_text(
        common + f"frontend f\n  bind 127.0.0.1:{wan} ssl crt {pem} ca-file {crt} verify required "
        f"ssl-min-ver TLSv1.3\n  default_backend b\nbackend b\n  server s 127.0.0.1:{service}\n"
    )
    (directory / "out.cfg").write_text(
        common + f"frontend f\n  bind 127.0.0.1:{local}\n  default_backend b\nbackend b\n"
        f"  server s 127.0.0.1:{wan} ssl crt {pem} ca-file {crt} verify required ssl-min-ver TLSv1.3 "
        "verifyhost scistream-stream\n"
    )
    binary = find_binary(None)
    return [[binary, "-db", "-f", str(directory / f"{n}.cfg")] for n in ("in", "out")], local


def stunnel_pair(directory: Path, service: int) -> tuple[list[list[str]], int]:
    """Two stunnel with TLS 1.3 and the stream certificate, at stunnel's defaults otherwise."""
    pem, crt = _credentials(directory)
    wan, local = free_port(), free_port()
    tls = f"cert = {pem}\nCAfile = {crt}\nverifyPeer = yes\nsslVersionMin = TLSv1.3\n"
    head = "foreground = yes\npid =\nsyslog = no\n"
    (directory / "in.conf").write_text(
        head + f"[in]\naccept = 127.0.0.1:{wan}\nconnect = 127.0.0.1:{service}\n" + tls
    )
    (directory / "out.conf").write_text(
        head + f"[out]\nclient = yes\naccept = 127.0.0.1:{local}\nconnect = 127.0.0.1:{wan}\n" + tls
    )
    binary = shutil.which("stunnel") or shutil.which("stunnel4") or "stunnel"
    return [[binary, str(directory / f"{n}.conf")] for n in ("in", "out")], local


def scistream_stream(
    stack: ExitStack, directory: Path, backend: str, rate: int, service: int
) -> Configuration:
    """Two real `s2cs` of this backend and one stream through both, open until `stack` closes."""
    extra = ("--type", backend)
    hpc = S2csProcess("hpc", directory / f"{backend}-hpc", free_port_range(4), extra)
    stack.callback(hpc.stop)
    hpc.start()
    inst = S2csProcess("inst", directory / f"{backend}-inst", free_port_range(4), extra)
    stack.callback(inst.stop)
    inst.start()
    inbound = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[service], rate=rate)
    outbound = inst.call("outbound", uid=inbound["uid"], remote_listeners=inbound["listeners"], rate=rate)
    path = tuple(proxies_of(hpc.state_dir) + proxies_of(inst.state_dir))
    label = f"SciStream {backend}, {LIMITED if rate else 'unlimited'}"
    if not path:
        raise RuntimeError(f"{label}: no process of the stream found below {hpc.state_dir.parent}")
    return Configuration(label, int(outbound["listeners"][0].rpartition(":")[2]), path)


def configurations(stack: ExitStack, directory: Path, service: int) -> list[Configuration]:
    """Every configuration, started, until `stack` closes."""
    found = [Configuration(DIRECT, service, ())]
    for name, pair in ((HAPROXY_PAIR, haproxy_pair), (TLS_PAIR, stunnel_pair)):
        sub = directory / name.split()[1]
        sub.mkdir()
        argvs, port = pair(sub, service)
        found.append(Configuration(name, port, stack.enter_context(processes(*argvs, directory=sub))))
    for backend in BACKENDS:
        for rate in (0, HIGH_RATE):
            found.append(scistream_stream(stack, directory / f"{backend}-{rate}", backend, rate, service))
    return found


def throughput(
    directory: Path, server: int, service: int, seconds: int, rounds: int, seed: int
) -> list[Result]:
    """Every configuration once per round, in the round's order (module docstring)."""
    print(
        f"One iperf3 stream, {seconds} s, {rounds} rounds, each configuration once per round in an order "
        f"shuffled every round (seed {seed}: --seed {seed} repeats it):",
        flush=True,
    )
    with ExitStack() as stack:
        configs = {c.name: c for c in configurations(stack, directory, service)}
        time.sleep(0.5)
        runs: dict[str, list[Run]] = {name: [] for name in configs}
        for number, order in enumerate(round_orders(list(configs), rounds, seed), 1):
            print(f"  round {number}: {', '.join(short(name) for name in order)}", flush=True)
            for name in order:
                runs[name].append(iperf3(configs[name], server, seconds))
    results = [Result(name, len(configs[name].path), tuple(found)) for name, found in runs.items()]
    show(results)
    return results


def short(name: str) -> str:
    """A configuration's name in a list of them: "stunnel pair", "haproxy limited"."""
    name = name.replace("hand-written ", "").replace(" 2.8", "").replace(" TLS 1.3", "")
    name = (
        name.replace("SciStream ", "")
        .replace(f", {LIMITED}", " limited")
        .replace(", unlimited", " unlimited")
    )
    return name.replace(" (no proxy)", "")


def show(results: Sequence[Result]) -> None:
    print(
        f"  {'configuration':44} {'Gbit/s':>7} {'CPU s/GB: path':>15} {'iperf3':>7} {'procs':>6}"
        "   runs, Gbit/s",
        flush=True,
    )
    for result in results:
        path = spread(result.path_cpu_per_gb()).median if result.processes else None
        shown = f"{path:15.2f}" if path is not None else f"{'-':>15}"
        runs = ", ".join(f"{r.gbps:.2f}" for r in result.runs)
        print(
            f"  {result.name:44} {result.gbps:7.2f} {shown} {spread(result.iperf3_cpu_per_gb()).median:7.2f} "
            f"{result.processes:6d}   {runs}",
            flush=True,
        )


def ratios(results: Sequence[Result]) -> list[Ratio]:
    """Per backend, a stream with a limit above what the machine reaches against the same stream
    unlimited, in Gbit/s and in CPU per GB of its path; SciStream's HAProxy stream (unlimited)
    against each hand-written pair. Each a ratio per round. A configuration not measured gives
    none of its ratios. Pure."""
    by_name: Mapping[str, Result] = {r.name: r for r in results}
    found = []

    def add(name: str, subject: str, top: str, bottom: str, goal: Goal | None, cpu: bool = False) -> None:
        if top in by_name and bottom in by_name:
            a, b = by_name[top], by_name[bottom]
            if cpu:
                values = round_ratios(a.path_cpu_per_gb(), b.path_cpu_per_gb())
            else:
                values = round_ratios([r.gbps for r in a.runs], [r.gbps for r in b.runs])
            if values:
                found.append(Ratio(name, tuple(values), goal, subject))

    for backend in BACKENDS:
        limited, unlimited = f"SciStream {backend}, {LIMITED}", f"SciStream {backend}, unlimited"
        subject = f"{backend} backend"
        add(f"{backend}: limited / unlimited, Gbit/s", subject, limited, unlimited, LIMITED_THROUGHPUT)
        add(f"{backend}: limited / unlimited, CPU per GB", subject, limited, unlimited, LIMITED_CPU, True)
    ours = "SciStream haproxy, unlimited"
    subject = "one iperf3 stream"
    add("SciStream haproxy, unlimited / stunnel pair, Gbit/s", subject, ours, TLS_PAIR, None)
    add("SciStream haproxy, unlimited / HAProxy pair, Gbit/s", subject, ours, HAPROXY_PAIR, None)
    add(
        "SciStream haproxy, unlimited / HAProxy pair, CPU per GB",
        subject,
        ours,
        HAPROXY_PAIR,
        OURS_OVER_HAPROXY_PAIR,
        True,
    )
    return found


def measured(found: Sequence[Ratio]) -> list[Measured]:
    return [Measured(r.goal, r.subject, r.spread.median) for r in found if r.goal is not None]


def show_ratios(found: Sequence[Ratio]) -> None:
    print("  ratios, the median of the rounds' (lowest-highest):", flush=True)
    for ratio in found:
        goal = f"   goal {ratio.goal}" if ratio.goal else "   (no goal: shown for comparison)"
        print(f"  {ratio.name:56} {ratio.spread!s:>20}{goal}", flush=True)


def as_json(results: Sequence[Result], found: Sequence[Ratio]) -> dict[str, Any]:
    return {
        "throughput": [
            {
                "name": r.name,
                "gbps": r.gbps,
                "runs": [run.gbps for run in r.runs],
                "processes": r.processes,
                "path_cpu_s_per_gb": spread(r.path_cpu_per_gb()).median if r.processes else None,
                "iperf3_cpu_s_per_gb": spread(r.iperf3_cpu_per_gb()).median,
                "bytes": [run.nbytes for run in r.runs],
            }
            for r in results
        ],
        "ratios": [
            {
                "name": ratio.name,
                "median": ratio.spread.median,
                "low": ratio.spread.low,
                "high": ratio.spread.high,
                "rounds": list(ratio.rounds),
                "goal": str(ratio.goal) if ratio.goal else None,
            }
            for ratio in found
        ],
    }
