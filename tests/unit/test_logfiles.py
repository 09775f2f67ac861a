"""Opening a session's files without following a link planted in their place (logfiles.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from scistream.s2ds.logfiles import append_log, create_private, open_log_for_rotation, read_log, size_of


def planted(tmp_path: Path) -> tuple[Path, Path]:
    secret = tmp_path / "secret"
    secret.write_bytes(b"-----BEGIN PRIVATE KEY-----\n" * 100)
    log = tmp_path / "session" / "proxy.log"
    log.parent.mkdir()
    log.symlink_to(secret)
    return log, secret


@pytest.mark.parametrize("opener", [append_log, read_log, open_log_for_rotation])
def test_a_link_in_place_of_a_log_is_refused_and_named(tmp_path, opener):
    log, secret = planted(tmp_path)
    with pytest.raises(OSError) as refused:
        opener(log)
    assert refused.value.errno == errno.ELOOP and refused.value.filename == str(log)
    assert secret.read_bytes().startswith(b"-----BEGIN")


def test_a_fifo_in_place_of_a_log_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "proxy.log"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as refused:
        read_log(fifo)
    assert "not a regular file" in str(refused.value)


def test_a_new_part_replaces_a_link_rather_than_writing_through_it(tmp_path):
    log, secret = planted(tmp_path)
    before = secret.read_bytes()
    with create_private(log) as part:
        part.write(b"rotated\n")
    assert not log.is_symlink() and log.read_bytes() == b"rotated\n"
    assert secret.read_bytes() == before
    assert os.stat(log).st_mode & 0o777 == 0o600


def test_the_size_of_a_link_is_its_own(tmp_path):
    log, secret = planted(tmp_path)
    assert size_of(log) < size_of(secret)


def test_a_log_is_created_private_and_appended(tmp_path):
    log = tmp_path / "proxy.log"
    for line in (b"one\n", b"two\n"):
        with append_log(log) as out:
            out.write(line)
    assert log.read_bytes() == b"one\ntwo\n" and os.stat(log).st_mode & 0o777 == 0o600
    with read_log(log) as f:
        assert f.read() == b"one\ntwo\n"
