"""What the soak runs: real s2cs gateways of both backends, long-lived streams carrying checked
traffic all the time, and clients that make and release streams without pause.

Everything here is bounded: every loop ends when `stop` is set or its deadline passes, every wait
and every command has a timeout. Faults (soak_faults.py) act on these objects from other threads:
a gateway's `lock` keeps a restart, a SIGHUP and a status call of the faults apart.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from scistream import api
from scistream.errors import ExitStatus, ScistreamError
from scistream.loopback import BIN, S2csProcess, free_port_range

from .soak_traffic import OK, REFUSED, CheckedService, Ledger, Route, send_checked

COMMAND_TIMEOUT = 90.0  # one s2uc command, on a busy 2-core machine
UID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class SoakS2cs(S2csProcess):
    """An s2cs whose log lives outside its state dir, so a full state filesystem does not also
    silence the log that says what happened."""

    log_dir: Path = Path("/tmp")

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.name}.log"


@dataclass
class Gateway:
    name: str  # e.g. "hpc-haproxy"
    backend: str
    s2cs: SoakS2cs
    tmpfs: Path | None  # the filesystem of its state dir, when it has one of its own
    lock: threading.Lock = field(default_factory=threading.Lock)
    starts: int = 1  # 1 + restarts after a kill
    baseline_fds: int = 0  # with no stream, after one made and released

    def process(self) -> psutil.Process | None:
        proc = self.s2cs.proc
        if proc is None or proc.poll() is not None:
            return None
        try:
            return psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return None

    def footprint(self) -> tuple[int, int] | None:
        """RSS (bytes) and open descriptors of s2cs, None when it is not running."""
        process = self.process()
        if process is None:
            return None
        try:
            return int(process.memory_info().rss), process.num_fds()
        except psutil.Error:
            return None


def make_gateways(work: Path, templates: Path, mounts: dict[str, Path], ports: int) -> list[Gateway]:
    """hpc and instrument gateways of each backend, each with its own state dir (on its own
    tmpfs when `mounts` has one for it), all with --templates `templates`."""
    SoakS2cs.log_dir = work / "logs"
    SoakS2cs.log_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for role in ("hpc", "inst"):
        for backend in ("haproxy", "stunnel"):
            name = f"{role}-{backend}"
            base = mounts.get(name, work)
            extra = ("--type", backend, "--templates", str(templates), "--verbose")
            s2cs = SoakS2cs(name, base / name, free_port_range(ports), extra)
            made.append(Gateway(name, backend, s2cs, mounts.get(name)))
    return made


@dataclass
class Request:
    """One request a client made: what, to which gateways, when, and whether it worked."""

    kind: str
    gateways: tuple[str, ...]
    start: float
    end: float
    ok: bool
    error: str = ""


@dataclass
class Book:
    """Requests and streams of the whole run, shared by all threads."""

    requests: list[Request] = field(default_factory=list)
    made: int = 0
    released: int = 0
    live: dict[str, tuple[str, ...]] = field(default_factory=dict)  # made for a client, not released
    unreleased: dict[str, tuple[str, ...]] = field(default_factory=dict)  # a release failed: to try again
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, request: Request) -> None:
        with self.lock:
            self.requests.append(request)

    def made_one(self, uid: str, gateways: tuple[str, ...]) -> None:
        with self.lock:
            self.made += 1
            self.live[uid] = gateways

    def release_done(self, uid: str, gateways: tuple[str, ...], done: bool) -> None:
        """A release worked (or found the stream gone everywhere), or must be tried again."""
        with self.lock:
            if not done:
                self.unreleased[uid] = gateways
                return
            self.unreleased.pop(uid, None)
            if self.live.pop(uid, None) is not None:
                self.released += 1


def s2uc(book: Book, kind: str, gateways: tuple[str, ...], *args: str) -> tuple[dict[str, Any] | None, str]:
    """Run one s2uc command with --json; its reply (None when it failed) and its error text."""
    start = time.monotonic()
    try:
        done = subprocess.run(
            [str(BIN / "s2uc"), *args, "--json"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )
        reply = json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else None
        error = "" if reply is not None else (done.stderr.strip() or f"exit status {done.returncode}")
        if reply is None and args[0] == "release" and done.returncode == ExitStatus.NOT_FOUND:
            reply, error = (
                {"gone": True},
                "",
            )  # on no gateway: released before, by a try whose answer was lost
    except subprocess.TimeoutExpired:
        reply, error = None, f"no answer within {COMMAND_TIMEOUT:.0f} s"
    book.note(Request(kind, gateways, start, time.monotonic(), reply is not None, error[-300:]))
    return reply, error


@dataclass
class TrafficStream:
    """A stream that lives the whole run and carries checked traffic all the time."""

    name: str
    hpc: Gateway
    inst: Gateway
    rate: int
    service: CheckedService
    num_conn: int = 5
    uid: str = ""
    port: int = 0  # the outbound proxy's listener, where the instrument sends

    @property
    def route(self) -> Route:
        return Route(self.name, self.service.name, (self.hpc.name, self.inst.name))


@dataclass(frozen=True)
class Setting:
    """What all the soak's threads share."""

    ledger: Ledger
    book: Book
    certs: Path  # every gateway's certificate, one file
    payload: memoryview  # random bytes; each connection sends a slice
    stop: threading.Event
    deadline: float  # monotonic: no new work after it
    pace_bps: float  # the long connections' pace
    seed: int


