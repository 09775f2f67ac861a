"""`s2cs --runtime swarm`: each session one Docker Swarm service, and the swarm the only state.

Real s2cs replicas, real s2uc, real HAProxy and shapers in real swarm tasks, on the swarm of this
engine (the `swarm` fixture makes a single-node one when there is none). Each test is a facility
of its own (`--facility`), so that no test sees another's services; whatever a test leaves in the
swarm under its facility's label is removed after it, passed or failed.

These run in the host's network namespace (swarm tasks on host networking cannot see a private
one), on ports taken free at run time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import psutil
import pytest

from scistream.errors import ScistreamError
from scistream.loopback import BIN, S2csProcess, Sink, free_port, free_port_range, proxies_of, send
from scistream.s2cs.gateway import port_is_free
from scistream.s2cs.swarm import stamp
from scistream.s2ds.containers import DEFAULT_LIMITS, LABEL
from tests.containers.conftest import FACILITY, NOTHING, labelled, objects
from tests.integration.conftest import field, open_stream, port_of, s2uc, wait_for

SERVICE_ID = "com.docker.swarm.service.id"  # the engine's label of a task's container
SECRETS = {"stream.key", "stream.crt", "stream.pem"}


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    client = docker.from_env(version="auto", timeout=120)
    yield client
    client.close()


@pytest.fixture
def facility(swarm: str) -> str:
    """A facility's name no other test uses: lower-case, 14 characters."""
    return f"t-{uuid.uuid4().hex[:12]}"


def running_containers(engine: Any, facility: str) -> list[Any]:
    """The facility's task containers that run now (the engine labels them as their service)."""
    return list(engine.containers.list(filters=labelled(facility), ignore_removed=True))


def remove_facility(engine: Any, facility: str) -> None:
    """Everything of the facility in the swarm: services, then their containers, configs and secrets."""
    for service in engine.services.list(filters=labelled(facility)):
        with contextlib.suppress(docker.errors.NotFound):
            service.remove()
    deadline = time.monotonic() + 60
    while running_containers(engine, facility) and time.monotonic() < deadline:
        time.sleep(0.2)
    for container in engine.containers.list(all=True, filters=labelled(facility), ignore_removed=True):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            container.remove(force=True)
    for obj in [
        *engine.configs.list(filters=labelled(facility)),
        *engine.secrets.list(filters=labelled(facility)),
    ]:
        with contextlib.suppress(docker.errors.NotFound):
            obj.remove()


