"""The shaper as a real process (`python -m scistream.s2ds.shaper`) with real sockets on 127.0.0.1.

It runs as an unprivileged user of its own when the tests run as root (as they do in CI), because
that is where the kernel is stingy: beyond `fs.pipe-user-pages-soft` a user's new pipes get two
slots, whatever size is asked for. One test uses up that user's pipe pages on purpose, with a
helper process that holds enlarged pipes until the kernel refuses, so the shaper's pipes are
two-slot pipes deterministically, without touching any sysctl.

Small messages fill a pipe long before its byte size (a slot holds one piece of a segment), and a
consumer that pauses makes the pipe, not the socket, the obstacle: the cases where a relay that
mistakes "pipe full" for "socket drained" waits forever for an edge that never comes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

import scistream
from scistream.loopback import Sink, free_port, send

from ..needs import lacking, require_root
from .conftest import BACKENDS, ending, listen_queue, open_stream

ROOT = os.geteuid() == 0


# --- the shaper's user ---------------------------------------------------------------------------


def spare_uid() -> int:
    """A uid that names nobody and runs nothing here: its pipe accounting is ours alone."""
    busy = {p.info["uids"].real for p in psutil.process_iter(["uids"]) if p.info.get("uids")}
    for uid in range(61_000, 65_000):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if uid not in busy:
                return uid
    raise RuntimeError("no spare uid between 61000 and 65000")


@dataclass(frozen=True)
class User:
    """Who the shaper runs as: a spare uid when we are root, else ourselves."""

    uid: int
    gid: int

    def popen_options(self) -> dict[str, Any]:
        if not ROOT:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


@pytest.fixture(scope="session")
def user() -> User:
    if not ROOT:
        return User(os.getuid(), os.getgid())
    uid = spare_uid()
    return User(uid, uid)


@pytest.fixture(scope="session")
def shaper_env() -> Iterator[dict[str, str]]:
    """The environment the shaper runs in: it needs the standard library and its own package
    only, which is copied where any user may read it. The checkout may be in a folder only its
    owner may enter (mktemp -d makes them 0700), and the shaper runs as another user."""
    where = Path(tempfile.mkdtemp(prefix="ss-pkg-", dir="/tmp"))
    try:
        where.chmod(0o755)
        package = Path(scistream.__file__).resolve().parent
        shutil.copytree(package, where / "scistream", ignore=shutil.ignore_patterns("__pycache__"))
        yield {**os.environ, "PYTHONPATH": str(where), "PYTHONDONTWRITEBYTECODE": "1"}
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="session")
def python(user: User, shaper_env: dict[str, str]) -> str:
    """An interpreter the shaper's user may run: ours, or else the system's when ours lives
    where that user may not look (a pyenv below /root, mode 0700)."""
    probe = "import sys, scistream.s2ds.shaper; assert sys.version_info >= (3, 11)"
    tried = []
    for candidate in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        try:
            found = subprocess.run(
                [candidate, "-c", probe], env=shaper_env, capture_output=True, **user.popen_options()
            )
        except OSError as exc:
            tried.append(f"{candidate}: {exc}")
            continue
        if found.returncode == 0:
            return candidate
        tried.append(f"{candidate}: {found.stderr.decode(errors='replace').strip()[-300:]}")
    pytest.fail(f"no Python 3.11 with the shaper that uid {user.uid} may run: {'; '.join(tried)}")


@pytest.fixture
def home(user: User) -> Iterator[Path]:
    """A directory the shaper's user owns, for its log, its stats and its Unix sockets."""
    path = Path(tempfile.mkdtemp(prefix="ss-shaper-", dir="/tmp"))
    os.chown(path, user.uid, user.gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


HOLDER = r"""
import fcntl, os, sys
size = min(1 << 20, int(open("/proc/sys/fs/pipe-max-size").read()))
held = []
for _ in range(4096):
    r, w = os.pipe()
    held.append((r, w))
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    except PermissionError:
        break
r, w = os.pipe()
print(fcntl.fcntl(w, fcntl.F_GETPIPE_SZ), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def two_slot_pipes(user: User, python: str, shaper_env: dict[str, str]) -> Iterator[int]:
    """Use up the pipe pages of the shaper's user: its new pipes get two slots. Yields their size."""
    require_root("uses up the pipe pages of a user of its own (not ours)")
    holder = subprocess.Popen(
        [python, "-c", HOLDER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=shaper_env,
        **user.popen_options(),
    )
    try:
        assert holder.stdout is not None
        size = int(holder.stdout.readline())
        if size != 2 * os.sysconf("SC_PAGE_SIZE"):
            why = f"this kernel still gives a new pipe {size} bytes (fs.pipe-user-pages-soft is 0?)"
            lacking("a kernel that limits a user's pipe pages", "two-slot pipes", why)
        yield size
    finally:
        holder.kill()
        holder.wait()


# --- the shaper ----------------------------------------------------------------------------------

Address = str | tuple[str, int]


def text(where: Address) -> str:
    return where if isinstance(where, str) else f"{where[0]}:{where[1]}"


@dataclass
class Shaper:
    proc: subprocess.Popen[bytes]
    log: Path

    def cpu(self) -> float:
        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def wakeups(self) -> int:
        """How many times it has slept and woken (the voluntary context switches of its one
        thread): a sleep in epoll_wait is one."""
        return int(psutil.Process(self.proc.pid).num_ctx_switches().voluntary)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start_shaper(
    user: User, python: str, home: Path, shaper_env: dict[str, str]
) -> Iterator[Callable[..., Shaper]]:
    started: list[Shaper] = []

    def start(routes: Sequence[tuple[Address, Address]], rate: int, *options: str) -> Shaper:
        argv = [python, "-m", "scistream.s2ds.shaper", "--rate", str(rate), *options]
        for listen, target in routes:
            argv += ["--route", text(listen), text(target)]
        log = home / f"shaper-{len(started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=home,
                env=shaper_env,
                **user.popen_options(),
            )
        shaper = Shaper(proc, log)
        started.append(shaper)
        deadline = time.monotonic() + 20
        while not shaper.output().startswith("shaper: "):  # printed once every route listens
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the shaper did not start: {shaper.output()}")
            time.sleep(0.05)
        return shaper

    yield start
    for shaper in started:
        shaper.proc.terminate()
        try:
            shaper.proc.wait(10)
        except subprocess.TimeoutExpired:
            shaper.proc.kill()
            shaper.proc.wait()


class Service:
    """What the shaper connects to: a listener whose connections the test takes one by one."""

    def __init__(self, where: Address = ("127.0.0.1", 0)) -> None:
        family = socket.AF_UNIX if isinstance(where, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(where)
        if isinstance(where, str):
            os.chmod(where, 0o777)  # noqa: S103 (the shaper's user connects to it)
        self.sock.listen(64)
        self.sock.settimeout(20)
        self.address: Address = self.sock.getsockname() if not isinstance(where, str) else where

    def accept(self, timeout: float = 20) -> socket.socket:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.settimeout(60)
        return conn

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def service() -> Iterator[Service]:
    svc = Service()
    yield svc
    svc.close()


def connect(where: Address) -> socket.socket:
    if isinstance(where, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(60)
        sock.connect(where)
    else:
        sock = socket.create_connection(where, timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one small segment per message
    return sock


def local() -> tuple[str, int]:
    return ("127.0.0.1", free_port())


# --- traffic -------------------------------------------------------------------------------------


def messages(count: int, seed: int, low: int = 10, high: int = 100) -> list[bytes]:
    """`count` messages of `low`-`high` random bytes."""
    rng = random.Random(seed)
    data = rng.randbytes(count * high)
    found, offset = [], 0
    for _ in range(count):
        size = rng.randint(low, high)
        found.append(data[offset : offset + size])
        offset += size
    return found


@dataclass
class Side:
    """What one end of a connection sent and got, done in threads with bounded waits."""

    sock: socket.socket
    sent: int = 0
    got: bytearray = field(default_factory=bytearray)
    eof: bool = False
    error: str = ""
    threads: list[threading.Thread] = field(default_factory=list)

    def pour(self, parts: Sequence[bytes], then_shut: bool = True) -> None:
        def run() -> None:
            try:
                for part in parts:
                    self.sock.sendall(part)
                    self.sent += len(part)
                if then_shut:
                    self.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self.error = f"send: {exc}"

        self._start(run)

    def drain(self, pause: float = 0.0, chunk: int = 65536, every: float = 0.0) -> None:
        """Read to the end of the stream, after `pause` s, `chunk` bytes at a time every `every` s."""

        def run() -> None:
            time.sleep(pause)  # a reader late or slow on purpose: what is tested, not an event
            try:
                while data := self.sock.recv(chunk):
                    self.got.extend(data)
                    if every:
                        time.sleep(every)
                self.eof = True
            except OSError as exc:
                self.error = f"recv: {exc}"

        self._start(run)

    def _start(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.threads.append(thread)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)


def exchange(
    client: socket.socket,
    server: socket.socket,
    up: Sequence[bytes],
    down: Sequence[bytes],
    pause: float,
    timeout: float = 90,
    every: float = 0.0,
) -> tuple[Side, Side]:
    """Both directions at once, each half-closed after its last message; each reader pauses first."""
    a, b = Side(client), Side(server)
    a.pour(up)
    b.pour(down)
    a.drain(pause, chunk=4096, every=every)
    b.drain(pause, chunk=4096, every=every)
    done = a.wait(timeout) and b.wait(timeout)
    summary = (
        f"up: sent {a.sent}, delivered {len(b.got)} of {sum(map(len, up))}; "
        f"down: sent {b.sent}, delivered {len(a.got)} of {sum(map(len, down))} {a.error} {b.error}"
    )
    assert done, f"stalled after {timeout} s: {summary}"
    assert bytes(b.got) == b"".join(up), summary
    assert bytes(a.got) == b"".join(down), summary
    assert a.eof and b.eof and not a.error and not b.error, summary
    return a, b


# --- 5a: "pipe full" is not "socket drained" -----------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "unix_target", "count"),
    [(0, False, 200_000), (2_000_000, True, 60_000)],
    ids=["unlimited-tcp", "2MBps-unix"],
)
def test_small_messages_all_reach_a_consumer_that_pauses(start_shaper, home, rate, unix_target, count):
    """Thousands of 10-100 byte messages, then a half-close; the consumer reads nothing for 2 s.

    Each message is a segment and a pipe slot holds one, so the pipe fills long before its byte
    size while the consumer is away; the sender has finished (or is blocked), so no new edge
    comes. The old loop took the pipe's EAGAIN for a drained socket and waited forever."""
    service = Service(str(home / "service.sock") if unix_target else ("127.0.0.1", 0))
    try:
        listen = local()
        start_shaper([(listen, service.address)], rate)
        client = connect(listen)
        server = service.accept()
        with client, server:
            exchange(client, server, messages(count, 1), [b"ok"], pause=2.0)
    finally:
        service.close()


# --- 5b: two-slot pipes --------------------------------------------------------------------------


def test_two_slot_pipes_carry_small_messages_both_ways(start_shaper, service, home, two_slot_pipes):
    """The shaper's user is beyond fs.pipe-user-pages-soft: F_SETPIPE_SZ fails and every pipe
    has two slots. The shaper must say so and still carry every byte, both directions at once,
    to consumers that pause and then read slowly. As behind an inbound proxy: the proxy's side
    is a Unix socket, the service's a TCP one."""
    listen = str(home / "shaper-0.sock")
    shaper = start_shaper([(listen, service.address)], 2_000_000)
    client = connect(listen)
    server = service.accept()
    with client, server:  # 2.2 MB each way; after the pause, consumers take 1 MB/s
        exchange(client, server, messages(40_000, 2), messages(40_000, 3), pause=1.0, every=0.004)
    assert f"{two_slot_pipes} bytes" in shaper.output()  # it says how small its pipes are, and why


# --- 5c: wake-ups and burst ----------------------------------------------------------------------


def test_a_slow_session_passes_no_16_kib_burst(start_shaper, service):
    """At 1 kb/s (125 bytes/s) a burst of 16 KiB was 131 s of the rate, let through at once."""
    listen = local()
    start_shaper([(listen, service.address)], 125)
    client = connect(listen)
    server = service.accept()
    with client, server:
        client.sendall(os.urandom(4000))
        got = 0
        server.settimeout(0.2)
        start = time.monotonic()
        while time.monotonic() < start + 2.0:
            with contextlib.suppress(TimeoutError):
                got += len(server.recv(65536))
    assert 100 <= got <= 125 * 2 + 125, f"{got} bytes in 2 s at 125 bytes/s"


def test_a_throttled_direction_wakes_the_shaper_only_when_a_quantum_is_due(start_shaper, service):
    """A sender far faster than 1 kb/s and an idle other direction: the shaper sleeps between
    quanta. It used to wake 1000 times a second, because the idle direction's full bucket asked
    for a wake-up in 1 ms. Its wake-ups are counted (each sleep in epoll_wait is a voluntary
    context switch), not its CPU: each costs a few hundred microseconds of splicing on the
    loopback, more on a busy machine, and a bound on CPU seconds once failed there at about
    30 wake-ups in 3 s, the number it should have."""
    listen = local()
    shaper = start_shaper([(listen, service.address)], 125)
    client = connect(listen)
    server = service.accept()
    with client, server:
        sender = Side(client)
        sender.pour([b"x" * 65536] * 64, then_shut=False)
        reader = Side(server)
        reader.drain()
        wait_until(lambda: reader.got, "the first bytes through the shaper")
        before, had = shaper.wakeups(), len(reader.got)
        time.sleep(3.0)  # the time whose wake-ups are counted: what is tested, not an event
        woke, carried = shaper.wakeups() - before, len(reader.got) - had
    # Asleep, but not stuck: the bytes went on at the rate meanwhile (375 in 3 s).
    assert 200 <= carried <= 800, f"{carried} bytes in 3 s at 125 bytes/s"
    assert woke < 150, f"{woke} wake-ups in 3 s at 125 bytes/s (about 30 are due)"


def test_an_idle_shaper_takes_no_cpu(start_shaper, service, home):
    listen = local()
    shaper = start_shaper([(listen, service.address)], 1_000_000, "--stats", str(home / "stats.json"))
    client = connect(listen)
    server = service.accept()
    with client, server:
        client.sendall(b"hello")
        assert server.recv(100) == b"hello"
        server.sendall(b"hi")
        assert client.recv(100) == b"hi"
        stats = home / "stats.json"
        counted = {"connections": 1, "total_connections": 1, "bytes_in": 5, "bytes_out": 2, "refused": 0}
        wait_until(lambda: _stats(stats) == counted, f"the last stats written ({counted})")
        before = shaper.cpu()
        time.sleep(3.0)  # the time whose CPU is measured: what is tested, not an event
        spent = shaper.cpu() - before
    assert spent < 0.03, f"{spent:.3f} s of CPU in 3 s with nothing to do"


# --- what the shaper has always promised ---------------------------------------------------------


def test_the_rate_is_shared_by_all_connections_of_all_routes_in_each_direction(start_shaper):
    """Two routes, two connections each, both directions at once: each direction carries the
    rate (within 15 % over 3 s) and every connection a fair part of it."""
    rate = 2_000_000
    services = [Service(), Service()]
    pairs: list[tuple[socket.socket, socket.socket]] = []
    try:
        listens = [local(), local()]
        start_shaper([(listens[i], services[i].address) for i in range(2)], rate)
        for i in (0, 0, 1, 1):
            client = connect(listens[i])
            pairs.append((client, services[i].accept()))
        ups = [Side(server) for _, server in pairs]
        downs = [Side(client) for client, _ in pairs]
        for (client, server), up, down in zip(pairs, ups, downs, strict=True):
            Side(client).pour([b"u" * 16384] * 10_000, then_shut=False)
            Side(server).pour([b"d" * 16384] * 10_000, then_shut=False)
            up.drain()
            down.drain()
        # A window of steady rate, measured: what is tested, not an event. Its first second
        # is left out, as a bucket's first burst is no part of the rate.
        time.sleep(1.0)
        start = [len(s.got) for s in ups + downs]
        time.sleep(3.0)
        moved = [len(s.got) - n for s, n in zip(ups + downs, start, strict=True)]
    finally:
        for client, server in pairs:
            client.close()
            server.close()
        for svc in services:
            svc.close()
    for direction in (moved[:4], moved[4:]):
        total = sum(direction) / 3.0
        assert abs(total - rate) < 0.15 * rate, f"{total:.0f} bytes/s for a rate of {rate}: {moved}"
        assert min(direction) > 0.10 * sum(direction), f"a connection starved: {moved}"


@pytest.mark.parametrize("first", ["client", "service"])
def test_a_half_close_is_passed_on_after_every_byte_before_it(start_shaper, service, first):
    """One side sends small messages and half-closes; the other goes on sending for a while and
    reads the FIN only after the last byte, then closes too."""
    listen = local()
    start_shaper([(listen, service.address)], 3_000_000)
    client = connect(listen)
    server = service.accept()
    with client, server:
        early, late = (client, server) if first == "client" else (server, client)
        a, b = Side(early), Side(late)
        a.pour(messages(5000, 4))  # then the FIN
        b.drain()  # sees the FIN after the 5000 messages ...
        assert b.wait(30), "the FIN did not come"
        assert bytes(b.got) == b"".join(messages(5000, 4)) and b.eof
        b.threads.clear()
        b.pour(messages(5000, 5))  # ... while the other way still flows, then ends
        a.drain()
        assert a.wait(30) and b.wait(30), "the second direction stalled"
        assert bytes(a.got) == b"".join(messages(5000, 5)) and a.eof


def test_a_reset_is_passed_on_as_a_reset(start_shaper, service):
    listen = local()
    start_shaper([(listen, service.address)], 1_000_000)
    client = connect(listen)
    server = service.accept()
    with server:
        client.sendall(b"partial")
        assert server.recv(100) == b"partial"
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        server.settimeout(10)
        with pytest.raises(ConnectionResetError):
            while server.recv(100):
                pass


def test_a_killed_shaper_resets_the_service_and_the_sender_while_bytes_are_in_flight(start_shaper, service):
    """The kernel closes a killed process's sockets: with a FIN after what they queue, the
    service would take a cut stream for a whole one (what the shaper's pipe held died with it)."""
    listen = local()
    shaper = start_shaper([(listen, service.address)], 0)
    client = connect(listen)
    server = service.accept()  # and reads nothing: the sender is still writing at the kill
    written = threading.Event()
    sent: list[str] = []

    def send_more_than_the_path_holds() -> None:
        try:
            client.sendall(os.urandom(64 << 20))
            sent.append("all")
        except OSError as exc:
            sent.append(type(exc).__name__)
        written.set()

    sender = threading.Thread(target=send_more_than_the_path_holds)
    sender.start()
    with client, server:
        wait_until(lambda: _queued(server) > 0, "the bytes at the service")
        assert not written.is_set()
        shaper.proc.kill()
        shaper.proc.wait()
        assert ending(server) == "ConnectionResetError"
        sender.join(60)
        # The reset ends its writing (or a broken pipe, if a write came after the reset).
        assert sent in (["ConnectionResetError"], ["BrokenPipeError"])


PROXY = r"""
import socket, sys, time
sock = socket.socket(socket.AF_UNIX)
sock.bind(sys.argv[1])
import os; os.chmod(sys.argv[1], 0o777)
sock.listen()
print("listening", flush=True)
conn, _ = sock.accept()
while conn.recv(65536):
    pass
print("read to the end", flush=True)
time.sleep(600)  # holds the connection open until the test kills it
"""


def test_the_end_of_a_killed_proxy_is_passed_on_as_a_reset(start_shaper, home):
    """A Unix socket has no reset: the kernel ends a killed proxy's connections as if it had
    closed them. The shaper in front of it tells its end from an orderly one by the proxy's life,
    and resets the sender, which would otherwise take the cut for a delivery."""
    path = str(home / "proxy.sock")
    proxy = subprocess.Popen([sys.executable, "-c", PROXY, path], stdout=subprocess.PIPE, text=True)
    try:
        assert proxy.stdout is not None and proxy.stdout.readline() == "listening\n"
        listen = local()
        start_shaper([(listen, path)], 0)
        with connect(listen) as client:
            client.sendall(b"a whole scan" * 1000)
            client.shutdown(socket.SHUT_WR)
            assert proxy.stdout.readline() == "read to the end\n"
            proxy.kill()
            assert ending(client) == "ConnectionResetError"
    finally:
        proxy.kill()
        proxy.wait()


def test_an_orderly_end_stays_a_fin_with_every_byte(start_shaper, service):
    """The reset is only for cuts: a connection that ends in order ends with its FIN, and
    nothing queued for the peer is thrown away."""
    listen = local()
    start_shaper([(listen, service.address)], 0)
    payload = os.urandom(8 << 20)
    with connect(listen) as client, service.accept() as server:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := server.recv(1 << 20):
            got.extend(chunk)
        assert bytes(got) == payload
        server.sendall(b"done")
        server.shutdown(socket.SHUT_WR)
        assert client.recv(100) == b"done" and client.recv(100) == b""


def _queued(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def _stats(path: Path) -> object:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        return json.loads(path.read_text())
    return None


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.02)


def test_a_refused_target_resets_the_client(start_shaper):
    listen = local()
    start_shaper([(listen, local())], 1_000_000)  # nobody listens there
    with connect(listen) as client:
        client.settimeout(10)
        with pytest.raises(ConnectionResetError):
            while client.recv(100):
                pass


def test_connection_n_plus_1_waits_in_the_listen_queue(start_shaper, service):
    listen = local()
    start_shaper([(listen, service.address)], 0, "--max-conn", "2")
    clients = [connect(listen) for _ in range(3)]
    try:
        served = [service.accept(), service.accept()]
        # The third waits in the shaper's listen queue, and so never reached the service ...
        wait_until(lambda: listen_queue(*listen) == 1, "a connection in the shaper's listen queue")
        assert listen_queue(*service.address) == 0
        clients[2].sendall(b"queued")
        clients[0].close()
        served[0].close()
        third = service.accept(timeout=10)  # ... until one closes
        served.append(third)
        assert third.recv(100) == b"queued"
    finally:
        for sock in clients + served:
            sock.close()


def test_stats_count_connections_and_bytes(start_shaper, service, home):
    stats = home / "stats.json"
    listen = local()
    start_shaper([(listen, service.address)], 1_000_000, "--stats", str(stats))

    def wait_for(expected: dict[str, int]) -> None:
        deadline = time.monotonic() + 10
        found: object = None
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                found = json.loads(stats.read_text())
                if found == expected:
                    return
            time.sleep(0.1)
        raise AssertionError(f"stats {found}, not {expected}")

    client = connect(listen)
    server = service.accept()
    with server:
        client.sendall(b"x" * 1000)
        server.sendall(b"y" * 500)
        wait_for({"connections": 1, "total_connections": 1, "bytes_in": 1000, "bytes_out": 500, "refused": 0})
        client.close()
    wait_for({"connections": 0, "total_connections": 1, "bytes_in": 1000, "bytes_out": 500, "refused": 0})


# --- 8: a path with "=" ---------------------------------------------------------------------------


def test_unix_sockets_in_a_directory_with_an_equals_sign(start_shaper, home, user):
    """Listen on a Unix socket whose path has "=" in it and relay to another one."""
    directory = home / "a=b" / "x=y"
    directory.mkdir(parents=True)
    for path in (directory.parent, directory):
        os.chown(path, user.uid, user.gid)
    service = Service(str(directory / "service.sock"))
    try:
        listen = str(directory / "shaper-0.sock")
        start_shaper([(listen, service.address)], 1_000_000)
        assert Path(listen).is_socket() and not (home / "a").exists()
        client = connect(listen)
        server = service.accept()
        with client, server:
            exchange(client, server, messages(2000, 6), messages(2000, 7), pause=0.2)
    finally:
        service.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_state_dir_with_an_equals_sign_carries_a_rate_limited_stream(start_s2cs, workdir, backend):
    """The operator guide allows any state dir; one with "=" failed every request after 10 s."""
    hpc = start_s2cs("hpc=1", backend=backend)
    inst = start_s2cs("instrument=2", backend=backend)
    sink = Sink()
    try:
        port = open_stream(hpc, inst, sink.port, rate=10_000).port
        data = os.urandom(500_000)
        assert send(("127.0.0.1", port), data) == (len(data), hashlib.sha256(data).hexdigest())
    finally:
        sink.close()
    assert sorted(p.name for p in workdir.iterdir() if p.is_socket()) == []  # none beside the state dirs
    assert list(hpc.state_dir.rglob("shaper-0.sock")) and list(inst.state_dir.rglob("shaper-0.sock"))
