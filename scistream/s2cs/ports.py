"""The pool of listener ports an S2CS may hand out (`--port-range`).

A port is either free or reserved by exactly one session, its owner; only the owner can free it,
so a session freed twice never frees a port that has gone to another one meanwhile. Reservation
is all-or-nothing, and a port another program holds on this host is skipped (the `is_free`
probe), never handed out.
Pure apart from the probe, which the caller supplies.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

from ..errors import BadRequest, ConfigError, Conflict, NoPorts


def parse_range(text: str) -> tuple[int, int]:
    lo, sep, hi = (part.strip() for part in text.partition("-"))
    if not sep or not all(p.isascii() and p.isdigit() for p in (lo, hi)):
        raise ConfigError(f"port range must look like 5100-5200, not {text!r}")
    first, last = int(lo), int(hi)
    if not 1 <= first <= last <= 65535:
        raise ConfigError(f"port range {text!r} is not within 1-65535 with first <= last")
    return first, last


class PortPool:
    def __init__(self, first: int, last: int, is_free: Callable[[int], bool] = lambda p: True) -> None:
        self.first = first
        self.last = last
        self.is_free = is_free
        self._owners: dict[int, str] = {}  # reserved port -> the session holding it
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        return f"{self.first}-{self.last}"

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    @property
    def reserved(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._owners)

    def available(self) -> int:
        with self._lock:
            # Sessions recovered from an earlier, different range may hold ports outside this one.
            return self.size - sum(1 for p in self._owners if self.first <= p <= self.last)

    def reserve(self, count: int, requested: Sequence[int] = (), owner: str = "") -> list[int]:
        """`requested` ports exactly (each inside the range and free), else `count` free ones,
        for `owner`."""
        with self._lock:
            if requested:
                if len(set(requested)) != len(requested):
                    raise BadRequest("the same port is requested twice")
                for port in requested:
                    if not self.first <= port <= self.last:
                        raise BadRequest(f"port {port} is outside this server's port range {self.label}")
                    if port in self._owners:
                        raise Conflict(f"port {port} is already used by another stream")
                    if not self.is_free(port):
                        raise Conflict(f"port {port} is held by another program on this host")
                chosen = list(requested)
            else:
                chosen = []
                for port in range(self.first, self.last + 1):
                    if len(chosen) == count:
                        break
                    if port not in self._owners and self.is_free(port):
                        chosen.append(port)
                if len(chosen) < count:
                    raise NoPorts(
                        f"no free port in {self.label}: {count} needed, "
                        f"{self.size - len(self._owners)} not reserved by a stream"
                    )
            self._owners.update(dict.fromkeys(chosen, owner))
            return chosen

    def take(self, ports: Iterable[int], owner: str = "") -> None:
        """Mark ports reserved without probing (sessions re-loaded from the state dir own them)."""
        with self._lock:
            self._owners.update(dict.fromkeys(ports, owner))

    def release(self, ports: Iterable[int], owner: str = "") -> None:
        """Free those of `ports` that `owner` holds; a port another session holds now stays."""
        with self._lock:
            for port in ports:
                if self._owners.get(port) == owner:
                    del self._owners[port]
