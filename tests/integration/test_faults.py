"""Faults a gateway must survive for months: every kind of process of both backends killed, on
each side, shaped and not; s2cs restarted meanwhile. The stream comes back and carries new
connections (DESIGN.md, "Supervision").
"""

from __future__ import annotations

import hashlib
import os
import signal
from dataclasses import astuple

import pytest

from scistream.loopback import S2csProcess, Sink, send

from .conftest import open_stream, wait_for

# (backend, side, rate in kbit/s, process): every process of every arrangement. HAProxy without a
# rate and with one listener runs no shaper; stunnel always runs one (it limits nothing itself).
KINDS = [
    (backend, side, rate, victim)
    for backend in ("haproxy", "stunnel")
    for side in ("inbound", "outbound")
    for rate, victims in ((10_000, ("proxy", "shaper")), (0, ("proxy",)))
    for victim in victims
    if not (backend == "stunnel" and rate == 0)  # the same processes as with a rate
]
KIND_IDS = [f"{b}-{side}-{'shaped' if rate else 'unshaped'}-{victim}" for b, side, rate, victim in KINDS]


def _process(gw: S2csProcess, uid: str, kind: str) -> dict:
    (stream,) = gw.call("status", uid=uid)["streams"]
    (found,) = [p for p in stream["processes"] if p["name"] == kind]
    return {**found, "stream": stream["state"]}


def _back(gw: S2csProcess, uid: str, kind: str, killed: int) -> bool:
    """Whether the process runs again, a new one, with its stream RUNNING."""
    now = _process(gw, uid, kind)
    return now["state"] == "RUNNING" and now["stream"] == "RUNNING" and now["pid"] not in (None, killed)


def _carries(port: int, size: int = 1 << 20) -> None:
    data = os.urandom(size)
    assert send(("127.0.0.1", port), data) == (len(data), hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize(("backend", "side", "rate", "victim"), KINDS, ids=KIND_IDS)
def test_a_killed_process_comes_back_and_the_stream_carries_new_connections(
    start_s2cs, backend, side, rate, victim
):
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    sink = Sink()
    uid, _, port = astuple(open_stream(hpc, inst, sink.port, rate=rate))
    gw = hpc if side == "inbound" else inst
    _carries(port)
    killed = _process(gw, uid, victim)["pid"]
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: _back(gw, uid, victim, killed), timeout=30, what=f"the {side} {victim} back")
    _carries(port)
    assert _process(gw, uid, victim)["restarts"] == 1


@pytest.mark.parametrize("backend", ["haproxy", "stunnel"])
def test_a_process_found_dead_after_an_s2cs_restart_comes_back(start_s2cs, backend):
    """The outbound proxy (behind its shaper: its listener is a Unix socket) dies while no s2cs
    watches; the next s2cs starts it again (gateway recovery), from a clean slate."""
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    sink = Sink()
    uid, _, port = astuple(open_stream(hpc, inst, sink.port))
    killed = _process(inst, uid, "proxy")["pid"]
    inst.stop(signal.SIGKILL)
    os.kill(killed, signal.SIGKILL)
    inst.start()
    wait_for(lambda: _back(inst, uid, "proxy", killed), timeout=30, what="the outbound proxy back")
    _carries(port)
