"""`scistream demo`: the user guide's two use cases on one machine, end to end, checked.

Two S2CS (an "hpc" and an "instrument" gateway) on 127.0.0.1, a service that checks what it gets,
`s2uc inbound_request` then `s2uc outbound_request` run as a user would, a few seconds of data at
the default rate limit, then 256 MiB at full speed, SHA-256 compared, both sides released, and no
proxy left behind. Exits non-zero if any step fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .loopback import BIN, S2csProcess, Sink, free_port_range, proxies_of
from .protocol import DEFAULT_RATE, format_rate

FULL_SPEED_BYTES = 256 << 20
LIMITED_SECONDS = 4.0


class DemoFailed(Exception):
    pass


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def s2uc(*args: str) -> dict[str, Any]:
    """Run the real `s2uc` as a user would; show the command; return its --json reply."""
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"$ s2uc {shown}", flush=True)
    result = subprocess.run([str(BIN / "s2uc"), *args, "--json"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DemoFailed(f"s2uc {args[0]} failed ({result.returncode}): {result.stderr.strip()}")
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def progress(done: int, total: int, started: float) -> None:
    tty = sys.stdout.isatty()
    if not tty and done % (total // 4) and done != total:
        return  # in a log, four lines are enough
    width = 40
    filled = width * done // total
    elapsed = max(time.monotonic() - started, 1e-6)
    rate = done * 8 / elapsed / 1e9
    bar = "#" * filled + "." * (width - filled)
    line = f"  [{bar}] {done >> 20:4d}/{total >> 20} MiB  {rate:5.2f} Gbit/s"
    print(f"\r{line}" if tty else line, end="" if tty else "\n", flush=True)


def stream(port: int, data: bytes, show: bool) -> tuple[int, str, float]:
    """Send `data` to the instrument-side listener; the sink's answer and the seconds it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        view = memoryview(data)
        chunk = 4 << 20
        for offset in range(0, len(view), chunk):
            sock.sendall(view[offset : offset + chunk])
            if show:
                progress(min(offset + chunk, len(view)), len(view), started)
        sock.shutdown(socket.SHUT_WR)
        reply = sock.makefile("rb").readline().split()
    elapsed = time.monotonic() - started
    if show and sys.stdout.isatty():
        print()
    if len(reply) != 2:
        raise DemoFailed("the service did not answer: the stream broke")
    return int(reply[0]), reply[1].decode(), elapsed


def stream_for(port: int, seconds: float) -> int:
    """Send random data for `seconds`; return how many bytes were sent."""
    block = os.urandom(64 << 10)
    sent = 0
    deadline = time.monotonic() + seconds
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        while time.monotonic() < deadline:
            sock.sendall(block)
            sent += len(block)
        sock.shutdown(socket.SHUT_WR)
        sock.makefile("rb").readline()
    return sent


def session(hpc: S2csProcess, inst: S2csProcess, sink: Sink, rate: int, cwd: Path) -> tuple[str, int]:
    """inbound_request at the HPC gateway, outbound_request at the instrument one."""
    os.chdir(cwd)
    rate_args = [] if rate == DEFAULT_RATE else ["--rate", str(rate)]
    inbound = s2uc(
        "inbound_request", "--s2cs", hpc.address, "--server_cert", str(hpc.cert),
        "--remote_ip", "127.0.0.1", "--receiver_ports", str(sink.port), *rate_args,
    )  # fmt: skip
    uid, listener = inbound["uid"], inbound["listeners"][0]
    print(f"  UID {uid}, HPC listener {listener} (TLS), limit {inbound['limits']['rate']['human']}")
    outbound = s2uc(
        "outbound_request", "--s2cs", inst.address, "--server_cert", str(inst.cert),
        *rate_args, uid, listener,
    )  # fmt: skip
    local = outbound["listeners"][0]
    print(f"  instrument sends to {local} -> {listener} -> service 127.0.0.1:{sink.port}")
    return uid, int(local.rpartition(":")[2])


def release(uid: str, *gateways: S2csProcess) -> None:
    for gw in gateways:
        s2uc("release", uid, "--s2cs", gw.address, "--server_cert", str(gw.cert))


