"""The state dir: sessions persisted with atomic writes, so a restarted s2cs finds its streams.

Layout of `--state-dir` (mode 0700):
    s2cs.lock             held (flock) by the one s2cs that uses this state dir; names its pid
    state.json            every session, with its proxy's pid, start time and command line
    state.json.bak        a second copy of state.json, written after it every time
    server.crt/.key       the control-plane certificate, when s2cs generated it
    sessions/<sid>/       one directory per session: config, stream key and certificate, logs
    sessions/<sid>/run/   what the session's processes write: their sockets, the shaper's counts
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
# <state>/sessions/<sid>/run/shaper-NN.sock, so the state dir path is bounded.
_MAX_STATE_DIR = 107 - len("/sessions/") - 12 - len("/run/shaper-NN.sock")


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
        self.copy = self.path / "state.json.bak"
        self.lock_file = self.path / "s2cs.lock"
        self._lock_fd: int | None = None
        self._lines: dict[str, tuple[dict[str, Any], str]] = {}  # sid -> its last record, encoded

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
        """The session records of state.json; none when there is none yet."""
        try:
            data = self.file.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"cannot read {self.file}: {exc.strerror}") from None
        try:
            return decode(data)
        except UnknownVersion as exc:
            raise ConfigError(f"{self.file} has {exc}; use the s2cs that wrote it") from None
        except ValueError as exc:
            raise self.damaged(str(exc)) from None

    def damaged(self, reason: str) -> ConfigError:
        """What an operator is told when state.json cannot be used. s2cs does not start then:
        starting without it would leave the streams it records running unmanaged, and the copy
        is the operator's to check (damage that reached state.json may have reached it too)."""
        if self.copy.is_file():
            advice = (
                f"its copy {self.copy} is as s2cs last wrote it: check it and move it into place to "
                "manage them again, or move both aside to start afresh"
            )
        else:
            advice = "repair it, or move it aside to start afresh (leaving their proxies unmanaged)"
        return ConfigError(
            f"{self.file} is damaged ({reason}); the streams it records may still run, so s2cs "
            f"does not start without it; {advice}"
        )

    def save(self, sessions: list[dict[str, Any]]) -> None:
        """Write these session records as the whole state, and its copy. A record whose `sid` was
        saved last time with the same content is not encoded again: most changes are to one
        session, and encoding 100 cost a millisecond of every save. The records are kept until
        the next save, so they must not be changed in place afterwards."""
        lines, kept = [], {}
        for record in sessions:
            sid = record.get("sid")
            last = self._lines.get(sid) if isinstance(sid, str) else None
            if last is not None and (last[0] is record or last[0] == record):
                line = last[1]  # the same record object when the gateway did not build it again
            else:
                line = json.dumps(record)
            if isinstance(sid, str):
                kept[sid] = (record, line)
            lines.append(line)
        data = assemble(lines)
        self._lines = kept
        write_private(self.file, data)
        # A copy, not a link or an older version: what damages one file (an edit gone wrong, a
        # bad block) leaves the other whole, and it is the state as it is now. An older one would
        # be one change behind, and restoring it could end a stream just made, or bring back
        # one just released.
        write_private(self.copy, data)
        # The rename itself must reach the disk too, or a crash could bring back the old file.
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def assemble(lines: list[str]) -> bytes:
    """A state file of session records, each already encoded as JSON, one per line. Pure.

    A line per record keeps the file readable, and a diff of two shows the sessions that
    changed. Each is encoded by json's C encoder, which an `indent` would replace by its
    pure-Python one: that took 5 ms per save with 100 sessions, and a request saves 3 times
    (docs/performance.md, "Per stream, at scale")."""
    body = ",\n".join(lines)
    return f'{{"version": {STATE_VERSION}, "sessions": [\n{body}\n]}}\n'.encode()


class UnknownVersion(ValueError):
    pass


def decode(data: bytes) -> list[dict[str, Any]]:
    """The session records of a state file; ValueError says what is wrong with it. Pure."""
    try:
        doc = json.loads(data)
    except ValueError as exc:  # bytes that are not UTF-8 included
        raise ValueError("empty" if not data.strip() else f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{_kind(doc)}, not a JSON object")
    version = doc.get("version")
    if version != STATE_VERSION:
        raise UnknownVersion(f"state version {version!r}, not {STATE_VERSION}")
    sessions = doc.get("sessions")
    if not isinstance(sessions, list):
        raise ValueError(f'"sessions" is {_kind(sessions)}, not a list')
    for i, record in enumerate(sessions):
        if not isinstance(record, dict):
            raise ValueError(f"session {i + 1} is {_kind(record)}, not an object")
    return sessions


def _kind(value: object) -> str:
    if value is None:
        return "null or missing"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"
