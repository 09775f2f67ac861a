"""A facility of three DTNs: `s2cs --runtime swarm` on a swarm of three engines of this machine.

The bed (scripts/swarm-bed, made once for this module) is three extra Docker engines, each in
network and UTS namespaces of its own, all three managers of one swarm; nodes 2 and 3 are the
gateway nodes (`scistream.address` their own address), node 1 runs no stream. The s2cs replicas
run in their node's namespace, as the stack runs them on host networking; the partner facility's
gateway (a process-runtime s2cs), the service behind the streams (a sink) and this test process
are on the bed's bridge (its namespace: the module enters it, and leaves it again at its end).

What a user and an operator would notice: where a stream is placed and at which address, data
byte-exact through it, replicas agreeing, what a node's loss and return, and a manager's, do to
the streams and to s2uc. Each test is a facility of its own; what it leaves in the swarm is
removed after it. The bed is taken down after the module, by pid and namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest

from scistream.errors import ScistreamError
from scistream.loopback import S2csProcess, Sink, free_port_range, send
from scistream.s2ds.containers import LABEL
from tests.containers.conftest import NOTHING, labelled, objects
from tests.integration.conftest import s2uc, wait_for
from tests.needs import lacking, require_command, require_root

BED = Path(__file__).resolve().parents[2] / "scripts" / "swarm-bed"
CONTROL_PORT = 5000  # of each replica, on its node's address: the namespace is the bed's own
PORT_RANGE = (5100, 5119)  # the facility's listener ports on every gateway node
LOSS_BOUND = 60.0  # seconds after a node's loss by which its streams are no longer RUNNING
RETURN_BOUND = 120.0  # seconds after a node's engine is back by which its streams run again
ELECTION_BOUND = 120.0  # seconds after the leader's loss by which the other managers create again
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: str) -> None:
    """Move this process (its calling thread, and the threads it starts later) into a network
    namespace: the sockets it opens from then on are there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def _bed(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BED), *args], capture_output=True, text=True, timeout=timeout)


@dataclass
class Bed:
    state: dict[str, Any]
    engines: dict[int, docker.DockerClient] = field(default_factory=dict)

    @property
    def partner(self) -> str:
        return str(self.state["partner"])

    @property
    def image(self) -> str:
        return str(self.state["image"])

    def node(self, index: int) -> dict[str, Any]:
        (found,) = [n for n in self.state["nodes"] if n["index"] == index]
        return dict(found)

    def engine(self, index: int) -> docker.DockerClient:
        if index not in self.engines:
            self.engines[index] = docker.DockerClient(
                base_url=self.node(index)["docker_host"], version="auto", timeout=120
            )
        return self.engines[index]

    def by_address(self, address: str) -> dict[str, Any]:
        (found,) = [n for n in self.state["nodes"] if n["address"] == address]
        return dict(found)

    def gateways(self) -> list[dict[str, Any]]:
        return [n for n in self.state["nodes"] if n["gateway"]]

    def run(self, *args: str) -> None:
        done = _bed(*args)
        assert done.returncode == 0, f"swarm-bed {' '.join(args)}: {done.stderr}"

    def node_state(self, index: int, asked: int = 1) -> str:
        """The node's state as the swarm says it (ready, down), asked of a manager's engine; empty
        while that manager cannot say (no leader yet, say)."""
        try:
            node = self.engine(asked).nodes.get(self.node(index)["node_id"])
        except (docker.errors.DockerException, OSError):
            return ""
        return str(node.attrs["Status"]["State"])


