from __future__ import annotations

import json
import os
import stat

import pytest

from scistream.errors import ConfigError
from scistream.s2cs.audit import AuditLog, entry, line

UID = "0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"


def test_a_line_says_who_did_what_from_where_and_names_the_stream_by_its_prefix_only():
    record = entry(
        "create",
        when=1767225600.25,
        op="inbound",
        identity=("a1b2-identity", "alice@example.org"),
        client="192.0.2.10",
        targets=["10.0.1.5:5001"],
        uid=UID,
        result="ok",
    )
    assert record == {
        "time": "2026-01-01T00:00:00.250Z",
        "event": "create",
        "op": "inbound",
        "identity": {"id": "a1b2-identity", "name": "alice@example.org"},
        "client": "192.0.2.10",
        "targets": ["10.0.1.5:5001"],
        "uid": "0b7c1f2e",
        "result": "ok",
    }
    assert UID not in line(record).decode()


def test_a_refusal_carries_its_code_and_reason_on_one_line():
    record = entry(
        "refuse",
        when=0,
        op="inbound",
        identity=None,
        client="::1",
        targets=["127.0.0.1:5000"],
        uid=None,
        result="FORBIDDEN",
        reason="target 127.0.0.1:5000 is this gateway's own control port\nsecond line",
    )
    data = line(record)
    assert data.count(b"\n") == 1 and data.endswith(b"\n")
    assert json.loads(data)["reason"].endswith("second line")
    assert json.loads(data)["uid"] is None


def test_the_log_is_private_appended_to_and_written_again_after_rotation(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    record = entry(
        "release", when=0, op="release", identity=None, client="c", targets=[], uid=UID, result="ok"
    )
    audit.write(record)
    audit.write(record)
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["release", "release"]
    path.rename(tmp_path / "audit.jsonl.1")  # logrotate
    audit.write(record)
    assert len(path.read_text().splitlines()) == 1


def test_a_log_that_cannot_be_written_stops_s2cs_at_start(tmp_path):
    with pytest.raises(ConfigError, match=r"--audit-log: cannot write .*/missing/audit.jsonl: No such file"):
        AuditLog(tmp_path / "missing" / "audit.jsonl")


def test_a_symlink_planted_at_the_log_path_is_refused_not_followed(tmp_path, caplog):
    victim = tmp_path / "server.key"
    victim.write_text("-----BEGIN PRIVATE KEY-----\n")
    path = tmp_path / "audit.jsonl"
    path.symlink_to(victim)
    with pytest.raises(ConfigError, match=r"--audit-log: cannot write .*/audit.jsonl: it is a symbolic link"):
        AuditLog(path)
    path.unlink()
    audit = AuditLog(path)
    path.rename(tmp_path / "audit.jsonl.1")  # rotated, and a symlink planted in its place
    path.symlink_to(victim)
    record = entry(
        "release", when=0, op="release", identity=None, client="c", targets=[], uid=UID, result="ok"
    )
    audit.write(record)
    assert victim.read_text() == "-----BEGIN PRIVATE KEY-----\n"  # not a byte more
    assert "cannot write the audit log" in caplog.text and "it is a symbolic link" in caplog.text


def test_a_fifo_planted_at_the_log_path_does_not_hang_s2cs(tmp_path):
    path = tmp_path / "audit.jsonl"
    os.mkfifo(path)  # nobody reads it: a plain open for writing would wait for ever
    with pytest.raises(ConfigError, match=r"cannot write .*/audit.jsonl: it is not a regular file"):
        AuditLog(path)
