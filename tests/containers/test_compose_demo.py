"""`make compose-demo` (scistream/compose_demo.py), for real: two facilities in containers, the
user guide's two requests, data through both gateways, and nothing of the compose project left
afterwards, whether the demo passed or was interrupted."""

from __future__ import annotations

import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
import time

import docker
import pytest

from scistream.compose_demo import DEFAULT_MIB, PROJECT_LABEL

DEMO_TIMEOUT = 900  # seconds; the demo takes about 30 s alone on 2 idle cores
SENT = re.compile(r"^  sent +(\d+) bytes, SHA-256 ([0-9a-f]{64})$", re.MULTILINE)
RECEIVED = re.compile(r"^  received +(\d+) bytes, SHA-256 ([0-9a-f]{64})", re.MULTILINE)


def demo(project: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "scistream.compose_demo", "--project", project],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def leftovers(client: docker.DockerClient, project: str) -> list[str]:
    """What the engine still has of `project`: by label, and by name in case a label went missing."""
    by_label = {"label": f"{PROJECT_LABEL}={project}"}
    left = [
        f"container {c.name}" for c in client.containers.list(all=True, filters=by_label, ignore_removed=True)
    ]
    left += [
        f"container {c.name}"
        for c in client.containers.list(all=True, filters={"name": project}, ignore_removed=True)
    ]
    left += [f"network {n.name}" for n in client.networks.list(filters=by_label)]
    left += [f"network {n.name}" for n in client.networks.list(names=[f"{project}_hpc"])]
    left += [f"volume {v.name}" for v in client.volumes.list(filters=by_label)]
    left += [f"volume {v.name}" for v in client.volumes.list(filters={"name": project})]
    return sorted(set(left))


@pytest.mark.timeout(DEMO_TIMEOUT + 60)
def test_two_demos_at_once_each_stream_arrives_intact_and_nothing_is_left(
    image: str, docker_client: docker.DockerClient
) -> None:
    # Two at once, as two users of one machine may run them: each has a project and networks of its own.
    projects = [f"scistream-test-{secrets.token_hex(4)}" for _ in range(2)]
    runs = [demo(project) for project in projects]
    try:
        outputs = [run.communicate(timeout=DEMO_TIMEOUT) for run in runs]
    finally:
        for run in runs:
            run.kill()
    for project, run, (out, err) in zip(projects, runs, outputs, strict=True):
        assert run.returncode == 0, f"{project}:\n{out}\n{err}"
        sent, received = SENT.search(out), RECEIVED.search(out)
        assert sent and received, out
        assert int(sent[1]) == int(received[1]) == DEFAULT_MIB << 20
        assert sent[2] == received[2]
        assert "verdict: the SHA-256 matched" in out
        assert f"no container, network or volume of {project} is left" in out
        assert leftovers(docker_client, project) == []
    # Each used networks of its own.
    nets = [re.search(r"SCISTREAM_NET=(\d+)", out) for out, _ in outputs]
    assert nets[0] and nets[1] and nets[0][1] != nets[1][1]


@pytest.mark.timeout(DEMO_TIMEOUT + 60)
def test_an_interrupted_demo_takes_everything_down(image: str, docker_client: docker.DockerClient) -> None:
    project = f"scistream-test-{secrets.token_hex(4)}"
    run = demo(project)
    lines: queue.Queue[str] = queue.Queue()
    assert run.stdout is not None
    stdout = run.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    seen = []
    deadline = time.monotonic() + DEMO_TIMEOUT
    try:
        # Interrupt it once the stream is up on both gateways: proxies run in both containers.
        while not any("the instrument sends to" in line for line in seen):
            assert run.poll() is None, "".join(seen)
            seen.append(lines.get(timeout=max(deadline - time.monotonic(), 1)))
        assert docker_client.containers.list(
            filters={"label": f"{PROJECT_LABEL}={project}"}, ignore_removed=True
        )
        run.send_signal(signal.SIGINT)
        run.wait(timeout=DEMO_TIMEOUT)
    finally:
        run.kill()
        run.wait()
    assert run.stderr is not None
    err = run.stderr.read()
    assert run.returncode == 130, err
    assert "compose demo interrupted" in err
    assert leftovers(docker_client, project) == []
