"""A gateway runs for months: proxies crash, s2cs is killed and restarted; streams must not notice."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import astuple

import psutil
import pytest

from scistream.errors import BackendFailed
from scistream.loopback import Sink, proxies_of, send
from scistream.s2cs.gateway import port_is_free
from scistream.s2ds.render import default_templates

from .conftest import BACKENDS, open_stream, pids_of, wait_for

EACH_BACKEND = pytest.mark.parametrize("backend", BACKENDS)


def _pids(gw, uid: str) -> dict[str, int]:
    streams = gw.call("status", uid=uid)["streams"]
    return {p["name"]: p["pid"] for s in streams for p in s["processes"]}


class LongSend:
    """300 MiB sent through a stream of 200 Mbit/s: 12 s, much longer than killing and
    restarting s2cs. Started once data reaches the sink."""

    SIZE = 300 << 20

    def __init__(self, port: int, sink: Sink) -> None:
        self.data = os.urandom(self.SIZE)
        self.sink = sink
        self.result: list[tuple[int, str]] = []
        address = ("127.0.0.1", port)
        self.thread = threading.Thread(target=lambda: self.result.append(send(address, self.data)))
        self.thread.start()
        wait_for(lambda: sink.received > 0, what="data flowing")

    def unfinished(self) -> bool:
        return self.sink.received < self.SIZE

    def delivered(self) -> bool:
        """Whether, once the sender is done, the sink says it got every byte in order."""
        self.thread.join(300)
        return self.result == [(self.SIZE, hashlib.sha256(self.data).hexdigest())]


@pytest.mark.parametrize("victim", ["proxy", "shaper"])
@EACH_BACKEND
def test_a_killed_process_is_restarted_and_the_listener_forwards_again(start_s2cs, victim, backend):
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    sink = Sink()
    uid, _, port = astuple(open_stream(hpc, inst, sink.port, rate=100_000))  # a rate: proxy and shaper
    before = _pids(hpc, uid)[victim]
    os.kill(before, signal.SIGKILL)

    def restarted() -> bool:
        stream = hpc.call("status", uid=uid)["streams"][0]
        return stream["state"] == "RUNNING" and stream["restarts"] == 1

    wait_for(restarted, timeout=10, what=f"restart of the {victim}")
    assert _pids(hpc, uid)[victim] != before
    data = os.urandom(1 << 20)
    assert send(("127.0.0.1", port), data) == (len(data), hashlib.sha256(data).hexdigest())


@EACH_BACKEND
def test_a_stream_keeps_flowing_while_s2cs_is_killed_and_restarted(start_s2cs, backend):
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    sink = Sink()
    uid, _, port = astuple(open_stream(hpc, inst, sink.port, rate=200_000))
    pids = _pids(hpc, uid)
    sending = LongSend(port, sink)
    hpc.stop(signal.SIGKILL)
    inst.stop(signal.SIGKILL)
    assert all(psutil.pid_exists(pid) for pid in pids.values()), "a process died with its s2cs"
    hpc.start()
    inst.start()
    assert sending.unfinished(), "the stream ended before s2cs was back: the test proved nothing"
    assert sending.delivered()

    assert _pids(hpc, uid) == pids  # re-adopted, not restarted
    assert hpc.call("status", uid=uid)["streams"][0]["state"] == "RUNNING"
    hpc.call("release", uid=uid)
    inst.call("release", uid=uid)
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids.values()
    )


@EACH_BACKEND
def test_sigterm_releases_everything_and_frees_the_whole_port_range(start_s2cs, backend):
    hpc = start_s2cs("hpc", backend=backend, ports=4)
    sink = Sink()
    uids = [
        hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=rate)["uid"]
        for rate in (0, 10_000)
    ]
    running = [pid for uid in uids for pid in _pids(hpc, uid).values()]
    assert sorted(proxies_of(hpc.state_dir)) == sorted(running)
    assert hpc.stop(signal.SIGTERM) == 0
    assert proxies_of(hpc.state_dir) == []
    leftovers = [p.name for p in (hpc.state_dir / "sessions").rglob("*")]
    assert leftovers == []
    assert json.loads((hpc.state_dir / "state.json").read_text())["sessions"] == []
    first, last = hpc.port_range
    assert all(port_is_free(p) for p in range(first, last + 1))


@EACH_BACKEND
def test_keep_streams_on_exit_leaves_the_proxies_for_the_next_s2cs(start_s2cs, backend):
    hpc = start_s2cs("hpc", "--keep-streams-on-exit", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    sink = Sink()
    uid, _, port = astuple(open_stream(hpc, inst, sink.port))
    pids = _pids(hpc, uid)
    assert hpc.stop(signal.SIGTERM) == 0
    data = os.urandom(100_000)
    assert send(("127.0.0.1", port), data) == (len(data), hashlib.sha256(data).hexdigest())
    hpc.start()
    assert _pids(hpc, uid) == pids
    hpc.call("release", uid=uid)
    assert proxies_of(hpc.state_dir) == []


@EACH_BACKEND
def test_the_next_s2cs_adopts_each_process_as_the_last_change_to_each_stream_left_it(start_s2cs, backend):
    """state.json is saved with only the changed stream's record built again: a restart in one
    stream, then a new stream, a release and s2cs's exit must leave every record as it is now."""
    hpc = start_s2cs("hpc", "--keep-streams-on-exit", backend=backend)
    sink = Sink()

    def inbound() -> str:
        return str(hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)["uid"])

    first, second, gone = inbound(), inbound(), inbound()
    killed = _pids(hpc, first)["proxy"]
    os.kill(killed, signal.SIGKILL)

    def restarted() -> bool:
        stream = hpc.call("status", uid=first)["streams"][0]
        return stream["state"] == "RUNNING" and stream["restarts"] == 1

    wait_for(restarted, timeout=10, what="restart of the proxy")
    hpc.call("release", uid=gone)
    third = inbound()
    before = {uid: _pids(hpc, uid) for uid in (first, second, third)}
    assert before[first]["proxy"] != killed
    assert hpc.stop(signal.SIGTERM) == 0
    hpc.start()
    assert {uid: _pids(hpc, uid) for uid in (first, second, third)} == before  # adopted, not restarted
    assert len(hpc.call("status")["streams"]) == 3  # the released one did not come back
    restarts = [hpc.call("status", uid=uid)["streams"][0]["restarts"] for uid in (first, second, third)]
    assert restarts == [1, 0, 0]
    for uid in (first, second, third):
        hpc.call("release", uid=uid)
    assert proxies_of(hpc.state_dir) == []


