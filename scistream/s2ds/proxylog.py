"""Reading what a session's processes wrote, boundedly: for the diagnosis (diagnosis.py) and for
`s2uc status UID --log`.

A log is read from where the last look stopped, so that `status` of many streams reads only what
is new since the one before, and never more than READ_MAX of one log at a time. The supervisor
rotates a log by copying it to LOG.1 and emptying it (supervisor.rotate_log): when LOG.1 is
another file than at the last look, the log was rotated since, and what came after where that
look stopped is at LOG.1's end. (Two rotations between two looks lose the part between them.)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

from .diagnosis import Tally, Threads, events
from .logfiles import read_log, size_of
from .supervisor import rotated

READ_MAX = 64 * 1024  # bytes of one log read at one look, at most: the newest, if more is new
SHOWN_LINES = 50  # per process, for `s2uc status UID --log`
SHOWN_BYTES = 8 * 1024  # per process: a status reply must stay within the protocol's 64 KiB
LINE_MAX = 400  # characters of one line shown; stunnel and HAProxy lines are far shorter


def _read(path: Path, start: int, end: int) -> bytes:
    """Bytes [start, end) of `path`, at most READ_MAX of them (the last ones)."""
    start = max(start, end - READ_MAX)
    with read_log(path) as f:  # never a link's target (logfiles.py)
        f.seek(start)
        return f.read(max(0, end - start))


def _complete(data: bytes, aligned: bool) -> tuple[list[str], int]:
    """The whole lines of `data` and how many bytes they take; a line still being written waits
    for the next look. Not `aligned`: the first line may be the end of one, and is dropped."""
    end = data.rfind(b"\n") + 1
    text = data[:end].decode("utf-8", "replace")
    lines = text.splitlines()
    if not aligned and lines:
        lines = lines[1:]
    return lines, end


class LogWatch:
    """The failures one process's log has told of, brought up to date at each look."""

    def __init__(self, path: Path, role: str, targets: Sequence[str]) -> None:
        self.path = path
        self.role = role
        self.targets = tuple(targets)
        self.offset: int | None = None  # where the last look stopped; None: no look yet
        self._rotated: tuple[int, int] | None = None  # LOG.1's inode and size at the last look
        self.tally = Tally()
        self._threads = Threads()
        self._lock = threading.Lock()  # status requests and metrics scrapes look at once

    def look(self) -> Tally:
        with self._lock:
            try:
                self._catch_up()
            except OSError:
                pass  # no log yet, or its directory is being deleted: what was counted stands
            return self.tally

    def _catch_up(self) -> None:
        info = os.lstat(self.path)
        size = info.st_size
        older = rotated(self.path, 1)
        try:
            part = older.lstat()
            now_rotated: tuple[int, int] | None = (part.st_ino, part.st_size)
        except OSError:
            now_rotated = None
        lines: list[str] = []
        if self.offset is None:  # the first look: the newest READ_MAX of the log
            data = _read(self.path, 0, size)
            lines, used = _complete(data, aligned=len(data) == size)
            self.offset = size - len(data) + used
        else:
            if now_rotated is not None and now_rotated != self._rotated:  # rotated since
                try:
                    end = now_rotated[1]
                    data = _read(older, self.offset, end)
                    lines += _complete(data, aligned=len(data) == end - self.offset)[0]
                except OSError:
                    pass
                self.offset = 0
            elif size < self.offset:  # emptied some other way: from its start
                self.offset = 0
            data = _read(self.path, self.offset, size)
            skipped = size - self.offset - len(data)
            found, used = _complete(data, aligned=skipped == 0)
            lines += found
            self.offset += skipped + used
        self._rotated = now_rotated
        if lines:
            found_events = events(lines, self.role, self.targets, info.st_mtime, self._threads)
            self.tally = self.tally.add(found_events)


def last_lines(path: Path, count: int = SHOWN_LINES, limit: int = SHOWN_BYTES) -> list[str]:
    """The last `count` lines of a log, within `limit` bytes, from LOG.1 too when the log was
    just rotated. The proxies log addresses and reasons, never key material: templates/."""
    found: list[str] = []
    budget = limit
    for part in (path, rotated(path, 1)):
        try:
            size = size_of(part)
            data = _read(part, max(0, size - budget), size)
        except OSError:
            continue
        lines = _complete(data + (b"" if data.endswith(b"\n") else b"\n"), aligned=len(data) == size)[0]
        shown = [line[:LINE_MAX] for line in lines if line.strip()]
        found = shown + found
        budget -= len(data)
        if len(found) >= count or budget <= 0 or len(data) < size:
            break
    return found[-count:]
