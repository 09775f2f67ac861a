"""`make soak`: real gateways for minutes under churn, checked traffic and faults on a seeded
schedule; then nothing may be left, and figures say what happened (docs/reliability.md).

    python -m bench.soak [--minutes 10] [--seed S] [--json FILE] [--plot FILE]

Run it in a private network namespace as root (make soak does, through scripts/run-isolated):
every address used is 127.0.0.1 there. As root it also takes a mount namespace of its own
(unshare -m), where each gateway's state dir gets a small tmpfs that a fault fills up; without
root that fault is skipped and said so. Exit status 0 when every goal was met, else 1, with the
goals missed named in the last line.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from scistream.loopback import proxies_of
from scistream.s2cs.gateway import port_is_free
from scistream.s2ds.render import default_templates

from .soak_faults import RECOVERY, Fault, Stage, run_fault, wait_until
from .soak_figures import figures, goals_missed, plot, report
from .soak_plan import FS_FULL, KINDS, Planned, StreamShape, plan
from .soak_traffic import CheckedService, Ledger, empty_silences, judge
from .soak_world import (
    Book,
    Gateway,
    Setting,
    TrafficStream,
    churn,
    environment_note,
    long_connections,
    make_gateways,
    open_stream,
    recorded_uids,
    release,
    sample,
    sampler,
    short_connections,
)

if TYPE_CHECKING:
    import typer

PRIVATE_MOUNTS = "SOAK_PRIVATE_MOUNTS"  # set once this process runs in a mount namespace of its own


@dataclass(frozen=True)
class Options:
    """What a soak was asked for; `seed` drawn when none was given."""

    minutes: float
    seed: int
    streams: int
    clients: int
    every: float
    fs_full_seconds: float
    pace: float
    json: Path | None
    plot: Path | None
    keep: bool


def command(then: Callable[[Options], int]) -> typer.Typer:
    """The command line; `then` runs the soak asked for and gives the exit status. typer is
    imported here, so the options are defaults (typer.Option(...)): an Annotated[...] would be
    read as a string in this module's globals, where typer is not."""
    import typer

    def soak_command(
        minutes: float = typer.Option(10.0, help="How long the faults and traffic go on."),
        seed: int | None = typer.Option(
            None, help="Seed of the fault schedule, to replay one.  [default: a new one]"
        ),
        streams: int = typer.Option(8, min=1, help="Long-lived streams carrying traffic."),
        clients: int = typer.Option(3, min=0, help="Clients making and releasing streams at once."),
        every: float = typer.Option(12.0, help="Seconds between faults, on average."),
        fs_full_seconds: float = typer.Option(60.0, help="How long a state filesystem stays full."),
        pace: float = typer.Option(4.0, help="Mbit/s of each long-lived connection."),
        json_file: Path | None = typer.Option(
            None, "--json", help="Write the figures, samples and faults to this file."
        ),
        plot_file: Path | None = typer.Option(
            None, "--plot", help="Draw the figures over time to this PNG (needs matplotlib)."
        ),
        keep: bool = typer.Option(
            False, "--keep", help="Keep the work dir (logs, state) even when all went well."
        ),
    ) -> None:
        if minutes <= 0:
            raise typer.BadParameter(f"{minutes:g} is not above 0", param_hint="'--minutes'")
        drawn = random.SystemRandom().randrange(1, 100_000) if seed is None else seed
        asked = Options(
            minutes, drawn, streams, clients, every, fs_full_seconds, pace, json_file, plot_file, keep
        )
        raise typer.Exit(then(asked))

    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    app.command(help=__doc__.split("\n\n")[0])(soak_command)
    return app


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if os.geteuid() == 0 and not os.environ.get(PRIVATE_MOUNTS) and shutil.which("unshare"):
        # Mounts of our own: the tmpfs of the state dirs goes with this process, whatever happens.
        env = {**os.environ, PRIVATE_MOUNTS: "1"}
        again = [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "--",
            sys.executable,
            "-m",
            "bench.soak",
            *argv,
        ]
        os.execvpe("unshare", again, env)  # noqa: S606 - our own argv, no shell
    command(run)(args=argv, prog_name="python -m bench.soak")


