"""The audit trail: one JSON line per stream created, refused or released, for the operator's SIEM.

`entry` builds a line from what a request did (pure); `AuditLog` appends it to the `--audit-log`
file, opening the file for every line so that logrotate may move it away at any time. A line
names the stream by its UID prefix only: the UID is the stream's secret.

s2cs may run as root, and the file's directory may be writable by others (a shared /var/log):
a symbolic link planted at its path would make s2cs append to the file it names, and a FIFO
would hang every request. Neither is opened: the line is refused, loudly.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError
from .sessions import short

log = logging.getLogger(__name__)

Event = Literal["create", "release", "refuse"]


def entry(
    event: Event,
    *,
    when: float,
    op: str,
    identity: tuple[str, str] | None,  # (id, name); None with authentication off or not yet known
    client: str,
    targets: list[str],
    uid: str | None,
    result: str,  # "ok" or the error code
    reason: str = "",
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "event": event,
        "op": op,
        "identity": None if identity is None else {"id": identity[0], "name": identity[1]},
        "client": client,
        "targets": targets,
        "uid": short(uid) if uid else None,
        "result": result,
    }
    if reason:
        record["reason"] = reason
    return record


def line(record: dict[str, Any]) -> bytes:
    """One line of JSON: json.dumps escapes every newline a reason may hold."""
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._append(b"")  # a file s2cs cannot write stops it at start, not at the first stream
        except OSError as exc:
            raise ConfigError(f"--audit-log: cannot write {path}: {_why(exc)}") from None

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._append(line(record))
        except OSError as exc:
            log.error("cannot write the audit log %s: %s; lost: %s", self.path, _why(exc), record)

    def _append(self, data: bytes) -> None:
        # O_NOFOLLOW: a symlink is refused (ELOOP), never followed. O_NONBLOCK: a FIFO without a
        # reader fails (ENXIO) instead of blocking; a regular file ignores it. Created 0600.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        with self._lock:
            fd = os.open(self.path, flags, 0o600)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError(errno.EINVAL, "it is not a regular file")
                os.write(fd, data)
            finally:
                os.close(fd)


def _why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link, which s2cs does not follow; give the path of the file itself"
    if exc.errno == errno.ENXIO:
        return "it is not a regular file"
    return exc.strerror or str(exc)
