"""The stream's UID on its way through s2uc: typed or pasted, read from a file, written to one.

The UID is the stream's secret. An argument is visible to every user of the host (/proc/*/cmdline,
shell history), so `--uid-file FILE` carries it instead: written mode 0600 by inbound_request,
read by outbound_request and release (`-` reads stdin). UIDs are case-insensitive for users;
what is not a UID is shown in full here, on its owner's terminal, and never sent to a server
(whose log would keep it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadRequest, ConfigError
from ..protocol import parse_uid

TYPE_CHECKING = False  # typing's, without importing typing: nothing here needs it to run
if TYPE_CHECKING:
    from typing import TextIO

STDIN = "-"
MAX_FILE = 4096  # a UID file holds one line of 36 characters
_SHOWN = 200  # more than any UID, less than a screenful
_WHAT = "a UID looks like 0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e, as s2uc inbound_request gave it"


def normalize_uid(text: str, where: str = "") -> str:
    """The UID in `text`, in lower case; BadRequest that shows all of `text` if it is not one."""
    uid = text.strip().lower()
    try:
        return parse_uid(uid)
    except BadRequest:
        shown = text.strip()
        shown = repr(shown) if len(shown) <= _SHOWN else f"{shown[:_SHOWN]!r}..."
        raise BadRequest(f"{shown}{where} is not a stream UID: {_WHAT}") from None


def read_uid(source: Path, stdin: TextIO) -> str:
    """The UID in a --uid-file: one line, the UID alone."""
    name = "stdin" if str(source) == STDIN else str(source)
    try:
        if str(source) == STDIN:
            text = stdin.read(MAX_FILE)
        else:
            with open(source, encoding="utf-8") as file:
                text = file.read(MAX_FILE)
    except OSError as exc:
        raise ConfigError(f"cannot read {name}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name} is not text: --uid-file takes the file inbound_request wrote") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{name} holds no UID: --uid-file takes the file inbound_request wrote")
    if len(lines) > 1:
        raise ConfigError(f"{name} holds more than the UID: it should hold the UID alone, on one line")
    return normalize_uid(lines[0], f" in {name}")


@dataclass
class UidFile:
    """Where inbound_request puts the UID: a private temporary file made before the request (so a
    place that cannot be written fails before a stream exists), swapped into place when whole."""

    path: Path
    temp: Path

    @classmethod
    def prepare(cls, path: Path) -> UidFile:
        if str(path) == STDIN:
            raise ConfigError("--uid-file - reads stdin; give inbound_request a file to write the UID to")
        import tempfile  # with shutil and random: only inbound_request --uid-file pays for it

        try:
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
        except OSError as exc:
            raise ConfigError(f"cannot write --uid-file {path}: {exc.strerror}") from None
        os.close(fd)
        return cls(path, Path(temp))

    def write(self, uid: str) -> None:
        try:
            with open(self.temp, "w", encoding="utf-8") as out:
                out.write(f"{uid}\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(self.temp, self.path)  # a file there (or a link) is replaced, not written through
        except OSError as exc:
            self.discard()
            raise ConfigError(f"cannot write --uid-file {self.path}: {exc.strerror}") from None

    def discard(self) -> None:
        self.temp.unlink(missing_ok=True)
