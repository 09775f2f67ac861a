"""The gateway's start-up and its edges: what an operator's mistake or an unlucky moment must not do."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
from dataclasses import astuple
from pathlib import Path

import psutil
import pytest

from scistream.errors import Conflict, NoPorts, NotFound
from scistream.loopback import BIN, S2csProcess, Sink, free_port, free_port_range, proxies_of, send
from scistream.s2cs.certs import generate
from scistream.s2ds.haproxy import find_binary

from .conftest import open_stream, port_of, s2uc, wait_for


def _pids(gw: S2csProcess, uid: str) -> dict[str, int]:
    streams = gw.call("status", uid=uid)["streams"]
    return {p["name"]: p["pid"] for s in streams for p in s["processes"]}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _fails(argv: list[str]) -> tuple[int, list[str]]:
    """Run an s2cs that must not start: its exit status and what it printed."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return result.returncode, (result.stdout + result.stderr).strip().splitlines()


def _contents(directory: Path) -> dict[str, bytes]:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


class SlowHaproxy:
    """An HAProxy that waits a few seconds at one step (its config check, or its start), so a
    test can act while s2cs waits for it. `slow("check")` arms it; `waiting("check")` is true once
    a process of it has reached that step."""

    SECONDS = 5

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "haproxy"
        self.path.write_text(
            "#!/bin/bash\n"
            # "check": a request's config, in the state dir; "precheck": the start-up template check
            'case " $* " in *" -v "*) step=version ;; *" -c "*"/sessions/"*) step=check ;;\n'
            '    *" -c "*) step=precheck ;; *) step=run ;; esac\n'
            f'if [ -e "{directory}/slow-$step" ]; then\n'
            f'    touch "{directory}/waiting-$step"; sleep {self.SECONDS}\n'
            "fi\n"
            # exec -a: the proxy's command line stays the one s2cs ran (and records)
            f'exec -a "$0" {find_binary(None)} "$@"\n'
        )
        self.path.chmod(0o755)

    def slow(self, step: str) -> None:
        (self.directory / f"slow-{step}").touch()

    def fast(self, step: str) -> None:
        (self.directory / f"slow-{step}").unlink(missing_ok=True)

    def waiting(self, step: str) -> bool:
        return (self.directory / f"waiting-{step}").exists()


@pytest.fixture
def slow_haproxy(workdir: Path) -> SlowHaproxy:
    directory = workdir / "bin"
    directory.mkdir()
    return SlowHaproxy(directory)


# --- one state dir, one s2cs --------------------------------------------------------------------


@pytest.mark.parametrize("port", ["the same port", "another port"])
def test_a_second_s2cs_on_the_same_state_dir_exits_and_touches_nothing(start_s2cs, port):
    hpc = start_s2cs("hpc")
    inst = start_s2cs("instrument")
    sink = Sink()
    uid, _, data_port = astuple(open_stream(hpc, inst, sink.port))
    pids = _pids(hpc, uid)
    before = _contents(hpc.state_dir)

    second = S2csProcess("again", hpc.state_dir, hpc.port_range, hpc.extra)
    second.port = hpc.port if port == "the same port" else free_port()
    status, output = _fails(second.argv())

    assert status != 0
    assert len(output) == 1, output
    assert output[0].startswith("error: ") and f"pid {hpc.proc.pid}" in output[0], output
    assert _contents(hpc.state_dir) == before  # not a file written, deleted or changed
    assert _pids(hpc, uid) == pids
    assert hpc.call("status", uid=uid)["streams"][0]["state"] == "RUNNING"
    data = os.urandom(1 << 20)
    assert send(("127.0.0.1", data_port), data) == (len(data), hashlib.sha256(data).hexdigest())


def test_a_busy_control_port_fails_before_any_stream_is_adopted(start_s2cs):
    hpc = start_s2cs("hpc", "--keep-streams-on-exit")
    sink = Sink()
    uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])["uid"]
    pids = _pids(hpc, uid)
    assert hpc.stop(signal.SIGTERM) == 0  # the streams stay, for the next s2cs
    other = start_s2cs("other")

    hpc.port = other.port  # the operator starts it again on a port another s2cs holds
    status, output = _fails(hpc.argv())

    assert status == 1
    assert output[-1].startswith(f"error: cannot listen on port {other.port}"), output
    assert not any("Traceback" in line for line in output), output
    assert all(_alive(pid) for pid in pids.values()), "a failed start stopped streams it had not made"
    hpc.port = free_port()
    hpc.start()
    assert _pids(hpc, uid) == pids
    assert hpc.call("status", uid=uid)["streams"][0]["state"] == "RUNNING"


# --- checked at start, said in one line ---------------------------------------------------------


