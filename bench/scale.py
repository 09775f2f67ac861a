"""The scale part of `make bench`: what a gateway pays per live stream.

For each backend, one `s2cs` and inbound streams at the default limits (a shaper each) added up
to 1, 10 and 100: the memory of every process serving them (PSS, so that pages the processes
share are counted once in all), per stream, with `s2cs`'s own beside it; and the inbound control
call's time with 100 streams live, against a second gateway with none at the same time.
`python -m bench --scale-only`. The goals are goals.py's MEMORY_PER_STREAM and INBOUND_REQUEST.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from scistream.loopback import BIN, S2csProcess, free_port, free_port_range, proxies_of

from .figures import percentiles
from .goals import INBOUND_REQUEST, MEMORY_PER_STREAM, Measured
from .latency import s2uc_seconds

COUNTS = (1, 10, 100)
BACKENDS = ("haproxy", "stunnel")


def pss_kib(pid: int) -> int:
    """Proportional set size of a process in KiB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _requests(gateways: list[tuple[S2csProcess, int]], service: int, requests: int) -> list[dict[str, float]]:
    """p50 and p95 (in ms) of the inbound control call alone and of `s2uc inbound_request`, on each of
    these gateways with the number of live streams beside it; each stream released after it is
    measured. The gateways take turns, one request each: both are measured under the same load
    of the machine (its disk above all: a request writes and syncs its files, and the time of a
    sync varies by several milliseconds from one minute to the next). And `s2uc --version`
    beside them, which does not reach a gateway: what the machine itself adds to any command."""
    times: dict[int, dict[str, list[float]]] = {
        live: {"calls": [], "commands": [], "starts": []} for _, live in gateways
    }
    for _ in range(requests):
        for gw, live in gateways:
            found = times[live]
            began = time.perf_counter()
            reply = gw.call("inbound", remote_ip="127.0.0.1", receiver_ports=[service])
            found["calls"].append(time.perf_counter() - began)
            gw.call("release", uid=reply["uid"])
            at_gw = ("--s2cs", gw.address, "--server_cert", str(gw.cert))
            took, reply = s2uc_seconds("inbound_request", *at_gw, "--remote_ip", "127.0.0.1",
                                       "--receiver_ports", str(service))  # fmt: skip
            found["commands"].append(took)
            gw.call("release", uid=reply["uid"])
            began = time.perf_counter()
            subprocess.run([str(BIN / "s2uc"), "--version"], capture_output=True, check=True, timeout=60)
            found["starts"].append(time.perf_counter() - began)
    rows = []
    for live, found in times.items():
        p50, p95 = (1000 * value for value in percentiles(found["calls"]))
        s2uc_p50, s2uc_p95 = (1000 * value for value in percentiles(found["commands"]))
        version_p50 = 1000 * percentiles(found["starts"])[0]
        rows.append({"live": live, "p50_ms": p50, "p95_ms": p95, "s2uc_p50_ms": s2uc_p50,
                     "s2uc_p95_ms": s2uc_p95, "version_p50_ms": version_p50})  # fmt: skip
    return rows


def measure(directory: Path, backend: str, requests: int) -> dict[str, Any]:
    """Memory at each count of streams on one gateway; then requests on it with all of them
    live, taking turns with a second gateway of the same backend that carries none."""
    gw, idle = (
        S2csProcess(f"scale-{backend}{name}", directory / f"scale-{backend}{name}",
                    free_port_range(max(COUNTS) + 8), ("--type", backend))
        for name in ("", "-idle")
    )  # fmt: skip
    service = free_port()  # nothing needs to listen there: no data flows
    memory: list[dict[str, float]] = []
    latency: list[dict[str, float]] = []
    uids: list[str] = []
    try:
        gw.start()
        idle.start()
        for count in COUNTS:
            while len(uids) < count:
                reply = gw.call("inbound", remote_ip="127.0.0.1", receiver_ports=[service])
                uids.append(reply["uid"])
            time.sleep(1.0)  # each process past its start-up
            pids = proxies_of(gw.state_dir)
            total = sum(pss_kib(pid) for pid in pids)
            own = pss_kib(gw.proc.pid) if gw.proc else 0
            memory.append({"streams": count, "processes": len(pids), "mib_per_stream": total / count / 1024,
                           "s2cs_mib": own / 1024})  # fmt: skip
        latency = _requests([(idle, 0), (gw, len(uids))], service, requests)
    finally:
        gw.stop()  # SIGTERM: s2cs releases every stream it carries
        idle.stop()
    return {"backend": backend, "memory": memory, "latency": latency}


def marginal(memory: list[dict[str, Any]]) -> tuple[int, float]:
    """What each stream added between the last two counts measured, in MiB: the cost of one more
    stream on a gateway that carries many, without the pages every proxy of its kind shares (the
    binary, OpenSSL), which a single stream pays alone. Pure."""
    low, high = memory[-2], memory[-1]
    added = high["mib_per_stream"] * high["streams"] - low["mib_per_stream"] * low["streams"]
    return low["streams"], added / (high["streams"] - low["streams"])


def measured(found: list[dict[str, Any]]) -> list[Measured]:
    """What the goals are checked against: per backend, the memory of one more stream at scale
    and `s2uc inbound_request` with each number of live streams. Pure."""
    checked = []
    for part in found:
        backend = f"{part['backend']} backend"
        if "marginal_mib" in part:
            checked.append(Measured(MEMORY_PER_STREAM, backend, part["marginal_mib"]))
        for row in part["latency"]:
            subject = f"{backend}, {row['live']} live streams"
            checked.append(Measured(INBOUND_REQUEST, subject, row["s2uc_p50_ms"] / 1000))
    return checked


def run(directory: Path, requests: int) -> list[dict[str, Any]]:
    results = []
    for backend in BACKENDS:
        print(f"Scale, {backend}: memory per stream at the default limits, and the control call", flush=True)
        found = measure(directory, backend, requests)
        for row in found["memory"]:
            print(
                f"  {row['streams']:3d} stream(s): {row['mib_per_stream']:5.1f} MiB per stream "
                f"({row['processes']} processes), s2cs {row['s2cs_mib']:.1f} MiB",
                flush=True,
            )
        beyond, found["marginal_mib"] = marginal(found["memory"])
        each = found["marginal_mib"]
        print(
            f"  each stream beyond the first {beyond}: {each:.1f} MiB (goal {MEMORY_PER_STREAM})", flush=True
        )
        for row in found["latency"]:
            print(
                f"  with {row['live']:3d} live: control call p50 {row['p50_ms']:4.0f} ms, "
                f"p95 {row['p95_ms']:4.0f} ms; s2uc inbound_request p50 {row['s2uc_p50_ms']:4.0f} ms, "
                f"p95 {row['s2uc_p95_ms']:4.0f} ms (goal p50 {INBOUND_REQUEST}, flat); "
                f"s2uc --version p50 {row['version_p50_ms']:4.0f} ms",
                flush=True,
            )
        results.append(found)
    return results
