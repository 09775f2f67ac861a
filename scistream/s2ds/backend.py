"""What every proxy backend offers s2cs, and what it can and cannot enforce."""

from __future__ import annotations

import os
import sys
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import jinja2

from ..credentials import stream_credentials
from ..errors import BackendFailed, ConfigError
from ..protocol import hostport
from .render import ListenerSpec, ProxySpec, Role, SessionFiles, render

# The shaper moves bytes with splice(2): Linux only. Elsewhere no rate can be enforced, and
# every reply says so (DESIGN.md, "Capabilities").
SHAPER = hasattr(os, "splice")
NO_SHAPER = "this system has no splice(2), which the shaper needs (Linux only)"


@dataclass(frozen=True)
class Capability:
    enforced: bool
    by: str = ""  # what enforces it
    reason: str = ""  # why it is not enforced

    def as_dict(self) -> dict[str, object]:
        found: dict[str, object] = {"enforced": self.enforced}
        if self.by:
            found["by"] = self.by
        if self.reason:
            found["reason"] = self.reason
        return found

    def describe(self) -> str:
        return f"enforced by {self.by}" if self.enforced else f"NOT enforced: {self.reason}"


def shaper_rate() -> Capability:
    return Capability(True, by="the session's shaper") if SHAPER else Capability(False, reason=NO_SHAPER)


@dataclass(frozen=True)
class Capabilities:
    num_conn: Capability
    rate: Capability


@dataclass(frozen=True)
class Launch:
    """One process of a session, and what must listen before it counts as started."""

    name: str  # "proxy" or "shaper"
    argv: tuple[str, ...]
    ready: tuple[int | str, ...]  # TCP ports, or paths of Unix sockets


