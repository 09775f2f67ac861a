"""Sessions: one record per stream and role on this gateway, and the registry that holds them.

A `Session` is the stable part (who asked for what, which ports); its processes (the proxy, and
the shaper when the session has a rate limit) are the live part. The registry is the only shared
structure of s2cs; every access holds its lock, so concurrent requests never see each other's
half-made sessions.
"""

from __future__ import annotations

import enum
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import Conflict
from ..protocol import Limits
from ..s2ds.render import ListenerSpec, Role
from ..s2ds.supervisor import ProxyProcess, State

_SID = re.compile(r"[0-9a-f]{12}")


def short(uid: str) -> str:
    """What logs and other users' listings show of a UID: enough to tell streams apart, not to join."""
    return uid[:8]


class Phase(enum.StrEnum):
    """Where a session is in its life here; its processes have states of their own."""

    STARTING = "STARTING"  # a request is starting it: nothing else may release it meanwhile
    ACTIVE = "ACTIVE"
    RELEASING = "RELEASING"  # being stopped: no request finds it any more


@dataclass
class Session:
    uid: str
    sid: str  # local name of the session's directory; not derived from the UID
    role: Role
    owner: str | None
    listeners: tuple[ListenerSpec, ...]
    advertised: tuple[str, ...]  # the listener addresses given to users, one per listener
    limits: Limits
    created: float = field(default_factory=time.time)
    procs: list[ProxyProcess] = field(default_factory=list)
    phase: Phase = Phase.ACTIVE
    node: str = ""  # the swarm node it runs on (swarm.py); empty on a gateway of its own
    # The swarm service it is, as last listed (swarm.py); None on a gateway of its own.
    service: Any = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"{self.role} {short(self.uid)}"

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(listener.port for listener in self.listeners)

    @property
    def state(self) -> State:
        """The worst state of its processes: a session is only RUNNING when all of them are."""
        states = [p.state for p in self.procs] or [State.STOPPED]
        for worst in (State.FATAL, State.BACKOFF, State.STARTING, State.STOPPING, State.STOPPED):
            if worst in states:
                return worst
        return State.RUNNING

    @property
    def restarts(self) -> int:
        return sum(p.restarts for p in self.procs)

    def to_record(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "sid": self.sid,
            "role": self.role,
            "owner": self.owner,
            "listeners": [[lst.bind_ip, lst.port, lst.target_ip, lst.target_port] for lst in self.listeners],
            "advertised": list(self.advertised),
            "num_conn": self.limits.num_conn,
            "rate": self.limits.rate,
            "created": self.created,
            "phase": str(self.phase),
            "processes": [
                {
                    "name": p.kind,
                    "argv": list(p.argv),  # a copy: the record is kept (StateDir.save)
                    "pid": p.pid,
                    "create_time": p.handle.create_time if p.handle else None,
                    "restarts": p.restarts,
                    "state": str(p.state),
                }
                for p in self.procs
            ],
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Session:
        return cls(
            uid=rec["uid"],
            sid=rec["sid"],
            role=rec["role"],
            owner=rec["owner"],
            listeners=tuple(ListenerSpec(b, int(p), t, int(tp)) for b, p, t, tp in rec["listeners"]),
            advertised=tuple(rec["advertised"]),
            limits=Limits(num_conn=int(rec["num_conn"]), rate=int(rec["rate"])),
            created=float(rec["created"]),
            # Written since s2cs kept the phase: a session recorded before is an active one.
            phase=Phase(rec.get("phase", Phase.ACTIVE)),
        )


@dataclass(frozen=True)
class RecordedProcess:
    """A process as state.json records it: what finds it again (pid, start time, command line)."""

    kind: str
    argv: tuple[str, ...]
    pid: int | None
    create_time: float | None
    restarts: int

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> RecordedProcess:
        argv = rec["argv"]
        if not isinstance(argv, list) or not all(isinstance(arg, str) for arg in argv):
            raise ValueError("a command line is not a list of strings")
        return cls(
            kind=str(rec["name"]),
            argv=tuple(argv),
            pid=int(rec["pid"]) if rec.get("pid") else None,
            create_time=float(rec["create_time"]) if rec.get("create_time") else None,
            restarts=int(rec.get("restarts", 0)),
        )


def parse_record(rec: dict[str, Any]) -> tuple[Session, list[RecordedProcess]]:
    """A session of state.json and its processes; ValueError says what is wrong with it."""
    try:
        session = Session.from_record(rec)
        processes = [RecordedProcess.from_record(p) for p in rec.get("processes", [])]
    except KeyError as exc:
        raise ValueError(f"it has no {exc.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"a field is malformed: {exc}") from None
    # The sid names a directory that release deletes: nothing but what _session makes.
    if not isinstance(session.sid, str) or not _SID.fullmatch(session.sid):
        raise ValueError(f"its sid {session.sid!r} is not a session id")
    if session.role not in ("inbound", "outbound") or not isinstance(session.uid, str):
        raise ValueError("its role or UID is malformed")
    return session, processes


class SessionRegistry:
    def __init__(self) -> None:
        self._by_sid: dict[str, Session] = {}
        self.lock = threading.RLock()

    def add(self, session: Session) -> None:
        with self.lock:
            for other in self._by_sid.values():
                if other.uid == session.uid and other.role == session.role:
                    raise Conflict(f"stream {short(session.uid)} already has an {session.role} proxy here")
            self._by_sid[session.sid] = session

    def remove(self, session: Session) -> None:
        with self.lock:
            self._by_sid.pop(session.sid, None)

    def of_uid(self, uid: str) -> list[Session]:
        """The sessions of a stream that requests may find: not those being released."""
        with self.lock:
            return [s for s in self._by_sid.values() if s.uid == uid and s.phase != Phase.RELEASING]

    def all(self) -> list[Session]:
        with self.lock:
            return sorted(self._by_sid.values(), key=lambda s: s.created)

    def sids(self) -> set[str]:
        with self.lock:
            return set(self._by_sid)

    def __len__(self) -> int:
        with self.lock:
            return len(self._by_sid)
