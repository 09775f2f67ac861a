"""The control-plane certificate (scistream/s2cs/certs.py)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from scistream.errors import ConfigError
from scistream.s2cs.certs import check_pair, server_certificate

from ..certificates import write_pair

DAY = datetime.timedelta(days=1)


def expired_pair(directory: Path) -> tuple[Path, Path]:
    now = datetime.datetime.now(datetime.UTC)
    return write_pair(directory / "server.crt", directory / "server.key", now - 30 * DAY, now - DAY)


def test_an_operators_expired_certificate_is_refused_with_its_date(tmp_path):
    crt, key = expired_pair(tmp_path)
    with pytest.raises(ConfigError, match=r"server\.crt expired on \d{4}-\d\d-\d\d .*: renew it"):
        check_pair(crt, key)


def test_a_generated_certificate_that_expired_is_made_anew(tmp_path):
    old, _ = expired_pair(tmp_path)
    before = old.read_bytes()
    crt, key, generated = server_certificate(None, None, tmp_path, "127.0.0.1")
    assert generated and crt.read_bytes() != before
    check_pair(crt, key)  # valid now