@pytest.fixture(scope="module")
def bed(image: str) -> Iterator[Bed]:
    reason = "a swarm of three engines in network namespaces"
    require_root(reason)
    for command in ("dockerd", "ip", "unshare"):
        require_command(command, reason)
    if not any(" cgroup " in line for line in Path("/proc/self/mounts").read_text().splitlines()):
        lacking("cgroup v1", reason, "no cgroup v1 hierarchy under /sys/fs/cgroup")
    made = _bed("up", "3", "--image", image)
    if made.returncode != 0:
        pytest.fail(f"scripts/swarm-bed up 3 failed: {made.stderr.strip()}", pytrace=False)
    found = Bed(json.loads(made.stdout))
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        _setns(f"/run/netns/{found.state['bridge_namespace']}")
        yield found
    finally:
        for client in found.engines.values():
            client.close()
        if _libc.setns(home, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back to this process's own network namespace")
        os.close(home)
        gone = _bed("down")
        assert gone.returncode == 0, f"scripts/swarm-bed down failed: {gone.stderr}"
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
        assert not [n for n in listed.stdout.split() if n.startswith("ssbed-")]


class Replica(S2csProcess):
    """An s2cs replica in its node's namespace (`ip netns exec` execs it: its pid is s2cs's)."""

    namespace: str = ""

    def argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *super().argv()]


@pytest.fixture
def facility() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def running(bed: Bed, facility: str) -> dict[int, int]:
    """How many task containers of the facility run on each node whose engine answers."""
    found = {}
    for node in bed.state["nodes"]:
        with contextlib.suppress(docker.errors.DockerException, OSError):
            found[node["index"]] = len(bed.engine(node["index"]).containers.list(filters=labelled(facility)))
    return found


def remove_facility(bed: Bed, facility: str) -> None:
    """Whatever the test left of its facility in the swarm, through a manager that answers."""
    for index in (1, 2, 3):
        try:
            engine = bed.engine(index)
            for service in engine.services.list(filters=labelled(facility)):
                with contextlib.suppress(docker.errors.NotFound):
                    service.remove()
            deadline = time.monotonic() + 60
            while any(running(bed, facility).values()) and time.monotonic() < deadline:
                time.sleep(0.2)
            for obj in [
                *engine.configs.list(filters=labelled(facility)),
                *engine.secrets.list(filters=labelled(facility)),
            ]:
                with contextlib.suppress(docker.errors.NotFound):
                    obj.remove()
            return
        except (docker.errors.DockerException, OSError):
            continue


@pytest.fixture
def replica(bed: Bed, facility: str, workdir: Path) -> Iterator[Callable[..., Replica]]:
    """replica(i): an s2cs of the test's facility on node i, listening on the node's address."""
    started: list[Replica] = []

    def run(index: int, *extra: str) -> Replica:
        node = bed.node(index)
        gw = Replica(
            f"replica{index}",
            workdir / f"replica{index}",
            PORT_RANGE,
            ("--type", "haproxy", "--runtime", "swarm", "--facility", facility, "--image", bed.image,
             "--allow-targets", f"{bed.partner}/32", *extra),
            env={"DOCKER_HOST": node["docker_host"]},
            listener_ip=node["address"],
            port=CONTROL_PORT,
        )  # fmt: skip
        gw.namespace = node["namespace"]
        started.append(gw)
        gw.start(timeout=90)
        return gw

    yield run
    for gw in started:
        gw.stop()
    heal(bed)
    remove_facility(bed, facility)


def heal(bed: Bed) -> None:
    """Every node's engine started again if a test stopped it, and the swarm seeing all ready:
    the next test gets the whole bed, whatever this one did or where it failed."""
    for node in bed.state["nodes"]:
        answers = subprocess.run(
            ["docker", "-H", node["docker_host"], "info"], capture_output=True, timeout=120
        )
        if answers.returncode != 0:
            bed.run("start", str(node["index"]))
    for node in bed.state["nodes"]:
        wait_for(lambda i=node["index"]: bed.node_state(i) == "ready", RETURN_BOUND, f"{node['name']} ready")


@pytest.fixture
def partner(bed: Bed, workdir: Path) -> Iterator[S2csProcess]:
    """The partner facility's gateway, on the bed's bridge: its outbound proxies reach the nodes."""
    gw = S2csProcess(
        "partner", workdir / "partner", free_port_range(10), ("--type", "haproxy",
        "--allow-targets", f"{bed.state['subnet']}"),
    )  # fmt: skip
    gw.start(timeout=60)
    yield gw
    gw.stop()


