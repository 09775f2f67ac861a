from __future__ import annotations

import threading

import pytest

from scistream.errors import BadRequest, ConfigError, Conflict, NoPorts
from scistream.s2cs.ports import PortPool, parse_range


def test_reserve_hands_out_the_lowest_free_ports():
    pool = PortPool(5100, 5200)
    assert pool.reserve(2) == [5100, 5101]
    assert pool.reserve(1) == [5102]
    assert pool.reserved == {5100, 5101, 5102}
    assert pool.available() == 101 - 3


def test_a_released_port_is_handed_out_again():
    pool = PortPool(5100, 5102)
    first = pool.reserve(3)
    pool.release([5101])
    assert pool.reserve(1) == [5101]
    pool.release(first)
    assert pool.available() == 3
    assert pool.reserve(3) == [5100, 5101, 5102]


def test_reservation_is_all_or_nothing():
    pool = PortPool(5100, 5102)
    pool.reserve(1)
    with pytest.raises(NoPorts):
        pool.reserve(3)
    assert pool.reserved == {5100}  # the two that were free are still free
    assert pool.reserve(2) == [5101, 5102]


def test_no_ports_names_the_range_and_how_many_were_needed():
    pool = PortPool(5100, 5104)
    pool.reserve(4)
    with pytest.raises(NoPorts) as caught:
        pool.reserve(2)
    assert caught.value.code == "NO_PORTS"
    assert "no free port in 5100-5104" in caught.value.message
    assert "2 needed" in caught.value.message
    assert "1 not reserved by a stream" in caught.value.message


def test_ports_another_program_holds_are_skipped():
    held_elsewhere = {5100, 5102}
    probed = []

    def is_free(port):
        probed.append(port)
        return port not in held_elsewhere

    pool = PortPool(5100, 5110, is_free=is_free)
    assert pool.reserve(2) == [5101, 5103]
    assert probed == [5100, 5101, 5102, 5103]  # stops probing once it has enough
    assert pool.reserved == {5101, 5103}


def test_reserved_ports_are_not_probed_again():
    probed = []
    pool = PortPool(5100, 5110, is_free=lambda p: probed.append(p) or True)
    pool.reserve(2)
    probed.clear()
    assert pool.reserve(1) == [5102]
    assert probed == [5102]


def test_when_other_programs_hold_the_rest_there_are_no_ports():
    pool = PortPool(5100, 5103, is_free=lambda p: p == 5100)
    with pytest.raises(NoPorts, match="no free port in 5100-5103"):
        pool.reserve(2)
    assert pool.reserved == frozenset()


def test_requested_ports_are_reserved_exactly():
    pool = PortPool(5100, 5200)
    assert pool.reserve(2, requested=[5150, 5120]) == [5150, 5120]
    assert pool.reserve(1) == [5100]
    assert pool.reserved == {5100, 5120, 5150}


@pytest.mark.parametrize("port", [5099, 5201, 80, 65535])
def test_a_requested_port_outside_the_range_is_a_bad_request_naming_the_range(port):
    pool = PortPool(5100, 5200)
    with pytest.raises(BadRequest, match=f"port {port} is outside this server's port range 5100-5200"):
        pool.reserve(1, requested=[port])
    assert pool.reserved == frozenset()


def test_a_requested_port_of_another_stream_is_a_conflict():
    pool = PortPool(5100, 5200)
    pool.reserve(1, requested=[5150])
    with pytest.raises(Conflict, match="port 5150 is already used by another stream"):
        pool.reserve(2, requested=[5151, 5150])
    assert pool.reserved == {5150}  # 5151 was not taken either


def test_a_requested_port_another_program_holds_is_a_conflict():
    pool = PortPool(5100, 5200, is_free=lambda p: p != 5151)
    with pytest.raises(Conflict, match="port 5151 is held by another program on this host"):
        pool.reserve(2, requested=[5150, 5151])
    assert pool.reserved == frozenset()


def test_a_port_requested_twice_is_refused():
    pool = PortPool(5100, 5200)
    with pytest.raises((BadRequest, Conflict)):
        pool.reserve(2, requested=[5150, 5150])


def test_ports_of_reloaded_sessions_are_taken_without_probing():
    pool = PortPool(5100, 5105, is_free=lambda p: False)  # the reloaded proxies hold them
    pool.take([5101, 5103])
    assert pool.reserved == {5101, 5103}
    with pytest.raises(Conflict, match="already used by another stream"):
        pool.reserve(1, requested=[5103])
    pool.is_free = lambda p: True
    assert pool.reserve(3) == [5100, 5102, 5104]


def test_concurrent_reservations_never_share_a_port():
    threads, per_thread = 16, 5
    pool = PortPool(20000, 20000 + threads * per_thread - 1)
    start = threading.Barrier(threads)
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def slow_probe(port):
        # A real probe binds a socket; let other threads run in between.
        threading.Event().wait(0.0001)
        return True

    pool.is_free = slow_probe

    def reserve():
        try:
            start.wait()
            for _ in range(per_thread):
                got = pool.reserve(1)
                results.append(got)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=reserve) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert not errors
    handed_out = [p for ports in results for p in ports]
    assert len(handed_out) == threads * per_thread
    assert len(set(handed_out)) == len(handed_out)
    assert pool.available() == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5100-5200", (5100, 5200)),
        ("1-65535", (1, 65535)),
        ("5100-5100", (5100, 5100)),
        (" 5100 - 5200 ", (5100, 5200)),
    ],
)
def test_parse_range_reads_first_and_last(text, expected):
    assert parse_range(text) == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("5100", "must look like 5100-5200"),
        ("", "must look like 5100-5200"),
        ("5100:5200", "must look like 5100-5200"),
        ("a-b", "must look like 5100-5200"),
        ("5100-", "must look like 5100-5200"),
        ("-5200", "must look like 5100-5200"),
        ("5100-5200-5300", "must look like 5100-5200"),
        ("5200-5100", "first <= last"),
        ("0-100", "not within 1-65535"),
        ("65000-70000", "not within 1-65535"),
    ],
)
def test_parse_range_explains_what_a_range_looks_like(text, complaint):
    with pytest.raises(ConfigError, match=complaint):
        parse_range(text)


def test_parse_range_refuses_unicode_digits_with_a_config_error():
    with pytest.raises(ConfigError, match="must look like 5100-5200"):
        parse_range("5100-52²")


def test_a_port_is_freed_only_by_the_session_that_holds_it():
    pool = PortPool(5100, 5101)
    first = pool.reserve(1, owner="a1")
    pool.release(first, owner="a1")
    assert pool.reserve(1, owner="b2") == first  # the port goes to the next session
    pool.release(first, owner="a1")  # the first session freed a second time: changes nothing
    assert pool.reserved == set(first)
    assert pool.reserve(1, owner="c3") == [5101]
    with pytest.raises(NoPorts):
        pool.reserve(1, owner="d4")
    pool.release(first, owner="b2")
    assert pool.reserved == {5101}


def test_ports_taken_back_at_recovery_belong_to_their_session():
    pool = PortPool(5100, 5105)
    pool.take([5101, 5103], owner="a1")
    pool.release([5101, 5103], owner="b2")
    assert pool.reserved == {5101, 5103}
    pool.release([5101, 5103], owner="a1")
    assert pool.reserved == frozenset()
