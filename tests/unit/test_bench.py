"""The figures `make bench` prints against the goals of docs/performance.md."""

from __future__ import annotations

import pytest

from scistream.bench import HIGH_RATE, TLS_PAIR, ratios


def test_the_limited_against_the_unlimited_stream_and_ours_against_the_stunnel_pair():
    results = [
        (TLS_PAIR, 4.0, [4.0]),
        ("SciStream haproxy, unlimited", 5.2, [5.2]),
        (f"SciStream haproxy, --rate {HIGH_RATE} (40 Gbit/s)", 3.9, [3.9]),
        ("SciStream stunnel, unlimited", 2.0, [2.0]),
        (f"SciStream stunnel, --rate {HIGH_RATE} (40 Gbit/s)", 2.5, [2.5]),
    ]
    found = {name: (ratio, goal) for name, ratio, goal in ratios(results)}
    assert found["haproxy: 40 Gbit/s limit / unlimited"] == (pytest.approx(0.75), 0.85)
    assert found["stunnel: 40 Gbit/s limit / unlimited"] == (pytest.approx(1.25), 0.85)
    assert found["SciStream haproxy, unlimited / stunnel pair"] == (pytest.approx(1.3), 1.3)


def test_a_configuration_not_measured_gives_no_ratio():
    assert ratios([("SciStream haproxy, unlimited", 5.0, [5.0])]) == []
    assert ratios([]) == []