@EACH_BACKEND
def test_a_recycled_pid_in_the_state_file_is_left_alone(start_s2cs, backend):
    hpc = start_s2cs("hpc", "--keep-streams-on-exit", backend=backend)
    sink = Sink()
    uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)["uid"]
    proxy = _pids(hpc, uid)["proxy"]
    assert hpc.stop(signal.SIGTERM) == 0
    os.kill(proxy, signal.SIGKILL)
    # Another program now has the pid the state file names (as after a reboot or pid reuse).
    stranger = subprocess.Popen(["sleep", "300"])
    state = json.loads((hpc.state_dir / "state.json").read_text())
    state["sessions"][0]["processes"][0]["pid"] = stranger.pid
    (hpc.state_dir / "state.json").write_text(json.dumps(state))
    try:
        hpc.start()
        wait_for(lambda: hpc.call("status", uid=uid)["streams"][0]["state"] == "RUNNING", what="restart")
        assert stranger.poll() is None, "s2cs killed a process that was not its proxy"
        assert _pids(hpc, uid)["proxy"] not in (proxy, stranger.pid)
    finally:
        stranger.kill()
        stranger.wait()


@EACH_BACKEND
def test_a_process_whose_record_was_never_written_is_adopted_by_the_next_s2cs(start_s2cs, backend):
    """A proxy restarted while the state dir's disk was full runs with its new pid known only to
    its s2cs; killed before state.json could be written again, that s2cs left it to a next one
    that found the old pid dead. It ran on unknown, holding its port (docs/reliability.md finding
    6); then it was stopped and started anew, cutting its connections. Now it is taken over: its
    stream flows on through the kill and the restart, byte for byte."""
    hpc = start_s2cs("hpc", backend=backend)
    inst = start_s2cs("instrument", backend=backend)
    sink = Sink()
    uid, _, port = astuple(open_stream(hpc, inst, sink.port, rate=200_000))
    pids = _pids(hpc, uid)
    sending = LongSend(port, sink)
    hpc.stop(signal.SIGKILL)
    # What the failed save left: the pid of the proxy before its last restart, gone since.
    gone = subprocess.Popen(["true"])
    gone.wait()
    state = json.loads((hpc.state_dir / "state.json").read_text())
    (record,) = [p for p in state["sessions"][0]["processes"] if p["pid"] == pids["proxy"]]
    record["pid"] = gone.pid
    (hpc.state_dir / "state.json").write_text(json.dumps(state))

    hpc.start()
    assert sending.unfinished(), "the stream ended before s2cs was back: the test proved nothing"
    assert _pids(hpc, uid) == pids  # taken over, not started anew
    assert hpc.call("status", uid=uid)["streams"][0]["state"] == "RUNNING"
    assert sending.delivered()
    assert sorted(proxies_of(hpc.state_dir)) == sorted(pids.values())  # nothing else runs
    assert "re-adopted its proxy" in hpc.log.read_text()


