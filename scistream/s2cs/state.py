"""The state dir: sessions persisted with atomic writes, so a restarted s2cs finds its streams.

Layout of `--state-dir` (mode 0700):
    state.json            every session, with its proxy's pid, start time and command line
    server.crt/.key       the control-plane certificate, when s2cs generated it
    sessions/<sid>/       one directory per session: config, stream key and certificate, log, socket
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..s2ds.backend import write_private

STATE_VERSION = 1
# A Unix socket path must fit in sun_path (108 bytes with its NUL); ours are
# <state>/sessions/<sid>/stats.sock, so the state dir path is bounded.
_MAX_STATE_DIR = 107 - len("/sessions/") - 12 - len("/stats.sock")


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        if len(str(self.path)) > _MAX_STATE_DIR:
            raise ConfigError(
                f"state dir path {self.path} is {len(str(self.path))} characters; "
                f"keep it under {_MAX_STATE_DIR} (proxies' control sockets live there)"
            )
        if not all(c.isalnum() or c in "._/-+=@" for c in str(self.path)):
            raise ConfigError(
                f"state dir path {self.path} has characters proxy configs cannot quote; "
                "use letters, digits and ._-/ only"
            )
        self.sessions = self.path / "sessions"
        self.file = self.path / "state.json"

    def create(self) -> None:
        self.sessions.mkdir(parents=True, exist_ok=True)
        # Session keys are the streams' secrets: nobody else may list or read this tree.
        os.chmod(self.path, 0o700)
        os.chmod(self.sessions, 0o700)

    def session_dir(self, sid: str) -> Path:
        return self.sessions / sid

    def load(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.file.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {self.file}: {exc}; move it aside to start afresh") from exc
        if data.get("version") != STATE_VERSION:
            raise ConfigError(
                f"{self.file} has state version {data.get('version')}, expected {STATE_VERSION}"
            )
        sessions = data.get("sessions", [])
        if not isinstance(sessions, list):
            raise ConfigError(f"{self.file} is damaged (no list of sessions); move it aside to start afresh")
        return sessions

    def save(self, sessions: list[dict[str, Any]]) -> None:
        data = json.dumps({"version": STATE_VERSION, "sessions": sessions}, indent=1).encode()
        write_private(self.file, data)
        # The rename itself must reach the disk too, or a crash could bring back the old file.
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
