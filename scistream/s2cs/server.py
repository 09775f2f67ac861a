"""The control port: TLS, one JSON line in, one JSON line out, then the connection closes.

asyncio carries the connections, so hundreds of idle or slow clients cost a few kilobytes each and
never hold a worker (a connection does its TLS itself, and has any TLS state only once its client has
sent a byte: _Connection); only a complete, framed request reaches the bounded pool of worker threads
that run the gateway's operations. Every read and write has a deadline.

One client address holds at most `max_per_address` connections: when it opens one more, its
oldest idle connection is closed to make room, and when none of them is idle the new request is
refused. So one host cannot take every connection, while its newest request is still served.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from ..errors import BadRequest, Conflict, Internal, ScistreamError
from ..protocol import (
    MAX_MESSAGE,
    OPS,
    InboundRequest,
    InfoRequest,
    OutboundRequest,
    ReleaseRequest,
    StatusRequest,
    decode,
    encode,
    error,
    hostport,
    parse_request,
)
from .audit import AuditLog, Event, entry
from .auth import Identity
from .gateway import Gateway
from .metrics import Metrics
from .sessions import short

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
MAX_CLIENTS = 1000  # connections at once; more are closed at once
MAX_PER_ADDRESS = 128  # connections at once from one client address (--max-clients-per-address)
WORKERS = 8
READ_CHUNK = 16 * 1024  # bytes taken from TLS at once: its largest record
_LIBC = ctypes.CDLL(None)  # the C library s2cs runs with: for _give_back_memory
RECEIVE_BUFFER = 64 * 1024  # bytes: what one read from a connection's socket takes at most
COLLECT_AFTER = 64  # connections ended, all of them gone: collect their garbage


def server_context(crt: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.3 only, as the data plane: every s2uc that pins certificates speaks it (docs/protocol.md).
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(crt, key)
    return ctx


class _Connection(asyncio.BufferedProtocol):
    """One control connection, with its TLS done here, over memory BIOs.

    Not asyncio's TLS transport: that one takes a 256 KiB read buffer for each connection the
    moment it starts its handshake, and a burst of connections all start theirs before the
    per-address limit closes the oldest (a burst of 300 unfinished handshakes took 89 MiB, kept
    by the allocator). Here a connection is counted for its address when it is accepted
    (ControlServer._opened), and its TLS state (OpenSSL's, about 45 KiB while a handshake is
    under way) is made only when its first byte comes: an idle one costs its socket, and one
    closed for a newer connection costs nothing more."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = self.address = "?"
        self.busy = False  # its request has come: it is no longer idle
        self.refused: ScistreamError | None = None  # its request is answered with this, unread
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._handshake: asyncio.Future[None] = self.loop.create_future()
        self._received = bytearray()  # what the client sent, decrypted, not yet read
        self._at_end = False  # the client sent its end of the stream
        self._failed: BaseException | None = None
        self._wakeup: asyncio.Future[None] | None = None  # a read or drain waiting
        self._writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream socket's
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer, self.address = hostport(peername[0], peername[1]), str(peername[0])
        self.server._opened(self)

    def close_for_another(self) -> None:
        """Closed at once, wherever it is (its TLS handshake or waiting for its request); what
        serves it sees the connection lost."""
        if self.transport is not None:
            self.transport.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        # One buffer for every connection of the server: the transport fills it and calls
        # buffer_updated at once, before any other connection reads (else it takes 256 KiB for
        # each read).
        return self.server.received

    def buffer_updated(self, nbytes: int) -> None:
        if self._tls is None:
            self._tls = self.server.context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._incoming.write(self.server.received[:nbytes])
        self._advance(self._tls)

    def eof_received(self) -> bool:
        self._incoming.write_eof()
        if self._tls is not None:
            self._advance(self._tls)
        self._end(ConnectionResetError("the client closed the connection"))
        return False  # TLS has no half-close: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc or ConnectionResetError("connection closed"))
        self._tls = None  # OpenSSL's state goes now, not when the cycle collector runs
        self.transport = None
        self.server._closed(self)

    def _advance(self, tls: ssl.SSLObject) -> None:
        """Take what came as far as it goes: the handshake, then the request's bytes."""
        try:
            if not self._handshake.done():
                tls.do_handshake()
                self._handshake.set_result(None)
            while len(self._received) <= MAX_MESSAGE:
                chunk = tls.read(READ_CHUNK)
                if not chunk:
                    self._at_end = True
                    break
                self._received += chunk
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._at_end = True  # the client's close_notify
        except ssl.SSLError as exc:
            self._flush()  # its alert, which tells the client why
            self._end(exc)
            if self.transport is not None:
                self.transport.close()
            return
        if len(self._received) > MAX_MESSAGE and self.transport is not None:
            self.transport.pause_reading()  # too large already: nothing more is read
        self._flush()
        self._wake()

    def _flush(self) -> None:
        if self._outgoing.pending and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._outgoing.read())

    def _end(self, exc: BaseException) -> None:
        if self._failed is None:
            self._failed = exc
        if not self._handshake.done():
            self._handshake.set_exception(exc)
            self._handshake.exception()  # retrieved: no "never retrieved" warning when unawaited
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _wait(self) -> None:
        self._wakeup = self.loop.create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    async def handshake(self) -> None:
        await asyncio.shield(self._handshake)

    async def readline(self) -> bytes:
        """The request's line (with its newline; what came when the client ended without one).
        ValueError when it is longer than MAX_MESSAGE."""
        while True:
            end = self._received.find(b"\n")
            if end > MAX_MESSAGE or (end < 0 and len(self._received) > MAX_MESSAGE):
                raise ValueError("request too large")
            if end >= 0 or self._at_end or self._failed is not None:
                if end < 0 and not self._at_end and self._failed is not None:
                    raise self._failed
                size = end + 1 if end >= 0 else len(self._received)
                line = bytes(self._received[:size])
                del self._received[:size]
                return line
            await self._wait()

    def write(self, data: bytes) -> None:
        if self._tls is None or self._failed is not None:
            raise ConnectionResetError("the connection is closed")
        self._tls.write(data)
        self._flush()

    async def drain(self) -> None:
        while self._writing_paused and self._failed is None:
            await self._wait()
        if self._failed is not None:
            raise self._failed

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake()

    def close(self) -> None:
        """With TLS's close_notify after the reply, so that the client knows it has it whole."""
        if self.transport is None or self.transport.is_closing():
            return
        if self._tls is not None and self._handshake.done() and self._failed is None:
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()  # writes close_notify; the client's is not waited for
            self._flush()
        self.transport.close()


