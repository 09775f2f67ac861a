"""The state dir: sessions persisted with atomic writes, so a restarted s2cs finds its streams.

Layout of `--state-dir` (mode 0700):
    s2cs.lock             held (flock) by the one s2cs that uses this state dir; names its pid
    state.json            every session, with its proxy's pid, start time and command line
    server.crt/.key       the control-plane certificate, when s2cs generated it
    sessions/<sid>/       one directory per session: config, stream key and certificate, log, socket
"""

from __future__ import annotations

import fcntl
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


def _make_dir(path: Path, what: str, parents: bool = False) -> None:
    try:
        path.mkdir(mode=0o700, parents=parents, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{what} {path} is not a directory") from None
    except NotADirectoryError:
        raise ConfigError(f"cannot make {what} {path}: a part of that path is a file") from None
    except OSError as exc:
        raise ConfigError(f"cannot make {what} {path}: {exc.strerror}") from None


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
        self.lock_file = self.path / "s2cs.lock"
        self._lock_fd: int | None = None

    def open(self) -> None:
        """Hold the state dir for the life of this process, then create what it lacks.

        The lock comes before anything else is read or written here: a second s2cs started on
        the same state dir by mistake changes nothing, and the streams of the first run on.
        """
        # Session keys are the streams' secrets: nobody else may list or read this tree.
        _make_dir(self.path, "state dir", parents=True)
        self._lock()
        _make_dir(self.sessions, "sessions dir")
        try:
            os.chmod(self.path, 0o700)
            os.chmod(self.sessions, 0o700)
        except OSError as exc:
            raise ConfigError(f"cannot make {exc.filename} private (mode 0700): {exc.strerror}") from None

    def _lock(self) -> None:
        try:
            # Not truncated on open: until the lock is ours, the pid in it is the holder's.
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open {self.lock_file}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            who = f"s2cs pid {holder}" if holder.isdigit() else "another s2cs"
            raise ConfigError(
                f"state dir {self.path} is in use by {who}; stop that one first, "
                "or give this one a --state-dir of its own"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"cannot lock {self.lock_file}: {exc.strerror}") from exc
        # The lock is the flock, held as long as this descriptor is open (until s2cs exits, even
        # by SIGKILL); the pid is only there to tell a second s2cs whom to look for.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def close(self) -> None:
        """Let go of the state dir (s2cs is done with it)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor drops the flock
            self._lock_fd = None

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
