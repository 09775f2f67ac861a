"""`s2cs --runtime docker`: each stream's proxy (and shaper) in a container of its own, on a real
Docker engine, from the project's image; the same lifecycle as processes.

These run in the host's network namespace (containers on host networking cannot see a private
one), on ports taken free at run time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from scistream.errors import ScistreamError
from scistream.loopback import BIN, Echo, S2csProcess, Sink, free_port_range, send
from scistream.s2cs.gateway import port_is_free
from scistream.s2ds.containers import DEFAULT_LIMITS, LABEL, gateway_tag
from tests.integration.conftest import BACKENDS, field, open_stream, port_of, s2uc, wait_for
from tests.integration.test_diagnosis import HANDSHAKE, send_and_lose, shows, status
from tests.integration.test_streams import RATE_TOLERANCE, _send_and_read_back, _steady_rate

EACH_BACKEND = pytest.mark.parametrize("backend", BACKENDS)


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    client = docker.from_env(timeout=60)
    yield client
    client.close()


def containers_of(engine: Any, gw: S2csProcess) -> list[Any]:
    """Every container of this gateway, running or not."""
    tag = gateway_tag(gw.state_dir)
    return list(
        engine.containers.list(all=True, filters={"label": f"{LABEL}.gateway={tag}"}, ignore_removed=True)
    )


@pytest.fixture
def start(workdir: Path, image: str, engine: Any) -> Iterator[Callable[..., S2csProcess]]:
    """s2cs on the docker runtime (or, with runtime="process", on processes) on host loopback."""
    started: list[S2csProcess] = []

    def run(
        name: str, *extra: str, backend: str = "haproxy", runtime: str = "docker", use: str = image
    ) -> S2csProcess:
        where = ("--runtime", "docker", "--image", use) if runtime == "docker" else ()
        gw = S2csProcess(name, workdir / name, free_port_range(10), ("--type", backend, *where, *extra))
        started.append(gw)
        gw.start(timeout=60)
        return gw

    yield run
    for gw in started:
        gw.stop()
    for gw in started:  # a failed test leaves no container for the next one
        for container in containers_of(engine, gw):
            container.remove(force=True)


def stream_containers(engine: Any, gw: S2csProcess) -> dict[str, Any]:
    """The running containers of a gateway by kind ("proxy", "shaper")."""
    return {c.labels[f"{LABEL}.process"]: c for c in containers_of(engine, gw) if c.status == "running"}


@EACH_BACKEND
def test_the_guides_flow_on_containers_carries_64_mib_byte_exact(start, engine, image, backend):
    hpc = start("hpc", backend=backend)
    inst = start("instrument", backend=backend)
    sink = Sink()
    hpc_args = ["--s2cs", hpc.address, "--server_cert", str(hpc.cert)]
    out = s2uc(
        "inbound_request",
        *hpc_args,
        "--rate",
        "0",
        "--remote_ip",
        "127.0.0.1",
        "--receiver_ports",
        str(sink.port),
    ).stdout
    uid, listener = field(out, "UID"), field(out, "Listeners")
    inst_args = ["--s2cs", inst.address, "--server_cert", str(inst.cert)]
    out = s2uc("outbound_request", *inst_args, "--rate", "0", uid, listener).stdout
    port = port_of(field(out, "Listeners"))

    # The proxies are containers of the image, not processes of s2cs.
    for gw in (hpc, inst):
        running = stream_containers(engine, gw)
        assert "proxy" in running, [c.name for c in containers_of(engine, gw)]
        assert running["proxy"].attrs["HostConfig"]["NetworkMode"] == "host"
        assert running["proxy"].attrs["Config"]["Image"] == image

    data = os.urandom(64 << 20)
    assert send(("127.0.0.1", port), data) == (len(data), hashlib.sha256(data).hexdigest())
    sink.close()
    status = s2uc("status", uid, *inst_args, "--json").stdout
    assert '"RUNNING"' in status

    s2uc("release", uid, *inst_args)
    s2uc("release", uid, *hpc_args)
    for gw in (hpc, inst):
        assert containers_of(engine, gw) == []


@EACH_BACKEND
def test_rate_and_num_conn_are_enforced_as_on_processes(start, engine, backend):
    """--rate 8000 (kb/s) over 4 connections: 8 Mbit/s each way within 15%, with the shaper in
    a container of its own; then a connection beyond num_conn waits."""
    hpc = start("hpc", backend=backend)
    inst = start("instrument", backend=backend)
    service = Echo()
    port = open_stream(hpc, inst, service.port, rate=8000, num_conn=4).port
    assert set(stream_containers(engine, inst)) == {"proxy", "shaper"}
    back = _send_and_read_back(port, seconds=6.0, connections=4)
    assert _steady_rate(service.marks) == pytest.approx(8e6, rel=RATE_TOLERANCE)
    assert _steady_rate(back) == pytest.approx(8e6, rel=RATE_TOLERANCE)

    held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(4)]
    for sock in held:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
    fifth = socket.create_connection(("127.0.0.1", port), timeout=30)
    fifth.sendall(b"ping")
    fifth.settimeout(2)
    with pytest.raises(TimeoutError):
        fifth.recv(4)  # the fifth waits for a place
    held[0].close()
    fifth.settimeout(30)
    assert fifth.recv(4) == b"ping"
    for sock in (*held[1:], fifth):
        sock.close()
    service.close()


def test_a_killed_container_is_started_again_and_counted(start, engine):
    hpc = start("hpc")
    inst = start("instrument")
    sink = Sink()
    stream = open_stream(hpc, inst, sink.port, rate=0)
    before = stream_containers(engine, hpc)["proxy"]
    subprocess.run(["docker", "kill", before.name], check=True, capture_output=True, timeout=60)

    def restarted() -> dict[str, Any] | None:
        found = hpc.call("status", uid=stream.uid)["streams"][0]
        return found if found["state"] == "RUNNING" and found["restarts"] >= 1 else None

    shown = wait_for(restarted, 60, "the proxy's container running again")
    assert shown["restarts"] == 1
    after = stream_containers(engine, hpc)["proxy"]
    assert after.id != before.id and after.name == before.name  # a new container, the same name
    assert len(containers_of(engine, hpc)) == 2  # the proxy's and the shaper's: the killed one is removed
    data = os.urandom(1 << 20)
    assert send(("127.0.0.1", stream.port), data) == (len(data), hashlib.sha256(data).hexdigest())
    sink.close()


def test_a_restarted_s2cs_readopts_its_containers_and_sigterm_removes_them(start, engine):
    hpc = start("hpc")
    inst = start("instrument")
    sink = Sink()
    stream = open_stream(hpc, inst, sink.port, rate=20000)  # a shaper too
    ids = {c.id for c in containers_of(engine, inst)}
    assert len(ids) == 2

    inst.stop(signal.SIGKILL)
    inst.start(timeout=60)
    assert {c.id for c in containers_of(engine, inst)} == ids  # the same ones, none added
    found = inst.call("status", uid=stream.uid)["streams"][0]
    assert found["state"] == "RUNNING" and found["restarts"] == 0
    assert "re-adopted" in inst.log.read_text()
    # Its output goes on being copied into the session's log, without a line twice.
    shaper_log = inst.state_dir / "sessions" / only_session(inst) / "shaper.log"
    before = shaper_log.read_text().splitlines()
    assert before and len(set(before)) == len(before), before
    data = os.urandom(1 << 20)
    assert send(("127.0.0.1", stream.port), data) == (len(data), hashlib.sha256(data).hexdigest())
    sink.close()

    assert inst.stop(signal.SIGTERM) == 0
    assert containers_of(engine, inst) == []


def test_release_leaves_no_container_no_file_and_no_port(start, engine):
    hpc = start("hpc")
    inst = start("instrument")
    sink = Sink()
    stream = open_stream(hpc, inst, sink.port, rate=20000)
    sessions = inst.state_dir / "sessions"
    assert len(list(sessions.iterdir())) == 1
    inst.call("release", uid=stream.uid)
    hpc.call("release", uid=stream.uid)
    for gw in (hpc, inst):
        assert containers_of(engine, gw) == []
        assert list((gw.state_dir / "sessions").iterdir()) == []
        first, last = gw.port_range
        assert all(port_is_free(p) for p in range(first, last + 1))
    sink.close()


def test_a_pair_of_one_gateway_on_processes_and_one_on_containers(start, engine):
    hpc = start("hpc", runtime="process", backend="stunnel")
    inst = start("instrument", backend="haproxy")
    sink = Sink()
    stream = open_stream(hpc, inst, sink.port, rate=0)
    assert containers_of(engine, hpc) == [] and set(stream_containers(engine, inst)) == {"proxy", "shaper"}
    data = os.urandom(16 << 20)
    assert send(("127.0.0.1", stream.port), data) == (len(data), hashlib.sha256(data).hexdigest())
    sink.close()


def test_engine_errors_fail_the_request_with_one_line(start, workdir):
    missing = start("hpc", use="scistream:no-such-version")
    assert "runtime docker: WARNING: the image scistream:no-such-version" in missing.log.read_text()
    with pytest.raises(ScistreamError) as failed:
        missing.call("inbound", remote_ip="127.0.0.1", receiver_ports=[5001])
    message = str(failed.value)
    assert "the image scistream:no-such-version is not on this Docker engine" in message
    assert "make images" in message and "\n" not in message.strip()

    env = {"DOCKER_HOST": f"unix://{workdir}/no-engine.sock"}
    gw = S2csProcess("nodaemon", workdir / "nodaemon", free_port_range(4), ("--runtime", "docker"), env)
    gw.start(timeout=60)
    try:
        assert "runtime docker: WARNING: cannot reach the Docker engine" in gw.log.read_text()
        with pytest.raises(ScistreamError) as failed:
            gw.call("inbound", remote_ip="127.0.0.1", receiver_ports=[5001])
        assert "cannot reach the Docker engine" in str(failed.value)
        assert gw.call("status")["streams"] == []  # nothing half-made is kept
    finally:
        gw.stop()


def test_the_policys_limits_are_the_containers_limits(start, workdir, engine):
    policy = workdir / "policy.toml"
    policy.write_text('targets = ["127.0.0.1/32"]\n\n[containers]\nmemory = "128M"\ncpus = 0.5\npids = 64\n')
    hpc = start("hpc", "--policy", str(policy))
    sink = Sink()
    hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])
    limits = stream_containers(engine, hpc)["proxy"].attrs["HostConfig"]
    assert (limits["Memory"], limits["NanoCpus"], limits["PidsLimit"]) == (128 << 20, 500_000_000, 64)
    assert limits["CapDrop"] == ["ALL"] and limits["ReadonlyRootfs"] is True
    sink.close()


def test_a_wrong_uid_is_diagnosed_from_the_containers_output(start, image):
    """The engine keeps the proxies' output and s2cs reads it as a process's log: `s2uc status`
    names the cause, and `--log` shows the proxy's lines."""
    hpc = start("hpc")
    inst = start("instrument")
    sink = Sink()
    uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])["uid"]
    listener = hpc.call("status", uid=uid)["streams"][0]["listeners"]
    wrong = str(uuid.uuid4())
    out = inst.call("outbound", uid=wrong, remote_listeners=listener)
    send_and_lose(port_of(out["listeners"][0]))
    shown = shows(hpc, uid, HANDSHAKE)
    assert "failed: the peer at 127.0.0.1 did not present" in shown
    engine_log = subprocess.run(
        ["docker", "logs", f"scistream-{gateway_tag(hpc.state_dir)}-{only_session(hpc)}-proxy"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    logged = status(hpc, uid, "--log")
    last = [line for line in (engine_log.stdout + engine_log.stderr).splitlines() if line.strip()][-1]
    assert last.strip() in logged  # the engine's copy and the one shown to the owner agree
    sink.close()


def only_session(gw: S2csProcess) -> str:
    (session,) = (gw.state_dir / "sessions").iterdir()
    return session.name


def test_a_container_no_stream_owns_is_removed_when_s2cs_starts(start, engine, image):
    """Left by an s2cs that died while it started a proxy: labelled as this gateway's, for a
    session state.json does not keep."""
    hpc = start("hpc")
    tag = gateway_tag(hpc.state_dir)
    hpc.stop()
    stray = engine.containers.run(
        image,
        ["sleep", "600"],
        name=f"scistream-{tag}-0123456789ab-proxy",
        labels={f"{LABEL}.gateway": tag, f"{LABEL}.session": "0123456789ab", f"{LABEL}.process": "proxy"},
        detach=True,
    )
    other = engine.containers.run(
        image, ["sleep", "600"], labels={f"{LABEL}.gateway": "another"}, detach=True
    )
    try:
        hpc.start(timeout=60)
        assert containers_of(engine, hpc) == []
        assert "removing the container" in hpc.log.read_text()
        other.reload()
        assert other.status == "running"  # another gateway's is left alone
    finally:
        for container in (stray, other):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)


def test_check_says_whether_the_engine_and_the_image_can_be_used(workdir, image):
    def check(*extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        first, last = free_port_range(4)
        return subprocess.run(
            [str(BIN / "s2cs"), "--check", "--runtime", "docker", "--port-range", f"{first}-{last}",
             "--state-dir", str(workdir / "state"), *extra],
            capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
        )  # fmt: skip

    def line(out: str) -> str:
        return next(row for row in out.splitlines() if "docker engine" in row)

    good = check("--image", image)
    assert re.search(rf"OK .*Docker Engine \d+\.\d+.*, image {image} ", line(good.stdout)), good.stdout
    missing = check("--image", "scistream:no-such-version")
    assert missing.returncode == 1 and "FAIL" in line(missing.stdout)
    assert "make images" in missing.stdout
    away = check("--image", image, env={"DOCKER_HOST": f"unix://{workdir}/no-engine.sock"})
    assert away.returncode == 1 and "cannot reach the Docker engine" in line(away.stdout)


# --- a compromised proxy or shaper: a shell in its container -------------------------------------

PLANT = """
import json, os, sys
done = {}
for link, target in json.loads(sys.argv[1]).items():
    try:
        try:
            os.unlink(link)
        except FileNotFoundError:
            pass
        os.symlink(target, link)
        done[link] = "planted"
    except OSError as exc:
        done[link] = exc.strerror
print(json.dumps(done))
"""

WRITE = """
import json, sys
done = {}
for path in sys.argv[1:]:
    try:
        with open(path, "ab") as f:
            f.write(b"# written from a container\\n")
        done[path] = "written"
    except OSError as exc:
        done[path] = exc.strerror
print(json.dumps(done))
"""


def in_container(container: Any, script: str, *args: str) -> dict[str, str]:
    """What a shell in the container did: the image's Python, as the container's user."""
    ran = subprocess.run(
        ["docker", "exec", container.id, "python", "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    return dict(json.loads(ran.stdout))


def test_links_planted_from_inside_the_containers_change_and_reveal_nothing_of_the_host(
    start, engine, workdir
):
    """A link in place of a log, from a shell in the proxy's or the shaper's container: `status
    --log` does not print its target (the control-plane key), a restart appends to no host file,
    a rotation truncates and overwrites none."""
    hpc = start("hpc", "--log-max-bytes", "4096")
    sink = Sink()
    uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=20000)["uid"]
    session = hpc.state_dir / "sessions" / only_session(hpc)
    key = hpc.state_dir / "server.key"
    assert "PRIVATE KEY" in key.read_text()
    appended, truncated, overwritten = (workdir / name for name in ("appended", "truncated", "overwritten"))
    for victim in (appended, truncated, overwritten):
        victim.write_text(f"{victim.name}: a host file mounted nowhere\n" * 200)  # above 4096 bytes
    before = {victim: victim.read_text() for victim in (appended, truncated, overwritten)}
    containers = stream_containers(engine, hpc)
    assert set(containers) == {"proxy", "shaper"}

    in_container(containers["proxy"], PLANT, json.dumps({str(session / "proxy.log"): str(key)}))
    logged = status(hpc, uid, "--log")
    assert "PRIVATE KEY" not in logged and key.read_text() not in logged

    in_container(containers["shaper"], PLANT, json.dumps({str(session / "shaper.log"): str(appended)}))
    containers["shaper"].kill()

    def restarted() -> dict[str, Any] | None:
        found = hpc.call("status", uid=uid)["streams"][0]
        shaper = next(p for p in found["processes"] if p["name"] == "shaper")
        return found if shaper["restarts"] >= 1 and found["state"] == "RUNNING" else None

    wait_for(restarted, 60, "the shaper's container running again")

    plant = {
        str(session / "proxy.log"): str(truncated),
        str(session / ".proxy.log.rotating"): str(overwritten),
    }
    in_container(stream_containers(engine, hpc)["proxy"], PLANT, json.dumps(plant))
    # The proxy logs each connection: its own log soon reaches 4096 bytes and is rotated.
    wait_for(
        lambda: (
            (session / "proxy.log.1").exists()
            or send_and_lose(port_of(hpc.call("status", uid=uid)["streams"][0]["listeners"][0]))
        ),
        60,
        "a rotation of the proxy's log",
    )
    hpc.call("status", uid=uid)  # a look at the logs after the rotation too
    for victim, text in before.items():
        assert victim.read_text() == text, f"{victim.name} was changed from inside a container"
    assert "PRIVATE KEY" in key.read_text()
    sink.close()


def test_no_configuration_or_credential_can_be_written_from_a_container(start, engine):
    """The proxy's container sees its config and the stream's certificate read-only, the shaper's
    none of them, and neither the stream's key file; nothing written in a container reaches a
    file of s2cs."""
    hpc = start("hpc")
    sink = Sink()
    hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=20000)
    session = hpc.state_dir / "sessions" / only_session(hpc)
    mounted = [session / name for name in ("proxy.conf", "stream.pem", "stream.crt")]
    before = {path: path.read_bytes() for path in session.iterdir() if path.is_file()}
    containers = stream_containers(engine, hpc)

    def sees(kind: str, path: Path) -> bool:
        found = subprocess.run(
            ["docker", "exec", containers[kind].id, "test", "-e", str(path)], capture_output=True, timeout=60
        )
        return found.returncode == 0

    assert [path.name for path in mounted if not sees("proxy", path)] == []
    assert not sees("proxy", session / "stream.key")
    assert [path.name for path in [*mounted, session / "stream.key"] if sees("shaper", path)] == []

    done = in_container(containers["proxy"], WRITE, *map(str, mounted))
    assert set(done.values()) == {"Read-only file system"}, done
    for container in containers.values():  # and whatever else it tries in that directory
        in_container(container, WRITE, *(str(session / name) for name in ("stream.key", "proxy.log", "x")))
    assert {path: path.read_bytes() for path in session.iterdir() if path.is_file()} == before
    sink.close()


def test_every_container_has_default_limits_and_no_uid_in_what_the_engine_shows(start, engine):
    hpc = start("hpc")
    sink = Sink()
    uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=20000)["uid"]
    for kind, container in stream_containers(engine, hpc).items():
        host = container.attrs["HostConfig"]
        assert host["PidsLimit"] == DEFAULT_LIMITS.pids, kind
        assert host["Memory"] == DEFAULT_LIMITS.memory, kind
        assert host["NanoCpus"] == int(DEFAULT_LIMITS.cpus * 1e9), kind
        assert "no-new-privileges" in host["SecurityOpt"], kind
        inspected = subprocess.run(
            ["docker", "inspect", container.id], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert uid not in inspected and uid.replace("-", "") not in inspected, kind
    sink.close()
