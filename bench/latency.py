"""How long a user waits for a request: `s2uc` commands timed from their start to their exit,
against real `s2cs` processes. The first part of `make bench` runs it with the process runtime,
the swarm part (swarm.py) once with each runtime; scale.py times its commands with `s2uc_seconds`.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scistream.loopback import BIN, S2csProcess, free_port, free_port_range

from .figures import percentiles
from .goals import CONNECT, INBOUND_REQUEST, Goal

# What is measured, and the goal of its p50 (None: none of its own).
LATENCY: dict[str, Goal | None] = {
    "s2uc --version": None,
    "inbound, the control call alone": None,
    "s2uc inbound_request": INBOUND_REQUEST,
    "s2uc connect": CONNECT,
}


def s2uc_seconds(*args: str) -> tuple[float, dict[str, Any]]:
    """How long a user waits for one `s2uc` command, from its start to its exit; its --json reply."""
    began = time.perf_counter()
    done = subprocess.run([str(BIN / "s2uc"), *args, "--json"], capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"s2uc {args[0]} failed: {done.stderr.strip()}")
    reply: dict[str, Any] = json.loads(done.stdout)
    return took, reply


def request_latency(
    directory: Path, runs: int, extra: tuple[Sequence[str], Sequence[str]] = ((), ()), goals: bool = True
) -> list[tuple[str, float, float]]:
    """p50 and p95 in seconds of what a user waits for: `s2uc --version` (the client starting),
    `s2uc inbound_request` and `s2uc connect` (both sides) at the default limits, each stream
    released after it is measured; with the control call alone, in this process, for the server's
    part. `extra`: more arguments of the inbound and the outbound s2cs (their runtime); `goals`:
    whether the goals are shown beside the figures (not for the swarm runtime, which has none)."""
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
        shown = f"   goal p50 {goal}" if goal and goals else ""
        print(f"  {name:36} p50 {p50 * 1000:5.0f} ms   p95 {p95 * 1000:5.0f} ms{shown}", flush=True)
        results.append((name, p50, p95))
    return results
