"""What the shaper decides, apart from how it does it: how much to read now, when to pass a FIN on,
who reads first, and when the loop must look again without an event.

A *flow* is one direction of one connection: source socket -> pipe -> destination socket, moved by
splice(2) in shaper.py. Each direction of a session has one token *bucket*, shared by all its
flows, and a round robin (*turns*) that decides who reads first. Everything here is pure: no
sockets, no splice, no epoll, no clock; times are passed in, in seconds of a monotonic clock.
shaper.py is the loop around it; tests/unit/test_shaping.py drives it without any of that.

Reading happens in quanta (a few milliseconds of the rate, at least QUANTUM_FLOOR bytes, at most
the burst) so that bytes move in pieces worth a system call, and the loop sleeps until the next
quantum is due. A flow with nothing to read asks for no wake-up at all.

Edge-triggered epoll means a flow believes a socket readable (writable) from an event until a
system call finds otherwise, and only a finding that cannot be something else may clear it: a
read that blocks while the pipe still holds data may have found the *pipe* full (its capacity is
counted in slots, one per piece, so small segments fill it long before its byte size), so only a
read into an empty pipe can find the socket drained.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

TYPE_CHECKING = False  # what typing.TYPE_CHECKING is, without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from typing import TypeVar

BURST = 0.1  # seconds of the rate: the most a bucket holds, let through at once after a pause
QUANTUM = 0.005  # seconds of the rate: the least worth a read...
QUANTUM_FLOOR = 1024  # ...and never less than this many bytes (unless the burst is smaller)
UNLIMITED_SHARE = 4 << 20  # bytes a flow may read per pass without a rate, before the others
_ROUNDING = 1e-6  # bytes: a refill at the very time a quantum is due may fall short by less


class Value:
    """A state of this module: equal to another of its class with the same fields, hashable,
    printable, and never changed: a transition makes a new one (`_but`). They were frozen
    dataclasses; `dataclasses` imports `inspect` and with it `ast`, `dis` and `tokenize`, about a
    third of the shaper's start (20 of 80 ms), which every rate-limited request waits for."""

    fields: tuple[str, ...] = ()  # in the order of __init__

    def _set(self, **values: object) -> None:
        self.__dict__.update(values)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot delete {name}")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    def __hash__(self) -> int:
        return hash((type(self), *self.__dict__.values()))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={self.__dict__[name]!r}" for name in self.fields)
        return f"{type(self).__name__}({shown})"


if TYPE_CHECKING:
    State = TypeVar("State", bound=Value)


def _but(state: State, **changes: object) -> State:
    """A copy of `state` with `changes`, without the checks of a constructor: the shaper makes a
    transition at every system call. Only for the states of this module, whose fields are all
    set by their __init__."""
    new = object.__new__(type(state))
    new.__dict__.update(state.__dict__)
    new.__dict__.update(changes)
    return new


class Bucket(Value):
    """Tokens in bytes, refilled at `rate` bytes/s up to `burst`, read in pieces of at least
    `quantum` (or less, when less is wanted). Rate 0: no limit, and no waiting."""

    fields = ("rate", "burst", "quantum", "tokens", "stamp")
    rate: int
    burst: int
    quantum: int
    tokens: float
    stamp: float  # when `tokens` was right

    def __init__(self, rate: int, burst: int, quantum: int, tokens: float, stamp: float) -> None:
        self._set(rate=rate, burst=burst, quantum=quantum, tokens=tokens, stamp=stamp)

    @classmethod
    def full(cls, rate: int, now: float) -> Bucket:
        if isinstance(rate, bool) or not isinstance(rate, int) or rate < 0:
            raise ValueError(f"a rate is a whole number of bytes per second, 0 or more, not {rate!r}")
        if not rate:
            return cls(0, 0, 1, 0.0, now)
        burst = max(1, int(rate * BURST))
        quantum = min(burst, max(QUANTUM_FLOOR, int(rate * QUANTUM)))
        return cls(rate, burst, quantum, float(burst), now)

    @property
    def unlimited(self) -> bool:
        return not self.rate

    def refill(self, now: float) -> Bucket:
        if now <= self.stamp:
            return self
        if self.unlimited:
            return _but(self, stamp=now)
        tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        return _but(self, tokens=tokens, stamp=now)

    def grant(self, want: int) -> int:
        """How many of `want` bytes may be read now: all the tokens cover, but none while they
        cover less than a quantum (or than `want`, if that is smaller)."""
        if want <= 0:
            return 0
        if self.unlimited:
            return want
        have = int(self.tokens + _ROUNDING)
        return min(want, have) if have >= min(want, self.quantum) else 0

    def take(self, n: int) -> Bucket:
        """`n` bytes were read (at most what `grant` allowed)."""
        if n < 0:
            raise ValueError(f"cannot take {n} bytes")
        if self.unlimited or not n:
            return self
        return _but(self, tokens=self.tokens - n)

    def due(self, want: int) -> float:
        """When `grant(want)` gives something, if nothing is taken meanwhile: `stamp` or later."""
        if self.unlimited or want <= 0:
            return self.stamp
        need = min(want, self.quantum)
        if self.tokens + _ROUNDING >= need:
            return self.stamp
        return self.stamp + (need - self.tokens) / self.rate