@EACH_BACKEND
def test_a_proxy_that_keeps_failing_is_fatal_and_keeps_its_ports(start_s2cs, backend):
    hpc = start_s2cs("hpc", backend=backend, ports=2)
    sink = Sink()
    reply = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)
    uid = reply["uid"]
    # Somebody breaks the session's config by hand, then the proxy dies: every restart fails.
    (config,) = (hpc.state_dir / "sessions").glob("*/proxy.conf")
    config.write_text(
        "no-such-keyword = here\n" if backend == "stunnel" else "frontend x\n    no-such-keyword here\n"
    )
    os.kill(_pids(hpc, uid)["proxy"], signal.SIGKILL)

    def fatal() -> dict | None:
        stream = hpc.call("status", uid=uid)["streams"][0]
        return stream if stream["state"] == "FATAL" else None

    stream = wait_for(fatal, timeout=60, what="FATAL")
    assert "no-such-keyword" in stream["last_error"]  # HAProxy's own words reach the operator
    assert stream["restarts"] >= 1
    # Its port stays reserved: the next stream gets the other one.
    other = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)
    assert other["listeners"] != reply["listeners"]
    hpc.call("release", uid=uid)
    assert sorted(proxies_of(hpc.state_dir)) == sorted(_pids(hpc, other["uid"]).values())


@EACH_BACKEND
def test_create_release_cycles_leak_nothing(start_s2cs, backend):
    hpc = start_s2cs("hpc", backend=backend, ports=4)
    server = psutil.Process(hpc.proc.pid)
    sink = Sink()

    def cycle(i: int) -> None:
        uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=(i % 2) * 10_000)[
            "uid"
        ]
        hpc.call("release", uid=uid)

    cycle(1)  # warm up: lazily opened files and threads of the server count as the baseline

    def footprint() -> tuple:
        return (
            len(server.children(recursive=True)),
            server.num_fds(),
            sorted(p.name for p in hpc.state_dir.rglob("*")),
            hpc.call("info")["free_ports"],
        )

    def steady() -> tuple:
        """The footprint once it holds still: s2cs closes its end of a control connection after
        the client has read the reply, so the last request's socket may still be open."""
        seen = [footprint()]

        def held() -> bool:
            seen.append(footprint())
            return seen[-1] == seen[-2]

        wait_for(held, timeout=60, what="a footprint that holds still")
        return seen[-1]

    before = steady()
    for i in range(300):
        cycle(i)
    after = [footprint()]

    def as_before() -> bool:
        after.append(footprint())
        return after[-1] == before

    try:
        wait_for(as_before, timeout=60, what="the footprint of before the cycles")
    except AssertionError:
        assert after[-1] == before  # shows what differs