@pytest.fixture
def sink(bed: Bed) -> Iterator[Sink]:
    """The service behind every stream: on the bridge, at the partner's address."""
    found = Sink(bed.partner)
    yield found
    found.close()


def on(gw: S2csProcess) -> list[str]:
    return ["--s2cs", gw.address, "--server_cert", str(gw.cert)]


def inbound(gw: S2csProcess, bed: Bed, sink: Sink) -> dict[str, Any]:
    return gw.call("inbound", remote_ip=bed.partner, receiver_ports=[sink.port], rate=0)


def host_of(listener: str) -> str:
    return listener.rpartition(":")[0]


def through(partner: S2csProcess, stream: dict[str, Any]) -> int:
    """The partner's outbound proxy to the stream's listeners: the port its instrument sends to."""
    reply = partner.call("outbound", uid=stream["uid"], remote_listeners=stream["listeners"], rate=0)
    return int(reply["listeners"][0].rpartition(":")[2])


def sent_intact(port: int, size: int) -> bool:
    data = os.urandom(size)
    return send(("127.0.0.1", port), data) == (len(data), hashlib.sha256(data).hexdigest())


def shown(gw: S2csProcess, uid: str) -> dict[str, Any]:
    (stream,) = gw.call("status", uid=uid)["streams"]
    return dict(stream)


def service_of(bed: Bed, facility: str, uid: str) -> Any:
    digest = hashlib.sha256(uid.encode()).hexdigest()
    (found,) = bed.engine(1).services.list(filters={"label": f"{LABEL}.uid-hash={digest}"})
    return found


# --- placement, data, replicas -------------------------------------------------------------------


def test_streams_go_to_the_gateway_nodes_by_load_and_carry_data_byte_exact(
    bed, replica, partner, sink, facility
):
    one = replica(1)
    first = inbound(one, bed, sink)
    where = host_of(first["listeners"][0])
    gateways = {n["address"]: n for n in bed.gateways()}
    assert where in gateways and where != bed.node(1)["address"]  # node 1 runs no stream
    service = service_of(bed, facility, first["uid"])
    assert service.attrs["Spec"]["Labels"][f"{LABEL}.node"] == gateways[where]["node_id"]
    port = through(partner, first)
    assert sent_intact(port, 16 << 20)  # from the partner's gateway, through the node, to the service

    second = inbound(one, bed, sink)
    other = host_of(second["listeners"][0])
    assert other in gateways and other != where  # the other gateway node: it had none

    two = replica(2)
    listing = s2uc("status", *on(two)).stdout
    for stream, address in ((first, where), (second, other)):
        (row,) = [line for line in listing.splitlines() if line.startswith(stream["uid"][:8])]
        assert "RUNNING" in row and address in row, listing
    s2uc("release", first["uid"], *on(two))
    assert [s["uid"][:8] for s in one.call("status")["streams"]] == [second["uid"][:8]]
    gone = s2uc("status", first["uid"], *on(one), check=False)
    assert gone.returncode != 0 and f"no stream {first['uid'][:8]}" in gone.stderr
    assert sent_intact(through(partner, second), 1 << 20)
    one.call("release", uid=second["uid"])
    assert objects(bed.engine(2), facility) == NOTHING
    assert wait_for(lambda: not any(running(bed, facility).values()), 60, "every task ended")


