"""Real s2cs and s2uc processes, real proxies, real TLS on 127.0.0.1; everything stopped afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from scistream.loopback import BIN, S2csProcess, free_port_range, proxies_of
from scistream.s2ds.framing import END, HEADER, PREAMBLE


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short on purpose: proxies' control sockets live below it, and Unix socket paths are short.
    path = Path(tempfile.mkdtemp(prefix="ss-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


BACKENDS = ("haproxy", "stunnel")


@pytest.fixture
def start_s2cs(workdir: Path) -> Iterator[Callable[..., S2csProcess]]:
    started: list[S2csProcess] = []

    def start(
        name: str = "hpc",
        *extra: str,
        backend: str = "haproxy",
        ports: int = 10,
        env: dict[str, str] | None = None,
    ) -> S2csProcess:
        gw = S2csProcess(name, workdir / name, free_port_range(ports), ("--type", backend, *extra), env)
        started.append(gw)
        gw.start()
        # The user guide's default --server_cert is ./server.crt: give each gateway's users a copy.
        shutil.copy(gw.cert, workdir / f"{name}.crt")
        return gw

    yield start
    for gw in started:
        gw.stop()
    for gw in started:  # a failed test must not leave proxies for the next one
        for pid in proxies_of(gw.state_dir):
            try:
                psutil.Process(pid).send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass


def s2uc(
    *args: str, cwd: Path | None = None, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(BIN / "s2uc"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=180,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"s2uc {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def wait_for(predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    """Poll `predicate` until it gives something true, and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


def ending(sock: socket.socket) -> str:
    """How a connection ends for the end reading it: "clean" (a FIN, what a sender takes for a
    delivery) or the name of the error that ended it ("ConnectionResetError")."""
    sock.settimeout(60)
    try:
        while sock.recv(1 << 16):
            pass
    except OSError as exc:
        return type(exc).__name__
    return "clean"


def listen_queue(host: str, port: int) -> int:
    """How many connections wait in the accept queue of the IPv4 TCP listener at host:port (what
    /proc/net/tcp shows as a listening socket's receive queue): proof that a connection waits
    for a process that does not take it, where a timeout would only guess."""
    local = f"{socket.htonl(int.from_bytes(socket.inet_aton(host), 'big')):08X}:{port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":  # LISTEN
                return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens at {host}:{port}")


def field(output: str, name: str) -> str:
    """The value of a `Name: value` line of s2uc's summary."""
    for line in output.splitlines():
        if line.startswith(f"{name}: "):
            return line.split(": ", 1)[1].strip()
    raise AssertionError(f"no {name!r} line in:\n{output}")


def framed(payload: bytes) -> bytes:
    """What an outbound shaper sends through its proxy for a connection that carries `payload`
    and ends (docs/reliability.md, "What a fault does to a connection"): what a test standing
    for the outbound side of a stream sends to an inbound listener."""
    frame = len(payload).to_bytes(HEADER, "big") + payload if payload else b""
    return PREAMBLE + frame + END


def pids_of(state_dir: Path, name: str) -> list[int]:
    """The processes of `state_dir` (proxies_of) whose program is `name`: "haproxy", "stunnel"."""
    return [pid for pid in proxies_of(state_dir) if psutil.Process(pid).name() == name]


def port_of(address: str) -> int:
    """5100 of '127.0.0.1:5100' or '[::1]:5100'."""
    return int(address.rpartition(":")[2])


@dataclass(frozen=True)
class Stream:
    uid: str
    listener: int  # the inbound proxy's port (TLS)
    port: int  # the outbound proxy's port, where the instrument sends


def open_stream(hpc: S2csProcess, inst: S2csProcess, service_port: int, **limits: int) -> Stream:
    """inbound at `hpc` in front of 127.0.0.1:`service_port`, then outbound at `inst`."""
    inbound = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[service_port], **limits)
    outbound = inst.call("outbound", uid=inbound["uid"], remote_listeners=inbound["listeners"], **limits)
    return Stream(inbound["uid"], port_of(inbound["listeners"][0]), port_of(outbound["listeners"][0]))