def run(args: Options) -> int:
    """The soak asked for, its report; the exit status (1 when a goal was missed)."""
    replay = "python -m bench.soak " + shlex.join(
        [f"--minutes={args.minutes:g}", f"--seed={args.seed}", f"--streams={args.streams}",
         f"--clients={args.clients}", f"--fs-full-seconds={args.fs_full_seconds:g}"]
    )  # fmt: skip
    print(f"soak: {replay} ({environment_note()})", flush=True)
    work = Path(tempfile.mkdtemp(prefix="sk-", dir="/tmp"))  # short: proxies' sockets live below it
    # The clients' own directory (pinned certificates, scopes): the soak's gateways come and go
    # on ports another run reuses, and must not touch the pins of whoever runs it.
    os.environ["SCISTREAM_HOME"] = str(work / "home")
    mounts = make_mounts(work) if os.environ.get(PRIVATE_MOUNTS) else {}
    keep = args.keep
    try:
        result = soak(args, work, mounts)
        result["command"] = replay
        fig = result["figures"]
        missed = goals_missed(fig)
        result["goals missed"] = missed
        print(report(fig, missed, replay, result["machine"]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1, default=str))
        keep = keep or bool(missed)
        if keep:
            print(f"soak: logs and state dirs kept in {work}", flush=True)
        return 1 if missed else 0
    finally:
        for target in mounts.values():
            subprocess.run(["umount", "-l", str(target)], check=False)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def make_mounts(work: Path) -> dict[str, Path]:
    """A 64 MiB tmpfs per gateway, for its state dir; {} when mounting fails (not root)."""
    mounts: dict[str, Path] = {}
    for role in ("hpc", "inst"):
        for backend in ("haproxy", "stunnel"):
            target = work / f"fs-{role}-{backend}"
            target.mkdir()
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(target)],
                capture_output=True,
            )
            if done.returncode != 0:
                print(f"soak: no tmpfs ({done.stderr.decode().strip()}): no state-fs-full fault", flush=True)
                return mounts
            mounts[f"{role}-{backend}"] = target
    return mounts


def soak(args: Options, work: Path, mounts: dict[str, Path]) -> dict[str, Any]:
    templates = work / "templates"
    shutil.copytree(default_templates(), templates)
    ports = args.streams + args.clients * 2 + 8
    gateways = make_gateways(work, templates, mounts, ports)
    services: list[CheckedService] = []
    stop = threading.Event()
    try:
        return _soak(args, work, gateways, services, stop)
    finally:
        stop.set()
        for gw in gateways:
            gw.s2cs.stop(signal.SIGTERM)
        for gw in gateways:  # whatever a failed run left: never a process after the soak
            for pid in proxies_of(gw.s2cs.state_dir):
                try:
                    psutil.Process(pid).kill()
                except psutil.Error:
                    pass
        for service in services:
            service.stop()