def open_stream(setting: Setting, stream: TrafficStream) -> None:
    """Both sides, through the Python API (the churn clients use s2uc too)."""
    made = api.connect(
        inbound=stream.hpc.s2cs.address,
        outbound=stream.inst.s2cs.address,
        remote_ip="127.0.0.1",
        receiver_ports=[stream.service.port],
        server_cert=setting.certs,
        rate=stream.rate,
        num_conn=stream.num_conn,
        local_ip="127.0.0.1",
    )
    stream.uid = made.uid
    stream.port = int(made.listeners[0].rpartition(":")[2])
    setting.book.made_one(made.uid, (stream.inst.name, stream.hpc.name))


def release(setting: Setting, uid: str, gateways: list[Gateway]) -> bool:
    """`s2uc release UID --s2cs A --s2cs B`: both sides, a gateway without it is no failure."""
    names = tuple(g.name for g in gateways)
    servers = [arg for g in gateways for arg in ("--s2cs", g.s2cs.address)]
    kind = "s2uc release (both sides)" if len(gateways) > 1 else "s2uc release"
    reply, _ = s2uc(setting.book, kind, names, "release", uid, *servers, "--server_cert", str(setting.certs))
    setting.book.release_done(uid, names, reply is not None)
    return reply is not None


def long_connections(setting: Setting, stream: TrafficStream) -> None:
    """One connection after the other, paced, each of 256 KiB to 4 MiB, until the end."""
    rng = random.Random(f"{setting.seed}-{stream.name}-long")
    n = 0
    while not setting.stop.is_set() and time.monotonic() < setting.deadline:
        n += 1
        size = rng.randint(256 << 10, 4 << 20)
        offset = rng.randrange(0, len(setting.payload) - size)
        seen = send_checked(
            setting.ledger, stream.route, ("127.0.0.1", stream.port), f"{stream.name}-L{n}",
            setting.payload[offset : offset + size], setting.pace_bps, timeout=size * 8 / 1e6 + 90,
        )  # fmt: skip
        if seen.outcome != OK:
            setting.stop.wait(1.0 if seen.outcome == REFUSED else 0.3)


