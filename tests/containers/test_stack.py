"""containers/stack.yaml: s2cs itself as a swarm service, deployed as docs/scale-out.md says.

`docker stack deploy` of the stack file on this engine's swarm (the `swarm` fixture), with a
control-plane certificate made by the openssl command of docs/scale-out.md; then what a user of
the facility does through it: `s2uc info`, an inbound stream that carries data from a real
outbound proxy (an s2cs of the instrument's facility, processes on this host), `s2uc release`.
Every test deploys a stack and a facility of its own, on ports taken free at run time, and
removes the stack, its secrets and its streams afterwards, passed or failed.

These run in the host's network namespace: the replica and the streams' tasks are on host
networking.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest

from scistream.loopback import S2csProcess, Sink, free_port, free_port_range, send
from scistream.s2cs.gateway import port_is_free
from scistream.s2ds.containers import LABEL
from tests.integration.conftest import field, port_of, s2uc, wait_for

STACK_FILE = Path(__file__).resolve().parents[2] / "containers" / "stack.yaml"
NAMESPACE = "com.docker.stack.namespace"  # the label docker stack puts on what it makes
DEPLOY_TIMEOUT = 180  # seconds for the replica to be placed, started and answering
HEALTHY_TIMEOUT = 120  # the first health check runs 10 s after the start


def run(*argv: str, env: dict[str, str] | None = None, timeout: float = 180) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """The control-plane pair, by the command of docs/scale-out.md, for 127.0.0.1 and localhost."""
    crt, key = directory / "s2cs.crt", directory / "s2cs.key"
    run(
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-days", "825", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        "-keyout", str(key), "-out", str(crt),
    )  # fmt: skip
    return crt, key


@dataclass
class Stack:
    """One deployment of containers/stack.yaml: its name, its facility, its settings."""

    engine: Any
    version: str  # the image's tag
    name: str
    facility: str
    port: int
    port_range: tuple[int, int]
    crt: Path
    key: Path

    @property
    def env(self) -> dict[str, str]:
        """The settings of the stack file, as an operator exports them before deploying."""
        first, last = self.port_range
        return {
            "SCISTREAM_VERSION": self.version,
            "SCISTREAM_LISTENER_IP": "127.0.0.1",
            "SCISTREAM_ALLOW_TARGETS": "127.0.0.1/32",
            "SCISTREAM_SERVER_CRT": str(self.crt),
            "SCISTREAM_SERVER_KEY": str(self.key),
            "SCISTREAM_PORT": str(self.port),
            "SCISTREAM_PORT_RANGE": f"{first}-{last}",
            "SCISTREAM_FACILITY": self.facility,
        }

    @property
    def on(self) -> list[str]:
        """The s2uc options that reach the stack's s2cs."""
        return ["--s2cs", f"127.0.0.1:{self.port}", "--server_cert", str(self.crt)]

    def deploy(self) -> None:
        run("docker", "stack", "deploy", "-c", str(STACK_FILE), self.name, env=self.env)

    def answers(self) -> dict[str, Any] | None:
        """`s2uc info --json` through the stack, once s2cs answers."""
        done = s2uc("info", *self.on, "--json", check=False)
        return json.loads(done.stdout) if done.returncode == 0 else None

    def remove(self) -> None:
        """`docker stack rm`, then wait until none of it is left (the CLI returns at once)."""
        if self.leftovers():
            run("docker", "stack", "rm", self.name)
        deadline = time.monotonic() + 120
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.5)

    def leftovers(self) -> dict[str, list[str]]:
        """What of the stack exists: its services, secrets, configs, networks, containers."""
        mine = {"label": f"{NAMESPACE}={self.name}"}
        found = {
            "services": [s.name for s in self.engine.services.list(filters=mine)],
            "secrets": [s.name for s in self.engine.secrets.list(filters=mine)],
            "configs": [c.name for c in self.engine.configs.list(filters=mine)],
            "networks": [n.name for n in self.engine.networks.list(filters=mine)],
            "containers": [
                c.name for c in self.engine.containers.list(all=True, filters=mine, ignore_removed=True)
            ],
        }
        return {kind: names for kind, names in found.items() if names}

    def streams(self) -> dict[str, list[str]]:
        """What of the facility's streams exists: services, configs (port claims), secrets."""
        mine = {"label": f"{LABEL}.facility={self.facility}"}
        found = {
            "services": [s.name for s in self.engine.services.list(filters=mine)],
            "configs": [c.name for c in self.engine.configs.list(filters=mine)],
            "secrets": [s.name for s in self.engine.secrets.list(filters=mine)],
        }
        return {kind: names for kind, names in found.items() if names}

    def remove_streams(self) -> None:
        """Every stream of the facility, as a failed test may leave them: the swarm's, not the stack's."""
        mine = {"label": f"{LABEL}.facility={self.facility}"}
        for service in self.engine.services.list(filters=mine):
            with contextlib.suppress(docker.errors.NotFound):
                service.remove()
        deadline = time.monotonic() + 60
        while self.engine.containers.list(filters=mine, ignore_removed=True) and time.monotonic() < deadline:
            time.sleep(0.2)
        for obj in [*self.engine.configs.list(filters=mine), *self.engine.secrets.list(filters=mine)]:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                obj.remove()

    def replica(self) -> Any:
        """The running container of the stack's s2cs."""
        found = self.engine.containers.list(
            filters={"label": f"{NAMESPACE}={self.name}"}, ignore_removed=True
        )
        assert len(found) == 1, [c.name for c in found]
        return found[0]


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ss-", dir="/tmp"))  # short: Unix socket paths below it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def stack(swarm: str, image: str, docker_client: Any, workdir: Path) -> Iterator[Stack]:
    """The stack file, deployed under a name and a facility of the test's own, and answering."""
    crt, key = make_certificate(workdir)
    tag = uuid.uuid4().hex[:10]
    version = image.partition(":")[2]
    made = Stack(docker_client, version, f"ss-{tag}", f"st-{tag}", free_port(), free_port_range(10), crt, key)
    try:
        made.deploy()
        wait_for(made.answers, DEPLOY_TIMEOUT, f"s2cs of the stack {made.name} answering")
        yield made
    finally:
        made.remove_streams()
        made.remove()
        assert not made.leftovers(), made.leftovers()


