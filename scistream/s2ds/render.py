"""Proxy configurations from Jinja templates.

A template sees one `ProxySpec` (what the proxy must do) and one `SessionFiles` (where its files
are), nothing else. Every value in them was validated before (see protocol.py); as a second line
of defence, `render` refuses any value that could end a config line or start a comment.

Pure: the caller writes the result to disk and lets the proxy check it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jinja2

from ..errors import ConfigError
from ..protocol import hostport

Role = Literal["inbound", "outbound"]

_SAFE = re.compile(r"[A-Za-z0-9._:/@\[\]+=-]*")


@dataclass(frozen=True)
class ListenerSpec:
    """One listener of a proxy and where it forwards to."""

    bind_ip: str  # "0.0.0.0" or "::" for all interfaces
    port: int
    target_ip: str
    target_port: int


@dataclass(frozen=True)
class ProxySpec:
    name: str  # short local session id, never the UID (the UID is the stream's secret)
    role: Role
    listeners: tuple[ListenerSpec, ...]
    num_conn: int
    rate_bytes: int  # per second, each direction, all connections together; 0 = unlimited
    shaped: bool  # the session has a shaper (see shaper.py) between the proxy and its targets...
    front: bool = False  # ...or in front of the proxy: it has the listener ports, the proxy Unix sockets
    # The networks (CIDR) that may connect to a plain entry (outbound listeners); None: anyone,
    # as on an inbound listener, where only a peer with the stream certificate gets through.
    sources: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SessionFiles:
    """Where the files of one session live; all inside its own directory of the state dir."""

    directory: Path

    @property
    def config(self) -> Path:
        return self.directory / "proxy.conf"

    @property
    def log(self) -> Path:
        return self.directory / "proxy.log"

    @property
    def cert(self) -> Path:
        """The stream certificate: presented to the peer and the only one accepted from it."""
        return self.directory / "stream.crt"

    @property
    def key(self) -> Path:
        return self.directory / "stream.key"

    @property
    def pem(self) -> Path:
        """Certificate and key in one file, as HAProxy's `crt` wants them."""
        return self.directory / "stream.pem"

    @property
    def run(self) -> Path:
        """Where the session's processes write (their sockets, the shaper's counts), apart from
        the files s2cs writes and reads (config, credentials, logs): a container is given this
        directory to write in, and nothing s2cs opens as root is in it (docs/security.md)."""
        return self.directory / "run"

    @property
    def stats_socket(self) -> Path:
        return self.run / "stats.sock"

    @property
    def shaper_stats(self) -> Path:
        return self.run / "shaper.json"

    def shaper_socket(self, index: int) -> Path:
        """The Unix socket between the shaper and the proxy, for listener `index`."""
        return self.run / f"shaper-{index}.sock"


def _finalize(value: Any) -> Any:
    if isinstance(value, bool | int):
        return value
    text = str(value)
    if not _SAFE.fullmatch(text):
        raise ConfigError(f"refusing to render unsafe value {text[:80]!r} into a proxy config")
    return value


def environment(override: Path | None, default: Path) -> jinja2.Environment:
    """Templates from `override` first (operators' edits), then the shipped ones."""
    search = [str(override)] if override else []
    search.append(str(default))
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(search),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - proxy configs, not HTML; values are checked by _finalize
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_finalize,
        # A template is read once, when it is first rendered (by the start-up check: preflight.py),
        # and kept: an edit takes effect at SIGHUP, once checked, never half-written or unchecked.
        auto_reload=False,
        cache_size=-1,
    )
    env.filters["hostport"] = hostport
    # stunnel splits host and port at the last colon and does not take brackets: ::1:5100
    env.filters["stunnel_address"] = lambda ip, port: f"{ip}:{port}"
    return env


def render(spec: ProxySpec, files: SessionFiles, template: str, env: jinja2.Environment) -> str:
    return env.get_template(template).render(proxy=spec, files=files)


def default_templates() -> Path:
    """The shipped templates: inside the package when installed, at the top of a source tree."""
    packaged = Path(__file__).resolve().parent.parent / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent.parent / "templates"