def _soak(
    args: Options,
    work: Path,
    gateways: list[Gateway],
    services: list[CheckedService],
    stop: threading.Event,
) -> dict[str, Any]:
    by_name = {gw.name: gw for gw in gateways}
    for gw in gateways:
        gw.s2cs.start(timeout=120)
    certs = work / "gateways.pem"
    certs.write_bytes(b"".join(gw.s2cs.cert.read_bytes() for gw in gateways))
    for gw in gateways:  # one stream made and released: what s2cs opens lazily counts as baseline
        uid = gw.s2cs.call("inbound", remote_ip="127.0.0.1", receiver_ports=[9])["uid"]
        gw.s2cs.call("release", uid=uid)
        gw.baseline_fds = (gw.footprint() or (0, 0))[1]
    ledger, book = Ledger(), Book()
    seconds = args.minutes * 60
    payload = memoryview(os.urandom(8 << 20))
    setting = Setting(
        ledger, book, certs, payload, stop, time.monotonic() + seconds + 900, args.pace * 1e6, args.seed
    )
    pairs = [
        (by_name[f"hpc-{a}"], by_name[f"inst-{b}"])
        for a in ("haproxy", "stunnel")
        for b in ("haproxy", "stunnel")
    ]
    streams = {}
    for i in range(args.streams):
        hpc, inst = pairs[i % len(pairs)]
        rate = 10_000 if (i // len(pairs) + i) % 2 == 0 else 0
        name = f"t{i}-{hpc.backend}-{inst.backend}-{'limited' if rate else 'unlimited'}"
        service = CheckedService(name, ledger)
        services.append(service)
        stream = TrafficStream(name, hpc, inst, rate, service)
        open_stream(setting, stream)
        streams[name] = stream
    churn_service = CheckedService("churn", ledger)
    services.append(churn_service)
    kinds = tuple(k for k in KINDS if k != FS_FULL or any(g.tmpfs for g in gateways))  # a tmpfs needs root
    shapes = [StreamShape(s.name, s.hpc.name, s.inst.name, s.rate) for s in streams.values()]
    schedule = plan(args.seed, seconds, shapes, list(by_name), kinds, every=args.every)
    print(f"soak: {len(streams)} long-lived streams, {args.clients} churn clients, {len(schedule)} faults "
          f"planned over {seconds:.0f} s", flush=True)  # fmt: skip
    stage = Stage(by_name, streams, ledger, work / "templates", stop, args.fs_full_seconds)
    began = time.monotonic()
    samples: list[dict[str, Any]] = [sample(gateways, ledger, book, began)]
    workers = [threading.Thread(target=sampler, args=(gateways, setting, began, samples), daemon=True)]
    for stream in streams.values():
        workers.append(threading.Thread(target=long_connections, args=(setting, stream), daemon=True))
        workers.append(threading.Thread(target=short_connections, args=(setting, stream), daemon=True))
    for client in range(args.clients):
        workers.append(
            threading.Thread(target=churn, args=(setting, client, pairs, churn_service), daemon=True)
        )
    for worker in workers:
        worker.start()
    faults = inject(stage, schedule, began, seconds)
    print("soak: faults done; stopping the traffic and the clients", flush=True)
    stop.set()
    for worker in workers:
        worker.join(240)
    run_end = time.monotonic()
    made, released, orphans, leaks = wind_down(setting, gateways, streams)
    footprints = footprints_of(gateways, samples)
    for gw in gateways:
        end = footprints[gw.name]["end"]
        if end and end["fds"] > gw.baseline_fds:
            leaks.append(
                f"s2cs {gw.name} holds {end['fds']} fds with no stream, {gw.baseline_fds} at the start"
            )
    for gw in gateways:
        code = gw.s2cs.stop(signal.SIGTERM)
        if code != 0:
            leaks.append(f"s2cs {gw.name} ended with exit status {code} on SIGTERM")
        left = proxies_of(gw.s2cs.state_dir)
        if left:
            leaks.append(f"processes of {gw.name} still running after it stopped: pids {left}")
    judged = judge(list(ledger.senders), dict(ledger.services))
    fig = figures(judged, empty_silences(judged, ledger.services), book.requests, faults, made, released,
                  leaks, footprints, run_end)  # fmt: skip
    fig["streams"]["replies lost to a fault (found in state.json, released)"] = orphans
    drawn = plot(samples, faults, began, args.plot) if args.plot else "no plot asked for"
    print(f"soak: {drawn}", flush=True)
    return {
        "machine": environment_note(),
        "figures": fig,
        "faults": [
            {
                "at": f.planned.at,
                "kind": f.planned.kind,
                "stream": f.planned.stream,
                "gateway": f.planned.gateway,
                "survived": f.survived,
                "detail": f.detail,
                "recovery s": round(f.recovered - f.end, 2) if f.recovered else None,
            }
            for f in faults
        ],
        "samples": samples,
    }


def inject(stage: Stage, schedule: list[Planned], began: float, seconds: float) -> list[Fault]:
    """Each planned fault at its time, in a thread of its own; back when all are done (bounded)."""
    faults, threads = [], []
    for planned in schedule:
        if stage.stop.wait(max(0.0, began + planned.at - time.monotonic())):
            break
        fault = Fault(planned)
        faults.append(fault)
        stage.faults.append(fault)
        print(f"soak: {planned.at:6.1f} s  {planned.kind} {planned.stream or planned.gateway}", flush=True)
        thread = threading.Thread(target=run_fault, args=(stage, fault), daemon=True)
        thread.start()
        threads.append(thread)
    stage.stop.wait(max(0.0, began + seconds - time.monotonic()))
    bound = time.monotonic() + stage.fs_full_seconds + 3 * RECOVERY + 60
    for thread in threads:
        thread.join(max(0.1, bound - time.monotonic()))
    return faults


def wind_down(
    setting: Setting, gateways: list[Gateway], streams: dict[str, TrafficStream]
) -> tuple[int, int, int, list[str]]:
    """Every stream released (the long-lived ones, those a failed release left, and those whose
    reply a fault lost, found in state.json as an operator would), then what is left is a leak."""
    for gw in gateways:  # a fault may have left one down (a restart that failed)
        if gw.process() is None:
            gw.s2cs.start(timeout=120)
    for stream in streams.values():
        release(setting, stream.uid, [stream.inst, stream.hpc])
    by_name = {gw.name: gw for gw in gateways}
    for _ in range(3):
        with setting.book.lock:  # streams whose release failed, and any a client left unreleased
            pending = sorted({**setting.book.live, **setting.book.unreleased}.items())
        for uid, names in pending:
            release(setting, uid, [by_name[n] for n in names])
    orphans = 0
    for gw in gateways:
        for uid in recorded_uids(gw):
            if uid not in setting.book.live:
                orphans += 1
            release(setting, uid, [gw])
    leaks: list[str] = []
    for gw in gateways:
        if not wait_until(lambda gw=gw: not what_is_left(gw), 60.0):  # type: ignore[misc]
            leaks += what_is_left(gw)
    with setting.book.lock:
        return setting.book.made, setting.book.released, orphans, leaks


def what_is_left(gw: Gateway) -> list[str]:
    """Everything of a stream still there on this gateway, with no stream left."""
    left = []
    state = gw.s2cs.state_dir
    if recorded_uids(gw):
        left.append(f"{gw.name}: state.json still records {len(recorded_uids(gw))} stream(s)")
    dirs = list((state / "sessions").iterdir()) if (state / "sessions").exists() else []
    if dirs:
        left.append(f"{gw.name}: session dirs left: {[d.name for d in dirs]}")
    procs = proxies_of(state)
    if procs:
        left.append(f"{gw.name}: processes left: {describe(procs)}")
    process = gw.process()
    children = process.children(recursive=True) if process else []
    if children:
        left.append(f"{gw.name}: s2cs still has children: {describe([c.pid for c in children])}")
    first, last = gw.s2cs.port_range
    busy = [p for p in range(first, last + 1) if not port_is_free(p)]
    if busy:
        left.append(f"{gw.name}: ports still listening: {busy}")
    return left


def describe(pids: list[int]) -> str:
    shown = []
    for pid in pids:
        try:
            shown.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:120]}")
        except psutil.Error:
            shown.append(str(pid))
    return "; ".join(shown)


def footprints_of(gateways: list[Gateway], samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """RSS and fds of each s2cs at the first minute (the last sample by then) and now."""
    shown: dict[str, dict[str, Any]] = {}
    for gw in gateways:
        early = [s[gw.name] for s in samples if s["t"] <= 60 and s.get(gw.name)]
        every = [s[gw.name] for s in samples if s.get(gw.name)]
        now = gw.footprint()
        shown[gw.name] = {
            "first minute": early[-1] if early else None,
            "peak": {"rss": max(p["rss"] for p in every), "fds": max(p["fds"] for p in every)}
            if every
            else None,
            "end": {"rss": now[0], "fds": now[1]} if now else None,
            "baseline fds": gw.baseline_fds,
            "starts": gw.starts,
        }
    return shown


if __name__ == "__main__":
    main()
