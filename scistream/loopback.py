"""Running gateways, services and instruments on one host: for the demo, the tests and the benchmark.

Ports are taken at run time (other programs may hold any fixed one); every process started here
is stopped again by whoever started it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .client.address import parse_server
from .client.transport import call
from .client.trust import trust
from .errors import ScistreamError
from .protocol import hostport
from .s2cs.gateway import port_is_free

BIN = Path(sys.executable).parent
LOOPBACK_TARGETS = "127.0.0.1/32,::1/128"  # every service of the demo, the tests and the bench


_taken: set[int] = set()
_taken_lock = threading.Lock()
_singles: set[int] = set()
SINGLES = (10000, 20000)  # free_port's; free_port_range's above, both below the ephemeral ports


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody holds on `host`, for whoever binds it next. Not one the kernel gives out on
    its own: a port it chose for a bind to port 0 lies among the ephemeral ports, which any
    outgoing connection made meanwhile may take (a gateway then failed to start with "Address
    already in use", on a busy machine). Nor one this process handed out lately."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with _taken_lock:
        if len(_singles) > (SINGLES[1] - SINGLES[0]) // 2:
            _singles.clear()  # handed out long ago: bound by now, or given up
        for _ in range(1000):
            port = random.randrange(*SINGLES)
            if port in _singles:
                continue
            with socket.socket(family) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            if not port_is_free(port):  # held on another address: a gateway may bind them all
                continue
            _singles.add(port)
            return port
    raise RuntimeError(f"no free port between {SINGLES[0]} and {SINGLES[1]} on {host}")


def free_port_range(count: int, low: int = 20000, high: int = 32000) -> tuple[int, int]:
    """`count` consecutive ports nobody listens on, and that this process has not handed out yet."""
    with _taken_lock:
        for _ in range(1000):
            first = random.randrange(low, high - count)
            ports = range(first, first + count)
            if not _taken.intersection(ports) and all(port_is_free(p) for p in ports):
                _taken.update(ports)
                return first, first + count - 1
    raise RuntimeError(f"no {count} consecutive free ports between {low} and {high}")


@dataclass
class Received:
    """What a sink connection got: byte count, SHA-256, and when the bytes came."""

    nbytes: int = 0
    sha256: str = ""
    first: float = 0.0
    last: float = 0.0
    marks: list[tuple[float, int]] = field(default_factory=list)  # (time, bytes so far)
    reset: bool = False

    def rate_bps(self, skip: float = 1.0) -> float:
        """Bits per second after the first `skip` seconds (a limiter may let an initial burst pass)."""
        start = next(((t, n) for t, n in self.marks if t >= self.first + skip), None)
        if start is None or self.last <= start[0]:
            return 0.0
        return (self.nbytes - start[1]) * 8 / (self.last - start[0])


def serve_each(sock: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    """Accept connections on a listening socket until it is closed, each handled in a thread."""

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()


class Sink:
    """A service that reads each connection to its end, then answers `<bytes> <sha256>\\n`."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])
        self.results: list[Received] = []
        self.connections = 0
        self.received = 0  # bytes so far, all connections
        self._lock = threading.Lock()
        serve_each(self.sock, self._handle)

    def _handle(self, conn: socket.socket) -> None:
        with self._lock:
            self.connections += 1
        got = Received()
        digest = hashlib.sha256()
        with conn:
            try:
                while chunk := conn.recv(1 << 20):
                    now = time.monotonic()
                    if not got.nbytes:
                        got.first = now
                    digest.update(chunk)
                    got.nbytes += len(chunk)
                    with self._lock:
                        self.received += len(chunk)
                    got.last = now
                    got.marks.append((now, got.nbytes))
            except OSError:
                got.reset = True  # the connection was cut: what came is not a whole stream
            got.sha256 = digest.hexdigest()
            with self._lock:  # before the answer: whoever has the answer finds the result
                self.results.append(got)
            with contextlib.suppress(OSError):
                conn.sendall(f"{got.nbytes} {got.sha256}\n".encode())

    def close(self) -> None:
        self.sock.close()


class Echo:
    """A service that sends back what each connection sends it, then closes that connection; it
    notes when each piece arrived (`marks`: time, bytes), for rate measurements."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_server((host, 0), backlog=128)
        self.port = int(self.sock.getsockname()[1])
        self.marks: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        serve_each(self.sock, self._echo)

    def _echo(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while chunk := conn.recv(1 << 16):
                with self._lock:
                    self.marks.append((time.monotonic(), len(chunk)))
                conn.sendall(chunk)

    def close(self) -> None:
        self.sock.close()


def send(address: tuple[str, int], data: bytes | memoryview, chunk: int = 1 << 20) -> tuple[int, str]:
    """Send `data`, half-close, and return what the sink says it received."""
    with socket.create_connection(address, timeout=120) as sock:
        view = memoryview(data)
        for offset in range(0, len(view), chunk):
            sock.sendall(view[offset : offset + chunk])
        sock.shutdown(socket.SHUT_WR)
        reply = sock.makefile("rb").readline().split()
    return int(reply[0]), reply[1].decode()


@dataclass
class S2csProcess:
    """An `s2cs` started as a real process, with its own control port, port range and state dir."""

    name: str
    state_dir: Path
    port_range: tuple[int, int]
    extra: Sequence[str] = ()
    env: dict[str, str] | None = None  # added to this process's environment
    listener_ip: str = "127.0.0.1"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return hostport(self.listener_ip, self.port)

    @property
    def cert(self) -> Path:
        return self.state_dir / "server.crt"

    @property
    def log(self) -> Path:
        return self.state_dir.parent / f"{self.name}.log"

    def argv(self) -> list[str]:
        first, last = self.port_range
        return [
            str(BIN / "s2cs"),
            "--listener-ip", self.listener_ip,
            "--port", str(self.port),
            "--port-range", f"{first}-{last}",
            "--state-dir", str(self.state_dir),
            *self.policy(),
            *self.extra,
        ]  # fmt: skip

    def policy(self) -> list[str]:
        """Services here listen on loopback, which the default policy refuses: allow it, unless
        the caller brings a policy of its own."""
        if any(arg.split("=")[0] in ("--allow-targets", "--policy") for arg in self.extra):
            return []
        return ["--allow-targets", LOOPBACK_TARGETS]

    def start(self, timeout: float = 30.0) -> S2csProcess:
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> S2csProcess:
        """Start it and return at once, ready or not (to catch it while it recovers)."""
        if not self.port:
            self.port = free_port(self.listener_ip)
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            env = {**os.environ, **(self.env or {})}
            self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"s2cs {self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if self.cert.exists():
                    return self.call("info")
            except ScistreamError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"s2cs {self.name} not ready after {timeout}s: {self.log.read_text()[-2000:]}"
                )
            time.sleep(0.1)

    def call(self, op: str, token: str | None = None, **fields: Any) -> dict[str, Any]:
        return call(parse_server(self.address), trust(self.cert), op, token, **fields)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def proxies_of(state_dir: Path) -> list[int]:
    """Pids of the processes whose command line names a file below `state_dir`: its proxies and
    shapers, and whatever else does (a `tail -f` of a log). For tests, to find and stop what a
    test left behind; s2cs itself never picks processes this way, only by what it recorded."""
    marker = str(state_dir.resolve()) + "/"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if any(marker in arg for arg in cmdline):
            found.append(int(process.pid))
    return found
