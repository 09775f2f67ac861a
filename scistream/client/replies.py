"""What an S2CS reply says, checked and typed: the results of the Python API and of `s2uc`.

Each reply of docs/protocol.md becomes a small frozen dataclass; a reply that lacks a field the
client needs, or has one of the wrong type, is an `Internal` error naming the server and the
field, never a KeyError later. Fields a client does not need are ignored, so a newer server can
add some. Each result keeps the reply it came from (`reply`) for `--json`.

The results of `status` and `info` are in reports.py, made at their first use: a request of a
stream needs none of them, and making their dataclasses was about 6 ms of every `s2uc` command.

Pure: no socket, file or process; imports nothing of the server or the data plane.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..errors import Internal
from ..protocol import format_rate

TYPE_CHECKING = False  # typing's, without importing typing: nothing here needs it to run
if TYPE_CHECKING:
    from typing import Any, TypeVar

    T = TypeVar("T")


class _Reader:
    """The fields of one reply object (or an object inside it), each checked for its type."""

    def __init__(self, server: str, fields: Any, where: str = "") -> None:
        self.server = server
        self.where = where
        if not isinstance(fields, Mapping):
            self.fail(f"{where or 'the reply'} is not an object")
        self.fields: Mapping[str, Any] = fields

    def fail(self, what: str) -> Any:
        raise Internal(f"{self.server} sent a reply this client does not understand: {what}")

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _get(self, key: str, kind: type[T] | tuple[type, ...], default: Any, required: bool) -> Any:
        if key not in self.fields or self.fields[key] is None:
            if required:
                self.fail(f"no {self._name(key)}")
            return default
        value = self.fields[key]
        # a bool is an int to isinstance: a count that is true or false is wrong all the same
        if isinstance(value, bool) and kind is not bool:
            self.fail(f"{self._name(key)} is not {_kind_name(kind)}")
        if not isinstance(value, kind):
            self.fail(f"{self._name(key)} is not {_kind_name(kind)}")
        return value

    def text(self, key: str) -> str:
        value: str = self._get(key, str, None, True)
        return value

    def maybe_text(self, key: str) -> str | None:
        value: str | None = self._get(key, str, None, False)
        return value

    def integer(self, key: str) -> int:
        value: int = self._get(key, int, None, True)
        return value

    def maybe_integer(self, key: str) -> int | None:
        value: int | None = self._get(key, int, None, False)
        return value

    def number(self, key: str) -> float:
        value: float = self._get(key, (int, float), None, True)
        return float(value)

    def maybe_number(self, key: str) -> float | None:
        value: float | None = self._get(key, (int, float), None, False)
        return None if value is None else float(value)

    def flag(self, key: str, default: bool | None = None) -> bool:
        value: bool = self._get(key, bool, default, default is None)
        return value

    def texts(self, key: str, required: bool = True) -> tuple[str, ...]:
        value: list[Any] = self._get(key, list, [], required)
        if not all(isinstance(v, str) for v in value):
            self.fail(f"{self._name(key)} is not a list of strings")
        return tuple(value)

    def maybe_texts(self, key: str) -> tuple[str, ...] | None:
        return self.texts(key) if self.fields.get(key) is not None else None

    def child(self, key: str) -> _Reader:
        return _Reader(self.server, self._get(key, Mapping, None, True), self._name(key))

    def children(self, key: str, required: bool = False) -> list[_Reader]:
        value: list[Any] = self._get(key, list, [], required)
        return [_Reader(self.server, v, f"{self._name(key)}[{i}]") for i, v in enumerate(value)]


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", list: "a list"}
    if isinstance(kind, tuple):
        return "a number"
    return names.get(kind, "an object")


def _frozen(reply: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(reply))


# --- limits -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capability:
    """Whether a gateway enforces a kind of limit, and with what (or why not)."""

    enforced: bool
    by: str | None = None  # what enforces it, when enforced
    reason: str | None = None  # why not, when not enforced


@dataclass(frozen=True)
class Capabilities:
    """Which limits a gateway enforces: num_conn and rate."""

    num_conn: Capability
    rate: Capability


@dataclass(frozen=True)
class Limit:
    """One limit of a stream: its value and whether it is enforced."""

    value: int  # num_conn in connections; rate in kb/s (1 kb = 1000 bit), 0 = unlimited
    enforced: bool
    by: str | None = None
    reason: str | None = None

    @property
    def human(self) -> str:
        """A rate in decimal units, as the gateways show it: '10 Mbit/s', 'unlimited'."""
        return format_rate(self.value)

    def as_dict(self, unit: str | None = None) -> dict[str, Any]:
        """The wire form of docs/protocol.md, "The limits object"."""
        found: dict[str, Any] = {"value": self.value}
        if unit is not None:
            found.update(unit=unit, human=self.human)
        found["enforced"] = self.enforced
        if self.by is not None:
            found["by"] = self.by
        if self.reason is not None:
            found["reason"] = self.reason
        return found


@dataclass(frozen=True)
class Limits:
    """The limits of one stream: num_conn and rate."""

    num_conn: Limit
    rate: Limit

    def unenforced(self) -> list[tuple[str, Limit]]:
        """The limits the gateway does not enforce, by name, for a warning."""
        return [(name, limit) for name, limit in self.by_name() if not limit.enforced]

    def by_name(self) -> list[tuple[str, Limit]]:
        return [("num_conn", self.num_conn), ("rate", self.rate)]

    def summary(self) -> str:
        """'at most 5 connections, 10 Mbit/s each direction'."""
        shown = "no rate limit" if self.rate.value == 0 else f"{self.rate.human} each direction"
        return f"at most {self.num_conn.value} connections, {shown}"

    def as_dict(self) -> dict[str, Any]:
        return {"num_conn": self.num_conn.as_dict(), "rate": self.rate.as_dict("kb/s")}


def _capability(read: _Reader) -> Capability:
    return Capability(read.flag("enforced"), read.maybe_text("by"), read.maybe_text("reason"))


def _limit(read: _Reader) -> Limit:
    value = read.integer("value")
    found = _capability(read)
    return Limit(value, found.enforced, found.by, found.reason)


def _limits(read: _Reader) -> Limits:
    limits = read.child("limits")
    return Limits(_limit(limits.child("num_conn")), _limit(limits.child("rate")))


def stream_limits(inbound: Limits, outbound: Limits) -> Limits:
    """The limits of a whole stream, from those of its two sides: the smaller value of each (a
    rate of 0 is the largest), enforced when either side enforces it."""
    return Limits(
        _joined(inbound.num_conn, outbound.num_conn, zero_is_unlimited=False),
        _joined(inbound.rate, outbound.rate, zero_is_unlimited=True),
    )


def _joined(inbound: Limit, outbound: Limit, zero_is_unlimited: bool) -> Limit:
    def size(value: int) -> float:
        return float("inf") if zero_is_unlimited and value == 0 else value

    sides = (("inbound", inbound), ("outbound", outbound))
    value = min(inbound.value, outbound.value, key=size)
    # The side whose value the stream gets enforces it; where both have it, either does.
    holding = [(side, limit) for side, limit in sides if limit.value == value]
    enforcing = [(side, limit) for side, limit in holding if limit.enforced]
    if enforcing:
        return Limit(value, True, by=_sides([(side, limit.by) for side, limit in enforcing]))
    return Limit(value, False, reason=_sides([(side, limit.reason) for side, limit in holding]))


def _sides(told: list[tuple[str, str | None]]) -> str | None:
    """What each side says: 'both sides: X' when they say the same, else 'inbound: X | outbound: Y'."""
    said = [(side, text) for side, text in told if text]
    if not said:
        return None
    if len(said) == 2 and said[0][1] == said[1][1]:
        return f"both sides: {said[0][1]}"
    return " | ".join(f"{side}: {text}" for side, text in said)


# --- the results of each op ---------------------------------------------------------------------


@dataclass(frozen=True)
class Inbound:
    """An inbound proxy: the stream's UID and the listeners the other facility connects to."""

    server: str  # the S2CS, HOST:PORT
    uid: str
    listeners: tuple[str, ...]  # IP:PORT, one per receiver port, in the same order
    limits: Limits
    reply: Mapping[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Outbound:
    """An outbound proxy: the listeners the instrument sends to."""

    server: str
    uid: str
    listeners: tuple[str, ...]  # IP:PORT, one per remote listener, in the same order
    limits: Limits
    bind: str | None  # the address the listeners bind; "0.0.0.0" for all interfaces
    note: str | None  # e.g. that the address asked for is not this host's
    reply: Mapping[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Released:
    """The proxies of a stream one gateway stopped."""

    server: str
    uid: str
    roles: tuple[str, ...]  # "inbound", "outbound", or both
    reply: Mapping[str, Any] = field(repr=False, compare=False)


def inbound(server: str, reply: Mapping[str, Any]) -> Inbound:
    read = _Reader(server, reply)
    return Inbound(server, read.text("uid"), read.texts("listeners"), _limits(read), _frozen(reply))


def outbound(server: str, reply: Mapping[str, Any]) -> Outbound:
    read = _Reader(server, reply)
    return Outbound(
        server,
        read.text("uid"),
        read.texts("listeners"),
        _limits(read),
        read.maybe_text("bind"),
        read.maybe_text("note"),
        _frozen(reply),
    )


def released(server: str, reply: Mapping[str, Any]) -> Released:
    read = _Reader(server, reply)
    return Released(server, read.text("uid"), read.texts("released"), _frozen(reply))
