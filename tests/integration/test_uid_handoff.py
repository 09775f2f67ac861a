"""The UID, the stream's secret, handed over in a private file: never on a command line.

On a shared login node every user can read every process's command line (/proc/*/cmdline), so a
UID passed as an argument is a UID given away. These tests run the user guide's flow with
--uid-file while watching the command line of every process on the host.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from scistream.loopback import BIN, Sink, send

from .conftest import BACKENDS, field, s2uc


class CommandLines:
    """Every command line seen on this host while it runs (s2uc's, s2cs's, the proxies')."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for proc in psutil.process_iter(["cmdline"]):
                cmdline = proc.info.get("cmdline")
                if cmdline:
                    self.seen.add("\0".join(cmdline))
            self._stop.wait(0.005)

    def __enter__(self) -> CommandLines:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def holding(self, secret: str) -> list[str]:
        return [c.replace("\0", " ") for c in self.seen if secret.lower() in c.lower()]

    def ran(self, *words: str) -> bool:
        return any(all(w in c.split("\0") for w in words) for c in self.seen)


@pytest.fixture
def watch() -> Iterator[CommandLines]:
    with CommandLines() as lines:
        yield lines


def s2uc_stdin(stdin: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "s2uc"), *args], input=stdin, capture_output=True, text=True, timeout=180, cwd=cwd
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_user_guide_flow_with_uid_files_puts_the_uid_on_no_command_line(
    start_s2cs, workdir, watch, backend
):
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    sink = Sink()
    uid_file = workdir / "stream.uid"

    # 5.4.1, the UID written to a private file instead of the terminal
    args = ["--s2cs", hpc.address, "--server_cert", str(hpc.cert)]
    service = ["--remote_ip", "127.0.0.1", "--receiver_ports", str(sink.port)]
    out = s2uc("inbound_request", *args, *service, "--uid-file", str(uid_file)).stdout
    uid = uid_file.read_text().strip()
    assert stat.S_IMODE(uid_file.stat().st_mode) == 0o600
    assert uid not in out and "UID:" not in out
    listener = field(out, "Listeners")
    # The user gave a certificate here, so the instrument side will need its own, named too.
    assert (
        f"s2uc outbound_request --s2cs INSTRUMENT_S2CS:5000 --server_cert INSTRUMENT_CERT "
        f"--uid-file {uid_file} {listener}"
    ) in out

    # 5.5.2 with the file handed over
    port = inst.port_range[0]
    args = ["--s2cs", inst.address, "--server_cert", str(inst.cert)]
    local = ["--remote_ip", "127.0.0.1", "--receiver_ports", str(port)]
    out = s2uc("outbound_request", *args, *local, "--uid-file", str(uid_file), listener).stdout
    assert field(out, "Listeners") == f"127.0.0.1:{port}"
    assert uid not in out

    # 5.5.3: the data arrives
    data = os.urandom(1_000_000)
    assert send(("127.0.0.1", port), data) == (len(data), hashlib.sha256(data).hexdigest())
    sink.close()

    # 5.7, once from the file and once from stdin
    out = s2uc("release", "--uid-file", str(uid_file), *args).stdout
    assert "Released outbound proxy" in out and uid not in out
    result = s2uc_stdin(
        f"{uid}\n", "release", "--uid-file", "-", "--s2cs", hpc.address, "--server_cert", str(hpc.cert)
    )
    assert result.returncode == 0, result.stderr
    assert "Released inbound proxy" in result.stdout
    for gw in (hpc, inst):
        assert gw.call("status")["streams"] == []

    watch.stop()
    assert watch.ran("outbound_request") and watch.ran("release")  # it did see s2uc run
    assert any("haproxy" in c or "stunnel" in c for c in watch.seen)  # and the proxies
    assert watch.holding(uid) == []


def test_the_positional_uid_still_works_in_any_case(start_s2cs, workdir, watch):
    hpc = start_s2cs("hpc")
    inst = start_s2cs("instrument")
    sink = Sink()
    hpc_args = ["--s2cs", hpc.address, "--server_cert", str(hpc.cert)]
    out = s2uc(
        "inbound_request", *hpc_args, "--remote_ip", "127.0.0.1", "--receiver_ports", str(sink.port)
    ).stdout
    uid, listener = field(out, "UID"), field(out, "Listeners")
    inst_args = ["--s2cs", inst.address, "--server_cert", str(inst.cert)]
    out = s2uc("outbound_request", *inst_args, uid.upper(), listener).stdout  # copied from a mail
    assert field(out, "UID") == uid
    assert s2uc("status", uid.upper(), *inst_args, "--json").returncode == 0
    s2uc("release", uid.upper(), *inst_args)
    s2uc("release", f" {uid} ", *hpc_args)
    assert hpc.call("status")["streams"] == [] and inst.call("status")["streams"] == []
    watch.stop()
    assert watch.holding(uid)  # the watch sees what the --uid-file test says is not there


def test_an_invalid_uid_is_shown_in_full_to_its_owner_and_never_reaches_the_server(start_s2cs, workdir):
    hpc = start_s2cs("hpc")
    args = ["--s2cs", hpc.address, "--server_cert", str(hpc.cert)]
    typo = "0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5"  # a digit short
    before = hpc.log.read_text()
    for command in (["release", typo, *args], ["outbound_request", *args, typo, "127.0.0.1:9"]):
        result = s2uc(*command, check=False)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.splitlines()
        assert f"error: {typo!r} is not a stream UID" in line
    (workdir / "uid").write_text(f"{typo}\n")
    result = s2uc("release", "--uid-file", str(workdir / "uid"), *args, check=False)
    assert result.returncode == 2 and f"{typo!r} in {workdir / 'uid'}" in result.stderr
    assert hpc.log.read_text() == before  # the server heard nothing of it


def test_uid_file_mistakes_are_named_before_anything_happens(start_s2cs, workdir):
    hpc = start_s2cs("hpc")
    sink = Sink()
    args = ["--s2cs", hpc.address, "--server_cert", str(hpc.cert)]
    service = ["--remote_ip", "127.0.0.1", "--receiver_ports", str(sink.port)]

    nowhere = workdir / "no-such-dir" / "stream.uid"
    result = s2uc("inbound_request", *args, *service, "--uid-file", str(nowhere), check=False)
    assert result.returncode == 2 and f"--uid-file {nowhere}" in result.stderr
    assert hpc.call("status")["streams"] == []  # no stream whose UID nobody got

    missing = workdir / "missing.uid"
    result = s2uc("release", "--uid-file", str(missing), *args, check=False)
    assert result.returncode == 2 and f"cannot read {missing}" in result.stderr

    uid_file = workdir / "stream.uid"
    s2uc("inbound_request", *args, *service, "--uid-file", str(uid_file))
    uid = uid_file.read_text().strip()
    both = s2uc("release", uid, "--uid-file", str(uid_file), *args, check=False)
    assert both.returncode == 2 and "not both" in both.stderr
    neither = s2uc("release", *args, check=False)
    assert neither.returncode == 2 and "--uid-file" in neither.stderr
    one_too_many = s2uc(
        "outbound_request", *args, "--uid-file", str(uid_file), uid, "127.0.0.1:9", check=False
    )
    assert one_too_many.returncode == 2 and "not both" in one_too_many.stderr
    s2uc("release", "--uid-file", str(uid_file), *args)