def _argv(workdir: Path, *extra: str) -> list[str]:
    first, last = free_port_range(4)
    return [
        str(BIN / "s2cs"),
        "--listener-ip", "127.0.0.1",
        "--port", str(free_port()),
        "--port-range", f"{first}-{last}",
        *extra,
    ]  # fmt: skip


def test_a_state_dir_that_is_a_file_is_one_error_line(workdir):
    path = workdir / "state"
    path.write_text("not a directory\n")
    status, output = _fails(_argv(workdir, "--state-dir", str(path)))
    assert status == 2
    assert output == [f"error: state dir {path} is not a directory"], output
    assert path.read_text() == "not a directory\n"


def test_a_bind_ip_that_is_not_an_address_of_this_host_is_refused_at_start(workdir):
    status, output = _fails(_argv(workdir, "--state-dir", str(workdir / "s"), "--bind-ip", "192.0.2.7"))
    assert status == 2
    assert len(output) == 1, output
    assert output[0].startswith("error: --bind-ip 192.0.2.7 is not an address of this host"), output


def _broken_pairs(workdir: Path) -> dict[str, tuple[Path, Path, str]]:
    crt, key = workdir / "s2cs.crt", workdir / "s2cs.key"
    generate(crt, key, "127.0.0.1")
    other_crt, other_key = workdir / "other.crt", workdir / "other.key"
    generate(other_crt, other_key, "127.0.0.1")
    garbage = workdir / "garbage.pem"
    garbage.write_text("hello\n")
    empty = workdir / "empty.pem"
    empty.write_bytes(b"")
    der = workdir / "s2cs.der"
    subprocess.run(["openssl", "x509", "-in", crt, "-outform", "DER", "-out", der], check=True)
    return {
        "certificate not PEM": (garbage, key, f"{garbage} is not a PEM certificate"),
        "certificate in DER": (der, key, f"{der} is not a PEM certificate"),
        "key empty": (crt, empty, f"{empty} is not a PEM private key"),
        "key of another certificate": (crt, other_key, f"{other_key} is not the key of {crt}"),
        "certificate a directory": (workdir, key, f"{workdir} is not a file"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "certificate not PEM",
        "certificate in DER",
        "key empty",
        "key of another certificate",
        "certificate a directory",
    ],
)
def test_a_bad_operator_certificate_or_key_is_one_error_line(workdir, case):
    crt, key, expected = _broken_pairs(workdir)[case]
    status, output = _fails(
        _argv(workdir, "--state-dir", str(workdir / "s"), "--server-crt", str(crt), "--server-key", str(key))
    )
    assert status == 2
    assert len(output) == 1, output
    assert output[0].startswith(f"error: {expected}"), output


# --- a damaged state.json -----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["[]", '"x"', "", '{"version": 1, "sessions": {}}'])
def test_a_damaged_state_file_is_refused_in_one_line_and_its_good_copy_brings_the_streams_back(
    start_s2cs, damage
):
    hpc = start_s2cs("hpc", "--keep-streams-on-exit")
    inst = start_s2cs("instrument")
    sink = Sink()
    uid, _, data_port = astuple(open_stream(hpc, inst, sink.port))
    pids = _pids(hpc, uid)
    assert hpc.stop(signal.SIGTERM) == 0
    state = hpc.state_dir / "state.json"
    state.write_text(damage)

    status, output = _fails(hpc.argv())

    assert status == 2
    assert len(output) == 1, output
    line = output[0]
    assert line.startswith(f"error: {state} is damaged"), line
    assert f"{state}.bak" in line  # the good copy, named
    assert all(_alive(pid) for pid in pids.values()), "a refused start stopped running streams"
    # The operator does what the line says: the good copy goes back, the streams come back.
    os.replace(f"{state}.bak", state)
    hpc.start()
    assert _pids(hpc, uid) == pids  # the very processes: the copy is one change behind, no more
    data = os.urandom(1 << 20)
    assert send(("127.0.0.1", data_port), data) == (len(data), hashlib.sha256(data).hexdigest())


# --- SIGTERM while s2cs recovers ----------------------------------------------------------------


