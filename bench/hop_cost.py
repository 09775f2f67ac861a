"""Experiment: what one relay hop costs, alone on loopback, in CPU seconds per GB.

`python -m bench.hop_cost [--seconds S] [--rounds N]`: iperf3 client -> relay -> iperf3 server,
one stream, for each relay in turns: the session's shaper without a limit, with a limit far above
what passes (40 Gbit/s: its token bucket never holds a byte back), and the barest relay Python
can make (`bare`: one thread per direction, blocking splice(2) through a 1 MiB pipe, no epoll,
no bucket, no bookkeeping), the floor of any relay written in Python. The relay's own CPU only.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from scistream.loopback import free_port
from scistream.s2ds.sockdiag import tcp_listeners

HERTZ = os.sysconf("SC_CLK_TCK")


def bare(listen: int, target: int) -> None:
    """The barest relay: accept, connect, a thread per direction splicing through a pipe."""
    server = socket.create_server(("127.0.0.1", listen))

    def pump(src: socket.socket, dst: socket.socket) -> None:
        r, w = os.pipe()
        fcntl.fcntl(w, 1031, 1 << 20)
        try:
            while True:
                n = os.splice(src.fileno(), w, 1 << 20)
                if not n:
                    break
                while n:
                    n -= os.splice(r, dst.fileno(), n)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the other direction ended the connection first

    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", target))
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


def ticks(pid: int) -> tuple[int, int]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]), int(fields[12])


def once(port: int, pid: int, seconds: int) -> tuple[float, float, float]:
    before = ticks(pid)
    out = subprocess.run(
        ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-O", "1", "-J"],
        capture_output=True, text=True, timeout=seconds + 60, check=False,
    ).stdout  # fmt: skip
    after = ticks(pid)
    report = json.loads(out)
    if "sum_received" not in report.get("end", {}):
        raise RuntimeError(str(report.get("error")))
    gb = sum(int(i["sum"]["bytes"]) for i in report["intervals"]) / 1e9
    user, system = ((a - b) / HERTZ / gb for a, b in zip(after, before, strict=True))
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9, user, system


def main(argv: list[str] | None = None) -> None:
    """The command line. typer is imported here, as by every module of bench/: some are imported
    by tests for their pure parts."""
    import typer

    def hop_cost(
        seconds: int = typer.Option(4, help="Seconds of each iperf3 run, after one second omitted."),
        rounds: int = typer.Option(3, help="Rounds, each relay once a round in a shuffled order."),
        bare_ports: tuple[int, int] | None = typer.Option(
            None,
            "--bare",
            metavar="LISTEN TARGET",
            hidden=True,
            help="Be the bare relay (run by the experiment).",
        ),
    ) -> None:
        if bare_ports:
            bare(*bare_ports)  # until the experiment ends it
            return
        raise typer.Exit(measure(seconds, rounds))

    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    app.command(help=__doc__)(hop_cost)
    app(args=argv, prog_name="python -m bench.hop_cost")


def measure(seconds: int, rounds: int) -> int:
    """Each relay in turns, `rounds` times; a table of medians and ranges."""
    service = free_port()
    procs = [subprocess.Popen(["iperf3", "-s", "-p", str(service)], stdout=subprocess.DEVNULL)]
    relays = {}
    python = sys.executable
    shaper = [python, "-m", "scistream.s2ds.shaper"]
    try:
        for name, argv in (
            ("shaper, no limit", [*shaper, "--rate", "0"]),
            ("shaper, 40 Gbit/s", [*shaper, "--rate", "5000000000"]),
            ("bare", [python, "-m", "bench.hop_cost", "--bare"]),
        ):
            port = free_port()
            if name == "bare":
                argv = [*argv, str(port), str(service)]
            else:
                argv = [*argv, "--route", f"127.0.0.1:{port}", f"127.0.0.1:{service}"]
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))
            relays[name] = (port, procs[-1].pid)
        for name, (port, _pid) in relays.items():  # each listening, before the first round
            deadline = time.monotonic() + 60
            while not tcp_listeners(port):
                if procs[list(relays).index(name)].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the relay {name!r} did not listen on port {port}")
                time.sleep(0.02)
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in relays}
        for _ in range(rounds):
            order = list(relays)
            random.shuffle(order)
            for name in order:
                for _attempt in range(20):
                    try:
                        results[name].append(once(*relays[name], seconds))
                        break
                    except RuntimeError:
                        time.sleep(0.5)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    print(f"{'relay':20} {'Gbit/s':>18} {'user s/GB':>18} {'system s/GB':>18} {'total s/GB':>18}")
    for name, runs in results.items():
        cells = []
        for column in (
            [r[0] for r in runs],
            [r[1] for r in runs],
            [r[2] for r in runs],
            [r[1] + r[2] for r in runs],
        ):
            cells.append(f"{statistics.median(column):6.2f} ({min(column):.2f}-{max(column):.2f})")
        print(f"{name:20} " + " ".join(f"{c:>18}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    main()
