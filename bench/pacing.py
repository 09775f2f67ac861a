"""Experiment: how exactly the kernel paces a TCP socket (SO_MAX_PACING_RATE, option 47; TCP's own
pacing, no `fq` needed since Linux 4.13), as a way to enforce a stream's rate without the token
bucket of scistream/s2ds/shaping.py.

`python -m bench.pacing` (in a private network namespace: scripts/run-isolated): for 1, 10, 100
and 1000 Mbit/s, N connections on loopback from this process to itself, each paced at the rate
divided by N, every sender writing as fast as its socket takes; what arrives over 5 s after a
1 s warm-up, all connections together, against the rate. With `churn`, every 0.5 s the oldest
connection ends and a new one starts, and the rate is divided anew among the live ones: `close`
closes it at once (what it still queued is sent after, at its old pace), `drain` stops writing to
it and keeps it in the division until its send queue is empty (SIOCOUTQ), then closes it.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import sys
import termios
import threading
import time

SO_MAX_PACING_RATE = 47
WARM_UP, WINDOW = 1.0, 5.0


class Run:
    def __init__(self, rate_bps: float, connections: int) -> None:
        self.rate = rate_bps
        self.server = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.server.getsockname()[1]
        self.total = 0
        self.lock = threading.Lock()
        self.live: list[tuple[socket.socket, threading.Event]] = []
        threading.Thread(target=self._accept, daemon=True).start()
        for _ in range(connections):
            self.add()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._count, args=(conn,), daemon=True).start()

    def _count(self, conn: socket.socket) -> None:
        buffer = bytearray(1 << 20)
        with conn:
            while n := conn.recv_into(buffer):
                with self.lock:
                    self.total += n

    def pace(self) -> None:
        each = max(1, int(self.rate / 8 / len(self.live)))
        for sock, _ in self.live:
            sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, struct.pack("Q", each))

    def add(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port))
        stop = threading.Event()
        self.live.append((sock, stop))
        self.pace()
        threading.Thread(target=self._send, args=(sock, stop), daemon=True).start()

    @staticmethod
    def _send(sock: socket.socket, stop: threading.Event) -> None:
        block = bytes(1 << 16)
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                sock.send(block)
            except TimeoutError:
                continue
            except OSError:
                return

    def end_oldest(self, drain: bool) -> None:
        sock, stop = self.live[0]
        stop.set()
        if drain:  # still counted among the live ones, and paced as one, until its queue is sent
            while struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]:
                time.sleep(0.01)
        self.live.remove((sock, stop))
        self.pace()
        sock.close()

    def measure(self, churn: str) -> float:
        time.sleep(WARM_UP)
        with self.lock:
            start, before = time.monotonic(), self.total
        while time.monotonic() < start + WINDOW:
            time.sleep(0.5)
            if churn:
                # the new one first: a drain may take long at a low rate
                self.add()
                self.end_oldest(churn == "drain")
        with self.lock:
            end, after = time.monotonic(), self.total
        for sock, stop in self.live:
            stop.set()
            sock.close()
        self.server.close()
        return (after - before) * 8 / (end - start)


def main() -> int:
    print(f"{'connections':>11} {'churn':>6} {'asked Mbit/s':>13} {'carried':>9} {'error':>8}")
    for connections, churn in ((1, ""), (4, ""), (4, "close"), (4, "drain")):
        for mbit in (1, 10, 100, 1000):
            carried = Run(mbit * 1e6, connections).measure(churn)
            error = carried / (mbit * 1e6) - 1
            print(
                f"{connections:>11} {churn or '-':>6} {mbit:>13} {carried / 1e6:>9.3f} {error:>+8.2%}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
