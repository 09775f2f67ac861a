"""The soak's fault schedule: which fault, when, against what; a pure function of the seed.

The same seed, minutes and topology give the same schedule (`--seed S` replays one): every choice
is drawn here from one random.Random(seed), none at run time. The first faults go through every
kind once, in a shuffled order, so a short run meets each kind; the rest are drawn with weights
(killed processes most often, as they are the most common fault of a long-lived gateway).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KILL_PROXY = "kill-proxy"  # SIGKILL of a stream's proxy
KILL_SHAPER = "kill-shaper"  # SIGKILL of a stream's shaper
KILL_S2CS = "kill-s2cs"  # SIGKILL of s2cs, restarted at once: it re-adopts the streams
RELOAD = "reload"  # a template changed, SIGHUP, changed back, SIGHUP
DUPLICATE = "duplicate-s2cs"  # a second s2cs on the same state dir: it must refuse
FLOOD = "control-flood"  # hundreds of idle and garbage connections to the control port
FS_FULL = "state-fs-full"  # the state dir's filesystem full for a while
SERVICE_STOP = "service-stop"  # the stream's target service crashes, then comes back

KINDS = (KILL_PROXY, KILL_SHAPER, KILL_S2CS, RELOAD, DUPLICATE, FLOOD, FS_FULL, SERVICE_STOP)
WEIGHTS = {
    KILL_PROXY: 6,
    KILL_SHAPER: 4,
    KILL_S2CS: 3,
    RELOAD: 2,
    DUPLICATE: 1,
    FLOOD: 2,
    FS_FULL: 1,
    SERVICE_STOP: 3,
}
ON_A_STREAM = (KILL_PROXY, KILL_SHAPER, SERVICE_STOP)  # the others are aimed at a gateway


@dataclass(frozen=True)
class StreamShape:
    """What the schedule needs to know of a long-lived stream."""

    name: str
    inbound: str  # gateway names
    outbound: str
    rate: int


@dataclass(frozen=True)
class Planned:
    at: float  # seconds after the traffic started
    kind: str
    stream: str  # the stream aimed at, for ON_A_STREAM kinds, else ""
    gateway: str  # the gateway aimed at (for a stream: the side whose process is killed)


def plan(
    seed: int,
    seconds: float,
    streams: list[StreamShape],
    gateways: list[str],
    kinds: tuple[str, ...] = KINDS,
    every: float = 12.0,
    quiet_start: float = 10.0,
    quiet_end: float = 15.0,
) -> list[Planned]:
    """Faults about every `every` seconds between `quiet_start` and `seconds - quiet_end`, at
    least one of each kind when they fit at 5 s apart."""
    rng = random.Random(seed)
    room = max(0.0, seconds - quiet_start - quiet_end)
    count = max(int(room // every), min(len(kinds), int(room // 5)))
    if count == 0:
        return []
    first = list(kinds)
    rng.shuffle(first)
    spacing = room / count
    planned = []
    for i in range(count):
        kind = first[i] if i < len(first) else rng.choices(kinds, [WEIGHTS[k] for k in kinds])[0]
        at = quiet_start + spacing * i + rng.uniform(0, spacing * 0.6)
        planned.append(_aim(rng, round(at, 1), kind, streams, gateways))
    return planned


def _aim(
    rng: random.Random, at: float, kind: str, streams: list[StreamShape], gateways: list[str]
) -> Planned:
    if kind in ON_A_STREAM:
        # A shaper runs only where there is a rate (or several listeners, which the soak has not).
        pool = [s for s in streams if s.rate] if kind == KILL_SHAPER else streams
        stream = rng.choice(pool or streams)
        side = rng.choice((stream.inbound, stream.outbound))
        return Planned(at, kind, stream.name, stream.inbound if kind == SERVICE_STOP else side)
    return Planned(at, kind, "", rng.choice(gateways))
