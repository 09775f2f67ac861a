"""The figures `make bench` prints, and the goals it checks them against (bench/goals.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bench import goals
from bench.__main__ import Options, main, options, verdict
from bench.figures import cpu_per_gb, cpu_seconds, round_orders, stat_ticks
from bench.goals import LIMITED_CPU, LIMITED_THROUGHPUT, MEMORY_PER_STREAM, OURS_OVER_HAPROXY_PAIR, Measured
from bench.scale import marginal
from bench.throughput import (
    HAPROXY_PAIR,
    LIMITED,
    TLS_PAIR,
    Result,
    Run,
    haproxy_pair,
    measured,
    ratios,
    throughput_settings,
)
from scistream.s2ds.render import default_templates

ROOT = Path(__file__).resolve().parents[2]


def runs(*gbps: float, path_cpu: float = 0.0) -> tuple[Run, ...]:
    """Runs of these Gbit/s, each carrying 10 GB, with `path_cpu` seconds of CPU each."""
    return tuple(Run(gbps=g, nbytes=10 * 10**9, path_cpu=path_cpu, iperf3_cpu=1.0) for g in gbps)


def test_each_round_gives_a_ratio_of_its_own_runs_reported_as_median_and_range():
    results = [
        Result("SciStream haproxy, unlimited", 2, runs(5.0, 6.0, 4.0)),
        Result(f"SciStream haproxy, {LIMITED}", 4, runs(3.5, 3.0, 3.6)),
    ]
    (found,) = [r for r in ratios(results) if r.name == "haproxy: limited / unlimited, Gbit/s"]
    assert found.rounds == pytest.approx((0.7, 0.5, 0.9))
    assert (found.spread.median, found.spread.low, found.spread.high) == pytest.approx((0.7, 0.5, 0.9))
    assert str(found.spread) == "0.70x (0.50-0.90)"
    # A ratio of medians (3.5 / 5.0) would hide that one round gave 0.5 and another 0.9.
    assert found.goal is LIMITED_THROUGHPUT


def test_ours_is_compared_with_both_pairs_and_its_goal_is_on_cpu_against_the_haproxy_pair():
    results = [  # 10 GB a run
        Result(TLS_PAIR, 2, runs(4.0, 4.0, path_cpu=14.0)),
        Result(HAPROXY_PAIR, 2, runs(5.0, 6.0, path_cpu=12.0)),
        Result("SciStream haproxy, unlimited", 4, (*runs(5.2, path_cpu=18.0), *runs(6.0, path_cpu=19.2))),
    ]
    found = {r.name: r for r in ratios(results)}
    assert found["SciStream haproxy, unlimited / stunnel pair, Gbit/s"].spread.median == pytest.approx(1.4)
    assert found["SciStream haproxy, unlimited / stunnel pair, Gbit/s"].goal is None
    assert found["SciStream haproxy, unlimited / HAProxy pair, Gbit/s"].rounds == pytest.approx((1.04, 1.0))
    assert found["SciStream haproxy, unlimited / HAProxy pair, Gbit/s"].goal is None
    cpu = found["SciStream haproxy, unlimited / HAProxy pair, CPU per GB"]
    assert cpu.rounds == pytest.approx((1.5, 1.6))
    assert cpu.goal is OURS_OVER_HAPROXY_PAIR
    (check,) = measured(list(found.values()))
    assert (check.subject, check.value, check.met) == ("one iperf3 stream", pytest.approx(1.55), False)


def test_a_configuration_not_measured_gives_no_ratio():
    assert ratios([Result("SciStream haproxy, unlimited", 2, runs(5.0))]) == []
    assert ratios([]) == []


def test_cpu_per_gigabyte_from_two_samples_of_proc_stat():
    # proc(5): pid (comm) state ... utime (14th) stime (15th); a name may hold spaces and ')'.
    def stat(pid: int, utime: int, stime: int) -> str:
        middle = " ".join(["S", "1", "1", "1", "0", "-1", "4194560", "100", "0", "0", "0"])
        return f"{pid} (haproxy) x) {middle} {utime} {stime} 0 0 20 0 3 0 12345 1000 200\n"

    assert stat_ticks(stat(7, 250, 130)) == 380
    before = {7: stat_ticks(stat(7, 250, 130)), 8: stat_ticks(stat(8, 10, 10))}
    after = {7: stat_ticks(stat(7, 450, 230)), 8: stat_ticks(stat(8, 60, 60)), 9: 50}
    # 300 + 100 + 50 (a process started in between counts from zero) ticks at 100 Hz.
    assert cpu_seconds(before, after, 100) == pytest.approx(4.5)
    # A process gone by the second sample is left out, not counted as a negative.
    assert cpu_seconds(before, {7: 480}, 100) == pytest.approx(1.0)
    assert cpu_per_gb(4.5, 3 * 10**9) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="no byte was carried"):
        cpu_per_gb(1.0, 0)


def test_the_limited_path_is_compared_by_its_cpu_per_gigabyte_round_by_round():
    results = [  # 10 GB a run: 20 and 25 s of CPU unlimited, 30 s limited
        Result("SciStream stunnel, unlimited", 2, (*runs(2.0, path_cpu=20.0), *runs(2.0, path_cpu=25.0))),
        Result(f"SciStream stunnel, {LIMITED}", 4, runs(1.9, 1.9, path_cpu=30.0)),
        Result("direct (no proxy)", 0, runs(20.0, 20.0)),
    ]
    assert results[0].path_cpu_per_gb() == pytest.approx([2.0, 2.5])
    (found,) = [r for r in ratios(results) if r.name == "stunnel: limited / unlimited, CPU per GB"]
    assert found.rounds == pytest.approx((1.5, 1.2))
    assert found.goal is LIMITED_CPU
    (check,) = [m for m in measured([found]) if m.goal is LIMITED_CPU]
    assert (check.subject, check.value, check.met) == ("stunnel backend", pytest.approx(1.35), False)


def test_a_missed_goal_is_named_at_the_end_and_fails_the_bench(capsys):
    checked = [
        Measured(MEMORY_PER_STREAM, "haproxy backend", 7.0),
        Measured(goals.CONNECT, "default backend", 0.52),
        Measured(LIMITED_THROUGHPUT, "haproxy backend", 0.64),
    ]
    assert verdict(checked, swarm_failed=False) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3] == "Goals (bench/goals.py): 3 checked, 2 missed"
    assert lines[-2] == "MISSED: `s2uc connect` p50, default backend: 0.520 s, goal <= 0.4 s (issue #24)"
    assert lines[-1] == (
        "MISSED: limited / unlimited stream, Gbit/s, haproxy backend: 0.64x, goal >= 0.85x (issue #26, #14)"
    )


def test_every_goal_met_passes_and_a_failed_swarm_part_fails(capsys):
    met = [Measured(goals.INBOUND_REQUEST, "haproxy backend, 100 live streams", 0.11)]
    assert verdict(met, swarm_failed=False) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "Goals (bench/goals.py): 1 checked, 0 missed"
    assert verdict(met, swarm_failed=True) == 1
    assert "FAILED: the swarm part" in capsys.readouterr().out.splitlines()[-1]


def test_the_request_goals_are_those_of_issue_24():
    assert (goals.INBOUND_REQUEST.bound, goals.INBOUND_REQUEST.limit) == ("<=", 0.25)
    assert (goals.CONNECT.bound, goals.CONNECT.limit) == ("<=", 0.40)
    assert goals.INBOUND_REQUEST.met(0.25) and not goals.INBOUND_REQUEST.met(0.251)


def test_the_rounds_order_is_shuffled_every_round_and_repeated_by_its_seed():
    names = [f"configuration {i}" for i in range(7)]
    orders = round_orders(names, 5, seed=1234)
    assert all(sorted(order) == sorted(names) for order in orders)
    assert len({tuple(order) for order in orders}) > 1  # not one order for every round
    assert round_orders(names, 5, seed=1234) == orders
    assert round_orders(names, 5, seed=4321) != orders


def test_the_haproxy_pair_has_the_buffers_and_suites_of_the_session_template(tmp_path):
    template = (default_templates() / "haproxy.cfg.j2").read_text()
    settings = throughput_settings(template)
    assert "tune.bufsize 65536" in settings
    assert [s.split()[0] for s in settings] == [
        "tune.bufsize",
        "ssl-default-bind-ciphersuites",
        "ssl-default-server-ciphersuites",
    ]
    haproxy_pair(tmp_path, 5201)
    for side in ("in", "out"):
        config = (tmp_path / f"{side}.cfg").read_text()
        assert config.startswith("global\n")
        assert all(f"  {line}\n" in config for line in settings)


def test_the_cost_of_one_more_stream_leaves_out_what_all_share():
    memory = [
        {"streams": 1, "mib_per_stream": 16.0},
        {"streams": 10, "mib_per_stream": 8.5},  # 85 MiB
        {"streams": 100, "mib_per_stream": 7.15},  # 715 MiB: 630 more for 90 more streams
    ]
    assert marginal(memory) == (10, pytest.approx(7.0))


def test_the_performance_page_shows_the_goals_of_goals_py():
    assert goals.table() in (ROOT / "docs" / "performance.md").read_text()


def test_every_option_of_make_bench_parses():
    # As make bench runs it: its own options first, then the user's BENCH_ARGS.
    assert options(["--swarm-only", "--runs", "1", "--swarm-mib", "64"]) == Options(
        runs=1, swarm_only=True, swarm_mib=64
    )
    asked = options(["--no-swarm", "--seconds", "2", "--runs", "1", "--requests", "3", "--seed", "7"])
    assert (asked.no_swarm, asked.seed, asked.requests) == (True, 7, 3)
    asked = options(["--throughput-only", "--seconds", "2", "--runs", "1"])
    assert asked.throughput_only and not asked.no_swarm
    asked = options(["--no-swarm", "--plot", "a.png", "--json", "b.json", "--latency-only", "--goals"])
    assert (asked.plot, asked.json, asked.latency_only, asked.goals) == (
        Path("a.png"),
        Path("b.json"),
        True,
        True,
    )
    assert options([]) == Options()


def test_two_parts_that_exclude_each_other_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as ended:
        main(["--no-swarm", "--scale-only"])
    assert ended.value.code == 2
    told = capsys.readouterr().err.splitlines()
    assert told[0] == "Usage: python -m bench [OPTIONS]"
    assert told[-1] == (
        "Error: Invalid value for --no-swarm, --scale-only: "
        "one of --swarm-only, --no-swarm, --scale-only, --throughput-only at most"
    )


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module or "")
        elif isinstance(node, ast.ImportFrom):  # relative: `from .goals import X`, `from . import goals`
            package = ".".join(path.relative_to(ROOT).parts[: -node.level])
            modules = [node.module] if node.module else [alias.name for alias in node.names]
            found.update(f"{package}.{module}" for module in modules)
    return found


def test_the_package_imports_no_benchmark():
    for path in (ROOT / "scistream").rglob("*.py"):
        found = imports(path)
        assert not {
            name for name in found if name == "bench" or name.startswith(("bench.", "scistream.bench"))
        }, path


def test_the_benchmarks_import_each_other_in_one_direction():
    modules = {p.stem: p for p in (ROOT / "bench").glob("*.py")}
    graph = {
        name: {dep.split(".")[1] for dep in imports(path) if dep.startswith("bench.") and dep.count(".") == 1}
        for name, path in modules.items()
    }

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(
            dep == goal or (dep not in seen and reaches(dep, goal, seen | {dep})) for dep in graph[start]
        )

    assert not [name for name in graph if reaches(name, name)]
