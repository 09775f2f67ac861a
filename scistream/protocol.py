"""The S2UC <-> S2CS control protocol: one line of UTF-8 JSON each way, over TLS.

Every request field is checked here, before anything touches a template, a file or a process:
types (a bool is not a number), ranges, IP addresses, ports, UIDs. Anything unexpected is a
BadRequest naming the field, so a client learns what to fix. docs/protocol.md is the spec.

Pure: no sockets, no files. The server and the client do the I/O and call these functions.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import BadRequest, ScistreamError, from_wire

TYPE_CHECKING = False  # typing's, without importing typing: nothing here needs it to run
if TYPE_CHECKING:
    from typing import Any

VERSION = 1
MAX_MESSAGE = 64 * 1024  # bytes, newline included
DEFAULT_PORT = 5000
DEFAULT_NUM_CONN = 5
DEFAULT_RATE = 10_000  # kb/s, 1 kb = 1000 bit: 10 Mbit/s
MAX_NUM_CONN = 10_000
MAX_RATE = 400_000_000  # kb/s = 400 Gbit/s; beyond any single gateway
MAX_LISTENERS = 64
MAX_TOKEN = 8192
OPS = ("info", "inbound", "outbound", "release", "status")

_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
# A bearer token (RFC 6750 b64token). Base64 and JWT segments never hold "..", so a token that
# does is refused too: it can only be an attempt at a path.
_TOKEN = re.compile(r"(?!.*\.\.)[A-Za-z0-9\-._~+/]+=*")


def hostport(host: str, port: int) -> str:
    """`1.2.3.4:5`, `[::1]:5`, `example.org:5`: the syntax of addresses here, in HAProxy and stunnel."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Address:
    """An IP address and a TCP port."""

    ip: str
    port: int

    def __str__(self) -> str:
        return hostport(self.ip, self.port)


@dataclass(frozen=True)
class Limits:
    num_conn: int = DEFAULT_NUM_CONN
    rate: int = DEFAULT_RATE  # kb/s; 0 = unlimited


@dataclass(frozen=True)
class InfoRequest:
    pass


@dataclass(frozen=True)
class InboundRequest:
    remote_ip: str  # the service behind the inbound proxy
    receiver_ports: tuple[int, ...]  # the service's ports, one listener each
    limits: Limits


@dataclass(frozen=True)
class OutboundRequest:
    uid: str
    remote_listeners: tuple[Address, ...]  # the inbound listeners at the other facility
    bind_ip: str | None  # where the instrument sends to; None = all interfaces
    receiver_ports: tuple[int, ...]  # local listener ports; empty = the server picks
    limits: Limits


@dataclass(frozen=True)
class ReleaseRequest:
    uid: str


@dataclass(frozen=True)
class StatusRequest:
    uid: str | None
    log: bool = False  # the last lines of its proxies' logs too: only with a uid


Body = InfoRequest | InboundRequest | OutboundRequest | ReleaseRequest | StatusRequest


@dataclass(frozen=True)
class Request:
    op: str
    token: str | None
    body: Body


# --- framing -----------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a JSON number this protocol accepts")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BadRequest(f"field {key!r} appears twice")
        result[key] = value
    return result


