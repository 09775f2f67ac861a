"""The systemd unit an operator installs (containers/s2cs.service): systemd accepts it, its
command line is one s2cs accepts, and it keeps the hardening and the settings the operator
guide explains ("Running s2cs with systemd").
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from scistream.loopback import BIN

UNIT = Path(__file__).resolve().parents[2] / "containers" / "s2cs.service"
INSTALLED = "/opt/scistream/bin/s2cs"  # where the guide installs s2cs; this machine has it in the venv
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"  # Debian: systemd


def runnable(text: str) -> str:
    """The unit with ExecStart naming this venv's s2cs, since systemd checks that it exists: the
    one change made to the shipped unit."""
    assert text.count(INSTALLED) == 1, f"ExecStart names {INSTALLED} once"
    changed = text.replace(INSTALLED, str(BIN / "s2cs"))
    differ = [old for old, new in zip(text.splitlines(), changed.splitlines(), strict=True) if old != new]
    assert len(differ) == 1 and differ[0].startswith("ExecStart="), differ
    return changed


def complaints(text: str, tmp_path: Path) -> list[str]:
    """What `systemd-analyze verify` says of the unit, or of its exit status. Only lines that name
    the unit count: on a host with systemd running it may also speak of other units."""
    path = tmp_path / "scistream-s2cs.service"
    path.write_text(text)
    assert Path(SYSTEMD_ANALYZE).exists(), "install systemd (make system-deps) for systemd-analyze"
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=120
    )
    found = [line for line in (result.stdout + result.stderr).splitlines() if path.name in line]
    if result.returncode != 0:
        found.append(f"exit status {result.returncode}: {result.stderr.strip()}")
    return found


def service(text: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(text)
    return dict(parser["Service"])


def test_systemd_accepts_the_unit(tmp_path):
    assert complaints(runnable(UNIT.read_text()), tmp_path) == []


@pytest.mark.parametrize(
    ("line", "broken"),
    [
        ("ProtectSystem=strict", "ProtectSystm=strict"),  # a key systemd does not know
        ("ProtectSystem=strict", "ProtectSystem=strictly"),  # a value it cannot parse
        ("KillMode=process", "KillMode=processes"),
    ],
)
def test_a_broken_unit_is_noticed(tmp_path, line, broken):
    """systemd only warns of these and starts the service without the setting: the test must not."""
    text = runnable(UNIT.read_text())
    assert text.count(f"\n{line}\n") == 1
    assert complaints(text.replace(f"\n{line}\n", f"\n{broken}\n"), tmp_path) != []


def test_a_unit_naming_a_missing_s2cs_is_noticed(tmp_path):
    missing = UNIT.read_text().replace(INSTALLED, str(tmp_path / "no" / "s2cs"))
    assert any("is not executable" in line for line in complaints(missing, tmp_path))


def test_the_command_line_is_one_s2cs_accepts():
    argv = shlex.split(service(UNIT.read_text())["ExecStart"])
    assert argv[0] == INSTALLED
    # --version is eager: s2cs parses every option, says "s2cs VERSION" and starts nothing.
    result = subprocess.run(
        [str(BIN / "s2cs"), *argv[1:], "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.startswith("s2cs "), result.stderr


def test_the_unit_is_hardened_and_keeps_streams_across_restarts():
    unit = service(UNIT.read_text())
    expected = {
        "User": "scistream",  # never root; a user of its own, which owns the state directory
        "StateDirectory": "scistream",
        "StateDirectoryMode": "0700",
        "ProtectSystem": "strict",  # read-only file system but for the state directory
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",  # no capability at all
        "KillMode": "process",  # proxies outlive a crash and --keep-streams-on-exit
        "Restart": "on-failure",
        "ExecReload": "/bin/kill -HUP $MAINPID",  # SIGHUP: templates and policy read again
        "EnvironmentFile": "/etc/scistream/s2cs.env",
    }
    assert {key: unit.get(key) for key in expected} == expected
    assert "AmbientCapabilities" not in unit
    # The secret comes from the environment file, never from a command line that `ps` shows.
    assert "secret" not in unit["ExecStart"].lower()
    assert not any(key == "Environment" and "SECRET" in value for key, value in unit.items())
