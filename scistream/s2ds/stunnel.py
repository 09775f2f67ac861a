"""The stunnel backend: TLS 1.3 with the stream certificate; limits enforced by the shaper.

stunnel has neither a connection limit per service nor a bandwidth limit, so every stunnel
session runs the shaper (shaper.py) between stunnel and its targets with `--max-conn` and the
rate. Both limits are therefore enforced, as with HAProxy; byte counts come from the shaper.

Before authentication: an inbound listener cuts a client that stalls its TLS handshake for 10 s
(TIMEOUTbusy, which stunnel 5.68 applies to the handshake only), as HAProxy's `timeout client`
does. Only authenticated connections reach the shaper, so only they count against num_conn.
stunnel cannot cap the connections still in their handshake; what bounds them is the process:
each session has its own stunnel, which takes at most "Clients allowed" = 125/256 of its
descriptor limit (inherited from s2cs, which raises its own to the hard limit) connections at
once and closes any beyond at once, the stream's own included.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jinja2

from ..errors import BackendFailed, ConfigError
from .backend import NO_SHAPER, SHAPER, Backend, Capabilities, Capability, Stats, shaper_rate
from .logfiles import read_small
from .render import ProxySpec, SessionFiles

_VERSION = re.compile(r"stunnel (\d+\.\d+)")
_ACCEPT = re.compile(r"^accept = .*$", re.MULTILINE)


_PR_SET_PDEATHSIG = 1  # prctl(2)


def _dies_with_this_process() -> Callable[[], None]:
    """What a dry run calls before it execs: a SIGKILL when the thread that started it ends, as
    with an s2cs killed mid-check, which would leave it running for ever, known to no later s2cs.
    libc is looked up here, in the parent: the child only makes the call."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def die_with_parent() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return die_with_parent


def find_binary() -> str:
    for name in ("stunnel", "stunnel4"):
        found = shutil.which(name)
        if found:
            return found
    raise ConfigError("stunnel is not installed: apt-get install stunnel4 (or use --type haproxy)")


class StunnelBackend(Backend):
    name = "stunnel"
    template = "stunnel.conf.j2"

    def __init__(self, templates: jinja2.Environment, binary: str | None = None) -> None:
        super().__init__(templates)
        self.binary = binary or find_binary()
        try:
            out = subprocess.run(
                [self.binary, "-version"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"cannot run {self.binary}: {exc}") from exc
        match = _VERSION.search(out.stdout + out.stderr)
        if not match:
            raise ConfigError(f"{self.binary} does not look like stunnel")
        self._version = match.group(1)

    @property
    def version(self) -> str:
        return f"stunnel {self._version}"

    @property
    def capabilities(self) -> Capabilities:
        num_conn = (
            Capability(True, by="the session's shaper") if SHAPER else Capability(False, reason=NO_SHAPER)
        )
        return Capabilities(num_conn=num_conn, rate=shaper_rate())

    def shaper_options(self, spec: ProxySpec, files: SessionFiles) -> list[str]:
        return [*super().shaper_options(spec, files), f"--stats={files.shaper_stats}"]

    def command(self, files: SessionFiles) -> list[str]:
        return [self.binary, str(files.config)]

    def check(self, config: Path, files: SessionFiles) -> None:
        """A dry run: the same config, listening on Unix sockets in a scratch directory, must get
        as far as stunnel's "Configuration successful"."""
        with tempfile.TemporaryDirectory(dir=files.directory, prefix=".dry") as scratch:
            count = iter(range(1000))
            text = _ACCEPT.sub(lambda m: f"accept = {scratch}/{next(count)}.sock", config.read_text())
            dry = Path(scratch) / "dry.conf"
            dry.write_text(text)
            log = Path(scratch) / "dry.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [self.binary, str(dry)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_dies_with_this_process(),  # one system call in the child, no lock taken
                )
            try:
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    words = log.read_text(errors="replace")
                    if "Configuration successful" in words:
                        return
                    if proc.poll() is not None:
                        break
                    time.sleep(0.02)
                # Errors are "[!] ..." while the config is read, "LOG3[...]" after.
                lines = [
                    ln.strip()
                    for ln in log.read_text(errors="replace").splitlines()
                    if ln.startswith("[!]") or "LOG3" in ln
                ]
                raise BackendFailed("stunnel refused the config: " + " | ".join(lines[-3:] or ["no output"]))
            finally:
                proc.kill()
                proc.wait()

    def stats(self, files: SessionFiles) -> Stats | None:
        try:
            data = json.loads(read_small(files.shaper_stats))  # the shaper's: never a link's target
        except (OSError, ValueError):
            return None
        return Stats(
            connections=int(data["connections"]),
            total_connections=int(data["total_connections"]),
            bytes_in=int(data["bytes_in"]),
            bytes_out=int(data["bytes_out"]),
            refused=int(data.get("refused", 0)),
        )