class ControlServer:
    def __init__(
        self,
        gateway: Gateway,
        context: ssl.SSLContext,
        host: str | None,
        port: int,
        audit: AuditLog | None = None,
        max_per_address: int = MAX_PER_ADDRESS,
        metrics: Metrics | None = None,
        reload: Callable[[], None] | None = None,
    ) -> None:
        self.gateway = gateway
        self.metrics = metrics
        self.context = context
        self.host = host
        self.port = port
        self.audit = audit
        self.max_per_address = max_per_address
        self.workers = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="request")
        self._clients = 0
        self._ended = 0  # connections ended since the last collection of garbage (_collect)
        self._by_address: dict[str, list[_Connection]] = {}  # only touched by the event loop
        self.reload = reload  # SIGHUP: templates and policy read again (cli.py)
        self._reloads: set[asyncio.Task[None]] = set()  # under way; held so none is collected
        self._serving: set[asyncio.Task[None]] = set()  # a task per connection, held likewise
        self.received = memoryview(bytearray(RECEIVE_BUFFER))  # only used by the event loop

    def dispatch(self, line: bytes, peer: str, address: str = "") -> dict[str, Any]:
        """One framed request from `peer` (ADDRESS:PORT) -> one reply; runs in a worker thread."""
        op = "?"
        body: object = None
        who: Identity | None = None
        begun = time.monotonic()
        try:
            message = decode(line)
            # The op it names, when it is one of ours: the audit line of a refusal says which.
            op = message["op"] if message.get("op") in OPS else "?"
            req = parse_request(message)
            op = req.op
            body = req.body
            if isinstance(body, InfoRequest):
                reply = self.gateway.info()
            else:
                who = self.gateway.auth.identify(req.token, address)
                if isinstance(body, InboundRequest):
                    reply = self.gateway.inbound(body, who)
                elif isinstance(body, OutboundRequest):
                    reply = self.gateway.outbound(body, who)
                elif isinstance(body, ReleaseRequest):
                    reply = self.gateway.release(body.uid, who)
                elif isinstance(body, StatusRequest):
                    reply = self.gateway.status(body.uid, who, log=body.log)
                else:  # pragma: no cover - parse_request knows no other body
                    raise Internal(f"no handler for {op}")
        except ScistreamError as exc:
            # A failure the client caused is the client's to fix (INFO); one of this server's, its operator's.
            level = logging.WARNING if exc.code in ("BACKEND_FAILED", "INTERNAL") else logging.INFO
            _log_request(level, peer, op, getattr(body, "uid", None), exc.code, exc.message)
            self._audit(op, body, who, address or peer, None, exc)
            self._observe(op, exc.code, begun)
            return error(exc)
        except Exception:
            _log_request(logging.ERROR, peer, op, getattr(body, "uid", None), "INTERNAL", exc_info=True)
            failed = Internal("internal error in s2cs; the operator finds the details in its log")
            self._audit(op, body, who, address or peer, None, failed)
            self._observe(op, failed.code, begun)
            return error(failed)
        _log_request(logging.DEBUG, peer, op, getattr(body, "uid", None) or reply.get("uid"), "ok")
        self._audit(op, body, who, address or peer, reply, None)
        self._observe(op, "ok", begun)
        return reply

    def _observe(self, op: str, code: str, begun: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(op, code, time.monotonic() - begun)

    def _audit(
        self,
        op: str,
        body: object,
        who: Identity | None,
        client: str,
        reply: dict[str, Any] | None,
        exc: ScistreamError | None,
    ) -> None:
        """A line for every stream created, refused or released, every refused identity, and
        every request refused unread (`body` None: malformed, too large, or one address's
        connections over the limit). What a client sent is never copied: only known op names,
        the targets once validated, and the error's own words."""
        if self.audit is None:
            return
        event: Event
        if isinstance(body, InboundRequest | OutboundRequest | ReleaseRequest):
            event = "refuse" if exc else "release" if isinstance(body, ReleaseRequest) else "create"
        elif exc is not None and (body is None or exc.code in ("UNAUTHENTICATED", "FORBIDDEN")):
            event = "refuse"
        else:
            return
        if isinstance(body, InboundRequest):
            targets = [hostport(body.remote_ip, port) for port in body.receiver_ports]
        elif isinstance(body, OutboundRequest):
            targets = [str(remote) for remote in body.remote_listeners]
        else:
            targets = []
        uid = (reply or {}).get("uid") or getattr(body, "uid", None)
        self.audit.write(
            entry(
                event,
                when=time.time(),
                op=op if op in OPS else "unknown",
                identity=(who.id, who.name) if who else None,
                client=client,
                targets=targets,
                uid=uid,
                result=exc.code if exc else "ok",
                reason=exc.message if exc else "",
            )
        )

    def _opened(self, conn: _Connection) -> None:
        """A connection accepted: counted, and for its address, before it has any TLS state, so
        that the connections a burst from one address is over its limit by are closed before they
        cost anything (_Connection)."""
        self._clients += 1
        if self._clients > MAX_CLIENTS:
            log.warning("%s: closed, %d clients connected already", conn.peer, MAX_CLIENTS)
            conn.close()
            return
        conn.refused = self._admit(conn.address, conn)
        task = asyncio.get_running_loop().create_task(self._client(conn))
        self._serving.add(task)
        task.add_done_callback(self._served)

    def _closed(self, conn: _Connection) -> None:
        self._clients -= 1
        self._ended += 1
        self._leave(conn.address, conn)
        self._collect()

    def _served(self, task: asyncio.Task[None]) -> None:
        self._serving.discard(task)
        self._collect()

    async def _client(self, conn: _Connection) -> None:
        peer, address = conn.peer, conn.address
        try:
            try:
                await asyncio.wait_for(conn.handshake(), HANDSHAKE_TIMEOUT)
            except (TimeoutError, ConnectionError, ssl.SSLError, OSError) as exc:
                log.debug("%s: no TLS handshake: %s", peer, exc)
                return
            loop = asyncio.get_running_loop()
            refused = conn.refused
            try:
                line = await asyncio.wait_for(conn.readline(), READ_TIMEOUT)
                conn.busy = True
            except TimeoutError:
                # DEBUG, as the closed idle connection below: every port scan would log one.
                log.debug("%s: no request within %.0fs, closed", peer, READ_TIMEOUT)
                return
            except ValueError:
                refused = BadRequest(f"request larger than {MAX_MESSAGE // 1024} KiB")
            except (ConnectionError, ssl.SSLError, OSError):
                return
            else:
                if not line.strip():
                    return
            if refused:
                # Off the event loop, as every audit line: a slow disk must not stall the others.
                await loop.run_in_executor(None, self._audit, "?", None, None, address, None, refused)
                reply = error(refused)
            else:
                reply = await loop.run_in_executor(self.workers, self.dispatch, line, peer, address)
            conn.write(_framed(reply, peer))
            # Answered: no longer under way for its address, in this same step, before the loop
            # takes any other connection. Left counted until the close, some loop turns later,
            # a client's next request, sent once this reply came, could find it there and be
            # refused under --max-clients-per-address (seen on a busy machine).
            self._leave(address, conn)
            await asyncio.wait_for(conn.drain(), WRITE_TIMEOUT)
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            conn.close()

    def _collect(self) -> None:
        """Free what the connections took, once all are gone after many.

        A connection that ended on an error holds that error, whose traceback holds the
        connection: only Python's cycle collector frees them, and it runs when many objects are
        made. A quiet s2cs makes few, so what a flood took stayed until the next flood. What is
        freed then stays with the process too, in the middle of the C heap, unless that is given
        back to the system (_give_back_memory): without, three floods of 960 unfinished
        handshakes from eight addresses kept 50, 64, then 70 MiB; with, 4. Both take a few
        milliseconds, when no client is waiting; and only once what served the connections is done
        too, since until then it holds them."""
        if self._clients == 0 and not self._serving and self._ended >= COLLECT_AFTER:
            self._ended = 0
            gc.collect()
            _give_back_memory()

    def _admit(self, address: str, conn: _Connection) -> ScistreamError | None:
        """Count `conn` for its address; make room by closing that address's oldest idle
        connection, or say why its request is refused when all of them are busy."""
        mine = self._by_address.setdefault(address, [])
        if len(mine) >= self.max_per_address:
            idle = next((c for c in mine if not c.busy), None)
            if idle is None:
                log.warning("%s: %d requests under way from it already; refused", address, len(mine))
                return Conflict(
                    f"{address} has {len(mine)} request(s) under way already, the most this server "
                    "takes from one address; try again when they are answered"
                )
            log.debug("%s: closed its oldest idle connection, it has %d", address, len(mine))
            mine.remove(idle)
            idle.close_for_another()
        mine.append(conn)
        return None

    def _leave(self, address: str, conn: _Connection) -> None:
        mine = self._by_address.get(address, [])
        if conn in mine:
            mine.remove(conn)
        if not mine:
            self._by_address.pop(address, None)

    @property
    def where(self) -> str:
        return hostport(self.host, self.port) if self.host else f"port {self.port} of every interface"

    async def serve(
        self,
        on_ready: Callable[[], None],
        keep_streams: bool,
        on_listening: Callable[[], None] = lambda: None,
    ) -> None:
        """Take the control port, recover the state dir's streams, serve requests until SIGTERM
        or SIGINT, then stop. `on_listening` runs once the port is taken: a busy port fails with
        one line, before any start-up output."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_tls_errors)
        stop = asyncio.Event()
        # Before recovery: a SIGTERM while streams are being re-adopted must still end in the
        # stop below (everything released, or kept with --keep-streams-on-exit), not in an exit
        # that leaves proxies and keys behind.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if self.reload is not None:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        # The port too: an s2cs that cannot listen must fail before it adopts any stream, or its
        # failed start would end streams it did not make.
        try:
            server = await loop.create_server(
                lambda: _Connection(self),
                self.host,
                self.port,
                backlog=512,
                reuse_address=True,
                start_serving=False,
            )
        except OSError as exc:  # asyncio's message names one of the addresses it tried: say why
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ScistreamError(f"cannot listen on {self.where}: {reason}") from None
        on_listening()
        async with server:
            try:
                await loop.run_in_executor(None, self.gateway.start)
            except BaseException:
                # The streams adopted so far belong to an earlier s2cs: leave them to the next.
                await loop.run_in_executor(None, self.gateway.close, True)
                raise
            if not stop.is_set():
                await server.start_serving()
                on_ready()
                await stop.wait()
            server.close()
        keeps = keep_streams or self.gateway.streams_outlive_s2cs
        log.info("stopping: %s", "leaving streams running" if keeps else "releasing every stream")
        # Requests under way finish first (those still queued are dropped): a stream being set up
        # now must be known to the gateway before it releases everything.
        await loop.run_in_executor(
            None, functools.partial(self.workers.shutdown, wait=True, cancel_futures=True)
        )
        await loop.run_in_executor(None, self.gateway.close, keep_streams)

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload(self) -> None:
        """Off the event loop: the check runs the proxy once per sample. Requests go on meanwhile,
        with the old templates and policy until the new ones are swapped in."""
        if self.reload is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.reload)
        except ScistreamError as exc:
            log.error("reload refused: %s; the old templates and policy stay", exc.message)
        except Exception:
            log.exception("reload refused: internal error; the old templates and policy stay")
        else:
            log.info("reloaded templates and policy")


def _log_request(
    level: int, peer: str, op: str, uid: object, code: str, message: str = "", exc_info: bool = False
) -> None:
    """One line per request: `PEER OP [UID PREFIX] -> CODE[: MESSAGE]`; the fields for --log-format
    json. Successful requests are DEBUG (shown with --verbose): those that change a stream have a
    line of the gateway's already."""
    prefix = short(uid) if isinstance(uid, str) else None
    named = f" {prefix}" if prefix else ""
    log.log(
        level,
        "%s %s%s -> %s%s",
        peer,
        op,
        named,
        code,
        f": {message}" if message else "",
        extra={"peer": peer, "op": op, "uid_prefix": prefix, "code": code},
        exc_info=exc_info,
    )


def _framed(reply: dict[str, Any], peer: str) -> bytes:
    """The reply's line; INTERNAL in its place should it be over 64 KiB, which the client would
    not read (a listing keeps within it: protocol.listing), so that the client is told why."""
    try:
        return encode(reply)
    except BadRequest:
        log.error("%s: a reply larger than %d KiB was not sent", peer, MAX_MESSAGE // 1024)
        return encode(
            error(Internal("the reply was larger than 64 KiB; the operator finds the request in its log"))
        )


def _give_back_memory() -> None:
    """Return the free pages of the C heap to the system (glibc's malloc_trim): glibc gives back
    only the free memory at the heap's top, not what lies between chunks still in use. Other C
    libraries have no such call; they keep it."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _quiet_tls_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A client that speaks no TLS, or hangs up mid-handshake, is normal on a public port."""
    exc = context.get("exception")
    if isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError):
        log.debug("TLS: %s", exc)
        return
    loop.default_exception_handler(context)
