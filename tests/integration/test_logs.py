"""What the state dir holds over time: proxy logs within their bound, and a full disk that fails
a request clearly while the streams already running go on. What each test shows is summed up in
the operator guide ("Logs and disk space").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from scistream.errors import BackendFailed
from scistream.loopback import Echo, Sink, send

from ..needs import require_command, require_root
from .conftest import BACKENDS, open_stream, s2uc

LOG_LIMIT = 4096  # --log-max-bytes of these tests; the default is 10 MiB
KEEP = 3  # rotated parts kept (supervisor.LOG_KEEP)
# One tick of the supervisor (0.2 s) of a busy machine's worth of lines beyond the limit.
SLACK = 32 * 1024


def echoed(port: int, data: bytes) -> bytes:
    """Send `data` through the stream to the echo service, half-close, return what came back."""
    back = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        reader = threading.Thread(target=lambda: _read_all(sock, back), daemon=True)
        reader.start()
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reader.join(60)
    return bytes(back)


def _read_all(sock: socket.socket, into: bytearray) -> None:
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            into += chunk


def log_parts(session: Path, kind: str = "proxy") -> dict[str, int]:
    """The files of one process's log in a session directory, and their sizes."""
    return {p.name: p.stat().st_size for p in sorted(session.glob(f"{kind}.log*"))}


def only_session(state_dir: Path) -> Path:
    (session,) = (state_dir / "sessions").iterdir()
    return session


@pytest.mark.parametrize("backend", BACKENDS)
def test_proxy_logs_stay_within_their_bound_through_hundreds_of_connections(start_s2cs, backend):
    hpc = start_s2cs("hpc", "--log-max-bytes", str(LOG_LIMIT), backend=backend)
    inst = start_s2cs("instrument", "--log-max-bytes", str(LOG_LIMIT), backend=backend)
    echo = Echo()
    port = open_stream(hpc, inst, echo.port, rate=0, num_conn=2).port
    first = os.urandom(424242)  # a size no other line can contain
    assert echoed(port, first) == first
    _many_connections_stay_within_the_bound(hpc, inst, port, first)
    echo.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logs_of_re_adopted_proxies_stay_within_their_bound(start_s2cs, backend):
    """After a restart of s2cs, the proxies it takes over are rotated as well, without a hole
    (HAProxy took O_APPEND away with its first line, before the restart)."""
    hpc = start_s2cs("hpc", "--log-max-bytes", str(LOG_LIMIT), backend=backend)
    inst = start_s2cs("instrument", "--log-max-bytes", str(LOG_LIMIT), backend=backend)
    echo = Echo()
    stream = open_stream(hpc, inst, echo.port, rate=0, num_conn=2)
    first = os.urandom(424242)
    assert echoed(stream.port, first) == first
    before = [_pids(gw, stream.uid) for gw in (hpc, inst)]
    for gw in (hpc, inst):
        gw.stop(signal.SIGKILL)
        gw.start()
    assert [_pids(gw, stream.uid) for gw in (hpc, inst)] == before  # taken over, not started again
    _many_connections_stay_within_the_bound(hpc, inst, stream.port, first)
    echo.close()


def _counts(text: str, size: int) -> bool:
    """Whether a proxy's log line counts a connection that carried `size` bytes of the stream:
    the proxy carries them in frames (docs/reliability.md, "How"), a few bytes more."""
    return any(size <= int(n) <= size + FRAMING_SLACK for n in re.findall(r"\b\d+\b", text))


FRAMING_SLACK = 4096  # bytes: the preamble, the end and a header per frame, far fewer than this


def _pids(gw, uid: str) -> list[int]:
    (entry,) = gw.call("status", uid=uid)["streams"]
    return [p["pid"] for p in entry["processes"]]


def _many_connections_stay_within_the_bound(hpc, inst, port: int, first: bytes) -> None:
    for i in range(600):
        data = f"short connection {i}\n".encode()
        assert echoed(port, data) == data
    last = os.urandom(535353)
    assert echoed(port, last) == last

    sessions = [only_session(gw.state_dir) for gw in (hpc, inst)]
    deadline = time.monotonic() + 30  # the lines of the last connection, then one more tick
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if all(log_parts(s)["proxy.log"] < LOG_LIMIT for s in sessions):
            break
    for session in sessions:
        parts = log_parts(session)
        # Rotated, the oldest parts dropped: never more than the log and KEEP parts.
        assert list(parts) == ["proxy.log", *(f"proxy.log.{i}" for i in range(1, KEEP + 1))], parts
        assert parts["proxy.log"] < LOG_LIMIT, parts
        assert all(size < LOG_LIMIT + SLACK for size in parts.values()), parts
        data = {name: (session / name).read_bytes() for name in parts}
        assert not any(b"\0" in d for d in data.values())  # no hole where earlier lines were
        text = {name: d.decode(errors="replace") for name, d in data.items()}
        # What is kept is the newest: the last connection is there, the first one gone.
        assert any(_counts(text[name], len(last)) for name in ("proxy.log", "proxy.log.1")), text
        assert not any(_counts(t, len(first)) for t in text.values())
        assert not list(session.glob(".*rotating"))  # no half-made part left behind
        # The shaper has its own log, bounded the same way; it says little.
        assert all(size < LOG_LIMIT + SLACK for size in log_parts(session, "shaper").values())
    # Nothing was restarted to rotate the logs: the stream still carries data.
    for gw in (hpc, inst):
        (entry,) = gw.call("status")["streams"]
        assert (entry["state"], entry["restarts"]) == ("RUNNING", 0)
    assert echoed(port, b"still there\n") == b"still there\n"


