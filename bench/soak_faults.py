"""The soak's faults, done to real processes and files, and whether what was hit survived.

Each planned fault (soak_plan.py) runs in a thread of its own: the fault, then a bounded watch
for recovery, so that one that never recovers holds up nothing else. A fault's window, from its
start to its recovery (or to the end of the run when there was none), is what cuts and failed
requests are charged to, on the streams and gateways it could touch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from scistream.errors import ScistreamError

from .soak_plan import (
    DUPLICATE,
    FLOOD,
    FS_FULL,
    KILL_PROXY,
    KILL_S2CS,
    KILL_SHAPER,
    ON_A_STREAM,
    RELOAD,
    SERVICE_STOP,
    Planned,
)
from .soak_traffic import OK, Ledger
from .soak_world import Gateway, SoakS2cs, TrafficStream, pids_of, stream_running

RECOVERY = 60.0  # how long a stream or gateway may take to work again after a fault


@dataclass
class Fault:
    planned: Planned
    start: float = 0.0
    end: float = 0.0  # when the fault itself was over (process killed, service back, space freed)
    recovered: float | None = None  # when it worked again
    survived: bool | None = None  # None: not done (skipped or the run ended first)
    detail: str = ""
    streams: frozenset[str] = field(default_factory=frozenset)  # the streams it could touch
    gateways: frozenset[str] = field(default_factory=frozenset)

    def window(self, run_end: float) -> tuple[float, float]:
        """The time its effects may show: from 1 s before it to 2 s after recovery."""
        return self.start - 1.0, (self.recovered or max(self.end, run_end)) + 2.0


@dataclass
class Stage:
    """What faults act on."""

    gateways: dict[str, Gateway]
    streams: dict[str, TrafficStream]
    ledger: Ledger
    templates: Path
    stop: threading.Event
    fs_full_seconds: float
    faults: list[Fault] = field(default_factory=list)  # every fault so far, for the others to see
    reload_lock: threading.Lock = field(default_factory=threading.Lock)


def run_fault(stage: Stage, fault: Fault) -> None:
    """Do one fault and watch for recovery; every outcome lands in `fault`."""
    planned = fault.planned
    gw = stage.gateways[planned.gateway]
    if planned.kind in ON_A_STREAM:
        stream = stage.streams[planned.stream]
        fault.streams = frozenset({stream.name})  # no gateway: requests do not pass through a proxy
    else:
        fault.gateways = frozenset({gw.name})
        fault.streams = frozenset(s.name for s in stage.streams.values() if gw in (s.hpc, s.inst))
    fault.start = time.monotonic()
    try:
        DO[planned.kind](stage, fault)
    except Exception as exc:  # a fault that could not be done is reported, not fatal
        fault.survived = False
        fault.detail = f"the fault itself failed: {type(exc).__name__}: {exc}"
    if not fault.end:
        fault.end = time.monotonic()


def kill_process(stage: Stage, fault: Fault) -> None:
    """SIGKILL the stream's proxy or shaper on one side; it must come back and carry data."""
    planned = fault.planned
    stream, gw = stage.streams[planned.stream], stage.gateways[planned.gateway]
    name = "shaper" if planned.kind == KILL_SHAPER else "proxy"
    with gw.lock:
        pids = pids_of(gw, stream.uid)
    if name not in pids:
        fault.detail = f"no {name} of {stream.name} found on {gw.name}: skipped"
        return
    victim = pids[name]
    with contextlib.suppress(ProcessLookupError):
        os.kill(victim, signal.SIGKILL)
    fault.end = time.monotonic()
    fault.detail = f"{name} pid {victim} of {stream.name} on {gw.name}"
    back = wait_until(lambda: _replaced(gw, stream.uid, name, victim), RECOVERY, stage.stop)
    worked = back and data_flows_again(stage, stream.name, fault.end)
    _verdict(fault, worked, f"{name} not back within {RECOVERY:.0f} s" if not back else "")


def _replaced(gw: Gateway, uid: str, name: str, victim: int) -> bool:
    pids = pids_of(gw, uid)
    return name in pids and pids[name] != victim and stream_running(gw, uid)


def data_flows_again(stage: Stage, stream: str, since: float) -> bool:
    """A connection of the stream, started after `since`, delivered every byte."""

    def delivered() -> bool:
        with stage.ledger.lock:
            return any(
                s.stream == stream and s.outcome == OK and s.start >= since for s in stage.ledger.senders
            )

    return wait_until(delivered, RECOVERY, stage.stop)


def _verdict(fault: Fault, worked: bool, why: str = "") -> None:
    fault.survived = worked
    if worked:
        fault.recovered = time.monotonic()
    elif why or not fault.detail.endswith("skipped"):
        fault.detail += f"; NOT SURVIVED: {why or 'no connection of the stream delivered afterwards'}"


