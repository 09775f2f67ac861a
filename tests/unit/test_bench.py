"""The figures `make bench` prints against the goals of docs/performance.md."""

from __future__ import annotations

import pytest

from scistream.bench import LIMITED, TLS_PAIR, ratios
from scistream.bench_scale import marginal


def test_the_limited_against_the_unlimited_stream_and_ours_against_the_stunnel_pair():
    results = [
        (TLS_PAIR, 4.0, [4.0]),
        ("SciStream haproxy, unlimited", 5.2, [5.2]),
        (f"SciStream haproxy, {LIMITED}", 3.9, [3.9]),
        ("SciStream stunnel, unlimited", 2.0, [2.0]),
        (f"SciStream stunnel, {LIMITED}", 2.5, [2.5]),
    ]
    found = {name: (ratio, goal) for name, ratio, goal in ratios(results)}
    assert found["haproxy: 40 Gbit/s limit / unlimited"] == (pytest.approx(0.75), 0.85)
    assert found["stunnel: 40 Gbit/s limit / unlimited"] == (pytest.approx(1.25), 0.85)
    assert found["SciStream haproxy, unlimited / stunnel pair"] == (pytest.approx(1.3), 1.3)


def test_a_configuration_not_measured_gives_no_ratio():
    assert ratios([("SciStream haproxy, unlimited", 5.0, [5.0])]) == []
    assert ratios([]) == []


def test_the_cost_of_one_more_stream_leaves_out_what_all_share():
    memory = [
        {"streams": 1, "mib_per_stream": 16.0},
        {"streams": 10, "mib_per_stream": 8.5},  # 85 MiB
        {"streams": 100, "mib_per_stream": 7.15},  # 715 MiB: 630 more for 90 more streams
    ]
    assert marginal(memory) == (10, pytest.approx(7.0))
