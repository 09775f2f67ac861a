"""`make bench`: how long a user waits for a request, and the throughput of one iperf3 stream
through SciStream and through hand-written pairs; then the swarm runtime against processes
(bench_swarm.py).

Run the first parts in a private network namespace (scripts/run-isolated does, as root) so that
nothing else on the machine shares its loopback; the swarm part cannot run there, as its tasks
listen on the host's network: make bench runs it as a second command, `--swarm-only`. Every
configuration carries the same single TCP stream for the same time; each is measured several
times and the median is shown. The hand-written pairs are the baselines SciStream must beat while
being encrypted: HAProxy 2.8 with TLS 1.3 and its default settings, and stunnel with TLS 1.3.
"""

from __future__ import annotations

import argparse
import compileall
import importlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .credentials import stream_credentials
from .loopback import BIN, S2csProcess, free_port, free_port_range
from .s2ds.haproxy import find_binary

UID = "7c9e6679-7425-40de-944b-e07fc1f90ae7"  # any UID: the pairs only need one stream's certificate


def iperf3(port: int, seconds: int) -> float:
    """Gbit/s of one stream from an iperf3 client to 127.0.0.1:`port`."""
    out = subprocess.run(
        ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-O", "1", "-J"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


@contextmanager
def processes(*argvs: list[str], directory: Path, settle: float = 0.5) -> Iterator[None]:
    procs = []
    try:
        for i, argv in enumerate(argvs):
            log = open(directory / f"p{i}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(settle)
        yield
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


def haproxy_pair(directory: Path, service: int) -> tuple[list[list[str]], int]:
    """Two HAProxy 2.8 with TLS 1.3 as anyone would write them: default buffers and ciphers."""
    pem, crt = _credentials(directory)
    wan, local = free_port(), free_port()
    common = "defaults\n  mode tcp\n  timeout connect 10s\n  timeout client 1h\n  timeout server 1h\n"
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


def gateways(directory: Path, backend: str) -> tuple[S2csProcess, S2csProcess]:
    extra = ("--type", backend)
    hpc = S2csProcess("hpc", directory / f"{backend}-hpc", free_port_range(4), extra).start()
    inst = S2csProcess("inst", directory / f"{backend}-inst", free_port_range(4), extra).start()
    return hpc, inst


def s2uc_seconds(*args: str) -> tuple[float, dict[str, Any]]:
    """How long a user waits for one `s2uc` command, from its start to its exit; its --json reply."""
    began = time.perf_counter()
    done = subprocess.run([str(BIN / "s2uc"), *args, "--json"], capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"s2uc {args[0]} failed: {done.stderr.strip()}")
    reply: dict[str, Any] = json.loads(done.stdout)
    return took, reply


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p95, in milliseconds."""
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return statistics.median(ordered) * 1000, p95 * 1000


def request_latency(
    directory: Path, runs: int, extra: tuple[Sequence[str], Sequence[str]] = ((), ())
) -> list[tuple[str, float, float]]:
    """p50 and p95 of what a user waits for: `s2uc --version` (the client starting), `s2uc
    inbound_request` and `s2uc connect` (both sides) at the default limits, each stream released
    after it is measured; with the control call alone, in this process, for the server's part.
    `extra`: more arguments of the inbound and the outbound s2cs (their runtime)."""
    hpc = S2csProcess("hpc", directory / "latency-hpc", free_port_range(8), extra[0])
    inst = S2csProcess("inst", directory / "latency-inst", free_port_range(8), extra[1])
    service = free_port()
    times: dict[str, list[float]] = {name: [] for name in LATENCY}
    try:
        hpc.start()
        inst.start()
        both = directory / "both.crt"
        both.write_bytes(hpc.cert.read_bytes() + inst.cert.read_bytes())
        at_hpc = ("--s2cs", hpc.address, "--server_cert", str(hpc.cert))
        target = ("--remote_ip", "127.0.0.1", "--receiver_ports", str(service))
        for _ in range(runs):
            began = time.perf_counter()
            subprocess.run([str(BIN / "s2uc"), "--version"], capture_output=True, check=True, timeout=60)
            times["s2uc --version"].append(time.perf_counter() - began)
            began = time.perf_counter()
            reply = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[service])
            times["inbound, the control call alone"].append(time.perf_counter() - began)
            hpc.call("release", uid=reply["uid"])
            took, reply = s2uc_seconds("inbound_request", *at_hpc, *target)
            times["s2uc inbound_request"].append(took)
            hpc.call("release", uid=reply["uid"])
            gateways = ("--inbound-s2cs", hpc.address, "--outbound-s2cs", inst.address)
            took, reply = s2uc_seconds("connect", *gateways, "--server_cert", str(both), *target)
            times["s2uc connect"].append(took)
            for gw in (inst, hpc):
                gw.call("release", uid=reply["uid"])
    finally:
        inst.stop()
        hpc.stop()
    results = []
    for name, values in times.items():
        p50, p95 = percentiles(values)
        goal = LATENCY[name]
        shown = f"   goal p50 <= {goal * 1000:.0f} ms" if goal else ""
        print(f"  {name:36} p50 {p50:5.0f} ms   p95 {p95:5.0f} ms{shown}", flush=True)
        results.append((name, p50, p95))
    return results


LATENCY = {  # what is measured, and the p50 it should not exceed (None: no goal of its own)
    "s2uc --version": None,
    "inbound, the control call alone": None,
    "s2uc inbound_request": 0.15,
    "s2uc connect": 0.35,
}


def throughput(
    directory: Path, service: int, seconds: int, runs: int
) -> list[tuple[str, float, list[float]]]:
    """One iperf3 stream to `service`: direct, through the hand-written pairs, through SciStream.
    Every configuration is started first, then measured once per round, all of them in each
    round: what the machine does meanwhile (another load, its clock) weighs on every
    configuration alike, and a ratio between two of them compares runs minutes apart at most."""
    print(f"One iperf3 stream, {seconds} s, median of {runs} runs, one run of each per round:", flush=True)
    ports = {"direct (no proxy)": service}
    with ExitStack() as stack:
        for name, pair in (
            ("hand-written HAProxy 2.8 TLS 1.3 pair", haproxy_pair),
            ("hand-written stunnel TLS 1.3 pair", stunnel_pair),
        ):
            sub = directory / name.split()[1]
            sub.mkdir()
            argvs, ports[name] = pair(sub, service)
            stack.enter_context(processes(*argvs, directory=sub))
        for backend in ("haproxy", "stunnel"):
            for rate, label in ((0, "unlimited"), (HIGH_RATE, LIMITED)):
                hpc, inst = gateways(directory / f"{backend}-{rate}", backend)
                stack.callback(inst.stop)
                stack.callback(hpc.stop)
                inbound = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[service], rate=rate)
                outbound = inst.call(
                    "outbound", uid=inbound["uid"], remote_listeners=inbound["listeners"], rate=rate
                )
                ports[f"SciStream {backend}, {label}"] = int(outbound["listeners"][0].rpartition(":")[2])
        time.sleep(0.5)
        values: dict[str, list[float]] = {name: [] for name in ports}
        for _ in range(runs):
            for name, port in ports.items():
                values[name].append(iperf3(port, seconds))
    results = []
    for name, found in values.items():
        result = statistics.median(found)
        shown = ", ".join(f"{v:.2f}" for v in found)
        print(f"  {name:44} {result:6.2f} Gbit/s   (runs: {shown})", flush=True)
        results.append((name, result, found))
    return results


HIGH_RATE = 40_000_000  # kb/s: a limit above what any configuration reaches here (direct ~20 Gbit/s)
LIMITED = "limit 40 Gbit/s"  # how a configuration with HIGH_RATE is named
TLS_PAIR = "hand-written stunnel TLS 1.3 pair"


def ratios(results: Sequence[tuple[str, float, list[float]]]) -> list[tuple[str, float, float]]:
    """The issue's two throughput figures with their goals: a stream with a limit above what the
    machine reaches against the same stream unlimited, per backend, and SciStream's encrypted
    stream (HAProxy, unlimited) against the hand-written stunnel pair. Pure."""
    gbps = {name: value for name, value, _ in results}
    found = []
    for backend in ("haproxy", "stunnel"):
        limited = gbps.get(f"SciStream {backend}, {LIMITED}")
        unlimited = gbps.get(f"SciStream {backend}, unlimited")
        if limited is not None and unlimited:
            found.append((f"{backend}: 40 Gbit/s limit / unlimited", limited / unlimited, 0.85))
    ours, pair = gbps.get("SciStream haproxy, unlimited"), gbps.get(TLS_PAIR)
    if ours is not None and pair:
        found.append(("SciStream haproxy, unlimited / stunnel pair", ours / pair, 1.3))
    return found


def plot(results: Sequence[tuple[str, float, list[float]]], path: Path) -> str:
    """A bar per configuration (its median) with a dot per run, as a PNG at `path`; what was done,
    in one line. matplotlib comes with make bench (bench-deps): without it, no plot, said so."""
    try:
        # By name: matplotlib is no dependency of SciStream, only of its benchmark.
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")  # no display: a file
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return f"no plot: matplotlib is not installed (make bench-deps installs it); {path} unchanged"
    shown = list(results)[::-1]  # the first configuration at the top
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.2), dpi=100)
    for i, (name, value, runs) in enumerate(shown):
        ax.barh(i, value, color="#4c72b0" if name.startswith("SciStream") else "#aaaaaa")
        ax.plot(runs, [i] * len(runs), "k.", markersize=4)
        ax.text(max(value, *runs), i, f"  {value:.2f}", va="center", fontsize=8)  # beside every dot
    ax.set_yticks(range(len(shown)), [name for name, _, _ in shown], fontsize=8)
    ax.set_xlabel("Gbit/s, one iperf3 stream (bar: median; dots: runs)")
    ax.set_title("Throughput per configuration, make bench", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"plot written to {path}"


def write_json(path: Path, parts: dict[str, Any]) -> None:
    """The parts measured now into `path`, keeping the other parts a bench wrote there before:
    make bench runs the swarm part as a second command, on the host's network."""
    found: dict[str, Any] = {}
    if path.exists():
        try:
            found = json.loads(path.read_text())
        except ValueError:
            found = {}
        if not isinstance(found, dict):
            found = {}
    found.update(parts)
    path.write_text(json.dumps(found, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scistream.bench", description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--json", type=Path, help="also write the results to this file (the other parts in it are kept)"
    )
    parser.add_argument("--requests", type=int, default=30, help="requests measured for each latency")
    parser.add_argument(
        "--latency-only", action="store_true", help="only the request latencies, of the swarm part too"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--swarm-only", action="store_true", help="only the swarm runtime against processes (host network)"
    )
    which.add_argument("--no-swarm", action="store_true", help="everything but the swarm part")
    which.add_argument(
        "--scale-only", action="store_true", help="only memory per stream and requests with 100 live streams"
    )
    parser.add_argument(
        "--plot", type=Path, help="also draw the throughput per configuration into this PNG file"
    )
    parser.add_argument("--swarm-mib", type=int, default=256, help="MiB each stream carries, swarm part")
    parser.add_argument(
        "--swarm-requests", type=int, default=20, help="requests measured for each latency, swarm part"
    )
    args = parser.parse_args(argv)
    for tool in ("iperf3", "stunnel"):
        if not shutil.which(tool) and not (tool == "stunnel" and shutil.which("stunnel4")):
            print(f"error: {tool} is not installed (make bench installs it)", file=sys.stderr)
            return 1
    # Bytecode, as an installed package has it: where PYTHONDONTWRITEBYTECODE is set (CI, some
    # containers) an editable install's modules would be compiled again at every command.
    compileall.compile_dir(Path(__file__).parent, quiet=1)
    directory = Path(tempfile.mkdtemp(prefix="ss-bench-", dir="/tmp"))
    parts: dict[str, Any] = {}
    try:
        if not (args.swarm_only or args.scale_only):
            parts.update(single(directory, args))
        if not (args.swarm_only or args.latency_only):
            from .bench_scale import run as scale

            parts["scale"] = scale(directory, args.requests)
        if not (args.no_swarm or args.scale_only):
            from .bench_swarm import run

            parts["swarm"] = run(
                directory, args.runs, args.swarm_mib, args.swarm_requests, not args.latency_only
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if args.json and parts:
            write_json(args.json, parts)
    return 1 if "failed" in parts.get("swarm", {}) else 0


def single(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The request latencies and the throughput of one stream, with the process runtime."""
    service = free_port()
    server = subprocess.Popen(
        ["iperf3", "-s", "-p", str(service)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    results: list[tuple[str, float, list[float]]] = []
    latencies: list[tuple[str, float, float]] = []
    try:
        print(f"Request latency, {args.requests} of each, default limits (a shaper per stream):", flush=True)
        latencies = request_latency(directory, args.requests)
        if not args.latency_only:
            results = throughput(directory, service, args.seconds, args.runs)
    finally:
        server.terminate()
        server.wait(10)
    found = ratios(results)
    for name, ratio, goal in found:
        print(f"  {name:44} {ratio:6.2f}x   goal >= {goal}x", flush=True)
    if results and args.plot:
        print(f"  {plot(results, args.plot)}", flush=True)
    return {
        "throughput": [{"name": n, "gbps": g, "runs": r} for n, g, r in results],
        "ratios": [{"name": n, "ratio": r, "goal": g} for n, r, g in found],
        "latency": [{"name": n, "p50_ms": p50, "p95_ms": p95} for n, p50, p95 in latencies],
    }


if __name__ == "__main__":
    sys.exit(main())