def test_an_operator_template_the_proxy_refuses_fails_the_request_in_the_proxys_words(start_s2cs, workdir):
    templates = workdir / "templates"
    shutil.copytree(default_templates(), templates)
    hpc = start_s2cs("hpc", "--templates", str(templates))
    sink = Sink()
    # 7 connections: a session unlike the samples the start-up and reload checks render (1 and 4).
    uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0, num_conn=7)["uid"]
    path = templates / "haproxy.cfg.j2"
    shipped = path.read_text()

    def reload(text: str) -> None:
        """An operator edits the template, with a typo only such a session meets, and reloads."""
        done = hpc.log.read_text().count("reloaded templates and policy")
        path.write_text(text)
        assert hpc.proc is not None
        hpc.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: hpc.log.read_text().count("reloaded templates and policy") > done, what="reload")

    reload(shipped.replace("clitcpka", "{{ 'clitcpak' if proxy.num_conn == 7 else 'clitcpka' }}"))
    with pytest.raises(BackendFailed, match="clitcpak"):
        hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0, num_conn=7)
    assert hpc.call("info")["free_ports"] == 9  # the failed request took no port
    # A template that names a variable that does not exist: the same, not a crash.
    reload(shipped.replace("proxy.num_conn + 256", "proxy.no_such_field if proxy.num_conn == 7 else 256"))
    with pytest.raises(BackendFailed, match="no_such_field"):
        hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0, num_conn=7)

    # s2cs restarts while the template is broken and the proxy is gone: the stream comes back
    # with the config it last ran with.
    hpc.stop(signal.SIGKILL)
    (proxy,) = pids_of(hpc.state_dir, "haproxy")
    os.kill(proxy, signal.SIGKILL)
    hpc.start()
    wait_for(lambda: hpc.call("status", uid=uid)["streams"][0]["state"] == "RUNNING", what="restart")
    assert "starting it again with its last config" in hpc.log.read_text()
    # Without that config either, s2cs still starts, and the stream says why it cannot run.
    hpc.stop(signal.SIGKILL)
    (proxy,) = pids_of(hpc.state_dir, "haproxy")
    os.kill(proxy, signal.SIGKILL)
    (config,) = (hpc.state_dir / "sessions").glob("*/proxy.conf")
    config.unlink()
    hpc.start()
    stream = hpc.call("status", uid=uid)["streams"][0]
    assert stream["state"] == "FATAL"
    assert "no_such_field" in stream["last_error"]
    hpc.call("release", uid=uid)
    assert proxies_of(hpc.state_dir) == []


def test_sigterm_during_requests_leaves_nothing_behind(start_s2cs):
    hpc = start_s2cs("hpc", ports=10)
    sink = Sink()
    results: list[object] = []

    def request() -> None:
        try:
            results.append(hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port]))
        except Exception as exc:  # refused or cut off by the shutdown: both are fine here
            results.append(exc)

    threads = [threading.Thread(target=request) for _ in range(10)]
    for t in threads:
        t.start()
    # The first proxy is up: some proxies started, some starting, some requests still queued.
    deadline = time.monotonic() + 60
    while not proxies_of(hpc.state_dir) and not results:
        assert time.monotonic() < deadline, "no request got as far as a proxy"
        time.sleep(0.02)
    assert hpc.stop(signal.SIGTERM) == 0
    for t in threads:
        t.join(60)
    assert len(results) == 10
    assert proxies_of(hpc.state_dir) == []
    assert list((hpc.state_dir / "sessions").iterdir()) == []


def test_a_restart_leaves_an_operators_tail_of_a_proxy_log_alone(start_s2cs):
    hpc = start_s2cs("hpc")
    sink = Sink()
    uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)["uid"]
    pids = _pids(hpc, uid)
    (log,) = (hpc.state_dir / "sessions").glob("*/proxy.log")
    # As from an operator's shell: a job of its own, in its own process group.
    tail = subprocess.Popen(["tail", "-f", str(log)], stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        hpc.stop(signal.SIGKILL)
        hpc.start()
        assert _pids(hpc, uid) == pids
        assert tail.poll() is None, "the restarted s2cs killed the operator's tail -f"
        hpc.call("release", uid=uid)
        assert tail.poll() is None, "releasing the stream killed the operator's tail -f"
    finally:
        tail.kill()
        tail.wait()


def test_a_stream_being_released_when_s2cs_died_is_ended_by_the_next_one(start_s2cs):
    hpc = start_s2cs("hpc", "--keep-streams-on-exit", ports=4)
    sink = Sink()
    kept, released = (
        hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])["uid"] for _ in range(2)
    )
    kept_pids, released_pids = _pids(hpc, kept), _pids(hpc, released)
    assert hpc.stop(signal.SIGTERM) == 0
    # s2cs died while it released the second stream: its record says so, its processes still run.
    path = hpc.state_dir / "state.json"
    state = json.loads(path.read_text())
    (record,) = (s for s in state["sessions"] if s["uid"] == released)
    record["phase"] = "RELEASING"
    path.write_text(json.dumps(state))

    hpc.start()

    assert [s["uid"] for s in hpc.call("status")["streams"]] == [kept[:8]]  # a listing shows prefixes
    assert _pids(hpc, kept) == kept_pids
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in released_pids.values()
    )
    assert len(list((hpc.state_dir / "sessions").iterdir())) == 1  # its key and config are gone
    assert hpc.call("info")["free_ports"] == 3  # the kept stream holds one port, the other none
    hpc.call("release", uid=kept)
    assert proxies_of(hpc.state_dir) == []