@pytest.fixture
def start(workdir: Path, image: str, engine: Any, facility: str) -> Iterator[Callable[..., S2csProcess]]:
    """s2cs replicas of the test's facility on the swarm (or, with runtime="process", a gateway of
    its own). The replicas share one port range, as replicas of a facility do; each has its own
    control port and its own state dir."""
    shared = free_port_range(10)
    started: list[S2csProcess] = []

    def run(
        name: str,
        *extra: str,
        runtime: str = "swarm",
        use: str = image,
        ports: tuple[int, int] | None = None,
    ) -> S2csProcess:
        if runtime == "swarm":
            where: tuple[str, ...] = ("--runtime", "swarm", "--facility", facility, "--image", use)
            port_range = ports or shared
        else:
            where, port_range = (), ports or free_port_range(10)
        gw = S2csProcess(name, workdir / name, port_range, ("--type", "haproxy", *where, *extra))
        started.append(gw)
        gw.start(timeout=90)
        return gw

    yield run
    for gw in started:
        gw.stop()
    for gw in started:  # a process-runtime gateway's proxies, should one outlive its s2cs
        for pid in proxies_of(gw.state_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    remove_facility(engine, facility)  # a failed test leaves nothing in the swarm


def on(gw: S2csProcess) -> list[str]:
    """The s2uc options that reach this gateway."""
    return ["--s2cs", gw.address, "--server_cert", str(gw.cert)]


def sent_intact(port: int, size: int) -> bool:
    data = os.urandom(size)
    return send(("127.0.0.1", port), data) == (len(data), hashlib.sha256(data).hexdigest())


def the_service(engine: Any, facility: str) -> Any:
    found = engine.services.list(filters=labelled(facility))
    assert len(found) == 1, [s.name for s in found]
    return found[0]


def task_container(engine: Any, service: Any) -> Any:
    (container,) = engine.containers.list(
        filters={"label": f"{SERVICE_ID}={service.id}"}, ignore_removed=True
    )
    return container


def status_json(gw: S2csProcess, uid: str) -> dict[str, Any]:
    shown = json.loads(s2uc("status", uid, *on(gw), "--json").stdout)
    (stream,) = shown["streams"]
    return dict(stream)


# --- the guide's flow ------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", ["0", None], ids=["rate-0", "default-rate"])
def test_the_guides_flow_with_the_inbound_side_on_swarm_is_one_service_and_byte_exact(
    start, engine, facility, workdir, rate
):
    hpc = start("hpc")
    inst = start("instrument", runtime="process")
    sink = Sink()
    limit = ["--rate", rate] if rate is not None else []
    out = s2uc(
        "inbound_request", *on(hpc), *limit, "--remote_ip", "127.0.0.1", "--receiver_ports", str(sink.port)
    ).stdout
    uid, listener = field(out, "UID"), field(out, "Listeners")
    out = s2uc("outbound_request", *on(inst), *limit, uid, listener).stdout
    port = port_of(field(out, "Listeners"))

    # One service of one replica on host networking; its files are swarm objects, not the host's.
    service = the_service(engine, facility)
    spec = service.attrs["Spec"]
    assert spec["Mode"]["Replicated"]["Replicas"] == 1
    assert spec["Labels"][f"{LABEL}.phase"] == "ACTIVE"  # answered: no sweep removes it
    networks = [engine.networks.get(n["Target"]).name for n in spec["TaskTemplate"].get("Networks", [])]
    assert networks == ["host"]
    container_spec = spec["TaskTemplate"]["ContainerSpec"]
    configs = {c["ConfigName"]: c for c in container_spec.get("Configs", [])}
    secrets = {s["SecretName"]: s for s in container_spec.get("Secrets", [])}
    assert {f"{service.name}-proxy.conf", f"{service.name}-task.json"} <= set(configs)
    assert secrets and {name.removeprefix(f"{service.name}-") for name in secrets} <= SECRETS
    made = objects(engine, facility)
    assert set(configs) <= set(made["configs"]) and sorted(secrets) == made["secrets"]
    for ref in [*configs.values(), *secrets.values()]:
        assert ref["File"]["Mode"] == 0o400  # read by the task's user only
    assert all(m["Type"] == "tmpfs" for m in container_spec.get("Mounts", [])), container_spec["Mounts"]
    container = task_container(engine, service)
    assert container.attrs["HostConfig"]["NetworkMode"] == "host"
    assert not container.attrs["HostConfig"].get("Binds")
    assert not [m for m in container.attrs["Mounts"] if str(workdir) in m.get("Source", "")]
    # s2cs keeps no file of it: the swarm has it all.
    assert list((hpc.state_dir / "sessions").iterdir()) == []

    assert sent_intact(port, 4 << 20)
    assert sent_intact(port, 1 << 20)  # a second connection too
    assert status_json(hpc, uid)["state"] == "RUNNING"

    s2uc("release", uid, *on(inst))
    s2uc("release", uid, *on(hpc))
    assert objects(engine, facility) == NOTHING
    sink.close()


# --- replicas ------------------------------------------------------------------------------------


def test_a_stream_made_through_one_replica_is_listed_and_released_through_the_other(start, engine, facility):
    one = start("one")
    other = start("other")
    assert one.state_dir != other.state_dir and one.port != other.port
    sink = Sink()
    out = s2uc(
        "inbound_request", *on(one), "--rate", "0", "--remote_ip", "127.0.0.1",
        "--receiver_ports", str(sink.port),
    ).stdout  # fmt: skip
    uid, listener = field(out, "UID"), field(out, "Listeners")
    # Neither replica keeps a file of it.
    for gw in (one, other):
        assert list((gw.state_dir / "sessions").iterdir()) == []

    shown = status_json(other, uid)
    assert (shown["uid"], shown["role"], shown["state"]) == (uid, "inbound", "RUNNING")
    assert shown["listeners"] == [listener]
    listing = s2uc("status", *on(other)).stdout
    (row,) = [line for line in listing.splitlines() if line.startswith(uid[:8])]
    assert "inbound" in row and "RUNNING" in row and listener in row

    released = s2uc("release", uid, *on(other))
    assert released.returncode == 0
    for gw in (one, other):
        assert "No streams on" in s2uc("status", *on(gw)).stdout
        gone = s2uc("status", uid, *on(gw), check=False)
        assert gone.returncode != 0 and f"no stream {uid[:8]}" in gone.stderr
    assert objects(engine, facility) == NOTHING
    sink.close()


def test_a_replica_killed_with_sigkill_loses_nothing(start, engine, facility):
    one = start("one")
    other = start("other")
    inst = start("instrument", runtime="process")
    sink = Sink()
    stream = open_stream(other, inst, sink.port, rate=0)
    service = the_service(engine, facility)

    assert other.stop(signal.SIGKILL) == -signal.SIGKILL
    assert sent_intact(stream.port, 4 << 20)  # the stream goes on forwarding
    assert the_service(engine, facility).id == service.id
    shown = status_json(one, stream.uid)
    assert (shown["state"], shown["restarts"]) == ("RUNNING", 0)
    assert shown["listeners"] == [f"127.0.0.1:{stream.listener}"]
    s2uc("release", stream.uid, *on(one))
    assert objects(engine, facility) == NOTHING
    sink.close()


def test_concurrent_requests_through_two_replicas_get_distinct_ports(start, engine, facility):
    one = start("one")
    other = start("other")
    sink = Sink()
    everyone = threading.Barrier(4)
    made: list[dict[str, Any]] = []
    refused: list[str] = []
    lock = threading.Lock()

    def request(gw: S2csProcess) -> None:
        everyone.wait(timeout=60)
        try:
            reply = gw.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)
        except ScistreamError as exc:
            with lock:
                refused.append(f"{gw.name}: {exc}")
            return
        with lock:
            made.append(reply)

    threads = [threading.Thread(target=request, args=(gw,)) for gw in (one, other, one, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not [t for t in threads if t.is_alive()]
    assert refused == []
    ports = [port_of(reply["listeners"][0]) for reply in made]
    assert len(set(ports)) == 4, ports
    first, last = one.port_range
    assert all(first <= p <= last for p in ports)
    assert len(objects(engine, facility)["services"]) == 4
    for gw in (one, other):  # each replica sees all four, running
        streams = gw.call("status")["streams"]
        assert sorted(s["state"] for s in streams) == ["RUNNING"] * 4
    for reply in made:
        other.call("release", uid=reply["uid"])
    assert objects(engine, facility) == NOTHING
    sink.close()


# --- the task's life -----------------------------------------------------------------------------


def test_a_killed_task_is_started_again_by_the_swarm_and_counted(start, engine, facility):
    hpc = start("hpc")
    inst = start("instrument", runtime="process")
    sink = Sink()
    stream = open_stream(hpc, inst, sink.port, rate=0)
    service = the_service(engine, facility)
    before = task_container(engine, service)
    subprocess.run(["docker", "kill", before.id], check=True, capture_output=True, timeout=120)

    def restarted() -> dict[str, Any] | None:
        shown = status_json(hpc, stream.uid)
        return shown if shown["state"] == "RUNNING" and shown["restarts"] >= 1 else None

    shown = wait_for(restarted, 60, "the stream's task running again")
    assert isinstance(shown, dict) and shown["restarts"] == 1
    assert the_service(engine, facility).id == service.id  # the same service, a new task
    after = task_container(engine, service)
    assert after.id != before.id
    assert sent_intact(stream.port, 4 << 20)
    sink.close()


def test_release_removes_the_service_its_objects_and_claims_and_frees_the_port(
    start, engine, facility, swarm
):
    only = free_port_range(1)
    hpc = start("hpc", ports=only)
    inst = start("instrument", runtime="process")
    sink = Sink()
    first = open_stream(hpc, inst, sink.port, rate=20000)  # a shaper in the task too
    assert first.listener == only[0]
    claim = f"scistream-{facility}-port-{swarm[:12]}-{only[0]}"
    assert claim in objects(engine, facility)["configs"]
    with pytest.raises(ScistreamError) as full:  # the claim holds the facility's one port
        hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])
    assert "no free port" in str(full.value)
    assert len(objects(engine, facility)["services"]) == 1  # the refused request left nothing

    s2uc("release", first.uid, *on(inst))
    s2uc("release", first.uid, *on(hpc))
    assert objects(engine, facility) == NOTHING
    assert running_containers(engine, facility) == []
    assert port_is_free(only[0])

    second = open_stream(hpc, inst, sink.port, rate=0)
    assert second.listener == only[0] and second.uid != first.uid
    assert sent_intact(second.port, 4 << 20)
    assert objects(engine, facility)["configs"].count(claim) == 1
    sink.close()