def short_connections(setting: Setting, stream: TrafficStream) -> None:
    """Bursts of short connections beside the long one, up to num_conn in all."""
    rng = random.Random(f"{setting.seed}-{stream.name}-short")
    n = 0
    while not setting.stop.is_set() and time.monotonic() < setting.deadline:
        burst = []
        for _ in range(rng.randint(1, stream.num_conn - 1)):
            n += 1
            size = rng.randint(16 << 10, 256 << 10)
            offset = rng.randrange(0, len(setting.payload) - size)
            args = (setting.ledger, stream.route, ("127.0.0.1", stream.port), f"{stream.name}-S{n}",
                    setting.payload[offset : offset + size], 0.0, 90.0)  # fmt: skip
            burst.append(threading.Thread(target=send_checked, args=args, daemon=True))
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join(120)
        setting.stop.wait(rng.uniform(0.5, 2.0))


@dataclass(frozen=True)
class Made:
    uid: str
    port: int


def churn(
    setting: Setting, client: int, pairs: list[tuple[Gateway, Gateway]], service: CheckedService
) -> None:
    """Make a stream, send through it byte-checked, release both sides; again, until the end.
    Streams are made by `s2uc inbound_request` + `outbound_request`, by `s2uc connect`, or by
    the Python API, released by `s2uc release` with both gateways or by the API."""
    rng = random.Random(f"{setting.seed}-churn-{client}")
    n = 0
    while not setting.stop.is_set() and time.monotonic() < setting.deadline:
        n += 1
        hpc, inst = rng.choice(pairs)
        rate = rng.choice((10_000, 0))
        how = rng.choice(("s2uc two steps", "s2uc connect", "api connect"))
        made = make_churn_stream(setting, how, hpc, inst, rate, service)
        if made is not None:
            setting.book.made_one(made.uid, (inst.name, hpc.name))
            size = rng.randint(16 << 10, 512 << 10)
            offset = rng.randrange(0, len(setting.payload) - size)
            route = Route(f"churn-{made.uid[:8]}", service.name, (hpc.name, inst.name))
            send_checked(setting.ledger, route, ("127.0.0.1", made.port), f"c{client}-{n}",
                         setting.payload[offset : offset + size], 0.0, 90.0)  # fmt: skip
            if how == "api connect":
                release_by_api(setting, made.uid, [inst, hpc])
            else:
                release(setting, made.uid, [inst, hpc])
        retry_releases(setting, {g.name: g for pair in pairs for g in pair}, rng)
        setting.stop.wait(rng.uniform(0.0, 0.5))


def make_churn_stream(
    setting: Setting, how: str, hpc: Gateway, inst: Gateway, rate: int, service: CheckedService
) -> Made | None:
    target = ("--remote_ip", "127.0.0.1", "--receiver_ports", str(service.port), "--rate", str(rate))
    cert = ("--server_cert", str(setting.certs))
    book = setting.book
    if how == "s2uc connect":
        both = (hpc.name, inst.name)
        gateways = ("--inbound-s2cs", hpc.s2cs.address, "--outbound-s2cs", inst.s2cs.address)
        reply, error = s2uc(book, how, both, "connect", *gateways, "--local_ip", "127.0.0.1", *target, *cert)
        if reply is None:
            left_behind(setting, error, (hpc.name,))  # connect names a UID it could not release
            return None
        return Made(reply["uid"], int(reply["listeners"][0].rpartition(":")[2]))
    if how == "api connect":
        return api_connect(setting, hpc, inst, rate, service)
    inbound, error = s2uc(book, "s2uc inbound_request", (hpc.name,), "inbound_request",
                          "--s2cs", hpc.s2cs.address, *target, *cert)  # fmt: skip
    if inbound is None:
        return None
    uid = inbound["uid"]
    outbound, error = s2uc(book, "s2uc outbound_request", (inst.name,), "outbound_request",
                           "--s2cs", inst.s2cs.address, "--remote_ip", "127.0.0.1", "--rate", str(rate),
                           *cert, uid, ",".join(inbound["listeners"]))  # fmt: skip
    if outbound is None:
        release(setting, uid, [inst, hpc])  # the instrument side may exist if only its reply was lost
        return None
    return Made(uid, int(outbound["listeners"][0].rpartition(":")[2]))