def test_two_replicas_creating_at_once_never_hand_out_the_same_node_and_port(bed, replica, sink, facility):
    one, two = replica(1), replica(2)
    everyone = threading.Barrier(6)
    made: list[dict[str, Any]] = []
    refused: list[str] = []
    lock = threading.Lock()

    def request(gw: S2csProcess) -> None:
        everyone.wait(timeout=60)
        try:
            reply = inbound(gw, bed, sink)
        except ScistreamError as exc:
            with lock:
                refused.append(f"{gw.name}: {exc}")
            return
        with lock:
            made.append(reply)

    threads = [threading.Thread(target=request, args=(gw,)) for gw in (one, two) * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not [t for t in threads if t.is_alive()]
    assert refused == []
    listeners = [reply["listeners"][0] for reply in made]
    assert len(set(listeners)) == 6, listeners
    assert {host_of(lst) for lst in listeners} <= {n["address"] for n in bed.gateways()}
    for gw in (one, two):
        assert sorted(s["state"] for s in gw.call("status")["streams"]) == ["RUNNING"] * 6
    for reply in made:
        two.call("release", uid=reply["uid"])
    assert objects(bed.engine(1), facility) == NOTHING


def test_a_nodes_max_streams_is_honoured(bed, replica, sink, facility):
    manager = bed.engine(1)
    nodes = [manager.nodes.get(n["node_id"]) for n in bed.gateways()]
    for node in nodes:
        spec = node.attrs["Spec"]
        node.update({**spec, "Labels": {**spec["Labels"], "scistream.max-streams": "1"}})
    try:
        one = replica(1)
        placed = {host_of(inbound(one, bed, sink)["listeners"][0]) for _ in nodes}
        assert placed == {n["address"] for n in bed.gateways()}  # one on each
        with pytest.raises(ScistreamError) as full:
            inbound(one, bed, sink)
        assert "scistream.max-streams" in str(full.value)
        assert len(objects(manager, facility)["services"]) == len(nodes)  # the refusal made nothing
    finally:
        for node in nodes:
            node.reload()
            spec = node.attrs["Spec"]
            labels = {k: v for k, v in spec["Labels"].items() if k != "scistream.max-streams"}
            node.update({**spec, "Labels": labels})


# --- a DTN lost, and back ------------------------------------------------------------------------


def claims(bed: Bed, facility: str) -> list[str]:
    """The facility's port claims (configs named ...-port-NODE-PORT), as a manager lists them."""
    return [name for name in objects(bed.engine(1), facility)["configs"] if "-port-" in name]


def not_running(gw: S2csProcess, uid: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        found = shown(gw, uid)
        return found if found["state"] != "RUNNING" else None

    return check


def runs_again(gw: S2csProcess, uid: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        found = shown(gw, uid)
        return found if found["state"] == "RUNNING" else None

    return check


def test_a_lost_nodes_stream_waits_for_it_new_ones_go_elsewhere_and_it_resumes_where_it_was(
    bed, replica, partner, sink, facility
):
    one = replica(1)
    first = inbound(one, bed, sink)
    lost = bed.by_address(host_of(first["listeners"][0]))
    port = through(partner, first)
    assert sent_intact(port, 1 << 20)

    began = time.monotonic()
    bed.run("kill", str(lost["index"]))  # the DTN is gone: its engine, its tasks, its proxies
    down = wait_for(not_running(one, first["uid"]), LOSS_BOUND, "the lost node's stream not RUNNING")
    seen_s = time.monotonic() - began
    assert isinstance(down, dict)
    # What the stream's owner reads: which node, that it waits for it, and how to end it now.
    assert f"node {lost['name']} ({lost['address']}) is down" in down.get("last_error", ""), down
    assert "release" in down.get("last_error", ""), down
    told = s2uc("status", first["uid"], *on(one)).stdout
    assert f"last error: node {lost['name']} ({lost['address']}) is down" in told, told
    second = inbound(one, bed, sink)
    assert host_of(second["listeners"][0]) not in ("", lost["address"])  # placed on the other one
    assert sent_intact(through(partner, second), 1 << 20)

    began = time.monotonic()
    bed.run("start", str(lost["index"]))
    back = wait_for(runs_again(one, first["uid"]), RETURN_BOUND, "the stream running again on its node")
    back_s = time.monotonic() - began
    assert isinstance(back, dict) and back["listeners"] == first["listeners"]  # where the partner has it
    assert "last_error" not in back or "is down" not in back["last_error"]
    assert wait_for(lambda: sent_intact(port, 4 << 20), 60, "data through the returned node")
    made = claims(bed, facility)
    assert len(made) == len(set(made)) == 2, made  # one port each, none claimed twice
    print(
        f"\nnode lost: not RUNNING after {seen_s:.1f}s; back: RUNNING {back_s:.1f}s after its engine started"
    )
    for stream in (first, second):
        one.call("release", uid=stream["uid"])
    assert objects(bed.engine(1), facility) == NOTHING
    assert wait_for(lambda: not any(running(bed, facility).values()), 60, "every task ended")


def test_a_stream_released_while_its_node_is_lost_is_not_served_when_the_node_returns(
    bed, replica, partner, sink, facility
):
    """The engine alone is killed: its containers go on serving, unseen by the swarm. The user
    ends the stream meanwhile; when the engine is back, its proxy is stopped, and its port free."""
    one = replica(1)
    first = inbound(one, bed, sink)
    lost = bed.by_address(host_of(first["listeners"][0]))
    port = through(partner, first)
    bed.run("stop-engine", str(lost["index"]))
    wait_for(lambda: bed.node_state(lost["index"]) == "down", LOSS_BOUND, f"{lost['name']} down")
    assert sent_intact(port, 1 << 20)  # its proxy still serves, as the swarm cannot stop it

    s2uc("release", first["uid"], *on(one))
    partner.call("release", uid=first["uid"])
    assert objects(bed.engine(1), facility) == NOTHING  # its claim too: the swarm has ended it

    bed.run("start", str(lost["index"]))
    wait_for(lambda: bed.node_state(lost["index"]) == "ready", RETURN_BOUND, f"{lost['name']} ready")
    wait_for(lambda: running(bed, facility).get(lost["index"]) == 0, 60, "the orphaned proxy stopped")
    ended_port = first["listeners"][0].rpartition(":")[2]
    listening = subprocess.run(
        ["ip", "netns", "exec", lost["namespace"], "ss", "-Htln", f"sport = :{ended_port}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert listening.stdout.strip() == ""  # nothing serves the ended stream's port
    again = inbound(one, bed, sink)  # and the facility places streams there again
    assert sent_intact(through(partner, again), 1 << 20)


# --- a manager lost ------------------------------------------------------------------------------


def test_a_lost_manager_leaves_the_facility_working_and_its_replica_names_the_others(
    bed, replica, partner, sink, facility
):
    one, two = replica(1), replica(2)
    bed.run("stop-engine", "1")  # node 1's engine (the swarm's first leader): its replica runs on
    try:
        refused = s2uc(
            "inbound_request", *on(one), "--remote_ip", bed.partner, "--receiver_ports", str(sink.port),
            check=False,
        )  # fmt: skip
        assert refused.returncode != 0
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "Docker engine" in lines[0], refused.stderr
        for index in (2, 3):  # where the other replicas are
            assert f"{bed.node(index)['name']} ({bed.node(index)['address']})" in lines[0], lines[0]
        # Two managers of three keep the quorum: once they have elected a leader, the facility
        # creates, carries and releases streams through the other replica.
        made: dict[str, Any] = {}
        meanwhile: list[str] = []

        def created() -> bool:
            try:
                made.update(inbound(two, bed, sink))
            except ScistreamError as exc:  # while the other managers elect a leader
                meanwhile.append(str(exc))
            return bool(made)

        wait_for(created, ELECTION_BOUND, "a stream created through the other manager's replica")
        # Nothing sends the operator the wrong way meanwhile (as "label a node" did).
        assert not [words for words in meanwhile if "label-add" in words], meanwhile
        assert sent_intact(through(partner, made), 1 << 20)
        s2uc("release", made["uid"], *on(two))
        assert "No streams on" in s2uc("status", *on(two)).stdout
    finally:
        bed.run("start", "1")
        wait_for(lambda: bed.node_state(1, asked=2) == "ready", RETURN_BOUND, "node1 ready")
    assert one.call("status")["streams"] == []  # the replica serves again once its engine does
