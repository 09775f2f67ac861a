"""Opening the files of a session's directory for s2cs without following a link.

s2cs often runs as root, and a session's processes (a proxy, a shaper) may write where its logs
are: a process of the process runtime runs as s2cs's own user. A link planted there in place of a
log (`proxy.log -> /etc/shadow`) must not make s2cs read, append to, truncate or overwrite
another file: every open here is relative to a handle of the log's directory (so the directory
itself is the one opened, whatever its path names meanwhile), refuses a final link (O_NOFOLLOW:
ELOOP) and refuses anything but a regular file (a FIFO in place of a log would block a reader
forever: opened non-blocking, checked, then made blocking).

Each function raises OSError with the file's whole path as its filename, as open() would.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@contextlib.contextmanager
def directory_of(path: Path) -> Iterator[int]:
    """A handle of the directory holding `path`, for the *at() calls below."""
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        yield fd
    finally:
        os.close(fd)


def _open_at(path: Path, flags: int, mode: int = 0o600) -> int:
    with directory_of(path) as directory:
        try:
            fd = os.open(path.name, flags | _NOFOLLOW, mode, dir_fd=directory)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def append_log(path: Path) -> BinaryIO:
    """The log opened for appending, created (mode 0600) if missing."""
    fd = _open_at(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "ab")


def read_log(path: Path) -> BinaryIO:
    return os.fdopen(_open_at(path, os.O_RDONLY), "rb")


def open_log_for_rotation(path: Path) -> BinaryIO:
    """The log opened to be read and then emptied (os.ftruncate of its descriptor, never of a path)."""
    return os.fdopen(_open_at(path, os.O_RDWR), "r+b")


def create_private(path: Path) -> BinaryIO:
    """A new file (mode 0600) in place of whatever was at `path`: a link planted there is removed,
    never written through (O_EXCL does not follow one)."""
    with directory_of(path) as directory, contextlib.suppress(FileNotFoundError):
        os.unlink(path.name, dir_fd=directory)
    return os.fdopen(_open_at(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb")


def size_of(path: Path) -> int:
    """The size of the file at `path` itself (a link's own, never its target's)."""
    return os.lstat(path).st_size


def read_small(path: Path, limit: int = 64 * 1024) -> bytes:
    """At most `limit` bytes of a small file a process writes (the shaper's counts)."""
    with read_log(path) as f:
        return f.read(limit)
