"""`make bench`, the swarm part: what `s2cs --runtime swarm` costs against the process runtime.

Measured on one node, the two runtimes at the same time and in turns (so that a busy machine
weighs on both alike), both with the haproxy backend at `--rate 0`:

- **throughput** of 1, 2 and 4 concurrent streams, each a real two-sided stream (an inbound and
  an outbound s2cs, data through their TLS) carrying a fixed amount from a sender to a counting
  service (Counter): the aggregate Gbit/s (every byte received, from the first sender's start
  until the last has its count back), the median of several runs, and swarm/process for each
  count; the same senders without any proxy ("direct") show what the bench itself can carry.
  Both gateways of each stream run on the runtime measured (on the swarm: two facilities of one
  single-node swarm), as between two facilities that both run it; whatever the swarm costs a
  stream is paid on both sides, so the ratio is its cost for a whole stream.
- **request latency**, latency.request_latency run once with each runtime (no goals: goals.py).

It runs on the host's own network, never in a private namespace (scripts/run-isolated): a swarm
task on host networking listens on the host's loopback. It sets up what it needs (the engine with
scripts/docker-engine, the image with make images, a single-node swarm only when this engine is
in none, left again afterwards), and removes what its facilities leave in the swarm; when it
cannot run, one line says why (NotRun). Like the rest of the bench it runs real `s2cs` and
`s2uc` (scistream.loopback) and calls nothing inside them; the engine it reaches with the docker
command.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from scistream import __version__
from scistream.loopback import S2csProcess, free_port_range, serve_each
from scistream.s2ds.containers import LABEL

from .latency import request_latency

ROOT = Path(__file__).resolve().parent.parent  # the checkout: scripts/, the Makefile
IMAGE = f"scistream:{__version__}"
COUNTS = (1, 2, 4)  # concurrent streams
RUNTIMES = ("process", "swarm")
ENGINE_TIMEOUT = 60  # seconds for one docker command
CHUNK = 1 << 20  # bytes of one send and of one receive


class NotRun(Exception):
    """Why the swarm part cannot run on this machine: one line, with what to do."""


def _docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=ENGINE_TIMEOUT)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def _swarm_state() -> tuple[str, bool]:
    done = _docker("info", "--format", "{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}")
    if done.returncode != 0:
        raise NotRun(f"docker info failed: {_last_line(done.stderr)}")
    state, _, manager = done.stdout.strip().partition(" ")
    return state, manager == "true"


@contextmanager
def swarm(log: Path) -> Iterator[None]:
    """An engine that answers, the image, and an active swarm this engine manages, for the
    `with` block; a swarm made here is left again at its end. NotRun says what is missing."""
    if os.environ.get("SCISTREAM_PRIVATE_NETNS") == "1":
        raise NotRun(
            "this runs in a private network namespace, and swarm tasks on host networking listen "
            "on the host's: run python -m bench --swarm-only outside it (make bench does)"
        )
    engine = ROOT / "scripts" / "docker-engine"
    if engine.exists():
        started = subprocess.run([str(engine)], stderr=subprocess.PIPE, text=True, timeout=600)
        if started.returncode != 0:
            raise NotRun(f"no Docker engine: {_last_line(started.stderr)}")
    elif not shutil.which("docker"):
        raise NotRun("docker is not installed, and there is no scripts/docker-engine here to install it")
    if not (ROOT / "Makefile").exists():
        if _docker("image", "inspect", IMAGE).returncode != 0:
            raise NotRun(f"the image {IMAGE} is not on this engine; build it with make images")
    else:
        # Made every time: an image of the same version built from older code would be measured
        # instead (a shaper without an option s2cs now passes it failed every task). With
        # nothing changed it takes seconds (scripts/build-images).
        print(f"  the image {IMAGE} of this checkout: make images (log in {log})", flush=True)
        with open(log, "wb") as out:
            built = subprocess.run(
                ["make", "-C", str(ROOT), "images"], stdout=out, stderr=subprocess.STDOUT, timeout=3600
            )
        if built.returncode != 0:
            raise NotRun(f"make images failed: {_last_line(log.read_text(errors='replace'))}")
    state, manager = _swarm_state()
    made = False
    if state == "inactive":
        init = _docker("swarm", "init", "--advertise-addr", "127.0.0.1")
        if init.returncode != 0:
            raise NotRun(f"docker swarm init failed: {_last_line(init.stderr)}")
        made = True
        print("  made a single-node swarm (docker swarm init); it is left again at the end", flush=True)
        state, manager = _swarm_state()
    try:
        if state != "active" or not manager:
            raise NotRun(f"this engine is not a manager of an active swarm (its swarm is {state or '?'})")
        yield
    finally:
        if made:
            left = _docker("swarm", "leave", "--force")
            if left.returncode != 0:
                print(
                    f"!! docker swarm leave --force failed: {_last_line(left.stderr)}",
                    file=sys.stderr,
                    flush=True,
                )


def remove_facility(facility: str) -> list[str]:
    """Remove what the swarm still has of a facility: services first, then the configs (port
    claims among them) and secrets they held. What was found, as `kind name`."""
    found = []
    where = f"label={LABEL}.facility={facility}"  # on every object of the facility
    for kind in ("service", "config", "secret"):
        names = _docker(kind, "ls", "--filter", where, "--format", "{{.Name}}").stdout.split()
        found += [f"{kind} {name}" for name in names]
        deadline = time.monotonic() + 30
        while names:  # a config is in use until its service's tasks are gone
            if _docker(kind, "rm", *names).returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
            names = _docker(kind, "ls", "--filter", where, "--format", "{{.Name}}").stdout.split()
    return found


def gateway_args(runtime: str, facility: str) -> tuple[str, ...]:
    args: tuple[str, ...] = ("--type", "haproxy")
    if runtime == "swarm":
        args += ("--runtime", "swarm", "--image", IMAGE, "--facility", facility)
    return args


@contextmanager
def facilities(tag: str) -> Iterator[tuple[str, str]]:
    """The names of this run's two swarm facilities; at the end, whatever they left in the swarm
    is removed, and named loudly (a release should have left nothing)."""
    names = (f"{tag}-hpc", f"{tag}-inst")
    try:
        yield names
    finally:
        for name in names:
            left = remove_facility(name)
            if left:
                print(
                    f"!! facility {name} left in the swarm, now removed: {', '.join(left)}",
                    file=sys.stderr,
                    flush=True,
                )


@contextmanager
def gateway_pair(
    directory: Path, runtime: str, names: tuple[str, str]
) -> Iterator[tuple[S2csProcess, S2csProcess]]:
    hpc = S2csProcess("hpc", directory / runtime / "hpc", free_port_range(8), gateway_args(runtime, names[0]))
    inst = S2csProcess(
        "inst", directory / runtime / "inst", free_port_range(8), gateway_args(runtime, names[1])
    )
    try:
        hpc.start(60)
        inst.start(60)
        yield hpc, inst
    finally:
        inst.stop()
        hpc.stop()


@contextmanager
def streams(hpc: S2csProcess, inst: S2csProcess, services: Sequence[int]) -> Iterator[list[int]]:
    """One unlimited stream to each service; the ports its sender connects to. Released
    at the end: the swarm keeps a stream when its s2cs stops."""
    uids: list[str] = []
    ports = []
    try:
        for service in services:
            inbound = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[service], rate=0)
            uids.append(inbound["uid"])
            outbound = inst.call(
                "outbound", uid=inbound["uid"], remote_listeners=inbound["listeners"], rate=0
            )
            ports.append(int(outbound["listeners"][0].rpartition(":")[2]))
        yield ports
    finally:
        for uid in uids:
            for gateway in (inst, hpc):
                try:
                    gateway.call("release", uid=uid)
                except Exception as exc:
                    print(
                        f"!! release of {uid[:8]} by {gateway.name} failed: {exc}",
                        file=sys.stderr,
                        flush=True,
                    )


class Counter:
    """A service that counts the bytes of each connection to its end, then answers the count:
    so a sender knows when every byte it sent has arrived (an iperf3 server stops counting when
    its client has sent all, while bytes are still in the proxies' buffers)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = int(self.sock.getsockname()[1])
        serve_each(self.sock, self._count)

    def _count(self, conn: socket.socket) -> None:
        buffer = bytearray(CHUNK)
        total = 0
        with conn, contextlib.suppress(OSError):
            while got := conn.recv_into(buffer):
                total += got
            conn.sendall(f"{total}\n".encode())

    def close(self) -> None:
        self.sock.close()


def push(port: int, nbytes: int, data: bytes) -> int:
    """Send `nbytes` (`data` again and again) to 127.0.0.1:`port`, half-close, and return what
    the Counter behind the stream says it received."""
    view = memoryview(data)
    with socket.create_connection(("127.0.0.1", port), timeout=300) as sock:
        left = nbytes
        while left:
            piece = view[: min(left, len(view))]
            sock.sendall(piece)
            left -= len(piece)
        sock.shutdown(socket.SHUT_WR)
        return int(sock.makefile("rb").readline() or b"-1")


def aggregate(ports: Sequence[int], nbytes: int) -> float:
    """Gbit/s of one sender per port at once, each sending `nbytes`: every byte received, from
    the first sender's start until the last has its count back."""
    data = os.urandom(CHUNK)  # TLS compresses nothing, but the bytes need not be all alike
    with ThreadPoolExecutor(len(ports)) as pool:
        began = time.perf_counter()
        received = list(pool.map(lambda port: push(port, nbytes, data), ports))
        took = time.perf_counter() - began
    short = [got for got in received if got != nbytes]
    if short:
        raise RuntimeError(f"a stream delivered {short[0]} of {nbytes} bytes")
    return sum(received) * 8 / took / 1e9


def throughput(directory: Path, names: tuple[str, str], mib: int, runs: int) -> list[dict[str, Any]]:
    """Aggregate Gbit/s of 1, 2 and 4 streams on each runtime, and direct; in turns, each run
    every count, each count every runtime (the first alternating, so neither always meets the
    cache another left)."""
    nbytes = mib << 20
    kinds = ("direct", *RUNTIMES)
    measured: dict[tuple[str, int], list[float]] = {(k, n): [] for k in kinds for n in COUNTS}
    print(
        f"Concurrent streams, haproxy, --rate 0, both gateways on the runtime, {mib} MiB per stream, "
        f"median of {runs} runs (aggregate Gbit/s):",
        flush=True,
    )
    with ExitStack() as stack:
        counter = Counter()
        stack.callback(counter.close)
        services = [counter.port] * max(COUNTS)
        ports: dict[str, list[int]] = {"direct": services}
        for runtime in RUNTIMES:
            began = time.perf_counter()
            hpc, inst = stack.enter_context(gateway_pair(directory, runtime, names))
            ports[runtime] = stack.enter_context(streams(hpc, inst, services))
            took = time.perf_counter() - began
            print(f"  {runtime}: two s2cs and {len(services)} streams set up in {took:.1f} s", flush=True)
        for run in range(runs):
            for count in COUNTS:
                order = ("direct", *(RUNTIMES if run % 2 == 0 else RUNTIMES[::-1]))
                for kind in order:
                    measured[kind, count].append(aggregate(ports[kind][:count], nbytes))
                shown = ", ".join(f"{k} {measured[k, count][-1]:.2f}" for k in kinds)
                print(f"  run {run + 1}, {count} stream(s): {shown}", flush=True)
    results = []
    print(f"  {'streams':8} {'direct':>8} {'process':>8} {'swarm':>8} {'swarm/process':>14}", flush=True)
    for count in COUNTS:
        found = {kind: statistics.median(measured[kind, count]) for kind in kinds}
        ratio = found["swarm"] / found["process"]
        shown = " ".join(f"{found[kind]:8.2f}" for kind in kinds)
        print(f"  {count:<8} {shown} {ratio:14.2f}", flush=True)
        results.append(
            {
                "streams": count,
                **{f"{kind}_gbps": found[kind] for kind in kinds},
                "ratio": ratio,
                **{f"{kind}_runs": measured[kind, count] for kind in kinds},
            }
        )
    return results


def latency(directory: Path, names: tuple[str, str], requests: int) -> list[dict[str, Any]]:
    """latency.request_latency with each runtime, one after the other."""
    results = []
    for runtime in RUNTIMES:
        print(f"Request latency, {runtime} runtime, {requests} of each, default limits:", flush=True)
        sub = directory / f"latency-{runtime}"
        extra = (gateway_args(runtime, names[0]), gateway_args(runtime, names[1]))
        for name, p50, p95 in request_latency(sub, requests, extra, goals=False):
            results.append({"runtime": runtime, "name": name, "p50_ms": p50 * 1000, "p95_ms": p95 * 1000})
    return results


def run(directory: Path, runs: int, mib: int, requests: int, with_throughput: bool = True) -> dict[str, Any]:
    """The swarm part, as the bench's JSON has it: its results, or `not_run` with why, or
    `failed` with the error that stopped it (each also printed, as one loud line)."""
    began = time.perf_counter()
    tag = f"bench-{secrets.token_hex(3)}"
    found: dict[str, Any] = {"image": IMAGE, "mib_per_stream": mib, "runs": runs, "requests": requests}
    try:
        with swarm(directory / "images.log"), facilities(tag) as names:
            found["latency"] = latency(directory, names, requests)
            if with_throughput:
                found["throughput"] = throughput(directory, names, mib, runs)
    except NotRun as why:
        print(f"!! SWARM PART NOT RUN: {why}", file=sys.stderr, flush=True)
        return {"not_run": str(why)}
    except Exception as exc:
        print(f"!! SWARM PART FAILED: {exc}", file=sys.stderr, flush=True)
        found["failed"] = str(exc)
    found["seconds"] = time.perf_counter() - began
    print(f"  the swarm part took {found['seconds']:.0f} s", flush=True)
    return found