def decode(line: bytes) -> dict[str, Any]:
    """One framed message -> a JSON object. Raises BadRequest for anything else."""
    if len(line) > MAX_MESSAGE:
        raise BadRequest(f"message larger than {MAX_MESSAGE // 1024} KiB")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("message is not UTF-8") from exc
    try:
        message = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise BadRequest("message is nested too deeply") from exc
    except ValueError as exc:
        raise BadRequest(f"message is not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise BadRequest("message must be a JSON object")
    return message


def encode(message: Mapping[str, Any]) -> bytes:
    data = _encoded(message)
    if len(data) >= MAX_MESSAGE:
        raise BadRequest(f"message larger than {MAX_MESSAGE // 1024} KiB")
    return data + b"\n"


# --- field validation --------------------------------------------------------------------------


def _int(fields: Mapping[str, Any], name: str, lo: int, hi: int, default: int | None = None) -> int:
    value = fields.get(name, default)
    if value is None:
        raise BadRequest(f"{name} is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}, not {value}")
    return value


def parse_ip(value: Any, name: str) -> str:
    """A literal IPv4 or IPv6 address, normalised. Host names and zone ids are refused."""
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be an IP address string, not {type(value).__name__}")
    if "%" in value or len(value) > 45:
        raise BadRequest(f"{name} is not an IP address: {value[:60]!r}")
    try:
        return ipaddress.ip_address(value).compressed
    except ValueError:
        raise BadRequest(f"{name} is not an IP address: {value[:60]!r}") from None


def parse_port(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be a port number, not {type(value).__name__}")
    if not 1 <= value <= 65535:
        raise BadRequest(f"{name}: {value} is not a TCP port (1-65535)")
    return value


def parse_address(value: Any, name: str) -> Address:
    """`1.2.3.4:5100` or `[::1]:5100`."""
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be an address string 'IP:PORT', not {type(value).__name__}")
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5:
        raise BadRequest(f"{name} must look like IP:PORT, not {value[:60]!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise BadRequest(f"{name}: write an IPv6 address in brackets, [ADDRESS]:PORT, not {value[:60]!r}")
    return Address(parse_ip(host, name), parse_port(int(port), name))


def parse_uid(value: Any, name: str = "uid") -> str:
    if not isinstance(value, str) or not _UID.fullmatch(value):
        # At most 8 characters: a mistyped UID (upper case, say) is still a secret; logs get no more.
        shown = f"{value[:8]!r}..." if isinstance(value, str) else type(value).__name__
        raise BadRequest(f"{name} is not a stream UID (a lowercase UUID4): {shown}")
    return value


def _ports(fields: Mapping[str, Any], name: str, required: bool) -> tuple[int, ...]:
    value = fields.get(name)
    if value is None:
        if required:
            raise BadRequest(f"{name} is required")
        return ()
    if not isinstance(value, list):
        raise BadRequest(f"{name} must be a list of ports, not {type(value).__name__}")
    if required and not value:
        raise BadRequest(f"{name} must name at least one port")
    if len(value) > MAX_LISTENERS:
        raise BadRequest(f"{name}: at most {MAX_LISTENERS} ports per stream")
    return tuple(parse_port(p, name) for p in value)


def _limits(fields: Mapping[str, Any]) -> Limits:
    return Limits(
        num_conn=_int(fields, "num_conn", 1, MAX_NUM_CONN, DEFAULT_NUM_CONN),
        rate=_int(fields, "rate", 0, MAX_RATE, DEFAULT_RATE),
    )


def _only(fields: Mapping[str, Any], op: str, allowed: set[str]) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise BadRequest(f"unknown field for {op}: {unknown[0][:40]!r}")


def _inbound(fields: Mapping[str, Any]) -> InboundRequest:
    _only(fields, "inbound", {"remote_ip", "receiver_ports", "num_conn", "rate"})
    if "remote_ip" not in fields:
        raise BadRequest("remote_ip is required")
    return InboundRequest(
        remote_ip=parse_ip(fields["remote_ip"], "remote_ip"),
        receiver_ports=_ports(fields, "receiver_ports", required=True),
        limits=_limits(fields),
    )


def _outbound(fields: Mapping[str, Any]) -> OutboundRequest:
    _only(fields, "outbound", {"uid", "remote_listeners", "remote_ip", "receiver_ports", "num_conn", "rate"})
    uid = parse_uid(fields.get("uid"))
    remote = fields.get("remote_listeners")
    if not isinstance(remote, list) or not remote:
        raise BadRequest("remote_listeners must be a non-empty list of 'IP:PORT' addresses")
    if len(remote) > MAX_LISTENERS:
        raise BadRequest(f"remote_listeners: at most {MAX_LISTENERS} per stream")
    listeners = tuple(parse_address(a, "remote_listeners") for a in remote)
    bind = fields.get("remote_ip")
    bind_ip = None if bind is None else parse_ip(bind, "remote_ip")
    ports = _ports(fields, "receiver_ports", required=False)
    if ports and len(ports) != len(listeners):
        raise BadRequest(
            f"receiver_ports names {len(ports)} port(s) but there are {len(listeners)} remote listener(s);"
            " listener i forwards to remote listener i"
        )
    if len(set(ports)) != len(ports):
        raise BadRequest("receiver_ports names a port twice")
    return OutboundRequest(uid, listeners, bind_ip, ports, _limits(fields))


def _release(fields: Mapping[str, Any]) -> ReleaseRequest:
    _only(fields, "release", {"uid"})
    return ReleaseRequest(parse_uid(fields.get("uid")))


def _status(fields: Mapping[str, Any]) -> StatusRequest:
    _only(fields, "status", {"uid", "log"})
    uid = fields.get("uid")
    log = fields.get("log", False)
    if not isinstance(log, bool):
        raise BadRequest(f"log must be true or false, not {type(log).__name__}")
    if log and uid is None:
        raise BadRequest("log needs a uid: the logs of one stream are shown, to its owner")
    return StatusRequest(None if uid is None else parse_uid(uid), log)


def _info(fields: Mapping[str, Any]) -> InfoRequest:
    _only(fields, "info", set())
    return InfoRequest()


_PARSERS: dict[str, Callable[[Mapping[str, Any]], Body]] = {
    "info": _info,
    "inbound": _inbound,
    "outbound": _outbound,
    "release": _release,
    "status": _status,
}


def parse_request(message: Mapping[str, Any]) -> Request:
    """A decoded request object -> a validated Request."""
    version = message.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise BadRequest("v (the protocol version) must be an integer; this server speaks 1")
    if version != VERSION:
        raise BadRequest(f"protocol version {version} is not supported; this server speaks {VERSION}")
    op = message.get("op")
    if not isinstance(op, str) or op not in _PARSERS:
        shown = op[:40] if isinstance(op, str) else type(op).__name__
        raise BadRequest(f"unknown op {shown!r}; expected one of {', '.join(OPS)}")
    token = message.get("token")
    if token is not None and (
        not isinstance(token, str) or len(token) > MAX_TOKEN or not _TOKEN.fullmatch(token)
    ):
        raise BadRequest("token must be null or a bearer token string")
    fields = {k: v for k, v in message.items() if k not in ("v", "op", "token")}
    return Request(op=op, token=token, body=_PARSERS[op](fields))


def decode_request(line: bytes) -> Request:
    return parse_request(decode(line))


# --- requests and replies, client side -----------------------------------------------------------


def request(op: str, token: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "op": op, "token": token, **{k: v for k, v in fields.items() if v is not None}}


def ok(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def listing(streams: list[dict[str, Any]]) -> dict[str, Any]:
    """The `status` reply of many streams, within MAX_MESSAGE: all of them when they fit, else the
    first ones that do, and `omitted`, how many more there are (each can be asked for by its
    UID). About 420 bytes a stream: a few hundred streams of one gateway are more than a reply
    holds, and the reply was then not sent at all. Pure."""
    whole = ok(streams=streams)
    if len(_encoded(whole)) < MAX_MESSAGE:
        return whole
    room = MAX_MESSAGE - len(_encoded(ok(streams=[], omitted=len(streams)))) - 1  # 1: the newline
    kept = 0
    for entry in streams:
        room -= len(_encoded(entry)) + (1 if kept else 0)  # its bytes, and a comma before it
        if room < 0:
            break
        kept += 1
    return ok(streams=streams[:kept], omitted=len(streams) - kept)


def _encoded(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def error(err: ScistreamError) -> dict[str, Any]:
    return {"ok": False, "error": {"code": err.code, "message": err.message}}


def check_reply(message: Mapping[str, Any]) -> dict[str, Any]:
    """A reply object -> its fields; an error reply raises the matching ScistreamError."""
    if message.get("ok") is True:
        return dict(message)
    err = message.get("error")
    if message.get("ok") is False and isinstance(err, dict):
        return _raise(str(err.get("code", "INTERNAL")), str(err.get("message", "no message")))
    raise from_wire("INTERNAL", "the server sent a reply this client does not understand")


def _raise(code: str, message: str) -> dict[str, Any]:
    raise from_wire(code, message)


# --- units ------------------------------------------------------------------------------------


def format_rate(kbps: int) -> str:
    """10000 -> '10 Mbit/s'; 0 -> 'unlimited'. 1 kb = 1000 bit, as in the user guide."""
    if kbps == 0:
        return "unlimited"
    for unit, scale in (("Gbit/s", 1_000_000), ("Mbit/s", 1_000), ("kbit/s", 1)):
        shown = float(f"{kbps / scale:.4g}")  # round first: 999999 kb/s is 1 Gbit/s, not 1000 Mbit/s
        if shown >= 1:
            return f"{shown:g} {unit}"
    raise AssertionError("unreachable: rate is at least 1 kb/s")


def rate_bytes_per_second(kbps: int) -> int:
    return kbps * 1000 // 8
