from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from scistream.errors import ConfigError
from scistream.s2cs.sessions import parse_record
from scistream.s2cs.state import StateDir, UnknownVersion, decode


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # State dir paths are bounded (proxies' Unix sockets live below them): pytest's tmp_path is too long.
    path = Path(tempfile.mkdtemp(prefix="ss-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def held(short_dir: Path) -> Iterator[StateDir]:
    state = StateDir(short_dir / "state")
    state.open()
    yield state
    state.close()


def test_the_state_dir_is_held_by_one_s2cs_and_names_its_pid(held):
    assert held.lock_file.read_text() == f"{os.getpid()}\n"
    assert held.path.stat().st_mode & 0o777 == 0o700
    assert held.sessions.is_dir()


def test_a_second_s2cs_is_refused_with_the_pid_of_the_first_and_changes_nothing(held):
    before = {p: p.stat().st_mtime_ns for p in held.path.rglob("*")}
    with pytest.raises(ConfigError) as caught:
        StateDir(held.path).open()
    assert caught.value.message == (
        f"state dir {held.path} is in use by s2cs pid {os.getpid()}; stop that one first, "
        "or give this one a --state-dir of its own"
    )
    assert {p: p.stat().st_mtime_ns for p in held.path.rglob("*")} == before
    assert held.lock_file.read_text() == f"{os.getpid()}\n"


def test_the_state_dir_is_free_again_once_its_holder_lets_go(held):
    held.close()
    again = StateDir(held.path)
    again.open()
    again.close()


def test_a_state_dir_that_is_a_file_is_refused_in_words(short_dir):
    path = short_dir / "state"
    path.write_text("not a directory\n")
    with pytest.raises(ConfigError, match=f"^state dir {re.escape(str(path))} is not a directory$"):
        StateDir(path).open()
    with pytest.raises(
        ConfigError,
        match=f"^cannot make state dir {re.escape(str(path))}/below: a part of that path is a file$",
    ):
        StateDir(path / "below").open()
    assert path.read_text() == "not a directory\n"


def test_a_sessions_dir_that_is_a_file_is_refused_in_words(short_dir):
    (short_dir / "sessions").write_text("")
    state = StateDir(short_dir)
    with pytest.raises(ConfigError, match=r"^sessions dir \S+ is not a directory$"):
        state.open()
    state.close()


# --- state.json ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"[]", "a list, not a JSON object"),
        (b'"x"', "a string, not a JSON object"),
        (b"3", "a number, not a JSON object"),
        (b'{"version": 1}', '"sessions" is null or missing, not a list'),
        (b'{"version": 1, "sessions": {}}', '"sessions" is an object, not a list'),
        (b'{"version": 1, "sessions": [[]]}', "session 1 is a list, not an object"),
        (b'{"version": 1, "sess', "not JSON: "),
        (b"\xff\xfe", "not JSON: "),
    ],
)
def test_a_damaged_state_file_is_told_apart_from_a_good_one(data, reason):
    with pytest.raises(ValueError, match=f"^{re.escape(reason)}"):
        decode(data)


def test_a_good_state_file_gives_its_records():
    assert decode(b'{"version": 1, "sessions": [{"uid": "u"}]}') == [{"uid": "u"}]
    assert decode(b'{"version": 1, "sessions": []}') == []
    with pytest.raises(UnknownVersion, match="state version 2, not 1"):
        decode(b'{"version": 2, "sessions": []}')


def test_a_state_file_has_one_line_per_session_and_reads_back_as_written(held):
    records = [
        {"uid": "u1", "argv": ["/usr/bin/haproxy", "-f", "/état/a b.cfg"], "pid": 12, "create_time": 1.5},
        {"uid": "u2", "processes": [], "rate": 0, "note": 'quote " and\nnewline'},
    ]
    held.save(records)
    assert held.load() == records
    lines = held.file.read_text().splitlines()
    assert len(lines) == 2 + len(records)  # the head, a line per session, the end
    held.save([])
    assert held.load() == []