def kill_s2cs(stage: Stage, fault: Fault) -> None:
    """SIGKILL s2cs, start it again on the same state dir: its streams must run on throughout."""
    gw = stage.gateways[fault.planned.gateway]
    with gw.lock:
        s2cs = gw.s2cs
        before = {s.name: pids_of(gw, s.uid) for s in stage.streams.values() if gw in (s.hpc, s.inst)}
        s2cs.stop(signal.SIGKILL)
        died = [name for name, pids in before.items() if not all(psutil.pid_exists(p) for p in pids.values())]
        started = restart(gw, stage.fs_full_seconds + RECOVERY)
        gw.starts += 1
    fault.end = time.monotonic()
    fault.detail = f"s2cs of {gw.name}"
    if not started:
        _verdict(fault, False, "s2cs did not start again")
        return
    if died:
        fault.detail += f"; processes of {', '.join(died)} died with s2cs"
    running = all(
        wait_until(lambda s=s: stream_running(gw, s.uid), RECOVERY, stage.stop)  # type: ignore[misc]
        for s in stage.streams.values()
        if gw in (s.hpc, s.inst)
    )
    # Re-adopted, not started anew (which would cut its connections); a process another fault
    # killed meanwhile is new, and is left out.
    after = {s.name: pids_of(gw, s.uid) for s in stage.streams.values() if gw in (s.hpc, s.inst)}
    renewed = [
        f"{name} {kind}"
        for name, pids in before.items()
        for kind, pid in pids.items()
        if after.get(name, {}).get(kind, pid) != pid and not _hit_meanwhile(stage, name, fault)
    ]
    if renewed:
        fault.detail += f"; started anew instead of re-adopted: {', '.join(renewed)}"
    why = "a stream was not RUNNING again" if not running else "processes died or were not re-adopted"
    _verdict(fault, running and not died and not renewed, why)


def _hit_meanwhile(stage: Stage, stream: str, fault: Fault) -> bool:
    """Whether another fault aimed at this stream overlapped this one."""
    return any(
        other is not fault
        and other.planned.stream == stream
        and other.start
        and other.start <= fault.end + 1
        and (other.recovered or time.monotonic()) >= fault.start
        for other in stage.faults
    )


