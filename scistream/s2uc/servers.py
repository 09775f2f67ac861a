"""Which S2CS gets which stored token: the scope each server advertised when the user logged in there.

`s2uc login --s2cs HOST:PORT` reads the scope from that server's `info` and keeps HOST:PORT ->
scope in ~/.scistream/servers.json, beside the tokens and as private (mode 0600). Without --scope,
s2uc sends a token only to a server kept here, and only the token of its scope: a server that
advertises some other facility's scope gets none, however it asks. Since this file decides where
tokens go, one that other users could have written is refused, not read.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..errors import ConfigError
from ..protocol import hostport
from .client import Server

TYPE_CHECKING = False  # typing's, without importing typing: nothing here needs it to run
if TYPE_CHECKING:
    from typing import Any

FILE = "servers.json"
VERSION = 1


def key(server: Server) -> str:
    """How a server is kept: host names in lower case (DNS ignores case), the port always."""
    return hostport(server.host.lower(), server.port)


def parse(text: str, path: Path) -> dict[str, str]:
    """The bindings of a servers.json; ConfigError that names the file when it is not one."""
    redo = f"delete {path} and log in again with s2uc login --s2cs HOST:PORT"
    try:
        data: Any = json.loads(text)
    except ValueError:
        raise ConfigError(f"{path} is not JSON: {redo}") from None
    servers = data.get("servers") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("version") != VERSION
        or not isinstance(servers, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in servers.items())
    ):
        raise ConfigError(f"{path} is not a servers file of this s2uc: {redo}")
    return dict(servers)


def render(bindings: dict[str, str]) -> str:
    return json.dumps({"version": VERSION, "servers": dict(sorted(bindings.items()))}, indent=2) + "\n"


class ServerScopes:
    """The servers.json of one user."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / FILE

    def scope_of(self, server: Server) -> str | None:
        return self._read().get(key(server))

    def bind(self, server: Server, scope: str) -> None:
        bindings = self._read()
        bindings[key(server)] = scope
        self._write(bindings)

    def forget(self, scope: str | None) -> int:
        """Forget the servers bound to `scope` (every server when None); how many."""
        bindings = self._read()
        kept = {k: v for k, v in bindings.items() if scope is not None and v != scope}
        if len(kept) != len(bindings):
            self._write(kept)
        return len(bindings) - len(kept)

    def _read(self) -> dict[str, str]:
        try:
            info = self.path.lstat()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise ConfigError(
                f"{self.path} could have been written by another user (not a file of yours, or "
                f"writable by others), and it decides where your tokens go: delete it and log in "
                f"again with s2uc login --s2cs HOST:PORT"
            )
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {self.path}: {getattr(exc, 'strerror', None) or exc}") from None
        return parse(text, self.path)

    def _write(self, bindings: dict[str, str]) -> None:
        """Write a private temporary file, then swap it into place: never half a file."""
        import tempfile  # with shutil and random: only a login pays for it, not each request

        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=self.directory, prefix=f".{FILE}.")  # mode 0600
        except OSError as exc:
            raise ConfigError(f"cannot write {self.path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(render(bindings))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, self.path)
        except OSError as exc:
            Path(temp).unlink(missing_ok=True)
            raise ConfigError(f"cannot write {self.path}: {exc.strerror}") from None
