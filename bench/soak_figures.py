"""The soak's figures and goals, from what the run recorded (pure, but for the plot).

A cut (a connection that failed visibly: a reset, an error, a timeout) is charged to a fault when
it overlaps the fault's window on a stream the fault could touch; one that no fault explains is
a failure of its own. A failed request is charged the same way, by the gateways it asked.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .soak_faults import Fault
from .soak_traffic import OK, Judged
from .soak_world import Request


@dataclass(frozen=True)
class Footprint:
    """s2cs's resident memory and open descriptors."""

    rss: int
    fds: int


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]


def charged(
    start: float, end: float, streams: set[str], gateways: set[str], faults: list[Fault], run_end: float
) -> Fault | None:
    """The fault whose window overlaps [start, end] on one of these streams or gateways: one
    aimed at the stream itself first, then one aimed at a gateway on its way."""
    overlapping = [
        f for f in faults if f.start and start <= f.window(run_end)[1] and end >= f.window(run_end)[0]
    ]
    overlapping.sort(key=lambda f: -f.start)  # the latest one began inside the others' windows
    for fault in overlapping:
        if fault.planned.stream in streams:
            return fault
    for fault in overlapping:
        if fault.streams & streams or fault.gateways & gateways:
            return fault
    return None


def figures(
    judged: list[Judged],
    empty_silent: int,
    requests: list[Request],
    faults: list[Fault],
    made: int,
    released: int,
    leaks: list[str],
    footprints: dict[str, dict[str, Any]],
    run_end: float,
) -> dict[str, Any]:
    cuts_by_kind: Counter[str] = Counter()
    unexplained = []
    silent = []
    checked = 0
    for j in judged:
        s = j.sender
        if s.outcome == OK:
            checked += s.length
        if j.silent:
            fault = charged(s.start, s.end, {s.stream}, set(s.gateways), faults, run_end)
            after = f" (during {fault.planned.kind}: {fault.detail})" if fault else ""
            silent.append(f"{s.conn_id} on {s.stream}: {j.silent}{after}")
        elif j.cut:
            fault = charged(s.start, s.end, {s.stream}, set(s.gateways), faults, run_end)
            if fault is None:
                unexplained.append(f"{s.conn_id} on {s.stream}: {s.outcome} {s.detail}".strip())
            else:
                cuts_by_kind[fault.planned.kind] += 1
    silent += [
        f"a service saw a clean end before any header, for a sender cut on its way ({empty_silent})"
    ] * (1 if empty_silent else 0)
    req_failed_fault: Counter[str] = Counter()
    req_unexplained = []
    req_fault_errors: list[str] = []
    under: list[float] = []
    calm: list[float] = []
    for r in requests:
        fault = charged(r.start, r.end, set(), set(r.gateways), faults, run_end)
        (under if fault else calm).append(r.end - r.start)
        if not r.ok:
            if fault is None:
                req_unexplained.append(f"{r.kind} at {', '.join(r.gateways)}: {r.error}")
            else:
                req_failed_fault[fault.planned.kind] += 1
                req_fault_errors.append(
                    f"{r.kind} at {', '.join(r.gateways)} during {fault.planned.kind}: {r.error}"
                )
    by_kind: dict[str, dict[str, int]] = {}
    for fault in faults:
        entry = by_kind.setdefault(fault.planned.kind, {"injected": 0, "survived": 0, "skipped": 0})
        if fault.survived is None:
            entry["skipped"] += 1
        else:
            entry["injected"] += 1
            entry["survived"] += bool(fault.survived)
    ok_times = [r.end - r.start for r in requests if r.ok]
    return {
        "streams": {"made": made, "released": released},
        "requests": {
            "count": len(requests),
            "failed under a fault": dict(req_failed_fault),
            "failed under a fault: errors": req_fault_errors,
            "failed, no fault to explain it": req_unexplained,
            "p50 ms": _ms(percentile(ok_times, 0.5)),
            "p99 ms": _ms(percentile(ok_times, 0.99)),
            "under faults: count": len(under),
            "under faults: p50 ms": _ms(percentile(under, 0.5)),
            "under faults: p99 ms": _ms(percentile(under, 0.99)),
            "calm: p50 ms": _ms(percentile(calm, 0.5)),
            "calm: p99 ms": _ms(percentile(calm, 0.99)),
        },
        "faults": by_kind,
        "faults not survived": [
            f"{f.planned.kind} at {f.planned.at:.0f} s: {f.detail}" for f in faults if f.survived is False
        ],
        "connections": {
            "count": len(judged),
            "delivered whole": sum(1 for j in judged if j.sender.outcome == OK),
            "bytes checked": checked,
            "cut by faults": dict(cuts_by_kind),
            "cut, no fault to explain it": unexplained,
        },
        "silent losses": silent,
        "leaks": leaks,
        "s2cs": footprints,
    }


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 1)


