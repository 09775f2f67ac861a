"""What the state dir holds over time: proxy logs within their bound. What each test shows is
summed up in the operator guide ("Logs and disk space").
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from .conftest import BACKENDS, open_stream

LOG_LIMIT = 4096  # --log-max-bytes of these tests; the default is 10 MiB
KEEP = 3  # rotated parts kept (supervisor.LOG_KEEP)
# One tick of the supervisor (0.2 s) of a busy machine's worth of lines beyond the limit.
SLACK = 32 * 1024


class Echo:
    """A service that sends back what it gets, then closes: proxies log the byte count of each
    connection (HAProxy's tcplog, stunnel's "Connection closed"), so a size marks a connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


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
    first, last = os.urandom(424242), os.urandom(535353)  # sizes no other line can contain
    assert echoed(port, first) == first
    for i in range(600):
        data = f"short connection {i}\n".encode()
        assert echoed(port, data) == data
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
        text = {name: (session / name).read_text(errors="replace") for name in parts}
        # What is kept is the newest: the last connection is there, the first one gone.
        assert any(str(len(last)) in text[name] for name in ("proxy.log", "proxy.log.1")), text
        assert not any(str(len(first)) in t for t in text.values())
        assert not list(session.glob(".*rotating"))  # no half-made part left behind
        # The shaper has its own log, bounded the same way; it says little.
        assert all(size < LOG_LIMIT + SLACK for size in log_parts(session, "shaper").values())
    # Nothing was restarted to rotate the logs: the stream still carries data.
    for gw in (hpc, inst):
        (entry,) = gw.call("status")["streams"]
        assert (entry["state"], entry["restarts"]) == ("RUNNING", 0)
    assert echoed(port, b"still there\n") == b"still there\n"
    echo.close()
