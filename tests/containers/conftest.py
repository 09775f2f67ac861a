"""Fixtures of the container tests: the Docker engine, and the image `make images` builds.

These tests run in the host's network namespace (scripts/run-tests runs them outside
scripts/run-isolated), since containers cannot see a private one; ports they publish on the host
are taken free at run time (scistream.loopback.free_port). A missing engine or image fails them
loudly, never skips them: `make test` starts the engine and builds the image first, or says in
one line why it could not, and then does not run these tests at all.

The swarm tests need this engine in a swarm: `swarm` makes a single-node one when there is none,
and leaves it again afterwards; a swarm that was there before is used and left as it was.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import DockerException, ImageNotFound

from scistream import __version__
from scistream.s2ds.containers import LABEL

ENGINE_TIMEOUT = 120  # seconds per call to the engine; a busy small machine is slow to answer
FACILITY = f"{LABEL}.facility"  # the label s2cs --runtime swarm puts on everything it makes
NOTHING: dict[str, list[str]] = {"services": [], "configs": [], "secrets": []}


def labelled(facility: str) -> dict[str, Any]:
    return {"label": f"{FACILITY}={facility}"}


def objects(engine: Any, facility: str) -> dict[str, list[str]]:
    """The names of the facility's services, configs (port claims among them) and secrets."""
    return {
        "services": sorted(s.name for s in engine.services.list(filters=labelled(facility))),
        "configs": sorted(c.name for c in engine.configs.list(filters=labelled(facility))),
        "secrets": sorted(s.name for s in engine.secrets.list(filters=labelled(facility))),
    }


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A client of the engine, at the API version the engine speaks (Debian's 20.10 speaks 1.41)."""
    try:
        client = docker.from_env(version="auto", timeout=ENGINE_TIMEOUT)
        client.ping()
    except DockerException as exc:
        pytest.fail(f"no Docker engine answers ({exc}); start one with scripts/docker-engine", pytrace=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def image(docker_client: docker.DockerClient) -> str:
    """The tag of SciStream's image for this version, `scistream:VERSION`, which must exist."""
    tag = f"scistream:{__version__}"
    try:
        docker_client.images.get(tag)
    except ImageNotFound:
        pytest.fail(f"the image {tag} does not exist; build it with make images", pytrace=False)
    return tag


def _swarm_state(client: docker.DockerClient) -> str:
    return str(client.info().get("Swarm", {}).get("LocalNodeState", ""))


@pytest.fixture(scope="session")
def swarm(docker_client: docker.DockerClient) -> Iterator[str]:
    """This engine as a manager of an active swarm; its node's id."""
    created = False
    state = _swarm_state(docker_client)
    if state != "active":
        if state not in ("inactive", ""):
            pytest.fail(f"this engine's swarm is {state}: neither active nor absent", pytrace=False)
        made = subprocess.run(
            ["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=ENGINE_TIMEOUT,
        )
        if made.returncode != 0:
            pytest.fail(f"docker swarm init failed: {made.stderr.strip()}", pytrace=False)
        created = True
    info = docker_client.info().get("Swarm", {})
    if info.get("LocalNodeState") != "active" or not info.get("ControlAvailable"):
        if created:
            subprocess.run(
                ["docker", "swarm", "leave", "--force"], capture_output=True, timeout=ENGINE_TIMEOUT
            )
        pytest.fail("this engine is not a manager of an active swarm", pytrace=False)
    yield str(info["NodeID"])
    if created:
        left = subprocess.run(
            ["docker", "swarm", "leave", "--force"], capture_output=True, text=True, timeout=ENGINE_TIMEOUT
        )
        if left.returncode != 0:
            pytest.fail(f"docker swarm leave --force failed: {left.stderr.strip()}", pytrace=False)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ss-", dir="/tmp"))  # short: Unix socket paths below it
    yield path
    shutil.rmtree(path, ignore_errors=True)