def test_a_save_writes_what_changed_in_a_session_since_the_last(held):
    first = [{"sid": "a", "phase": "starting", "pid": None}, {"sid": "b", "phase": "running"}]
    held.save(first)
    changed = [{"sid": "a", "phase": "running", "pid": 7}, {"sid": "b", "phase": "running"}]
    held.save(changed)
    assert held.load() == changed
    held.save([{"sid": "b", "phase": "stopping"}])  # a released, b changed
    assert held.load() == [{"sid": "b", "phase": "stopping"}]
    assert decode(held.copy.read_bytes()) == [{"sid": "b", "phase": "stopping"}]
    held.save([{"sid": "a", "phase": "starting", "pid": None}])  # a sid seen before, made again
    assert held.load() == [{"sid": "a", "phase": "starting", "pid": None}]


def test_a_damaged_state_file_is_refused_naming_it_and_its_copy(held):
    held.save([{"n": 1}])
    held.save([{"n": 2}])
    held.file.write_text("[]")
    with pytest.raises(ConfigError) as caught:
        held.load()
    message = caught.value.message
    assert message.startswith(f"{held.file} is damaged (a list, not a JSON object); ")
    assert f"its copy {held.copy} is as s2cs last wrote it: check it and move it into place" in message
    assert "\n" not in message
    os.replace(held.copy, held.file)
    assert held.load() == [{"n": 2}]


def test_without_a_copy_the_refusal_says_what_else_to_do(held):
    held.file.write_text('"x"')
    with pytest.raises(ConfigError, match="repair it, or move it aside to start afresh"):
        held.load()


def test_every_save_writes_a_copy_of_its_own(held):
    for sessions in ([{"n": 1}], [{"n": 1}, {"n": 2}], []):
        held.save(sessions)
        assert decode(held.copy.read_bytes()) == sessions
    assert held.copy.stat().st_mode & 0o777 == 0o600  # it holds UIDs, as state.json does
    assert held.copy.stat().st_ino != held.file.stat().st_ino  # damage to one spares the other
    assert sorted(p.name for p in held.path.iterdir()) == [
        "s2cs.lock",
        "sessions",
        "state.json",
        "state.json.bak",
    ]


def _record(**changes: object) -> dict[str, object]:
    record: dict[str, object] = {
        "uid": "0e6c3f4e-6a0c-4d7e-9d55-9a4b8f5e2b10",
        "sid": "a1b2c3d4e5f6",
        "role": "inbound",
        "owner": None,
        "listeners": [["127.0.0.1", 5100, "10.0.0.5", 5001]],
        "advertised": ["127.0.0.1:5100"],
        "num_conn": 5,
        "rate": 10000,
        "created": 1.5,
        "processes": [{"name": "proxy", "argv": ["haproxy", "-db"], "pid": 42, "create_time": 7.25}],
    }
    record.update(changes)
    return record


def test_a_session_record_comes_back_as_it_was_written():
    session, (proc,) = parse_record(_record())
    assert (session.uid, session.sid, session.role, session.ports) == (
        "0e6c3f4e-6a0c-4d7e-9d55-9a4b8f5e2b10",
        "a1b2c3d4e5f6",
        "inbound",
        (5100,),
    )
    assert (proc.kind, proc.argv, proc.pid, proc.create_time, proc.restarts) == (
        "proxy",
        ("haproxy", "-db"),
        42,
        7.25,
        0,
    )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"uid": None, "sid": "a1b2c3d4e5f6"}, "its role or UID is malformed"),
        ({"sid": "../../etc"}, "its sid '../../etc' is not a session id"),
        ({"role": "sideways"}, "its role or UID is malformed"),
        ({"listeners": [["127.0.0.1", 5100]]}, "a field is malformed"),
        ({"num_conn": "many"}, "a field is malformed"),
        ({"processes": [{"name": "proxy", "argv": "haproxy -db"}]}, "a command line is not a list"),
    ],
)
def test_a_malformed_session_record_says_what_is_wrong(changes, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_record(_record(**changes))


def test_a_session_record_without_a_field_names_it():
    record = _record()
    del record["listeners"]
    with pytest.raises(ValueError, match="it has no 'listeners'"):
        parse_record(record)