@dataclass(frozen=True)
class Stats:
    connections: int  # open now
    total_connections: int
    bytes_in: int  # from the clients of the listeners
    bytes_out: int  # to them
    refused: int = 0  # connections to a plain entry from a source not allowed, refused at accept


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read, atomically: temp file, fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp creates the file with mode 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Backend(ABC):
    """One kind of proxy. `write_config` writes and checks a session's files, `launches` says what
    to start for it; `prepare` does both."""

    name: str
    template: str

    def __init__(self, templates: jinja2.Environment) -> None:
        self.templates = templates

    @property
    @abstractmethod
    def version(self) -> str: ...

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abstractmethod
    def command(self, files: SessionFiles) -> list[str]: ...

    @abstractmethod
    def check(self, config: Path, files: SessionFiles) -> None:
        """Let the proxy itself check a rendered config; raise BackendFailed with its words."""

    def stats(self, files: SessionFiles) -> Stats | None:
        return None

    def write_credentials(self, uid: str, files: SessionFiles) -> None:
        creds = stream_credentials(uid)
        write_private(files.key, creds.key_pem)
        write_private(files.cert, creds.cert_pem)
        write_private(files.pem, creds.cert_pem + creds.key_pem)

    def shaped(self, rate_bytes: int, listeners: int) -> bool:
        """Whether a session runs the shaper between its proxy and its targets: always, where
        splice(2) is. Besides the rate and one connection limit over several listeners, it
        carries each connection's end across the proxies (`--frame`): without it a cut on the
        other side of the TLS hop reaches this end as a clean close (docs/reliability.md, "What
        a fault does to a connection"), an unlimited stream too."""
        return SHAPER

    def shaper_options(self, spec: ProxySpec, files: SessionFiles) -> list[str]:
        """The shaper enforces num_conn over all listeners of the session together, and frames
        what it passes to its proxy, as the shaper of the other gateway does."""
        return [f"--max-conn={spec.num_conn}", "--frame"]

    def spec(
        self,
        name: str,
        role: Role,
        listeners: tuple[ListenerSpec, ...],
        num_conn: int,
        rate_bytes: int,
        sources: tuple[str, ...] | None = None,
    ) -> ProxySpec:
        """What the proxy of a session must do, with the shaper where this backend needs one: for
        the gateway's sessions and the start-up check's samples alike (preflight.py)."""
        shaped = self.shaped(rate_bytes, len(listeners))
        return ProxySpec(
            name=name,
            role=role,
            listeners=listeners,
            num_conn=num_conn,
            rate_bytes=rate_bytes,
            shaped=shaped,
            front=shaped and self.shaper_in_front(role),
            sources=sources if role == "outbound" else None,
        )

    def shaper_in_front(self, role: str) -> bool:
        """Whether the shaper takes the listener ports, with the proxy behind it: outbound, so
        that it only ever sees plain data. Between an outbound proxy and the peer it would pass
        TLS records on in pieces as small as the rate allows per wake-up, and stunnel 5.68
        resets a connection whose records come in more than about a hundred pieces
        ("transfer() loop executes not transferring any data"): a HAProxy outbound proxy then
        cut the replies of a stunnel inbound one."""
        return role == "outbound"

    def ready(self, spec: ProxySpec, files: SessionFiles, kind: str) -> tuple[int | str, ...]:
        """What must listen before a process of this session counts as started."""
        sockets = tuple(str(files.shaper_socket(i)) for i in range(len(spec.listeners)))
        ports = tuple(lst.port for lst in spec.listeners)
        on_ports = "shaper" if spec.front else "proxy"
        return ports if kind == on_ports else sockets

    def prepare(self, uid: str, spec: ProxySpec, files: SessionFiles) -> list[Launch]:
        """A session's files written and checked, and the processes to start, in order."""
        self.write_config(uid, spec, files)
        return self.launches(spec, files)

    def write_config(self, uid: str, spec: ProxySpec, files: SessionFiles) -> None:
        """Validate, write, check, swap: the config only takes its place once the proxy accepts it."""
        try:
            text = render(spec, files, self.template, self.templates)
        except (jinja2.TemplateError, ConfigError) as exc:
            # An operator's template (--templates) is wrong: the request fails, with the reason.
            raise BackendFailed(f"cannot render {self.template}: {exc}") from None
        self.write_credentials(uid, files)
        files.run.mkdir(mode=0o700, exist_ok=True)
        candidate = files.directory / f".{files.config.name}.new"
        write_private(candidate, text.encode())
        try:
            self.check(candidate, files)
            os.replace(candidate, files.config)
        finally:
            candidate.unlink(missing_ok=True)

    def launches(self, spec: ProxySpec, files: SessionFiles) -> list[Launch]:
        """The processes of a session, what the other connects to first; nothing is written. Pure."""
        proxy = Launch("proxy", tuple(self.command(files)), self.ready(spec, files, "proxy"))
        if not spec.shaped:
            return [proxy]
        shaper = self.shaper_launch(spec, files)
        # Whatever the other connects to starts first.
        return [proxy, shaper] if spec.front else [shaper, proxy]

    def shaper_launch(self, spec: ProxySpec, files: SessionFiles) -> Launch:
        # `--route LISTEN TARGET`: two arguments, never one to split, since a state dir may
        # hold any character ("=" included: `--route=PATH=ADDR` once cut such paths in two).
        routes: list[str] = []
        for i, lst in enumerate(spec.listeners):
            socket_path = str(files.shaper_socket(i))
            if spec.front:
                routes += ["--route", hostport(lst.bind_ip, lst.port), socket_path]
            else:
                routes += ["--route", socket_path, hostport(lst.target_ip, lst.target_port)]
        options = self.shaper_options(spec, files)
        if spec.front and spec.sources is not None:
            # The shaper has the plain entry: it refuses other sources at accept (shaping.Sources).
            options += [f"--allow-source={network}" for network in spec.sources]
        argv = (sys.executable, "-m", "scistream.s2ds.shaper", f"--rate={spec.rate_bytes}", *options, *routes)
        return Launch("shaper", argv, self.ready(spec, files, "shaper"))