# --- engine errors -------------------------------------------------------------------------------


def test_a_missing_image_fails_with_one_line_and_leaves_nothing_in_the_swarm(
    start, engine, image, facility, workdir
):
    first, last = free_port_range(4)
    absent = f"scistream:absent-{uuid.uuid4().hex[:8]}"
    refused = subprocess.run(
        [str(BIN / "s2cs"), "--runtime", "swarm", "--facility", facility, "--image", absent,
         "--listener-ip", "127.0.0.1", "--port", str(free_port()), "--port-range", f"{first}-{last}",
         "--state-dir", str(workdir / "refused"), "--allow-targets", "127.0.0.1/32"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: the image {absent} is not on this Docker engine: build it (make images) or pass --image"
    )

    # An image the node no longer has when a stream is asked for (removed, or never on that node).
    gone = f"scistream:gone-{uuid.uuid4().hex[:8]}"
    repository, tag = gone.split(":")
    engine.images.get(image).tag(repository, tag)
    try:
        hpc = start("hpc", use=gone)
    finally:
        engine.images.remove(gone)  # the tag only: the image keeps its other tags
    sink = Sink()
    failed = s2uc(
        "inbound_request", *on(hpc), "--remote_ip", "127.0.0.1", "--receiver_ports", str(sink.port),
        check=False,
    )  # fmt: skip
    assert failed.returncode != 0
    assert objects(engine, facility) == NOTHING
    assert hpc.call("status")["streams"] == []
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1, failed.stderr
    assert lines[0].startswith("error: ") and gone in lines[0], lines[0]  # which image is missing
    sink.close()


def test_metrics_are_refused_on_swarm_rather_than_showing_no_streams(swarm, facility, workdir):
    """A replica holds no stream: its scrape would say 0 streams whatever the swarm runs."""
    first, last = free_port_range(4)
    refused = subprocess.run(
        [str(BIN / "s2cs"), "--runtime", "swarm", "--facility", facility, "--metrics-port", str(free_port()),
         "--listener-ip", "127.0.0.1", "--port", str(free_port()), "--port-range", f"{first}-{last}",
         "--state-dir", str(workdir / "metrics")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --metrics-port is not available with --runtime swarm yet")
    ), refused.stderr


# --- what the engine shows, what a task may use ---------------------------------------------------

WRITE = """
import json, sys
done = {}
for path in sys.argv[1:]:
    try:
        with open(path, "ab") as f:
            f.write(b"# written from the task\\n")
        done[path] = "written"
    except OSError as exc:
        done[path] = exc.strerror
print(json.dumps(done))
"""


def test_the_swarm_shows_no_uid_and_the_task_has_default_limits_and_no_new_privileges(
    start, engine, facility
):
    hpc = start("hpc")
    other = start("other")
    inst = start("instrument", runtime="process")
    sink = Sink()
    stream = open_stream(hpc, inst, sink.port, rate=20000)  # the proxy and a shaper in the task
    service = the_service(engine, facility)
    container = task_container(engine, service)
    for what in (["service", "inspect", service.id], ["inspect", container.id]):
        shown = subprocess.run(["docker", *what], capture_output=True, text=True, timeout=120, check=True)
        assert stream.uid not in shown.stdout and stream.uid.replace("-", "") not in shown.stdout, what
    for what in (["service", "ls"], ["ps", "-a"], ["config", "ls"], ["secret", "ls"]):
        listed = subprocess.run(["docker", *what], capture_output=True, text=True, timeout=120, check=True)
        assert stream.uid not in listed.stdout, what

    limits = service.attrs["Spec"]["TaskTemplate"]["Resources"]["Limits"]
    assert limits["MemoryBytes"] == DEFAULT_LIMITS.memory
    assert limits["NanoCPUs"] == int(DEFAULT_LIMITS.cpus * 1e9)
    assert limits["Pids"] == DEFAULT_LIMITS.pids
    assert container.attrs["HostConfig"]["PidsLimit"] == DEFAULT_LIMITS.pids
    first = psutil.Process(container.attrs["State"]["Pid"])
    processes = [first, *first.children(recursive=True)]
    assert len(processes) >= 3  # the task, the proxy, the shaper
    for process in processes[1:]:  # every process of the task but the engine's init
        status = Path(f"/proc/{process.pid}/status").read_text()
        assert "NoNewPrivs:\t1" in status, process.cmdline()

    # Found, shown and released by the UID as before, from a replica that did not make it.
    shown = status_json(other, stream.uid)
    assert (shown["uid"], shown["state"]) == (stream.uid, "RUNNING")
    assert sent_intact(stream.port, 1 << 20)
    s2uc("release", stream.uid, *on(other))
    s2uc("release", stream.uid, *on(inst))
    assert objects(engine, facility) == NOTHING
    sink.close()


def test_no_configuration_or_credential_can_be_written_from_the_task(start, engine, facility):
    hpc = start("hpc")
    sink = Sink()
    hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=20000)
    container = task_container(engine, the_service(engine, facility))
    spec = the_service(engine, facility).attrs["Spec"]["TaskTemplate"]["ContainerSpec"]
    mounted = {ref["File"]["Name"] for ref in [*spec.get("Configs", []), *spec.get("Secrets", [])]}
    assert any(name.endswith("proxy.conf") for name in mounted)
    assert not any(name.endswith("stream.key") for name in mounted)  # no proxy reads it
    ran = subprocess.run(
        ["docker", "exec", container.id, "python", "-c", WRITE, *sorted(mounted)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    done = json.loads(ran.stdout)
    assert done and "written" not in done.values(), done
    sink.close()


def test_the_objects_of_a_half_made_session_are_swept_once_old(start, engine, facility):
    """Left by a replica that died between making a session's configs and secrets and making its
    service: removed by the next replica once older than the bound; a young one may still be
    another replica's request in progress, and stays."""
    old, young = stamp(time.time() - 3600), stamp(time.time())
    made = []
    for sid, created in (("0123456789ab", old), ("ba9876543210", young)):
        labels = {FACILITY: facility, f"{LABEL}.session": sid, f"{LABEL}.created": created}
        made.append(engine.configs.create(name=f"{facility}-{sid}-proxy.conf", data=b"x", labels=labels))
        made.append(engine.secrets.create(name=f"{facility}-{sid}-stream.pem", data=b"x", labels=labels))
    hpc = start("hpc")
    left = objects(engine, facility)
    assert left["configs"] == [f"{facility}-ba9876543210-proxy.conf"], left
    assert left["secrets"] == [f"{facility}-ba9876543210-stream.pem"], left
    assert "half-made" in hpc.log.read_text()


def test_a_service_whose_request_never_answered_is_removed_once_old(start, engine, image, facility):
    """Left by a replica that died while the new service started, before its reply: no user has
    its UID, so nobody could release it. The next replica removes it once older than the bound;
    a young one may be another replica's request in progress, and stays."""
    old, young = stamp(time.time() - 3600), stamp(time.time())
    for sid, created in (("0123456789ab", old), ("ba9876543210", young)):
        labels = {FACILITY: facility, f"{LABEL}.session": sid, f"{LABEL}.created": created,
                  f"{LABEL}.phase": "STARTING"}  # fmt: skip
        engine.services.create(image, ["sleep", "3600"], name=f"scistream-{facility}-{sid}", labels=labels)
        engine.configs.create(name=f"{facility}-{sid}-proxy.conf", data=b"x", labels=labels)
    hpc = start("hpc")
    left = objects(engine, facility)
    assert left["services"] == [f"scistream-{facility}-ba9876543210"], left
    assert left["configs"] == [f"{facility}-ba9876543210-proxy.conf"], left
    assert "before its request answered" in hpc.log.read_text()