def test_sigterm_during_the_start_up_template_check_leaves_no_scratch_files(
    start_s2cs, slow_haproxy, workdir
):
    scratch = workdir / "tmp"
    scratch.mkdir()
    hpc = start_s2cs("hpc", "--haproxy-bin", str(slow_haproxy.path))
    assert hpc.stop(signal.SIGTERM) == 0
    slow_haproxy.slow("precheck")
    hpc.env = {**(hpc.env or {}), "TMPDIR": str(scratch)}
    hpc.launch()
    wait_for(lambda: slow_haproxy.waiting("precheck"), what="the start-up check of the templates")
    assert list(scratch.iterdir())  # the rendered samples are there while they are checked
    assert hpc.stop(signal.SIGTERM) == 128 + signal.SIGTERM  # not killed by the signal: it exits
    assert "stopped before it started serving" in hpc.log.read_text()
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("keep", [False, True], ids=["release", "keep-streams-on-exit"])
def test_sigterm_during_recovery_still_ends_in_a_clean_stop(start_s2cs, slow_haproxy, keep):
    hpc = start_s2cs("hpc", "--keep-streams-on-exit", "--haproxy-bin", str(slow_haproxy.path))
    sink = Sink()
    alive, gone = (
        hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)["uid"]
        for _ in range(2)
    )
    alive_pid, gone_pid = _pids(hpc, alive)["proxy"], _pids(hpc, gone)["proxy"]
    assert hpc.stop(signal.SIGTERM) == 0
    os.kill(gone_pid, signal.SIGKILL)  # recovery writes its config again, and HAProxy checks it: slowly
    slow_haproxy.slow("check")
    if not keep:
        hpc.extra = tuple(arg for arg in hpc.extra if arg != "--keep-streams-on-exit")
    hpc.launch()
    wait_for(lambda: slow_haproxy.waiting("check"), what="recovery checking a config")

    assert hpc.stop(signal.SIGTERM) == 0

    state = json.loads((hpc.state_dir / "state.json").read_text())
    if keep:
        assert _alive(alive_pid)
        assert sorted(s["uid"] for s in state["sessions"]) == sorted([alive, gone])
        slow_haproxy.fast("check")
        hpc.start()
        assert _pids(hpc, alive)["proxy"] == alive_pid
        wait_for(lambda: hpc.call("status", uid=gone)["streams"][0]["state"] == "RUNNING", what="restart")
    else:
        assert not _alive(alive_pid)
        assert proxies_of(hpc.state_dir) == []
        assert list((hpc.state_dir / "sessions").iterdir()) == []  # no key, no config left
        assert state["sessions"] == []
        assert json.loads((hpc.state_dir / "state.json.bak").read_text())["sessions"] == []


# --- release while the same stream is still starting --------------------------------------------


@pytest.mark.parametrize("step", ["check", "run"], ids=["checking its config", "starting its proxy"])
def test_a_release_while_the_outbound_starts_is_refused_and_the_stream_stays_whole(
    start_s2cs, slow_haproxy, step
):
    hpc = start_s2cs("hpc")
    inst = start_s2cs("instrument", "--haproxy-bin", str(slow_haproxy.path), ports=2)
    sink = Sink()
    inbound = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])
    uid = inbound["uid"]
    slow_haproxy.slow(step)
    replies: list[object] = []

    def outbound() -> None:
        try:
            replies.append(inst.call("outbound", uid=uid, remote_listeners=inbound["listeners"]))
        except Exception as exc:
            replies.append(exc)

    thread = threading.Thread(target=outbound)
    thread.start()
    wait_for(lambda: slow_haproxy.waiting(step), what=f"the outbound proxy {step}")

    with pytest.raises(Conflict, match="still starting"):
        inst.call("release", uid=uid)
    thread.join(120)

    (reply,) = replies
    assert isinstance(reply, dict), reply
    slow_haproxy.fast(step)
    assert inst.call("status", uid=uid)["streams"][0]["state"] == "RUNNING"
    data = os.urandom(1 << 20)
    address = ("127.0.0.1", port_of(reply["listeners"][0]))
    assert send(address, data) == (len(data), hashlib.sha256(data).hexdigest())
    inst.call("release", uid=uid)
    with pytest.raises(NotFound):
        inst.call("release", uid=uid)
    assert inst.call("info")["free_ports"] == 2
    # Each port goes to one new stream: none was freed a second time while another stream held it.
    listeners = [
        inst.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)["listeners"][0]
        for _ in range(2)
    ]
    assert len(set(listeners)) == 2
    with pytest.raises(NoPorts):
        inst.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)


# --- s2cs killed while a request starts a proxy -------------------------------------------------


def test_a_proxy_starting_when_s2cs_is_killed_is_stopped_by_the_next_one(start_s2cs, slow_haproxy):
    hpc = start_s2cs("hpc", "--haproxy-bin", str(slow_haproxy.path), ports=2)
    sink = Sink()
    slow_haproxy.slow("run")
    replies: list[object] = []

    def inbound() -> None:
        try:
            replies.append(hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0))
        except Exception as exc:
            replies.append(exc)

    thread = threading.Thread(target=inbound)
    thread.start()
    wait_for(lambda: slow_haproxy.waiting("run"), what="the proxy starting")
    hpc.stop(signal.SIGKILL)
    thread.join(120)
    assert not isinstance(replies[0], dict), "the request answered before s2cs was killed"

    # The proxy goes on starting without its s2cs, and is soon an HAProxy like any other. The
    # session's shaper may still be in its gate, waiting for a word from the killed s2cs: that
    # gate ends without running the shaper, so it may be gone (or a zombie, with no command line)
    # by the time it is looked at again.
    def orphaned() -> list[int]:
        wrapper = str(slow_haproxy.path)
        found = []
        for pid in proxies_of(hpc.state_dir):
            try:
                if psutil.Process(pid).cmdline()[:1] == [wrapper]:
                    found.append(pid)
            except psutil.NoSuchProcess:
                continue
        return found

    orphan = wait_for(orphaned, what="the orphaned proxy running")
    slow_haproxy.fast("run")

    hpc.start()

    # Its user never got an answer, so no stream exists: nothing of it may keep a port.
    assert hpc.call("status")["streams"] == []
    assert not any(_alive(pid) for pid in orphan)
    assert proxies_of(hpc.state_dir) == []
    assert list((hpc.state_dir / "sessions").iterdir()) == []
    assert hpc.call("info")["free_ports"] == 2


