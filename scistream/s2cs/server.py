"""The control port: TLS, one JSON line in, one JSON line out, then the connection closes.

asyncio carries the connections, so hundreds of idle or slow clients cost a few kilobytes each and
never hold a worker; only a complete, framed request reaches the bounded pool of worker threads
that run the gateway's operations. Every read and write has a deadline.

One client address holds at most `max_per_address` connections: when it opens one more, its
oldest idle connection is closed to make room, and when none of them is idle the new request is
refused. So one host cannot take every connection, while its newest request is still served.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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
COLLECT_AFTER = 64  # connections ended, all of them gone: collect their garbage


def server_context(crt: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.3 only, as the data plane: every s2uc that pins certificates speaks it (docs/protocol.md).
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(crt, key)
    return ctx


class _Connection:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.busy = False  # its request has come: it is no longer idle
        self.task = asyncio.current_task()  # what serves it: cancelled to close it for another

    def close_for_another(self) -> None:
        """Closed at once, wherever it is (its TLS handshake or waiting for its request): its
        task is cancelled, and the transport aborted when the task ends (_client)."""
        if self.task is not None:
            self.task.cancel()


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

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = hostport(peername[0], peername[1]) if peername else "?"
        address = str(peername[0]) if peername else "?"
        self._clients += 1
        conn = _Connection(writer)
        refused = self._admit(address, conn)
        try:
            if self._clients > MAX_CLIENTS:
                log.warning("%s: closed, %d clients connected already", peer, MAX_CLIENTS)
                return
            # TLS only once the connection is counted for its address: each handshake under way
            # holds a 256 KiB buffer of asyncio's, and a flood of unfinished ones from one address
            # took 90 MiB before its connections were counted.
            try:
                await writer.start_tls(self.context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
            except (TimeoutError, ConnectionError, ssl.SSLError, OSError) as exc:
                log.debug("%s: no TLS handshake: %s", peer, exc)
                return
            loop = asyncio.get_running_loop()
            try:
                line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
                conn.busy = True
            except TimeoutError:
                # DEBUG, as the closed idle connection below: every port scan would log one.
                log.debug("%s: no request within %.0fs, closed", peer, READ_TIMEOUT)
                return
            except (ValueError, asyncio.LimitOverrunError):
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
            writer.write(encode(reply))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
            pass
        except asyncio.CancelledError:
            writer.transport.abort()  # closed for a newer connection of its address (_admit)
        finally:
            self._clients -= 1
            self._leave(address, conn)
            writer.close()
            self._collect()

    def _collect(self) -> None:
        """Free the TLS connections that ended, once all are gone after many.

        asyncio's TLS objects of a connection hold each other in a cycle, with a 256 KiB buffer:
        only Python's cycle collector frees them, and it runs when many objects are made. A quiet
        s2cs makes few, so what a flood of connections took stayed until the next flood (in a
        measurement, a collection after one gave back 6 to 20 MiB of 45). A full collection takes
        a few milliseconds, and no client is waiting then."""
        self._ended += 1
        if self._clients == 0 and self._ended >= COLLECT_AFTER:
            self._ended = 0
            gc.collect()

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
            server = await asyncio.start_server(
                self._client,
                self.host,
                self.port,
                limit=MAX_MESSAGE,
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


def _quiet_tls_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A client that speaks no TLS, or hangs up mid-handshake, is normal on a public port."""
    exc = context.get("exception")
    if isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError):
        log.debug("TLS: %s", exc)
        return
    loop.default_exception_handler(context)