def share(bucket: Bucket, wanting: int) -> int:
    """What each of the `wanting` flows of a direction may read in one pass: an equal part of the
    tokens, but at least a quantum, so that whoever is first in turn can read when there is one."""
    if bucket.unlimited:
        return UNLIMITED_SHARE
    return max(bucket.quantum, int(bucket.tokens) // max(1, wanting))


class Read(Value):
    fields = ("size",)
    size: int  # splice at most this much from the source into the pipe

    def __init__(self, size: int) -> None:
        self._set(size=size)


class Write(Value):
    fields = ("size",)
    size: int  # splice at most this much from the pipe into the destination

    def __init__(self, size: int) -> None:
        self._set(size=size)


class Finish(Value):
    """Pass the source's FIN on: shut the destination down for writing."""


Action = Read | Write | Finish | None  # None: nothing to do until an event, a write or a refill


class Flow(Value):
    """The relay state of one flow, changed only by what its system calls and events report."""

    fields = ("capacity", "pending", "readable", "writable", "pipe_full", "eof", "shut", "moved")
    capacity: int  # bytes the pipe holds when its slots are whole pages (F_GETPIPE_SZ)
    pending: int  # bytes in the pipe
    readable: bool  # an event came since a read last found the source drained
    writable: bool  # an event came since a write last found the destination full
    pipe_full: bool  # the last read blocked while the pipe held data: read after a write
    eof: bool  # the source's FIN was read
    shut: bool  # ...and passed on
    moved: int  # bytes delivered to the destination

    def __init__(
        self,
        capacity: int,
        pending: int = 0,
        readable: bool = True,
        writable: bool = True,
        pipe_full: bool = False,
        eof: bool = False,
        shut: bool = False,
        moved: int = 0,
    ) -> None:
        self._set(
            capacity=capacity,
            pending=pending,
            readable=readable,
            writable=writable,
            pipe_full=pipe_full,
            eof=eof,
            shut=shut,
            moved=moved,
        )

    @property
    def room(self) -> int:
        """How much a read may ask for now; 0 when no read may be tried until something changes."""
        if self.eof or not self.readable or self.pipe_full:
            return 0
        return max(0, self.capacity - self.pending)

    @property
    def busy(self) -> bool:
        """Something could be done now without any event: a write, the FIN, or a read."""
        return bool((self.pending and self.writable) or (self.eof and not self.pending and not self.shut))

    def read(self, n: int) -> Flow:
        """A read moved `n` bytes into the pipe; 0 is the source's FIN."""
        if n < 0 or self.eof:
            raise ValueError(f"a read of {n} bytes" + (" after the FIN" if self.eof else ""))
        if not n:
            return _but(self, eof=True)
        return _but(self, pending=self.pending + n)

    def read_blocked(self) -> Flow:
        """A read found nothing to move. Into an empty pipe (which always has a free slot) that
        means the socket is drained, and the next event will say when it is not. Otherwise the
        pipe may have been full: try again once a write has taken something out of it."""
        if self.pending:
            return _but(self, pipe_full=True)
        return _but(self, readable=False, pipe_full=False)

    def wrote(self, n: int) -> Flow:
        if not 0 < n <= self.pending:
            raise ValueError(f"a write of {n} bytes from a pipe holding {self.pending}")
        return _but(self, pending=self.pending - n, moved=self.moved + n, pipe_full=False)

    def write_blocked(self) -> Flow:
        return _but(self, writable=False)

    def finished(self) -> Flow:
        if not self.eof or self.pending or self.shut:
            raise ValueError("a FIN passed on before every byte before it")
        return _but(self, shut=True)

    def woken(self, readable: bool, writable: bool) -> Flow:
        """An event: the source may have something to read, the destination room to write."""
        return _but(self, readable=self.readable or readable, writable=self.writable or writable)


def step(flow: Flow, bucket: Bucket, budget: int) -> Action:
    """What to do next for `flow`, whose direction has `bucket`, with `budget` bytes left of its
    share in this pass. The pipe is emptied first; the FIN follows the last byte before it."""
    pending = flow.pending
    if pending and flow.writable:
        return Write(pending)
    if flow.eof:
        return Finish() if not pending and not flow.shut else None
    room = flow.room
    want = min(room, budget)
    if not room or want < min(room, bucket.quantum):
        return None  # nothing may be read, or this pass's share is used up: the next pass
    n = bucket.grant(want)
    return Read(n) if n else None


class Turns(Value):
    """The round robin of one direction: each pass starts with the flow after the last one that
    read in the pass before, so every flow that wants to read is first in its turn and none
    starves behind the others (keys are connection serials, increasing)."""

    fields = ("last",)
    last: int

    def __init__(self, last: int = -1) -> None:
        self._set(last=last)

    def order(self, keys: Sequence[int]) -> list[int]:
        """`keys` (sorted) in the order of this pass."""
        start = bisect.bisect_right(keys, self.last)
        return [*keys[start:], *keys[:start]]

    def served(self, key: int) -> Turns:
        return Turns(key)


def wakeup(
    now: float, directions: Iterable[tuple[Bucket, Iterable[Flow]]], deadlines: Iterable[float]
) -> float | None:
    """Seconds the loop may wait for events before it must look again; None: until an event.

    A flow that could do something now makes it 0; one that wants to read is due when its
    bucket can grant it a quantum; one that waits for an event (a drained source, a full
    destination) or has ended asks for nothing. `deadlines` are other times to look (a connect
    timeout, the next stats)."""
    due = list(deadlines)
    for bucket, flows in directions:
        for flow in flows:
            if flow.busy:
                due.append(now)
            elif flow.room:
                due.append(bucket.due(flow.room))
    if not due:
        return None
    return max(0.0, min(due) - now)
