"""The scale part of `make bench`: what a gateway pays per live stream.

For each backend, one `s2cs` and inbound streams at the default limits (a shaper each) added up
to 1, 10 and 100: the memory of every process serving them (PSS, so that pages the processes
share are counted once in all), per stream, with `s2cs`'s own beside it; and the inbound control
call's time with none and with 100 streams live. `python -m scistream.bench --scale-only`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .bench import percentiles
from .loopback import S2csProcess, free_port, free_port_range, proxies_of

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


def _control_call(gw: S2csProcess, service: int, requests: int) -> tuple[float, float]:
    times = []
    for _ in range(requests):
        began = time.perf_counter()
        reply = gw.call("inbound", remote_ip="127.0.0.1", receiver_ports=[service])
        times.append(time.perf_counter() - began)
        gw.call("release", uid=reply["uid"])
    return percentiles(times)


def measure(directory: Path, backend: str, requests: int) -> dict[str, Any]:
    gw = S2csProcess(
        f"scale-{backend}", directory / f"scale-{backend}", free_port_range(max(COUNTS) + 8),
        ("--type", backend),
    )  # fmt: skip
    service = free_port()  # nothing needs to listen there: no data flows
    memory: list[dict[str, float]] = []
    latency: list[dict[str, float]] = []
    uids: list[str] = []
    try:
        gw.start()
        p50, p95 = _control_call(gw, service, requests)
        latency.append({"live": 0, "p50_ms": p50, "p95_ms": p95})
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
        p50, p95 = _control_call(gw, service, requests)
        latency.append({"live": len(uids), "p50_ms": p50, "p95_ms": p95})
    finally:
        gw.stop()  # SIGTERM: s2cs releases every stream it carries
    return {"backend": backend, "memory": memory, "latency": latency}


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
        for row in found["latency"]:
            print(
                f"  inbound control call with {row['live']:3d} live: p50 {row['p50_ms']:4.0f} ms   "
                f"p95 {row['p95_ms']:4.0f} ms",
                flush=True,
            )
        results.append(found)
    return results