def restart(gw: Gateway, within: float) -> bool:
    """Start the gateway's s2cs again (on its control port), trying until `within` s passed: it
    may refuse to start while its filesystem is full."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            gw.s2cs.start(timeout=max(5.0, min(120.0, deadline - time.monotonic())))
            return True
        except RuntimeError:
            gw.s2cs.stop(signal.SIGKILL)
            time.sleep(1.0)
    return False


RELOADED = "reloaded templates and policy"


def reload(stage: Stage, fault: Fault) -> None:
    """Change the backend's template (one more comment line), SIGHUP; change it back, SIGHUP.
    Both reloads must be taken, and the gateway must go on making streams."""
    gw = stage.gateways[fault.planned.gateway]
    name = "haproxy.cfg.j2" if gw.backend == "haproxy" else "stunnel.conf.j2"
    template = stage.templates / name
    with stage.reload_lock:
        original = template.read_text()
        changed = original + f"# changed by the soak at {time.time():.0f}, and changed back\n"
        taken = 0
        for text in (changed, original):
            template.write_text(text)
            with gw.lock:
                count = gw.s2cs.log.read_text(errors="replace").count(RELOADED)
                if gw.process() is None:
                    break
                gw.s2cs.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
                seen = wait_until(
                    lambda c=count: gw.s2cs.log.read_text(errors="replace").count(RELOADED) > c,  # type: ignore[misc]
                    30.0,
                    stage.stop,
                )
            taken += seen
            stage.stop.wait(3.0)  # the churn makes streams with the changed template meanwhile
        template.write_text(original)
    fault.end = time.monotonic()
    fault.detail = f"{name} on {gw.name}: {taken} of 2 reloads taken"
    answers = wait_until(lambda: _answers(gw), RECOVERY, stage.stop)
    _verdict(fault, taken == 2 and answers, "a reload was not taken" if taken < 2 else "")


def _answers(gw: Gateway) -> bool:
    try:
        gw.s2cs.call("info")
        return True
    except (ScistreamError, OSError):
        return False


def duplicate(stage: Stage, fault: Fault) -> None:
    """A second s2cs on the same state dir (another control port): it must refuse to start, and
    the first must go on answering."""
    gw = stage.gateways[fault.planned.gateway]
    twin = SoakS2cs(f"{gw.name}-twin", gw.s2cs.state_dir, gw.s2cs.port_range, gw.s2cs.extra)
    proc = twin.launch().proc
    try:
        code = proc.wait(60) if proc is not None else None
    except subprocess.TimeoutExpired:
        code = None
        twin.stop(signal.SIGKILL)
    said = twin.log.read_text(errors="replace")[-500:] if twin.log.exists() else ""
    fault.end = time.monotonic()
    refused = code not in (None, 0) and "in use" in said
    fault.detail = f"a second s2cs on the state dir of {gw.name}: " + (
        "refused" if refused else f"exit {code}: {said.strip()[-200:]}"
    )
    answers = wait_until(lambda: _answers(gw), RECOVERY, stage.stop)
    _verdict(fault, refused and answers, "the second s2cs did not refuse" if not refused else "")


FLOOD_CONNECTIONS = 300
FLOOD_SECONDS = 10.0


def flood(stage: Stage, fault: Fault) -> None:
    """Hundreds of connections to the control port, idle ones and ones that send garbage, for a
    while: the gateway must answer meanwhile and afterwards."""
    gw = stage.gateways[fault.planned.gateway]
    host, port = gw.s2cs.listener_ip, gw.s2cs.port
    held: list[socket.socket] = []
    try:
        for i in range(FLOOD_CONNECTIONS):
            if stage.stop.is_set():
                break
            with contextlib.suppress(OSError):
                sock = socket.create_connection((host, port), timeout=2)
                held.append(sock)
                if i % 2:
                    sock.sendall(b"\x16\x03\x01 not a TLS hello, and no end of it" * 4)
        answered = _timed_info(gw)
        stage.stop.wait(FLOOD_SECONDS)
    finally:
        for sock in held:
            sock.close()
    fault.end = time.monotonic()
    shown = f"{answered:.2f} s" if answered is not None else "no answer"
    fault.detail = f"{len(held)} connections to {gw.name}'s control port; info during it: {shown}"
    after = wait_until(lambda: _answers(gw), RECOVERY, stage.stop)
    _verdict(fault, answered is not None and after, "no answer during the flood" if answered is None else "")


def _timed_info(gw: Gateway) -> float | None:
    start = time.monotonic()
    try:
        gw.s2cs.call("info")
    except (ScistreamError, OSError, ssl.SSLError):
        return None
    return time.monotonic() - start


def fs_full(stage: Stage, fault: Fault) -> None:
    """Fill the filesystem of the gateway's state dir, hold it full, free it: requests may fail
    meanwhile (with an error), streams run on, and requests work again afterwards."""
    gw = stage.gateways[fault.planned.gateway]
    if gw.tmpfs is None:
        fault.detail = f"{gw.name} has no filesystem of its own (not root?): skipped"
        return
    filler = gw.tmpfs / "filler"
    try:
        with open(filler, "wb") as out:
            block = b"\0" * (1 << 20)
            with contextlib.suppress(OSError):  # ENOSPC: full, as meant
                for _ in range(1 << 14):
                    out.write(block)
                    out.flush()
        free = os.statvfs(gw.tmpfs)
        fault.detail = f"state dir of {gw.name} full ({free.f_bavail * free.f_frsize} bytes free)"
        stage.stop.wait(stage.fs_full_seconds)
    finally:
        filler.unlink(missing_ok=True)
    fault.end = time.monotonic()
    made = wait_until(lambda: _makes_a_stream(gw), RECOVERY, stage.stop)
    _verdict(fault, made, "no stream could be made afterwards" if not made else "")


def _makes_a_stream(gw: Gateway) -> bool:
    try:
        uid = gw.s2cs.call("inbound", remote_ip="127.0.0.1", receiver_ports=[9])["uid"]
        gw.s2cs.call("release", uid=uid)
        return True
    except (ScistreamError, OSError):
        return False


SERVICE_DOWN = 5.0


def service_stop(stage: Stage, fault: Fault) -> None:
    """The stream's service crashes (its connections reset) and comes back on its port."""
    stream = stage.streams[fault.planned.stream]
    stream.service.stop()
    stage.stop.wait(SERVICE_DOWN)
    stream.service.start()
    fault.end = time.monotonic()
    fault.detail = f"service of {stream.name} down for {SERVICE_DOWN:.0f} s"
    _verdict(fault, data_flows_again(stage, stream.name, fault.end))


DO: dict[str, Callable[[Stage, Fault], None]] = {
    KILL_PROXY: kill_process,
    KILL_SHAPER: kill_process,
    KILL_S2CS: kill_s2cs,
    RELOAD: reload,
    DUPLICATE: duplicate,
    FLOOD: flood,
    FS_FULL: fs_full,
    SERVICE_STOP: service_stop,
}


def wait_until(predicate: Callable[[], bool], timeout: float, stop: threading.Event | None = None) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` s passed (False). `stop` does not
    cut the wait short: recovery is judged even when the run is ending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return bool(predicate())
