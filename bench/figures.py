"""The arithmetic of the bench's figures: percentiles, ratios with their spread over rounds, CPU
seconds per gigabyte from two samples of /proc, and the seeded order of each round. Pure: no
process, socket or clock here, so the unit tests check every figure the bench prints.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def percentiles(values: Sequence[float]) -> tuple[float, float]:
    """p50 and p95, in the unit of `values`."""
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return statistics.median(ordered), p95


@dataclass(frozen=True)
class Spread:
    """The median of some values and their lowest and highest."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f})"


def spread(values: Sequence[float]) -> Spread:
    return Spread(statistics.median(values), min(values), max(values))


def round_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """One ratio per round, each from the two runs of that same round: what the machine did
    during a round (another load, its clock) weighs on both alike, so the ratios vary less than
    a ratio of medians taken over different minutes would. A round with a zero denominator gives
    none."""
    if len(numerator) != len(denominator):
        raise ValueError(f"{len(numerator)} runs against {len(denominator)}: a ratio needs the same rounds")
    return [n / d for n, d in zip(numerator, denominator, strict=True) if d]


def round_orders(names: Sequence[str], rounds: int, seed: int) -> list[list[str]]:
    """The order of the configurations in each round, shuffled anew every round: none is always
    the first (after an idle pause) or always follows the same one (whose caches and heat it
    meets). Seeded, so that a run's order can be repeated (`--seed`)."""
    rng = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        orders.append(order)
    return orders


def stat_ticks(stat: str) -> int:
    """utime + stime of a process, in clock ticks, from the text of /proc/PID/stat: every thread
    of the process, those that have ended included. The fields are counted after the last ')':
    the command name before it may hold spaces and parentheses."""
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is the state, the 3rd field of proc(5); utime and stime are its 14th and 15th.
    return int(fields[11]) + int(fields[12])


def cpu_seconds(before: Mapping[int, int], after: Mapping[int, int], hertz: int) -> float:
    """CPU seconds the processes used between two samples (pid: ticks). A process sampled only
    after counts from zero (it started in between); one gone by the second sample is left out,
    its last ticks unknown."""
    return sum(ticks - before.get(pid, 0) for pid, ticks in after.items()) / hertz


def cpu_per_gb(seconds: float, nbytes: int) -> float:
    """CPU seconds per gigabyte (10^9 bytes, as in Gbit/s) carried."""
    if nbytes <= 0:
        raise ValueError("no byte was carried: there is no CPU per gigabyte to give")
    return seconds / (nbytes / 1e9)
