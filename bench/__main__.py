"""`make bench`: how long a user waits for a request, the throughput and CPU per gigabyte of one
iperf3 stream through SciStream and through hand-written pairs (throughput.py), what a gateway
pays per live stream (scale.py); then the swarm runtime against processes (swarm.py). Each goal
of goals.py is checked against what was measured: a missed one is named, one line each, at the
end, and the exit status is then 1 (also when the swarm part failed).

Run it from a checkout, `python -m bench`. Run the first parts in a private network namespace
(scripts/run-isolated does, as root) so that nothing else on the machine shares its loopback;
the swarm part cannot run there, as its tasks listen on the host's network: make bench runs it
as a command of its own, `--swarm-only`, before the others.
"""

from __future__ import annotations

import compileall
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import scistream
from scistream.loopback import free_port

from . import goals, scale, swarm, throughput
from .goals import Measured
from .latency import LATENCY, request_latency
from .plot import plot

if TYPE_CHECKING:
    import typer

PROG = "python -m bench"


@dataclass(frozen=True)
class Options:
    """What `python -m bench` was asked for."""

    seconds: int = 5
    runs: int = 3
    seed: int | None = None
    json: Path | None = None
    requests: int = 30
    latency_only: bool = False
    swarm_only: bool = False
    no_swarm: bool = False
    scale_only: bool = False
    throughput_only: bool = False
    plot: Path | None = None
    swarm_mib: int = 256
    swarm_requests: int = 20
    goals: bool = False


# Which parts run: at most one of these, or every part.
PARTS = ("--swarm-only", "--no-swarm", "--scale-only", "--throughput-only")


def command(then: Callable[[Options], int]) -> typer.Typer:
    """The command line; `then` runs what it asks for and gives the exit status. typer is
    imported here, not by the tests that import this module for its pure parts; so the options
    are given as defaults (typer.Option(...)), not in Annotated[...], which typer would read as
    strings in this module's globals, where typer is not."""
    import typer

    def bench(
        seconds: int = typer.Option(5, help="Seconds of each iperf3 run."),
        runs: int = typer.Option(3, help="Rounds of the throughput part, runs of the swarm part."),
        seed: int | None = typer.Option(
            None, help="The seed of the rounds' order (default: a new one, printed to repeat a run)."
        ),
        json_file: Path | None = typer.Option(
            None, "--json", help="Also write the results to this file (the other parts in it are kept)."
        ),
        requests: int = typer.Option(30, help="Requests measured for each latency."),
        latency_only: bool = typer.Option(
            False, "--latency-only", help="Only the request latencies, of the swarm part too."
        ),
        swarm_only: bool = typer.Option(
            False, "--swarm-only", help="Only the swarm runtime against processes (host network)."
        ),
        no_swarm: bool = typer.Option(False, "--no-swarm", help="Everything but the swarm part."),
        scale_only: bool = typer.Option(
            False, "--scale-only", help="Only memory per stream and requests with 100 live streams."
        ),
        throughput_only: bool = typer.Option(
            False,
            "--throughput-only",
            help="Only the throughput and CPU per GB of one iperf3 stream (the configurations in turns).",
        ),
        plot_file: Path | None = typer.Option(
            None, "--plot", help="Also draw the throughput per configuration into this PNG file."
        ),
        swarm_mib: int = typer.Option(256, help="MiB each stream carries, swarm part."),
        swarm_requests: int = typer.Option(20, help="Requests measured for each latency, swarm part."),
        show_goals: bool = typer.Option(
            False, "--goals", help="Print the goals as a Markdown table, and exit."
        ),
    ) -> None:
        given = (swarm_only, no_swarm, scale_only, throughput_only)
        chosen = [name for name, on in zip(PARTS, given, strict=True) if on]
        if len(chosen) > 1:  # a usage error, exit status 2, as argparse's exclusive group gave
            raise typer.BadParameter(f"one of {', '.join(PARTS)} at most", param_hint=", ".join(chosen))
        asked = Options(
            seconds, runs, seed, json_file, requests, latency_only, swarm_only, no_swarm, scale_only,
            throughput_only, plot_file, swarm_mib, swarm_requests, show_goals,
        )  # fmt: skip
        raise typer.Exit(then(asked))

    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    app.command(help=__doc__)(bench)
    return app


def options(argv: list[str]) -> Options:
    """What `argv` asks for, or a usage error raised: the command line, nothing run."""
    found: list[Options] = []

    def keep(asked: Options) -> int:
        found.append(asked)
        return 0

    command(keep)(args=argv, prog_name=PROG, standalone_mode=False)
    return found[0]


