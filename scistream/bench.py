"""`make bench`: throughput of one iperf3 stream through SciStream and through hand-written pairs.

Run it in a private network namespace (scripts/run-isolated does, as root) so that nothing else
on the machine shares its loopback. Every configuration carries the same single TCP stream for
the same time; each is measured several times and the median is shown. The hand-written pairs
are the baselines SciStream must beat while being encrypted: HAProxy 2.8 with TLS 1.3 and its
default settings, and stunnel with TLS 1.3.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .credentials import stream_credentials
from .loopback import S2csProcess, free_port, free_port_range
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


def measure(name: str, port: int, seconds: int, runs: int) -> tuple[str, float, list[float]]:
    values = []
    for _ in range(runs):
        values.append(iperf3(port, seconds))
    result = statistics.median(values)
    print(f"  {name:44} {result:6.2f} Gbit/s   (runs: {', '.join(f'{v:.2f}' for v in values)})", flush=True)
    return name, result, values


def gateways(directory: Path, backend: str) -> tuple[S2csProcess, S2csProcess]:
    extra = ("--type", backend)
    hpc = S2csProcess("hpc", directory / f"{backend}-hpc", free_port_range(4), extra).start()
    inst = S2csProcess("inst", directory / f"{backend}-inst", free_port_range(4), extra).start()
    return hpc, inst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scistream.bench", description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    for tool in ("iperf3", "stunnel"):
        if not shutil.which(tool) and not (tool == "stunnel" and shutil.which("stunnel4")):
            print(f"error: {tool} is not installed (make bench installs it)", file=sys.stderr)
            return 1
    directory = Path(tempfile.mkdtemp(prefix="ss-bench-", dir="/tmp"))
    service = free_port()
    server = subprocess.Popen(
        ["iperf3", "-s", "-p", str(service)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    results = []
    print(f"One iperf3 stream, {args.seconds} s, median of {args.runs} runs:", flush=True)
    try:
        time.sleep(0.5)
        results.append(measure("direct (no proxy)", service, args.seconds, args.runs))
        for name, pair in (
            ("hand-written HAProxy 2.8 TLS 1.3 pair", haproxy_pair),
            ("hand-written stunnel TLS 1.3 pair", stunnel_pair),
        ):
            sub = directory / name.split()[1]
            sub.mkdir()
            argvs, port = pair(sub, service)
            with processes(*argvs, directory=sub):
                results.append(measure(name, port, args.seconds, args.runs))
        for backend in ("haproxy", "stunnel"):
            for rate, label in ((0, "unlimited"), (5_000_000, "--rate 5000000 (5 Gbit/s)")):
                hpc, inst = gateways(directory, backend)
                try:
                    inbound = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[service], rate=rate)
                    outbound = inst.call(
                        "outbound", uid=inbound["uid"], remote_listeners=inbound["listeners"], rate=rate
                    )
                    port = int(outbound["listeners"][0].rpartition(":")[2])
                    results.append(measure(f"SciStream {backend}, {label}", port, args.seconds, args.runs))
                finally:
                    hpc.stop()
                    inst.stop()
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps([{"name": n, "gbps": g, "runs": r} for n, g, r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