def api_connect(
    setting: Setting, hpc: Gateway, inst: Gateway, rate: int, service: CheckedService
) -> Made | None:
    start = time.monotonic()
    try:
        made = api.connect(
            inbound=hpc.s2cs.address,
            outbound=inst.s2cs.address,
            remote_ip="127.0.0.1",
            receiver_ports=[service.port],
            server_cert=setting.certs,
            rate=rate,
            local_ip="127.0.0.1",
        )
    except ScistreamError as exc:
        setting.book.note(
            Request("api connect", (hpc.name, inst.name), start, time.monotonic(), False, str(exc))
        )
        left_behind(setting, str(exc), (hpc.name,))
        return None
    setting.book.note(Request("api connect", (hpc.name, inst.name), start, time.monotonic(), True))
    return Made(made.uid, int(made.listeners[0].rpartition(":")[2]))


def release_by_api(setting: Setting, uid: str, gateways: list[Gateway]) -> None:
    start = time.monotonic()
    names = tuple(g.name for g in gateways)
    try:
        outcomes = api.release(uid, s2cs=[g.s2cs.address for g in gateways], server_cert=setting.certs)
        failed = [str(o.error) for o in outcomes if o.failed]
    except ScistreamError as exc:
        failed = [str(exc)]
    error = "; ".join(failed)
    setting.book.note(Request("api release (both sides)", names, start, time.monotonic(), not failed, error))
    setting.book.release_done(uid, names, not failed)


def left_behind(setting: Setting, error: str, gateways: tuple[str, ...]) -> None:
    """A failed connect that could not undo its inbound side names the UID: release it later."""
    for uid in UID_RE.findall(error):
        with setting.book.lock:
            setting.book.unreleased.setdefault(uid, gateways)


def retry_releases(setting: Setting, by_name: dict[str, Gateway], rng: random.Random) -> None:
    """Streams whose release failed (a gateway was down): one more try, now and then."""
    with setting.book.lock:
        pending = sorted(setting.book.unreleased.items())
    if not pending or rng.random() > 0.3:
        return
    uid, names = rng.choice(pending)
    release(setting, uid, [by_name[n] for n in names])


def recorded_uids(gateway: Gateway) -> list[str]:
    """The UIDs of the streams in the gateway's state.json: what an operator reads to find a
    stream whose reply its client never got (s2cs killed between making it and answering)."""
    try:
        data = json.loads((gateway.s2cs.state_dir / "state.json").read_text())
    except (OSError, ValueError):
        return []
    return [s["uid"] for s in data.get("sessions", []) if isinstance(s, dict) and "uid" in s]


def sample(gateways: list[Gateway], ledger: Ledger, book: Book, began: float) -> dict[str, Any]:
    """One point of the figures over time."""
    point: dict[str, Any] = {"t": round(time.monotonic() - began, 1)}
    for gw in gateways:
        print_ = gw.footprint()
        point[gw.name] = {"rss": print_[0], "fds": print_[1]} if print_ else None
    point["delivered"] = ledger.delivered_bytes()
    with book.lock:
        point["requests"] = len(book.requests)
        point["failed_requests"] = sum(1 for r in book.requests if not r.ok)
    return point


def sampler(gateways: list[Gateway], setting: Setting, began: float, into: list[dict[str, Any]]) -> None:
    while not setting.stop.wait(2.0):
        into.append(sample(gateways, setting.ledger, setting.book, began))


def pids_of(gateway: Gateway, uid: str) -> dict[str, int]:
    """The stream's processes at this gateway, by name ("proxy", "shaper"); {} when unknown."""
    try:
        streams = gateway.s2cs.call("status", uid=uid)["streams"]
    except (ScistreamError, OSError):
        return {}
    return {p["name"]: int(p["pid"]) for s in streams for p in s.get("processes", []) if p.get("pid")}


def stream_running(gateway: Gateway, uid: str) -> bool:
    try:
        streams = gateway.s2cs.call("status", uid=uid)["streams"]
    except (ScistreamError, OSError):
        return False
    return bool(streams) and all(s["state"] == "RUNNING" for s in streams)


def environment_note() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
