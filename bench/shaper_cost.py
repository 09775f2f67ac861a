"""Experiment: where a limited stream's CPU goes, per kind of process, in turns.

`python -m bench.shaper_cost [--seconds S] [--rounds N] [VARIANT ...]`, in a private network
namespace (scripts/run-isolated) like `make bench`. Each VARIANT is `label:rate_kbps[:NAME=VALUE,...]`,
the values added to both gateways' environment. Every variant is a SciStream HAProxy stream
through two real `s2cs`; every round runs one iperf3 stream through each, in a shuffled order.
Per variant: Gbit/s, and CPU seconds per GB (10^9 bytes) of the proxies and of the shapers, user
and system apart, and the shapers' voluntary context switches per MB (their wake-ups).

With `--pairs`, a VARIANT is `label:rate_kbps[:frame]` and stands for two shapers back to back,
without proxies or `s2cs`: an outbound one (TCP -> Unix) and an inbound one (Unix -> TCP, to the
iperf3 server), both with `--frame` when it says so: what framing costs (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from scistream.loopback import S2csProcess, free_port, free_port_range, proxies_of

HERTZ = os.sysconf("SC_CLK_TCK")


def sample(pid: int) -> tuple[int, int, int]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return (0, 0, 0)  # gone: counted as nothing
    fields = stat[stat.rindex(")") + 2 :].split()
    switches = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("voluntary_ctxt"))
    return int(fields[11]), int(fields[12]), switches


def kind(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return "gone"
    return "shaper" if "scistream.s2ds.shaper" in cmdline else "proxy"


def stream(
    stack: ExitStack, directory: Path, backend: str, rate: int, service: int, env: dict[str, str]
) -> tuple[int, dict[int, str]]:
    extra: tuple[str, ...] = ("--type", backend)
    if "TEMPLATES" in env:
        extra += ("--templates", env["TEMPLATES"])
    ends = []
    for name in ("hpc", "inst"):
        s2cs = S2csProcess(name, directory / f"{name}", free_port_range(4), extra, env=env)
        stack.callback(s2cs.stop)
        s2cs.start()
        ends.append(s2cs)
    hpc, inst = ends
    inbound = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[service], rate=rate)
    outbound = inst.call("outbound", uid=inbound["uid"], remote_listeners=inbound["listeners"], rate=rate)
    pids = proxies_of(hpc.state_dir) + proxies_of(inst.state_dir)
    return int(outbound["listeners"][0].rpartition(":")[2]), {pid: kind(pid) for pid in pids}


def pair(
    stack: ExitStack, directory: Path, rate_kbps: int, frame: bool, service: int
) -> tuple[int, dict[int, str]]:
    """Two shapers back to back through a Unix socket: the entry port and their pids."""
    directory.mkdir(parents=True)
    sock, entry = str(directory / "pair.sock"), free_port()
    options = ["--rate", str(rate_kbps * 1000 // 8), *(["--frame"] if frame else [])]
    pids: dict[int, str] = {}
    for listen, target in ((sock, f"127.0.0.1:{service}"), (f"127.0.0.1:{entry}", sock)):
        log = open(directory / f"shaper-{len(pids)}.log", "w")  # noqa: SIM115 (closed by the stack)
        stack.callback(log.close)
        argv = [sys.executable, "-m", "scistream.s2ds.shaper", *options, "--route", listen, target]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        stack.callback(proc.wait, 10)
        stack.callback(proc.terminate)
        deadline = time.monotonic() + 20
        while not (directory / f"shaper-{len(pids)}.log").read_text().startswith("shaper: "):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"a shaper did not start: {argv}")
            time.sleep(0.05)
        pids[proc.pid] = "shaper"
    return entry, pids


def run(port: int, pids: dict[int, str], seconds: int) -> dict[str, float]:
    for _ in range(20):
        try:
            return once(port, pids, seconds)
        except RuntimeError as exc:
            if "busy" not in str(exc):
                raise
            time.sleep(0.5)  # the server still ends the run before
    raise RuntimeError("the iperf3 server stayed busy")


def once(port: int, pids: dict[int, str], seconds: int) -> dict[str, float]:
    before = {pid: sample(pid) for pid in pids}
    out = subprocess.run(
        ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-O", "1", "-J"],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    ).stdout  # fmt: skip
    after = {pid: sample(pid) for pid in pids}
    report = json.loads(out)
    if "sum_received" not in report.get("end", {}):
        raise RuntimeError(f"iperf3 through port {port}: {report.get('error')}")
    nbytes = sum(int(i["sum"]["bytes"]) for i in report["intervals"])
    gb = nbytes / 1e9
    found = {"gbps": float(report["end"]["sum_received"]["bits_per_second"]) / 1e9}
    for which in ("proxy", "shaper"):
        user = sys_ = switches = 0
        for pid, k in pids.items():
            if k == which and after[pid][0]:
                user += after[pid][0] - before[pid][0]
                sys_ += after[pid][1] - before[pid][1]
                switches += after[pid][2] - before[pid][2]
        found[f"{which}_user"] = user / HERTZ / gb
        found[f"{which}_sys"] = sys_ / HERTZ / gb
        found[f"{which}_wakeups_per_mb"] = switches / (nbytes / 1e6)
    found["path"] = sum(found[f"{w}_{t}"] for w in ("proxy", "shaper") for t in ("user", "sys"))
    return found


def main(argv: list[str] | None = None) -> None:
    """The command line. typer is imported here, as by every module of bench/: some are imported
    by tests for their pure parts."""
    import typer

    def shaper_cost(
        variants: list[str] = typer.Argument(
            ...,
            metavar="VARIANT...",
            help="label:rate_kbps[:NAME=VALUE,...] (with --pairs: label:rate_kbps[:frame])",
        ),
        seconds: int = typer.Option(4, help="Seconds of each iperf3 run."),
        rounds: int = typer.Option(3, help="Rounds, each variant once a round in a shuffled order."),
        backend: str = typer.Option("haproxy", help="The proxies' backend, haproxy or stunnel."),
        pairs: bool = typer.Option(
            False, "--pairs", help="Two bare shapers per variant (label:rate_kbps[:frame])."
        ),
    ) -> None:
        for text in variants:  # before anything is started
            label, _, rest = text.partition(":")
            if not label or not rest.split(":")[0].isdigit():
                raise typer.BadParameter(f"{text!r} is not label:rate_kbps[:...]", param_hint="'VARIANT...'")
        raise typer.Exit(measure(variants, seconds, rounds, backend, pairs))

    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    app.command(help=__doc__)(shaper_cost)
    app(args=argv, prog_name="python -m bench.shaper_cost")


def measure(variants: list[str], seconds: int, rounds: int, backend: str, pairs: bool) -> int:
    """Every variant in turns, `rounds` times; a table of medians and ranges."""
    directory = Path(tempfile.mkdtemp(prefix="ss-cost-", dir="/tmp"))
    os.environ["SCISTREAM_HOME"] = str(directory / "home")
    service = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-p", str(service)], stdout=subprocess.DEVNULL)
    results: dict[str, list[dict[str, float]]] = {}
    try:
        with ExitStack() as stack:
            configs = {}
            for i, text in enumerate(variants):
                label, rate, *rest = text.split(":")
                if pairs:
                    frame = rest == ["frame"]
                    configs[label] = pair(stack, directory / f"v{i}", int(rate), frame, service)
                    results[label] = []
                    continue
                env = dict(pair.split("=", 1) for pair in rest[0].split(",")) if rest else {}
                configs[label] = stream(stack, directory / f"v{i}", backend, int(rate), service, env)
                results[label] = []
            for number in range(rounds):
                order = list(configs)
                random.shuffle(order)
                for label in order:
                    port, pids = configs[label]
                    results[label].append(run(port, pids, seconds))
                print(f"round {number + 1} done", flush=True)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)
    keys = ["gbps", "path", "proxy_user", "proxy_sys", "shaper_user", "shaper_sys", "shaper_wakeups_per_mb"]
    print(f"{'variant':14}" + "".join(f"{k:>22}" for k in keys))
    for label, runs in results.items():
        cells = []
        for key in keys:
            values = [r[key] for r in runs]
            cells.append(f"{statistics.median(values):7.2f} ({min(values):.2f}-{max(values):.2f})")
        print(f"{label:14}" + "".join(f"{c:>22}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    main()