def test_a_request_whose_shaper_starts_before_its_proxy_config_is_written_is_served(workdir):
    """A request starts the shaper while another thread writes and checks the proxy's config
    (Gateway._launch). The shaper's sockets are in the session's run/ directory: under load the
    shaper once came first, found no run/ yet and failed the request ("shaper did not start").
    Here the config is written only once the shaper listens or has ended, whichever comes."""
    from scistream.protocol import InboundRequest, Limits, parse_request
    from scistream.s2cs.auth import NoAuth
    from scistream.s2cs.gateway import Gateway, Settings
    from scistream.s2cs.host import Host
    from scistream.s2cs.policy import Own, build_policy
    from scistream.s2ds.haproxy import HaproxyBackend
    from scistream.s2ds.render import ProxySpec, SessionFiles, default_templates, environment

    def shaper_settled(files: SessionFiles) -> bool:
        for child in psutil.Process().children():
            try:
                if str(files.shaper_socket(0)) in child.cmdline():
                    return child.status() == psutil.STATUS_ZOMBIE or files.shaper_socket(0).exists()
            except psutil.Error:
                continue
        return False

    class LateConfig(HaproxyBackend):
        def write_config(self, uid: str, spec: ProxySpec, files: SessionFiles) -> None:
            # Before the fix the shaper could not listen: the session had no run/ directory yet.
            wait_for(lambda: shaper_settled(files), what="the shaper to listen or end")
            super().write_config(uid, spec, files)

    service = Sink()
    ports = free_port_range(4)
    settings = Settings("127.0.0.1", None, ports, workdir / "state")
    policy = build_policy(Own(frozenset(), 5000, ports), [], allow_targets=["127.0.0.1/32"])
    backend = LateConfig(environment(None, default_templates()))
    gateway = Gateway(NoAuth(), Host(settings, backend, policy=policy))
    gateway.open()
    gateway.start()
    try:
        request = parse_request(
            {"v": 1, "op": "inbound", "remote_ip": "127.0.0.1", "receiver_ports": [service.port]}
        ).body
        assert isinstance(request, InboundRequest)
        assert request.limits == Limits(5, 10000)  # the default rate: a shaper behind the proxy
        reply = gateway.inbound(request, None)
        assert reply["ok"] and reply["listeners"]
    finally:
        gateway.close()
        service.close()


# Streams enough that `status` of all of them is larger than a reply may be (64 KiB, about 420
# bytes a stream): HAProxy streams without a rate, one process each.
MANY = 180


def test_status_of_more_streams_than_a_reply_holds_shows_those_that_fit_and_counts_the_rest(start_s2cs):
    """A gateway with a few hundred streams: `s2uc status` of all of them. The reply would be
    larger than 64 KiB, the most one may be; s2cs then sent nothing at all, and s2uc said the
    gateway had not answered."""
    hpc = start_s2cs("hpc", ports=MANY)
    service = free_port()  # nothing needs to listen there: no data flows
    inbound = {"remote_ip": "127.0.0.1", "receiver_ports": [service], "rate": 0}
    uids = [hpc.call("inbound", **inbound)["uid"] for _ in range(MANY)]
    at = ["--s2cs", hpc.address, "--server_cert", str(hpc.cert)]

    reply = json.loads(s2uc("status", *at, "--json").stdout)
    assert 0 < reply["omitted"] < MANY  # more than a reply holds, and most of them shown
    assert len(reply["streams"]) + reply["omitted"] == MANY
    shown = s2uc("status", *at).stdout
    assert f"... and {reply['omitted']} more stream(s)" in shown
    assert len([line for line in shown.splitlines() if " RUNNING " in line]) == len(reply["streams"])
    # Each stream can still be asked for by its UID, the last one made too.
    (last,) = json.loads(s2uc("status", uids[-1], *at, "--json").stdout)["streams"]
    assert last["uid"] == uids[-1] and last["state"] == "RUNNING"
