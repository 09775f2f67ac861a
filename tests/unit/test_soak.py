"""The soak's pure parts (bench/soak_plan.py, bench/soak_traffic.py, bench/soak_figures.py): a
seed replays its schedule, and a connection's two ends are judged as a user would be affected."""

from __future__ import annotations

from bench.soak_faults import Fault
from bench.soak_figures import charged, goals_missed
from bench.soak_plan import KILL_SHAPER, KINDS, ON_A_STREAM, Planned, StreamShape, plan
from bench.soak_traffic import (
    CLEAN_CLOSE,
    EMPTY,
    OK,
    RESET,
    SHORT,
    SVC_RESET,
    WHOLE,
    SenderSeen,
    ServiceSeen,
    empty_silences,
    judge,
)

GATEWAYS = ["hpc-haproxy", "hpc-stunnel", "inst-haproxy", "inst-stunnel"]
STREAMS = [
    StreamShape("t0", "hpc-haproxy", "inst-haproxy", 10_000),
    StreamShape("t1", "hpc-haproxy", "inst-stunnel", 0),
]


def test_a_seed_replays_its_schedule_and_another_seed_does_not():
    assert plan(7, 600, STREAMS, GATEWAYS) == plan(7, 600, STREAMS, GATEWAYS)
    assert plan(7, 600, STREAMS, GATEWAYS) != plan(8, 600, STREAMS, GATEWAYS)


def test_two_minutes_meet_every_kind_of_fault_within_the_run():
    schedule = plan(11, 120, STREAMS, GATEWAYS)
    assert {p.kind for p in schedule} == set(KINDS)
    assert all(10 <= p.at <= 105 for p in schedule)
    assert [p.at for p in schedule] == sorted(p.at for p in schedule)


def test_faults_on_a_stream_aim_at_one_of_its_gateways_and_shapers_only_where_a_rate_is():
    for p in plan(3, 3600, STREAMS, GATEWAYS):
        if p.kind in ON_A_STREAM:
            shape = next(s for s in STREAMS if s.name == p.stream)
            assert p.gateway in (shape.inbound, shape.outbound)
        if p.kind == KILL_SHAPER:
            assert p.stream == "t0"


def sender(conn_id: str, outcome: str, length: int = 100) -> SenderSeen:
    return SenderSeen(conn_id, "t0", "t0", ("hpc-haproxy", "inst-haproxy"), length, outcome, 1.0, 2.0)


def service(conn_id: str | None, outcome: str, nbytes: int = 100) -> ServiceSeen:
    return ServiceSeen(conn_id, outcome, nbytes, 1.0, 2.0)


def test_a_reset_at_both_ends_is_a_cut_not_a_loss():
    (j,) = judge([sender("a", RESET)], {"t0": [service("a", SVC_RESET, 40)]})
    assert j.cut and j.silent is None


def test_a_clean_end_short_at_the_service_is_a_silent_loss_whatever_the_sender_saw():
    (j,) = judge([sender("a", RESET)], {"t0": [service("a", SHORT, 40)]})
    assert j.silent == "the service saw a clean end after 40 of 100 bytes"


def test_a_clean_close_without_the_verdict_is_a_silent_loss_for_the_sender():
    (nothing,) = judge([sender("a", CLEAN_CLOSE)], {})
    assert nothing.silent == "the sender saw a clean end; the service got nothing"
    (arrived,) = judge([sender("b", CLEAN_CLOSE)], {"t0": [service("b", WHOLE)]})
    assert arrived.silent is not None and "the data arrived" in arrived.silent


def test_a_delivered_connection_is_neither_cut_nor_lost():
    (j,) = judge([sender("a", OK)], {"t0": [service("a", WHOLE)]})
    assert not j.cut and j.silent is None


def test_an_empty_clean_end_counts_only_against_a_sender_no_service_saw():
    judged = judge([sender("a", RESET), sender("b", OK)], {"t0": [service("b", WHOLE)]})
    assert empty_silences(judged, {"t0": [service(None, EMPTY), service("b", WHOLE)]}) == 1
    assert empty_silences(judged, {"t0": [service("b", WHOLE)]}) == 0


def fault(kind: str, stream: str, gateway: str, start: float, recovered: float) -> Fault:
    f = Fault(Planned(0, kind, stream, gateway), start=start, end=start, recovered=recovered)
    f.streams = frozenset({stream} if stream else {"t0", "t1"})
    f.gateways = frozenset({gateway})
    return f


def test_a_cut_is_charged_to_the_fault_on_its_own_stream_before_one_on_its_gateway():
    on_gateway = fault("kill-s2cs", "", "hpc-haproxy", 10.0, 12.0)
    on_stream = fault("kill-proxy", "t0", "hpc-haproxy", 11.0, 13.0)
    assert charged(11.5, 11.6, {"t0"}, set(), [on_gateway, on_stream], 100.0) is on_stream
    assert charged(11.5, 11.6, {"t1"}, set(), [on_gateway, on_stream], 100.0) is on_gateway
    assert charged(30.0, 31.0, {"t0"}, {"hpc-haproxy"}, [on_gateway, on_stream], 100.0) is None


def test_goals_missed_name_each_goal():
    fig = {
        "silent losses": ["x"],
        "leaks": [],
        "faults not survived": [],
        "connections": {"cut, no fault to explain it": []},
        "requests": {"failed, no fault to explain it": []},
        "streams": {"made": 3, "released": 3},
        "s2cs": {"hpc": {"first minute": {"rss": 50 << 20, "fds": 9}, "end": {"rss": 200 << 20, "fds": 9}}},
    }
    missed = goals_missed(fig)
    assert missed[0] == "1 silent loss(es) (goal 0)"
    assert "s2cs hpc grew from 50 MiB to 200 MiB (goal: flat)" in missed
