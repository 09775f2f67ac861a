"""Fixtures of the container tests: the Docker engine, and the image `make images` builds.

These tests run in the host's network namespace (scripts/run-tests runs them outside
scripts/run-isolated), since containers cannot see a private one; ports they publish on the host
are taken free at run time (scistream.loopback.free_port). A missing engine or image fails them
loudly, never skips them: `make test` starts the engine and builds the image first, or says in
one line why it could not, and then does not run these tests at all.
"""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest
from docker.errors import DockerException, ImageNotFound

from scistream import __version__

ENGINE_TIMEOUT = 120  # seconds per call to the engine; a busy small machine is slow to answer


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