# --- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(workdir: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs where the hpc gateway keeps its state dir; unmounted afterwards."""
    require_root("mounting a small tmpfs")
    require_command("mount", "mounting a small tmpfs")
    mountpoint = workdir / "hpc"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "scistream-test", str(mountpoint)],
        check=True,
        timeout=30,
    )
    try:
        yield mountpoint
    finally:
        # The gateways and their proxies are stopped by then: start_s2cs is torn down first.
        for _ in range(50):
            if subprocess.run(["umount", str(mountpoint)], timeout=30).returncode == 0:
                break
            time.sleep(0.2)
        else:
            subprocess.run(["umount", "-l", str(mountpoint)], timeout=30, check=True)


def fill(path: Path) -> None:
    """Write zeros to `path` until its file system is full."""
    block = b"\0" * 65536
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, block)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    try:  # the last pages, smaller than a block
        while True:
            os.write(fd, b"\0" * 512)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


class Sender:
    """One connection of a running stream that sends random blocks until it is told to stop."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.digest = hashlib.sha256()
        self.sent = 0
        self.answer: tuple[int, str] | None = None
        self.error: OSError | None = None  # the connection was cut
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rng = random.Random(8)
        try:
            with self.sock:
                while not self._stop.is_set():
                    block = rng.randbytes(256 * 1024)
                    self.sock.sendall(block)
                    self.digest.update(block)
                    self.sent += len(block)
                    time.sleep(0.01)  # pacing, not an event: a steady stream all along the test
                self.sock.shutdown(socket.SHUT_WR)
                words = self.sock.makefile("rb").readline().split()
                self.answer = (int(words[0]), words[1].decode())
        except OSError as exc:
            self.error = exc

    def finish(self) -> tuple[tuple[int, str], tuple[int, str] | OSError | None]:
        """(what was sent, what the service says it got or how the connection was cut)."""
        self._stop.set()
        self._thread.join(120)
        return (self.sent, self.digest.hexdigest()), self.error or self.answer


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_full_disk_fails_a_request_clearly_and_running_streams_go_on(
    small_disk, start_s2cs, workdir, backend
):
    hpc = start_s2cs("hpc", backend=backend)
    assert hpc.state_dir == small_disk
    inst = start_s2cs("instrument", backend=backend)
    sink = Sink()
    stream = open_stream(hpc, inst, sink.port, rate=0)
    sender = Sender(stream.port)  # carries data all along
    deadline = time.monotonic() + 60
    while sender.sent < 4 << 20 and time.monotonic() < deadline:
        time.sleep(0.05)

    fill(small_disk / "filler")
    # The stream carries 4 MiB more with the disk full (the proxies log, the shaper counts, s2cs
    # ticks meanwhile), and s2cs still answers.
    full_at = sender.sent
    deadline = time.monotonic() + 60
    while sender.sent < full_at + (4 << 20) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sender.sent >= full_at + (4 << 20), f"the stream stopped when the disk filled: {sender.finish()}"

    # A new connection of the running stream still gets through, byte-exact.
    data = os.urandom(1 << 20)
    assert send(("127.0.0.1", stream.port), data) == (len(data), hashlib.sha256(data).hexdigest())
    # A new stream cannot be set up: one clear error, with what to do.
    other = Sink()
    with pytest.raises(BackendFailed) as caught:
        hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[other.port])
    message = caught.value.message
    assert message.startswith(f"the disk of the state dir {hpc.state_dir} is full"), message
    assert "free space there" in message
    result = s2uc(
        "inbound_request",
        *("--s2cs", hpc.address, "--server_cert", str(workdir / "hpc.crt")),
        *("--remote_ip", "127.0.0.1", "--receiver_ports", str(other.port)),
        check=False,
    )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line == f"error: {message} (BACKEND_FAILED from {hpc.address})"
    # Nothing of the failed requests is left; the running stream is untouched.
    assert hpc.call("info")["streams"] == 1
    assert len(list((hpc.state_dir / "sessions").iterdir())) == 1
    (entry,) = hpc.call("status", uid=stream.uid)["streams"]
    assert (entry["state"], entry["restarts"]) == ("RUNNING", 0)
    sent, answer = sender.finish()
    assert answer == sent

    # Space again: the next request works.
    (small_disk / "filler").unlink()
    uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[other.port])["uid"]
    for gw in (hpc, inst):
        gw.call("release", uid=stream.uid)
    hpc.call("release", uid=uid)


def test_a_proxy_whose_session_directory_was_deleted_says_so_in_status(start_s2cs):
    hpc = start_s2cs("hpc", backend="haproxy")
    sink = Sink()
    uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)["uid"]
    session = only_session(hpc.state_dir)
    (entry,) = hpc.call("status", uid=uid)["streams"]
    (proxy,) = [p for p in entry["processes"] if p["name"] == "proxy"]
    shutil.rmtree(session)  # by hand, by mistake
    psutil.Process(proxy["pid"]).kill()
    deadline = time.monotonic() + 60
    while entry["state"] != "FATAL" and time.monotonic() < deadline:
        time.sleep(0.5)
        (entry,) = hpc.call("status", uid=uid)["streams"]
    assert entry["state"] == "FATAL"
    assert entry["last_error"] == (
        f"proxy: cannot open its log {session}/proxy.log: the session directory {session} is gone; "
        "release the stream and request it again"
    )
    hpc.call("release", uid=uid)


def _process(gw, uid: str, kind: str) -> dict:
    (entry,) = gw.call("status", uid=uid)["streams"]
    return next(p for p in entry["processes"] if p["name"] == kind)


def _plant(link: Path, target: Path) -> None:
    """What a compromised proxy or shaper can do in its session directory: a link for a file."""
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def test_links_planted_for_logs_change_and_reveal_nothing_else(start_s2cs, workdir):
    """A process of the session (it writes where its log is) puts links where s2cs, as root,
    rotates, reads and appends: no host file is overwritten, truncated or appended to, and
    `s2uc status --log` prints no other file (the control-plane key)."""
    hpc = start_s2cs("hpc", "--log-max-bytes", str(LOG_LIMIT))
    sink = Sink()
    uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=20000)["uid"]
    session = only_session(hpc.state_dir)
    key = hpc.state_dir / "server.key"
    victims = {name: workdir / name for name in ("overwritten", "truncated", "appended")}
    for victim in victims.values():
        victim.write_text(f"{victim.name}: a file of the host\n" * 300)  # above LOG_LIMIT
    before = {victim: victim.read_bytes() for victim in victims.values()}
    listener = int(hpc.call("status", uid=uid)["streams"][0]["listeners"][0].rsplit(":", 1)[1])

    # A rotation: its copy goes to a fresh file, never through a link in its place.
    _plant(session / ".proxy.log.rotating", victims["overwritten"])
    deadline = time.monotonic() + 60
    while not (session / "proxy.log.1").exists():  # HAProxy logs each refused handshake
        assert time.monotonic() < deadline, "the proxy's log was not rotated"
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", listener), timeout=10) as sock,
        ):
            sock.sendall(b"not TLS\n")
            sock.recv(100)

    # A link in place of the log: not rotated (its size is the link's), so nothing is truncated.
    _plant(session / "proxy.log", victims["truncated"])
    shaper = _process(hpc, uid, "shaper")
    os.kill(shaper["pid"], signal.SIGKILL)  # the supervisor's ticks go on meanwhile

    def started_again(times: int) -> bool:
        found = _process(hpc, uid, "shaper")
        return found["restarts"] >= times and found["state"] == "RUNNING"

    deadline = time.monotonic() + 60
    while not started_again(1):
        assert time.monotonic() < deadline, "the shaper was not started again"
        time.sleep(0.05)

    _plant(session / "proxy.log", key)
    shown = s2uc("status", uid, "--log", "--s2cs", hpc.address, "--server_cert", str(hpc.cert)).stdout
    assert "PRIVATE KEY" not in shown

    # A restart does not append its output to a link's target: it fails, and says why.
    _plant(session / "shaper.log", victims["appended"])
    os.kill(_process(hpc, uid, "shaper")["pid"], signal.SIGKILL)

    def tried_again() -> dict:
        found = _process(hpc, uid, "shaper")
        return found if found["restarts"] >= 2 and found["state"] != "STARTING" else {}

    deadline = time.monotonic() + 60
    while not (tried := tried_again()):
        assert time.monotonic() < deadline, "no further start of the shaper"
        time.sleep(0.05)
    assert tried["state"] in ("BACKOFF", "FATAL")
    assert {victim: victim.read_bytes() for victim in victims.values()} == before
    assert "PRIVATE KEY" in key.read_text()
    sink.close()