def run() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="scistream-demo-"))
    # The demo's s2uc pins the demo's gateways in the demo's directory, not in the user's
    # servers.json: its gateways, made anew each time, may get the same port another day.
    os.environ["SCISTREAM_HOME"] = str(workdir / "home")
    hpc = S2csProcess("hpc", workdir / "hpc", free_port_range(10))
    inst = S2csProcess("instrument", workdir / "instrument", free_port_range(10))
    sink = Sink()
    started = time.monotonic()
    here = os.getcwd()
    try:
        step("Start two gateways on 127.0.0.1 (an HPC centre and an instrument facility)")
        for gw in (hpc, inst):
            info = gw.start().call("info")
            caps = info["backend"]["capabilities"]
            print(
                f"  s2cs {gw.name:10} control {gw.address}, ports {info['port_range']}, "
                f"{info['backend']['version']}, "
                f"rate limits {'enforced' if caps['rate']['enforced'] else 'NOT enforced'}"
            )
        print(f"  service (checks SHA-256 of what arrives) on 127.0.0.1:{sink.port}")
        targets = ",".join(hpc.call("info")["policy"]["targets"])
        print(f"  both started with --allow-targets {targets}: their default policy (the networks")
        print("  of their interfaces) never opens a proxy to loopback, where this service listens")

        step(f"A stream at the guide's default rate, {DEFAULT_RATE} kb/s = {format_rate(DEFAULT_RATE)}")
        uid, port = session(hpc, inst, sink, DEFAULT_RATE, workdir)
        stream_for(port, LIMITED_SECONDS)
        got = sink.results[-1] if sink.results else None
        if got is None:
            raise DemoFailed("nothing arrived at the service")
        measured = got.rate_bps()
        print(f"  measured {measured / 1e6:.1f} Mbit/s over {got.last - got.first:.1f}s (limit 10 Mbit/s)")
        if not 0.7 * 10e6 < measured < 1.3 * 10e6:
            raise DemoFailed(f"the rate limit did not hold: {measured / 1e6:.1f} Mbit/s")
        release(uid, inst, hpc)

        step(f"{FULL_SPEED_BYTES >> 20} MiB of random data at full speed (--rate 0), encrypted end to end")
        uid, port = session(hpc, inst, sink, 0, workdir)
        data = os.urandom(FULL_SPEED_BYTES)
        expected = hashlib.sha256(data).hexdigest()
        nbytes, digest, elapsed = stream(port, data, show=True)
        ok = nbytes == len(data) and digest == expected
        print(f"  service got {nbytes} bytes, SHA-256 {digest[:16]}... {'matches' if ok else 'DIFFERS'}")
        if not ok:
            raise DemoFailed("the data that arrived is not the data that was sent")
        print(f"  throughput {nbytes * 8 / elapsed / 1e9:.2f} Gbit/s through two TLS 1.3 proxies")
        for gw in (hpc, inst):
            for s in gw.call("status", uid=uid)["streams"]:
                print(
                    f"  {gw.name:10} {s['role']:8} {s['state']}: "
                    f"{s.get('total_connections', '?')} connection(s)"
                )
        release(uid, inst, hpc)

        step("Nothing left behind")
        left = proxies_of(hpc.state_dir) + proxies_of(inst.state_dir)
        if left:
            raise DemoFailed(f"proxy processes still running after release: {left}")
        for gw in (hpc, inst):
            if gw.stop() != 0:
                raise DemoFailed(f"s2cs {gw.name} did not stop cleanly; see {gw.log}")
            if any((gw.state_dir / "sessions").iterdir()):
                raise DemoFailed(f"files left in {gw.state_dir / 'sessions'}")
        print("  no proxy process, no session file, both s2cs stopped")
        print(f"\nDemo passed in {time.monotonic() - started:.0f}s.")
        return 0
    except (DemoFailed, RuntimeError, OSError) as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        for gw in (hpc, inst):
            if gw.log.exists():
                print(f"--- last lines of {gw.log}:\n{gw.log.read_text()[-1500:]}", file=sys.stderr)
        return 1
    finally:
        os.chdir(here)
        sink.close()
        for gw in (hpc, inst):
            gw.stop()
        shutil.rmtree(workdir, ignore_errors=True)