@pytest.fixture
def instrument(workdir: Path) -> Iterator[S2csProcess]:
    """The other facility's gateway: an s2cs of processes on this host, for the outbound proxy."""
    gw = S2csProcess("instrument", workdir / "instrument", free_port_range(10), ("--type", "haproxy"))
    try:
        gw.start(timeout=60)
        yield gw
    finally:
        gw.stop()


def sent_intact(port: int, size: int) -> bool:
    data = os.urandom(size)
    return send(("127.0.0.1", port), data) == (len(data), hashlib.sha256(data).hexdigest())


def test_the_stack_serves_info_and_a_stream_and_leaves_nothing(stack, instrument, image):
    # s2cs is a replica of the stack, on the swarm runtime, with the secret's certificate.
    info = stack.answers()
    assert info["runtime"] == {"type": "swarm", "facility": stack.facility, "image": image}
    first, last = stack.port_range
    assert (info["port_range"], info["free_ports"], info["streams"]) == (f"{first}-{last}", 10, 0), info
    shown = s2uc("info", *stack.on).stdout
    assert f"{first}-{last}" in shown and "127.0.0.1/32" in shown, shown
    replica = stack.replica().attrs
    assert replica["HostConfig"]["NetworkMode"] == "host" and replica["HostConfig"]["ReadonlyRootfs"]
    assert replica["Config"]["Image"] == image

    # An inbound stream through the stack, fed by the instrument's outbound proxy.
    sink = Sink()
    out = s2uc(
        "inbound_request", *stack.on, "--rate", "0",
        "--remote_ip", "127.0.0.1", "--receiver_ports", str(sink.port),
    ).stdout  # fmt: skip
    uid, listener = field(out, "UID"), field(out, "Listeners")
    assert first <= port_of(listener) <= last
    made = instrument.call("outbound", uid=uid, remote_listeners=[listener], rate=0)
    assert sent_intact(port_of(made["listeners"][0]), 8 << 20)
    assert sent_intact(port_of(made["listeners"][0]), 1 << 20)  # a second connection too
    (described,) = json.loads(s2uc("status", uid, *stack.on, "--json").stdout)["streams"]
    assert (described["state"], described["restarts"]) == ("RUNNING", 0), described
    assert stack.streams()["services"] == [described["service"]]

    # Released through the stack: nothing of the stream is left, its port is free again.
    instrument.call("release", uid=uid)
    released = s2uc("release", uid, *stack.on)
    assert "Released inbound proxy" in released.stdout, released.stdout
    assert stack.streams() == {}
    wait_for(lambda: port_is_free(port_of(listener)), 30, f"port {listener} free")
    sink.close()

    # The replica reports itself healthy (its health check: `info` on the control port).
    wait_for(
        lambda: stack.replica().attrs["State"].get("Health", {}).get("Status") == "healthy",
        HEALTHY_TIMEOUT,
        "the replica healthy",
    )

    # `docker stack rm` leaves nothing of the stack: service, secrets, network, container.
    assert stack.leftovers()["secrets"]
    stack.remove()
    assert stack.leftovers() == {}
    assert port_is_free(stack.port)


def test_a_stream_outlives_the_stack_and_a_new_deployment_releases_it(stack, instrument):
    sink = Sink()
    out = s2uc(
        "inbound_request", *stack.on, "--rate", "0",
        "--remote_ip", "127.0.0.1", "--receiver_ports", str(sink.port),
    ).stdout  # fmt: skip
    uid, listener = field(out, "UID"), field(out, "Listeners")
    made = instrument.call("outbound", uid=uid, remote_listeners=[listener], rate=0)
    port = port_of(made["listeners"][0])

    # The streams are the swarm's: without any s2cs, the stream carries data.
    stack.remove()
    assert stack.leftovers() == {}
    assert stack.streams()["services"]
    assert sent_intact(port, 4 << 20)

    # A new replica, with nothing of the old one, finds the stream and releases it.
    stack.deploy()
    wait_for(stack.answers, DEPLOY_TIMEOUT, "s2cs of the stack answering again")
    (entry,) = json.loads(s2uc("status", uid, *stack.on, "--json").stdout)["streams"]
    assert (entry["uid"], entry["state"], entry["listeners"]) == (uid, "RUNNING", [listener]), entry
    instrument.call("release", uid=uid)
    s2uc("release", uid, *stack.on)
    assert stack.streams() == {}
    sink.close()
