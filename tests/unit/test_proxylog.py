"""Reading proxy logs boundedly: only what is new, across a rotation, a line being written waits."""

from __future__ import annotations

from pathlib import Path

from scistream.s2ds import proxylog
from scistream.s2ds.diagnosis import SERVICE_REFUSED
from scistream.s2ds.proxylog import LogWatch, last_lines
from scistream.s2ds.supervisor import LogBound, rotate_log

REFUSED = "cannot connect to 10.0.1.5:5001: Connection refused\n"


def test_each_look_counts_only_what_is_new(tmp_path: Path) -> None:
    log = tmp_path / "shaper.log"
    log.write_text("shaper: unlimited\n" + REFUSED)
    watch = LogWatch(log, "inbound", ["10.0.1.5:5001"])
    assert watch.look().by_kind() == {SERVICE_REFUSED: 1}
    assert watch.look().by_kind() == {SERVICE_REFUSED: 1}  # read again: nothing new
    with open(log, "a") as f:
        f.write(REFUSED + REFUSED[:10])  # the second still being written
    assert watch.look().by_kind() == {SERVICE_REFUSED: 2}
    with open(log, "a") as f:
        f.write(REFUSED[10:])
    assert watch.look().by_kind() == {SERVICE_REFUSED: 3}


def test_a_rotation_between_two_looks_loses_nothing(tmp_path: Path) -> None:
    log = tmp_path / "shaper.log"
    log.write_text(REFUSED)
    watch = LogWatch(log, "inbound", [])
    watch.look()
    with open(log, "a") as f:
        f.write(REFUSED * 2)
    rotate_log(log, LogBound(max_bytes=1, keep=2))
    with open(log, "a") as f:
        f.write(REFUSED)
    assert watch.look().by_kind() == {SERVICE_REFUSED: 4}


def test_a_look_reads_at_most_the_newest_read_max(tmp_path: Path, monkeypatch: object) -> None:
    log = tmp_path / "shaper.log"
    log.write_text(REFUSED * 10_000)  # 520 kB
    watch = LogWatch(log, "inbound", [])
    counted = watch.look().by_kind()[SERVICE_REFUSED]
    assert counted <= proxylog.READ_MAX // len(REFUSED) + 1
    assert counted >= proxylog.READ_MAX // len(REFUSED) - 1
    assert watch.offset == log.stat().st_size


def test_no_log_yet_is_no_failure(tmp_path: Path) -> None:
    assert LogWatch(tmp_path / "proxy.log", "inbound", []).look().failures() == []


def test_the_last_lines_are_bounded_and_include_the_rotated_part(tmp_path: Path) -> None:
    log = tmp_path / "proxy.log"
    log.write_text("".join(f"old {i}\n" for i in range(3)))
    rotate_log(log, LogBound(max_bytes=1, keep=2))
    log.write_text("new 0\nnew 1\n")
    assert last_lines(log, count=4) == ["old 1", "old 2", "new 0", "new 1"]
    log.write_text("x" * 1000 + "\n" + "".join(f"line {i}\n" for i in range(100)))
    shown = last_lines(log)
    assert shown == [f"line {i}" for i in range(50, 100)]
    log.write_text(("y" * 1000 + "\n") * 100)
    shown = last_lines(log, limit=8192)
    assert sum(len(line) + 1 for line in shown) <= 8192
    assert all(len(line) == proxylog.LINE_MAX for line in shown)
    assert last_lines(tmp_path / "none.log") == []
