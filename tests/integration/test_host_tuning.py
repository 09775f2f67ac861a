"""`scistream doctor --path-rtt 50ms --path-rate 10G` (and `s2cs --check`) on this host: each
host-tuning finding a WARN that names the sysctl and the value to set, never a FAIL.

A private network namespace has its own net.ipv4.tcp_rmem, tcp_wmem and tcp_congestion_control:
the tests set them low there to make a WARN appear and high to make it go (net.core.rmem_max and
wmem_max are read-only there: the host's apply, and are judged as they are)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scistream.loopback import BIN, free_port, free_port_range

from ..needs import require_command, require_netns
from .test_doctor import check, verdicts

SCISTREAM_DOCTOR = (str(BIN / "scistream"), "doctor")
S2CS_CHECK = (str(BIN / "s2cs"), "--check")
ISSUE_PATH = ("--path-rtt", "50ms", "--path-rate", "10G")
WINDOW = 62_500_000  # 10 Gbit/s x 50 ms, in bytes
TARGET = 67108864  # the next power of two: 64 MiB


def sysctl(name: str) -> str:
    return Path("/proc/sys", *name.split(".")).read_text().strip()


@pytest.fixture
def set_sysctl() -> Iterator[object]:
    """sysctl -w in this test's network namespace; what it changed is put back after."""
    require_netns("sets per-namespace sysctls")
    before: dict[str, str] = {}

    def set_(name: str, value: str) -> None:
        before.setdefault(name, sysctl(name))
        subprocess.run(["sysctl", "-q", "-w", f"{name}={value}"], check=True)
        assert sysctl(name).split() == value.split()

    yield set_
    for name, value in before.items():
        subprocess.run(["sysctl", "-q", "-w", f"{name}={value}"], check=True)


def core_max(name: str) -> int:
    return int(sysctl(f"net.core.{name}"))


@pytest.mark.parametrize("command", [SCISTREAM_DOCTOR, S2CS_CHECK], ids=["scistream doctor", "s2cs --check"])
def test_buffers_too_small_for_10g_over_50ms_warn_with_the_sysctl_and_pass_once_set(
    workdir, set_sysctl, command
):
    set_sysctl("net.ipv4.tcp_rmem", "4096 131072 6291456")
    set_sysctl("net.ipv4.tcp_wmem", "4096 16384 4194304")
    low = check(workdir, *ISSUE_PATH, command=command)
    assert low.returncode == 0, low.stdout + low.stderr  # a WARN, never a FAIL
    found = verdicts(low.stdout)
    for name, sysctl_name, default in (
        ("receive buffers", "net.ipv4.tcp_rmem", "131072"),
        ("send buffers", "net.ipv4.tcp_wmem", "16384"),
    ):
        status, line = found[name]
        assert status == "WARN", line
        assert f"the 59.6 MiB window ({WINDOW} bytes) a 10 Gbit/s path of 50 ms needs" in line
        assert "fix: sysctl -w " in line and f"{sysctl_name}='4096 {default} {TARGET}'" in line

    set_sysctl("net.ipv4.tcp_rmem", f"4096 131072 {2 * TARGET}")
    set_sysctl("net.ipv4.tcp_wmem", f"4096 16384 {2 * TARGET}")
    high = check(workdir, *ISSUE_PATH, command=command)
    assert high.returncode == 0, high.stdout + high.stderr
    found = verdicts(high.stdout)
    for name, core in (("receive buffers", "rmem_max"), ("send buffers", "wmem_max")):
        status, line = found[name]
        assert "tcp_rmem" not in line.partition("fix:")[2] and "tcp_wmem" not in line.partition("fix:")[2]
        if core_max(core) >= WINDOW:
            assert status == "OK", line
        else:  # the host's own, which this namespace cannot change: named alone
            assert status == "WARN", line
            assert line.endswith(
                f"fix: sysctl -w net.core.{core}={TARGET} (and the same in /etc/sysctl.d/ to keep it)"
            )


def test_a_path_the_buffers_hold_passes_and_one_they_do_not_warns(workdir, set_sysctl):
    """Both directions on one sysctl: a path whose window the host's net.core limits hold."""
    window = min(core_max("rmem_max"), core_max("wmem_max")) // 2
    path = ("--path-rtt", "1ms", "--path-rate", f"{window * 8}k")  # `window` bytes in flight over 1 ms
    set_sysctl("net.ipv4.tcp_rmem", f"4096 4096 {window // 2}")
    status, line = verdicts(check(workdir, *path).stdout)["receive buffers"]
    assert status == "WARN", line
    target = max(1 << 20, 1 << (window - 1).bit_length())
    assert f"({window} bytes)" in line and f"net.ipv4.tcp_rmem='4096 4096 {target}'" in line
    assert "net.core.rmem_max" not in line.partition("fix:")[2]

    set_sysctl("net.ipv4.tcp_rmem", f"4096 4096 {window}")
    status, line = verdicts(check(workdir, *path).stdout)["receive buffers"]
    assert status == "OK" and "hold the" in line, line


def test_a_congestion_control_for_short_paths_warns_and_bbr_or_htcp_passes(workdir, set_sysctl):
    allowed = sysctl("net.ipv4.tcp_allowed_congestion_control").split()
    set_sysctl("net.ipv4.tcp_congestion_control", "reno")
    status, line = verdicts(check(workdir).stdout)["congestion control"]
    assert status == "WARN" and "net.ipv4.tcp_congestion_control is reno" in line, line
    assert "fix: " in line and "sysctl -w net.ipv4.tcp_congestion_control=" in line
    good = next((a for a in ("bbr", "htcp") if a in allowed), None)
    if good is None:
        pytest.skip(f"neither bbr nor htcp is allowed in this namespace ({' '.join(allowed)})")
    set_sysctl("net.ipv4.tcp_congestion_control", good)
    status, line = verdicts(check(workdir).stdout)["congestion control"]
    assert status == "OK" and line.startswith(good), line


def test_an_open_files_limit_too_low_for_the_port_range_warns_with_the_limit_to_set(workdir):
    require_command("prlimit", "runs the check with a lower descriptor limit")
    first, last = free_port_range(10)
    ports = ("--port-range", f"{first}-{last}")
    low = check(workdir, *ports, prefix=("prlimit", "--nofile=1024:1024", "--"))
    assert low.returncode == 0, low.stdout + low.stderr
    status, line = verdicts(low.stdout)["open files"]
    assert status == "WARN", line
    assert "the hard limit is 1024" in line and "up to 1084" in line  # 1000 + 2 x 10 + 64
    assert "fix: LimitNOFILE=65536 in the service unit" in line

    high = check(workdir, *ports, prefix=("prlimit", "--nofile=4096:4096", "--"))
    status, line = verdicts(high.stdout)["open files"]
    assert status == "OK" and line.startswith("4096 "), line


def test_a_path_option_without_its_pair_or_unit_is_refused_with_what_to_give(workdir):
    result = check(workdir, "--path-rtt", "50ms")
    assert result.returncode == 2
    assert "give --path-rtt and --path-rate together" in result.stderr
    result = check(workdir, "--path-rtt", "50", "--path-rate", "10G")
    assert result.returncode == 2
    assert "--path-rtt '50': give the path's round-trip time with its unit, such as 50ms" in result.stderr
    # They judge a host for --check: a start refuses them, and makes nothing.
    state = workdir / "started"
    started = subprocess.run(
        [str(BIN / "s2cs"), *ISSUE_PATH, "--port", str(free_port()), "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 2 and "--path-rtt and --path-rate go with --check" in started.stderr
    assert not state.exists()
