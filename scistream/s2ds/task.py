"""What a swarm task runs: every process of one session in its container, `python -m
scistream.s2ds.task PLAN`.

`s2cs --runtime swarm` makes a session one swarm service of one replica (s2cs/swarm.py). Its
container runs this program, which reads the plan (a swarm config: each process's command and
what it must listen on), starts the processes (the shaper and the proxy share the session's
directory, a tmpfs of the container), and prints `READY` once every one listens. Their output is
the container's, which the engine keeps and `docker service logs` shows.

Before it starts them it gives up, for itself and them, the gaining of privileges (no setuid
program can raise them: PR_SET_NO_NEW_PRIVS), which a swarm service of Docker Engine 20.10
cannot ask for, and makes the session's `run/` directory, where they write.

It ends when one of them ends: with status 1 (the swarm's restart policy starts the task again)
or, after a SIGTERM (release, or the swarm moving it), by stopping the others and exiting 0.
"""

from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from .runtime import bound_endpoints

READY = "scistream-task: READY"
READY_TIMEOUT = 20.0  # seconds for every process to listen
GRACE = 5.0  # seconds between SIGTERM and SIGKILL when the task stops


def plan_of(text: str) -> list[dict[str, Any]]:
    """The processes of a plan, checked: ValueError says what is wrong. Pure."""
    plan = json.loads(text)
    processes = plan.get("processes") if isinstance(plan, dict) else None
    if not isinstance(processes, list) or not processes:
        raise ValueError("a plan lists its processes under 'processes'")
    for proc in processes:
        if not isinstance(proc, dict):
            raise ValueError("each process of a plan is an object with argv and ready")
        argv, ready = proc.get("argv"), proc.get("ready", [])
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise ValueError(f"process {proc.get('name')!r}: argv is not a list of strings")
        if not (
            isinstance(ready, list)
            and all(isinstance(r, int | str) and not isinstance(r, bool) for r in ready)
        ):
            raise ValueError(f"process {proc.get('name')!r}: ready is not a list of ports and paths")
    return processes


_PR_SET_NO_NEW_PRIVS = 38  # prctl(2), the same number on every architecture


def no_new_privileges() -> None:
    """Neither this process nor any it starts can gain a privilege (execve of a setuid program)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + GRACE
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m scistream.s2ds.task PLAN.json", file=sys.stderr)
        return 2
    try:
        processes = plan_of(Path(argv[0]).read_text())
    except (OSError, ValueError) as exc:
        print(f"scistream-task: cannot use the plan {argv[0]}: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        no_new_privileges()
        (Path(argv[0]).parent / "run").mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        print(f"scistream-task: cannot prepare: {exc}", file=sys.stderr, flush=True)
        return 1
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children: list[subprocess.Popen[bytes]] = []
    try:
        for proc in processes:
            # Their output is ours, the container's: the engine keeps it.
            children.append(subprocess.Popen(proc["argv"], stdin=subprocess.DEVNULL))
    except OSError as exc:
        print(f"scistream-task: cannot run {proc['argv'][0]}: {exc.strerror}", file=sys.stderr, flush=True)
        _stop(children)
        return 1
    wanted = [set(proc.get("ready", [])) for proc in processes]
    deadline = time.monotonic() + READY_TIMEOUT
    ready = False
    while not stopping:
        ended = [i for i, child in enumerate(children) if child.poll() is not None]
        if ended:
            which = Path(processes[ended[0]]["argv"][0]).name
            print(
                f"scistream-task: {which} exited with status {children[ended[0]].returncode}",
                file=sys.stderr,
                flush=True,
            )
            _stop(children)
            return 1
        if not ready:
            try:
                ready = all(
                    want <= bound_endpoints([psutil.Process(child.pid)], want)
                    for child, want in zip(children, wanted, strict=True)
                )
            except psutil.NoSuchProcess:
                ready = False
            if ready:
                print(READY, flush=True)
            elif time.monotonic() > deadline:
                print(
                    f"scistream-task: not listening after {READY_TIMEOUT:.0f}s", file=sys.stderr, flush=True
                )
                _stop(children)
                return 1
        time.sleep(0.02 if not ready else 0.2)
    _stop(children)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