def write_json(path: Path, parts: dict[str, Any]) -> None:
    """The parts measured now into `path`, keeping the other parts a bench wrote there before:
    make bench runs the swarm part as a command of its own, on the host's network."""
    found: dict[str, Any] = {}
    if path.exists():
        try:
            found = json.loads(path.read_text())
        except ValueError:
            found = {}
        if not isinstance(found, dict):
            found = {}
    found.update(parts)
    path.write_text(json.dumps(found, indent=1))


def single(directory: Path, args: Options) -> tuple[dict[str, Any], list[Measured]]:
    """The request latencies and the throughput of one stream, with the process runtime."""
    server_port = free_port()
    server = subprocess.Popen(
        ["iperf3", "-s", "-p", str(server_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    results: list[throughput.Result] = []
    latencies: list[tuple[str, float, float]] = []
    seed = secrets.randbelow(1 << 32) if args.seed is None else args.seed
    try:
        if not args.throughput_only:
            print(
                f"Request latency, {args.requests} of each, default limits (a shaper per stream):", flush=True
            )
            latencies = request_latency(directory, args.requests)
        if not args.latency_only:
            results = throughput.throughput(directory, server.pid, server_port, args.seconds, args.runs, seed)
    finally:
        server.terminate()
        server.wait(10)
    checked = [
        Measured(goal, "default backend", p50) for name, p50, _ in latencies if (goal := LATENCY[name])
    ]
    found = throughput.ratios(results)
    if found:
        throughput.show_ratios(found)
    checked += throughput.measured(found)
    if results and args.plot:
        print(f"  {plot(results, args.plot)}", flush=True)
    part = {
        **throughput.as_json(results, found),
        "seed": seed,
        "latency": [{"name": n, "p50_ms": p50 * 1000, "p95_ms": p95 * 1000} for n, p50, p95 in latencies],
    }
    return part, checked


def verdict(checked: list[Measured], swarm_failed: bool) -> int:
    """The goals checked, and a line for each missed one (and for a failed swarm part), last of
    all; the exit status."""
    missed = goals.missed(checked)
    if checked:  # the swarm part alone checks none
        print(f"Goals (bench/goals.py): {len(checked)} checked, {len(missed)} missed", flush=True)
    for miss in missed:
        print(miss.missed_line(), flush=True)
    if swarm_failed:
        print("FAILED: the swarm part (its error is above)", flush=True)
    return 1 if missed or swarm_failed else 0


def main(argv: list[str] | None = None) -> None:
    command(run)(args=argv, prog_name=PROG)


def run(args: Options) -> int:
    """Every part asked for; the exit status."""
    if args.goals:
        print(goals.table())
        return 0
    needed = () if args.swarm_only else ("iperf3", "stunnel")
    for tool in needed:
        if not shutil.which(tool) and not (tool == "stunnel" and shutil.which("stunnel4")):
            print(f"error: {tool} is not installed (make bench-deps installs it)", file=sys.stderr)
            return 1
    # Bytecode, as an installed package has it: where PYTHONDONTWRITEBYTECODE is set (CI, some
    # containers) an editable install's modules would be compiled again at every command.
    compileall.compile_dir(Path(scistream.__file__).parent, quiet=1)
    directory = Path(tempfile.mkdtemp(prefix="ss-bench-", dir="/tmp"))
    # Its s2uc pins its gateways here, not in the user's servers.json: they are made anew each run.
    os.environ["SCISTREAM_HOME"] = str(directory / "home")
    parts: dict[str, Any] = {}
    checked: list[Measured] = []
    try:
        if not (args.swarm_only or args.scale_only):
            part, checked = single(directory, args)
            parts.update(part)
        if not (args.swarm_only or args.latency_only or args.throughput_only):
            parts["scale"] = scale.run(directory, args.requests)
            checked += scale.measured(parts["scale"])
        if not (args.no_swarm or args.scale_only or args.throughput_only):
            parts["swarm"] = swarm.run(
                directory, args.runs, args.swarm_mib, args.swarm_requests, not args.latency_only
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if checked:
            parts["goals"] = [
                {"figure": m.goal.figure, "subject": m.subject, "value": m.value, "goal": str(m.goal),
                 "issues": list(m.goal.issues), "met": m.met}
                for m in checked
            ]  # fmt: skip
        if args.json and parts:
            write_json(args.json, parts)
    return verdict(checked, "failed" in parts.get("swarm", {}))


if __name__ == "__main__":
    main()
