"""The docker runtime: each process of a session (its proxy, its shaper) in a container of its own.

`s2cs --runtime docker` gives the gateway this runtime instead of the process one; the supervisor's
lifecycle, readiness, restarts, re-adoption and release stay as they are (runtime.py). What differs
is only where a process runs:

- The container runs the image's program of the same name (`haproxy`, `stunnel4`, `python`): the
  backend's command names the gateway's binary, whose path means nothing in the image.
- Host networking: the listeners bind the gateway's addresses, as processes do, and s2cs sees them
  listen as it sees a process's (psutil, by the container's process and its children).
- Each container sees only what its program needs, at the paths s2cs gave it: the session's
  `run/` directory (SessionFiles.run), the only place it may write, where the Unix sockets between
  the proxy and the shaper and the stats socket are; and, read-only, the proxy its config and the
  stream's certificate files (never the key file alone, which no proxy reads), the shaper nothing
  more. The logs, the config and the credentials are files of s2cs in the session directory,
  which no container can write to: a link a compromised proxy plants can only be in `run/`, where
  s2cs opens nothing as root (but its stats, without following a link: haproxy.py, stunnel.py).
- Named and labelled after the gateway and the session: a restarted s2cs finds its containers by
  what state.json recorded (the container's process, its start time and its command), and removes
  any of this gateway's containers that no kept session owns.
- The engine keeps each container's output (bounded); s2cs copies it into the session's log as it
  comes, so that the failure diagnosis, `s2uc status --log` and log rotation work as for processes.
- A container that exits is removed once its exit status and last output are read; the supervisor
  starts a new one with back-off. No capability but binding low ports (which only takes effect
  for an s2cs running as root), no new privileges, a read-only root file system, s2cs's own user,
  and limits of memory, CPU and processes: the policy's `[containers]`, else DEFAULT_LIMITS.

Engine errors (no daemon, no image) become `SpawnFailed`: the request fails with one line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from .logfiles import append_log
from .render import SessionFiles
from .runtime import Handle, SpawnFailed, bound_endpoints

log = logging.getLogger(__name__)

LABEL = "org.scistream"  # every label this runtime sets starts with it
ENGINE_TIMEOUT = 30  # seconds for one call to the engine
COARSE_TICK = 0.01  # seconds a file's mtime may lag the time it was written (1/HZ, HZ >= 100)
# What the engine keeps of a container's output: bounded as the session's log is (supervisor.py).
ENGINE_LOGS = {"max-size": "10m", "max-file": "3"}


class Limits(Protocol):
    """What each container may use: s2cs's policy (policy.ContainerLimits); None = the default
    (DEFAULT_LIMITS), 0 = no limit."""

    @property
    def memory(self) -> int | None: ...  # bytes

    @property
    def cpus(self) -> float | None: ...

    @property
    def pids(self) -> int | None: ...


@dataclass(frozen=True)
class DefaultLimits:
    """What a container may use where the policy file's `[containers]` says nothing: enough for
    a proxy or shaper carrying a stream at full speed, never the whole host (docs/operator-guide.md)."""

    memory: int | None = 1 << 30  # bytes: 1 GiB
    cpus: float | None = 2.0
    pids: int | None = 1024  # stunnel runs a thread per connection


DEFAULT_LIMITS = DefaultLimits()


def effective(limits: Limits | None) -> DefaultLimits:
    """The policy's limits, each unset one the default; None where the policy says 0 (none)."""
    given = limits or DEFAULT_LIMITS
    memory, cpus, pids = (
        DEFAULT_LIMITS.memory if given.memory is None else given.memory or None,
        DEFAULT_LIMITS.cpus if given.cpus is None else given.cpus or None,
        DEFAULT_LIMITS.pids if given.pids is None else given.pids or None,
    )
    return DefaultLimits(memory, cpus, pids)