def goals_missed(fig: dict[str, Any], rss_growth: float = 1.5, rss_slack: int = 24 << 20) -> list[str]:
    """Each goal the run missed, in words; [] when it met them all."""
    missed = []
    if fig["silent losses"]:
        missed.append(f"{len(fig['silent losses'])} silent loss(es) (goal 0)")
    if fig["leaks"]:
        missed.append(f"{len(fig['leaks'])} leak(s) (goal 0)")
    if fig["faults not survived"]:
        missed.append(f"{len(fig['faults not survived'])} fault(s) not survived (goal 0)")
    cuts = fig["connections"]["cut, no fault to explain it"]
    if cuts:
        missed.append(f"{len(cuts)} connection(s) cut with no fault to explain it (goal 0)")
    failed = fig["requests"]["failed, no fault to explain it"]
    if failed:
        missed.append(f"{len(failed)} request(s) failed with no fault to explain it (goal 0)")
    if fig["streams"]["made"] != fig["streams"]["released"]:
        missed.append(f"{fig['streams']['made']} streams made but {fig['streams']['released']} released")
    for name, fp in fig["s2cs"].items():
        first, end = fp.get("first minute"), fp.get("end")
        if first and end and end["rss"] > max(first["rss"] * rss_growth, first["rss"] + rss_slack):
            missed.append(
                f"s2cs {name} grew from {first['rss'] >> 20} MiB to {end['rss'] >> 20} MiB (goal: flat)"
            )
    return missed


def report(fig: dict[str, Any], missed: list[str], command: str, machine: str) -> str:
    """The figures as a person reads them."""
    req, conn = fig["requests"], fig["connections"]
    lines = [
        f"Soak: {command}",
        f"  machine: {machine}",
        f"  streams made {fig['streams']['made']}, released {fig['streams']['released']}",
        f"  requests {req['count']}: p50 {req['p50 ms']} ms, p99 {req['p99 ms']} ms; under faults "
        f"({req['under faults: count']}): p50 {req['under faults: p50 ms']} ms, "
        f"p99 {req['under faults: p99 ms']} ms",
        f"  requests failed under a fault: {_counts(req['failed under a fault'])}",
        "  faults (injected/survived):"
        + "".join(f" {k} {v['injected']}/{v['survived']}" for k, v in sorted(fig["faults"].items())),
        f"  connections {conn['count']}, delivered whole {conn['delivered whole']}, "
        f"bytes checked {conn['bytes checked']:,}",
        f"  connections cut by faults: {_counts(conn['cut by faults'])}",
        f"  silent losses: {len(fig['silent losses'])}   leaks: {len(fig['leaks'])}",
    ]
    for name, fp in fig["s2cs"].items():
        first, end = fp.get("first minute"), fp.get("end")
        lines.append(
            f"  s2cs {name}: RSS {_mib(first)} -> {_mib(end)} MiB (peak {_mib(fp.get('peak'))}), "
            f"fds {_fds(first)} -> {_fds(end)} (peak {_fds(fp.get('peak'))}) "
            f"(baseline {fp.get('baseline fds')}, started {fp.get('starts')} time(s))"
        )
    for title, items in (
        ("silent losses", fig["silent losses"]),
        ("leaks", fig["leaks"]),
        ("faults not survived", fig["faults not survived"]),
        ("connections cut with no fault to explain it", conn["cut, no fault to explain it"]),
        ("requests failed with no fault to explain it", req["failed, no fault to explain it"]),
    ):
        if items:
            lines.append(f"  {title}:")
            lines += [f"    - {item}" for item in items[:20]]
            if len(items) > 20:
                lines.append(f"    ... and {len(items) - 20} more")
    lines.append("GOALS MET" if not missed else "GOALS MISSED: " + "; ".join(missed))
    return "\n".join(lines)


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"


def _mib(fp: dict[str, int] | None) -> str:
    return f"{fp['rss'] / (1 << 20):.0f}" if fp else "?"


def _fds(fp: dict[str, int] | None) -> str:
    return str(fp["fds"]) if fp else "?"


def plot(samples: list[dict[str, Any]], faults: list[Fault], began: float, path: Path) -> str:
    """s2cs memory and descriptors, checked bytes and requests over time, faults marked: a PNG.
    Returns what was done, in words (matplotlib may be missing: make bench-deps installs it)."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
        from matplotlib.lines import Line2D  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return "no plot: matplotlib is missing (make bench-deps installs it)"
    names = (
        [k for k in samples[0] if k not in ("t", "delivered", "requests", "failed_requests")]
        if samples
        else []
    )
    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    for name in names:
        axes[0].plot(t, [s[name]["rss"] / (1 << 20) if s[name] else math.nan for s in samples], label=name)
        axes[1].plot(t, [s[name]["fds"] if s[name] else math.nan for s in samples], label=name)
    axes[0].set_ylabel("s2cs RSS (MiB)")
    axes[1].set_ylabel("s2cs open fds")
    axes[0].legend(fontsize=7, ncol=4)
    mb = [s["delivered"] / 1e6 for s in samples]
    rate = [0.0] + [(mb[i] - mb[i - 1]) * 8 / max(0.1, t[i] - t[i - 1]) for i in range(1, len(t))]
    axes[2].plot(t, rate, color="tab:green")
    axes[2].set_ylabel("checked Mbit/s")
    axes[3].plot(t, [s["requests"] for s in samples], label="requests")
    axes[3].plot(t, [s["failed_requests"] for s in samples], label="failed")
    axes[3].set_ylabel("requests (total)")
    axes[3].legend(fontsize=7)
    axes[3].set_xlabel("seconds")
    colours = plt.get_cmap("tab10")
    kinds = sorted({f.planned.kind for f in faults})
    for fault in faults:
        if fault.start:
            colour = colours(kinds.index(fault.planned.kind) % 10)
            for ax in axes:
                ax.axvline(fault.start - began, color=colour, alpha=0.35, lw=1)
    handles = [Line2D([], [], color=colours(i % 10), label=k) for i, k in enumerate(kinds)]
    axes[2].legend(handles=handles, fontsize=7, ncol=4, title="faults", title_fontsize=7)
    fig.suptitle("SciStream soak: s2cs footprint, checked traffic and requests; faults as lines")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"plot written to {path}"