def engine_options(limits: Limits | None) -> dict[str, Any]:
    """The engine's names for the limits in effect."""
    found: dict[str, Any] = {}
    limits = effective(limits)
    if limits.memory is not None:
        found["mem_limit"] = limits.memory
    if limits.cpus is not None:
        found["nano_cpus"] = int(limits.cpus * 1e9)
    if limits.pids is not None:
        found["pids_limit"] = limits.pids
    return found


def needs(files: SessionFiles, kind: str) -> tuple[Path, ...]:
    """The files of s2cs a process of a kind reads (read-only in its container): the proxy its
    config and the stream's certificate (HAProxy's `crt` and stunnel's `cert` take the PEM with
    the key), the shaper none."""
    return (files.config, files.cert, files.pem) if kind == "proxy" else ()


def program(argv0: str) -> str:
    """The image's program for the gateway's binary: the same name; any Python is `python`."""
    name = Path(argv0).name
    return "python" if name.startswith("python") else name


def image_command(argv: Sequence[str]) -> list[str]:
    return [program(argv[0]), *argv[1:]]


def gateway_tag(state_dir: Path) -> str:
    """Short and stable for one state dir: two gateways on one engine never share a name."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]


def engine_error(exc: BaseException, image: str) -> str:
    """One line on what the engine said, and what to do."""
    import docker.errors

    if isinstance(exc, docker.errors.ImageNotFound):
        return f"the image {image} is not on this Docker engine: build it (make images) or pass --image"
    if isinstance(exc, docker.errors.APIError):
        return f"the Docker engine refused: {exc.explanation or exc}"
    # requests' ConnectionError, which the SDK lets through, is an OSError.
    if isinstance(exc, OSError | docker.errors.DockerException):
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return f"cannot reach the Docker engine at {host}: is dockerd running, and may this user use it?"
    return f"the Docker engine failed: {exc}"


def _alive(pid: int, create_time: float) -> bool:
    if pid <= 0:
        return False
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - create_time) < 0.05 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class ContainerHandle:
    """One container of a session; `pid` is its first process as the gateway sees it."""

    runtime: DockerRuntime
    container: Any  # docker.models.containers.Container
    pid: int
    create_time: float
    follower: threading.Thread | None = None
    code: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return str(self.container.name)

    def poll(self) -> int | None:
        """None while its process runs; once it has ended, its exit status (the container is
        removed then; -1 when the engine could not say)."""
        with self.lock:
            if self.code is None and not _alive(self.pid, self.create_time):
                self.code = self.runtime.finish(self)
            return self.code


class DockerRuntime:
    """Implements runtime.Runtime with one container per process, through the Docker SDK."""

    name = "docker"

    def __init__(
        self,
        image: str,
        state_dir: Path,
        limits: Callable[[], Limits | None] = lambda: None,
        client: Any = None,
    ) -> None:
        self.image = image
        self.state_dir = state_dir
        self.tag = gateway_tag(state_dir)
        self.limits = limits  # read at each start: a SIGHUP may have changed the policy
        self._client = client
        self._client_lock = threading.Lock()

    # --- the engine --------------------------------------------------------------------------------

    def client(self) -> Any:
        """The engine's client, made at first use: s2cs starts without an engine, its requests fail."""
        with self._client_lock:
            if self._client is None:
                import docker

                try:
                    self._client = docker.from_env(timeout=ENGINE_TIMEOUT)
                except docker.errors.DockerException as exc:
                    raise SpawnFailed(engine_error(exc, self.image)) from None
            return self._client

    def check(self) -> str:
        """What the engine and the image are, or SpawnFailed with why they cannot be used."""
        try:
            client = self.client()
            version = client.version().get("Version", "?")
            image = client.images.get(self.image)
        except SpawnFailed:
            raise
        except Exception as exc:
            raise SpawnFailed(engine_error(exc, self.image)) from None
        return f"Docker Engine {version}, image {self.image} ({image.short_id.removeprefix('sha256:')})"

    def container_name(self, cwd: Path, log_path: Path) -> str:
        return f"scistream-{self.tag}-{cwd.name}-{log_path.stem}"

    def labels(self, cwd: Path, log_path: Path) -> dict[str, str]:
        return {
            f"{LABEL}.gateway": self.tag,
            f"{LABEL}.state-dir": str(self.state_dir),
            f"{LABEL}.session": cwd.name,
            f"{LABEL}.process": log_path.stem,  # "proxy" or "shaper"
        }

    def _ours(self, container: Any) -> bool:
        return bool(container.labels.get(f"{LABEL}.gateway") == self.tag)

    # --- Runtime -------------------------------------------------------------------------------------

    def spawn(
        self, argv: Sequence[str], cwd: Path, log: Path, recorded: Callable[[Handle], None] = lambda _: None
    ) -> ContainerHandle:
        """The container runs before it is recorded: one whose s2cs died in between is found by
        its labels (sweep), which a process of the host has not."""
        import docker.errors
        from docker.types import LogConfig, Mount

        name = self.container_name(cwd, log)
        files = SessionFiles(cwd)
        files.run.mkdir(mode=0o700, exist_ok=True)
        mounts = [Mount(str(files.run), str(files.run), type="bind")]
        mounts += [
            Mount(str(path), str(path), type="bind", read_only=True) for path in needs(files, log.stem)
        ]
        try:
            client = self.client()
            self._remove_stale(client, name)
            container = client.containers.create(
                self.image,
                image_command(argv),
                name=name,
                labels=self.labels(cwd, log),
                working_dir=str(cwd),
                user=f"{os.getuid()}:{os.getgid()}",
                network_mode="host",
                init=True,  # signals reach the program, and its children are reaped
                mounts=mounts,
                read_only=True,
                tmpfs={"/tmp": "size=16m"},
                cap_drop=["ALL"],
                cap_add=["NET_BIND_SERVICE"],
                security_opt=["no-new-privileges"],
                log_config=LogConfig(type="json-file", config=ENGINE_LOGS),
                **engine_options(self.limits()),
            )
            try:
                container.start()
                container.reload()
            except BaseException:
                try:
                    container.remove(force=True)
                except docker.errors.DockerException as exc:  # the sweep of the next start removes it
                    logging.getLogger(__name__).warning(  # `log` is the process's log file here
                        "cannot remove the container %s: %s", name, engine_error(exc, self.image)
                    )
                raise
        except SpawnFailed:
            raise
        except Exception as exc:
            raise SpawnFailed(engine_error(exc, self.image)) from None
        pid = int(container.attrs["State"].get("Pid") or 0)
        handle = ContainerHandle(self, container, pid, _create_time(pid))
        handle.follower = self._follow(container, log, since=None)
        recorded(handle)
        return handle

    def _remove_stale(self, client: Any, name: str) -> None:
        """A container of that name is left from an s2cs that died while it started one: it is
        this gateway's and no session has it (the gateway spawns only what it does not run)."""
        import docker.errors

        try:
            old = client.containers.get(name)
        except docker.errors.NotFound:
            return
        if not self._ours(old):
            raise SpawnFailed(f"a container named {name} exists and is not this gateway's: remove it")
        log.warning("removing the container %s left by an earlier s2cs", name)
        old.remove(force=True)

    def _follow(self, container: Any, log_path: Path, since: float | None) -> threading.Thread:
        """Copy the container's output into the session's log as it comes, until it ends."""

        def copy() -> None:
            try:
                with append_log(log_path) as out:  # never through a link in its place
                    options: dict[str, Any] = {"stream": True, "follow": True}
                    if since is not None:
                        options["since"] = since
                    for chunk in container.logs(**options):
                        out.write(chunk)
                        out.flush()
            except Exception as exc:  # the engine went away, or the session directory did
                log.debug("%s: stopped copying its output: %s", container.name, exc)

        thread = threading.Thread(target=copy, name=f"log {container.name}", daemon=True)
        thread.start()
        return thread

    def finish(self, handle: ContainerHandle) -> int:
        """Its exit status, once its output is all in the log; then the container is removed."""
        if handle.follower is not None:
            handle.follower.join(timeout=5)
        code = -1
        try:
            code = int(handle.container.wait(timeout=10).get("StatusCode", -1))
        except Exception as exc:
            log.debug("%s: no exit status from the engine: %s", handle.name, exc)
        try:
            handle.container.remove(force=True)
        except Exception as exc:
            if "No such container" not in str(exc):
                log.warning("cannot remove the container %s: %s", handle.name, engine_error(exc, self.image))
        return code

    def adopt(self, pid: int, create_time: float, argv: Sequence[str]) -> ContainerHandle | None:
        if not _alive(pid, create_time):
            return None
        try:
            running = self.client().containers.list(
                filters={"label": f"{LABEL}.gateway={self.tag}"}, ignore_removed=True
            )
        except Exception as exc:
            log.warning("cannot look for this gateway's containers: %s", engine_error(exc, self.image))
            return None
        command = image_command(argv)
        for container in running:
            state, config = container.attrs["State"], container.attrs["Config"]
            if int(state.get("Pid") or 0) == pid and config["Cmd"] == command:
                handle = ContainerHandle(self, container, pid, create_time)
                kind = container.labels[f"{LABEL}.process"]
                log_path = Path(config["WorkingDir"]) / f"{kind}.log"
                # Only what it wrote after the last line copied; the engine kept it while s2cs
                # was away. The file's time comes from the kernel's coarse clock, up to a tick
                # (at most 10 ms) behind the engine's stamp of the last line copied: without the
                # tick that line came twice (and a failure it reports was counted twice).
                since = log_path.lstat().st_mtime + COARSE_TICK if log_path.exists() else None
                handle.follower = self._follow(container, log_path, since=since)
                return handle
        return None

    def signal(self, handle: Handle, sig: int) -> None:
        if not isinstance(handle, ContainerHandle) or handle.code is not None:
            return
        try:
            handle.container.kill(signal=int(sig))
        except Exception as exc:  # gone already, or not running any more: poll will tell
            log.debug("%s: signal %d not sent: %s", handle.name, sig, exc)

    def listening(self, handle: Handle, endpoints: Sequence[int | str]) -> bool:
        """Every port and socket bound by the container's processes: its init and the program."""
        try:
            first = psutil.Process(handle.pid)
            processes = [first, *first.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            return False
        return set(endpoints) <= bound_endpoints(processes, endpoints)

    def keep_appending(self, handle: Handle) -> bool:
        return True  # s2cs writes the log itself, always appending (_follow)

    def unrecorded(self, wanted: Sequence[tuple[Path, Sequence[str]]]) -> list[Handle | None]:
        # A container left unrecorded is taken over by the next start of its name.
        return [None for _ in wanted]

    def sweep(self, sessions: set[str], running: Collection[int] = (), where: Path | None = None) -> None:
        """Remove this gateway's containers that no kept session owns. One of a kept session that
        is not `running` is left to the next start of its kind, which takes over its name."""
        try:
            found = self.client().containers.list(
                all=True, filters={"label": f"{LABEL}.gateway={self.tag}"}, ignore_removed=True
            )
        except Exception as exc:
            log.warning("cannot look for this gateway's containers: %s", engine_error(exc, self.image))
            return
        for container in found:
            if container.labels.get(f"{LABEL}.session") not in sessions:
                log.warning("removing the container %s: no stream of this gateway has it", container.name)
                try:
                    container.remove(force=True)
                except Exception as exc:
                    log.warning(
                        "cannot remove the container %s: %s", container.name, engine_error(exc, self.image)
                    )

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def _create_time(pid: int) -> float:
    if pid <= 0:
        return 0.0
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:
        return 0.0
