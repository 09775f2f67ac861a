"""What s2uc knows of each S2CS it has used: the scope of its token, and the certificate it presents.

`s2uc login --s2cs HOST:PORT` reads the scope from that server's `info` and keeps HOST:PORT ->
scope in ~/.scistream/servers.json, beside the tokens and as private (mode 0600). Without --scope,
s2uc sends a token only to a server kept here, and only the token of its scope: a server that
advertises some other facility's scope gets none, however it asks.

The same file pins each server (HOST:PORT) to the certificate it presented the first time s2uc
used it (the SHA-256 of its DER form, under "certificates"), so that later another gateway's
certificate, even one of the user's bundle, can never speak for it. Since this file decides where
tokens go, one that other users could have written is refused, not read.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import ConfigError
from ..protocol import hostport
from .address import Server

TYPE_CHECKING = False  # typing's, without importing typing: nothing here needs it to run
if TYPE_CHECKING:
    from typing import Any

FILE = "servers.json"
VERSION = 1


def key(server: Server) -> str:
    """How a server is kept: host names in lower case (DNS ignores case), the port always."""
    return hostport(server.host.lower(), server.port)


@dataclass(frozen=True)
class Known:
    """The content of a servers.json: server -> scope, and server -> pinned certificate."""

    scopes: Mapping[str, str] = field(default_factory=dict)
    certificates: Mapping[str, str] = field(default_factory=dict)  # "sha256:HEX" of the DER form


def parse(text: str, path: Path) -> Known:
    """The content of a servers.json; ConfigError that names the file when it is not one."""
    redo = f"delete {path} and log in again with s2uc login --s2cs HOST:PORT"
    try:
        data: Any = json.loads(text)
    except ValueError:
        raise ConfigError(f"{path} is not JSON: {redo}") from None
    servers: Any = data.get("servers") if isinstance(data, dict) else None
    # Absent in a file of an s2uc from before pinning: nothing pinned yet.
    certificates: Any = data.get("certificates", {}) if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("version") != VERSION
        or not _strings(servers)
        or not _strings(certificates)
    ):
        raise ConfigError(f"{path} is not a servers file of this s2uc: {redo}")
    return Known(dict(servers), dict(certificates))


def _strings(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def render(known: Known) -> str:
    # The same version: an older s2uc still reads the scopes (and drops the pins when it writes).
    content = {
        "version": VERSION,
        "servers": dict(sorted(known.scopes.items())),
        "certificates": dict(sorted(known.certificates.items())),
    }
    return json.dumps(content, indent=2) + "\n"


class ServerScopes:
    """The servers.json of one user: the scope of each server's token."""

    def __init__(self, directory: Path) -> None:
        self.file = ServersFile(directory)
        self.path = self.file.path

    def scope_of(self, server: Server) -> str | None:
        return self.file.read().scopes.get(key(server))

    def bind(self, server: Server, scope: str) -> None:
        with self.file.change() as known:
            self.file.write(replace(known, scopes={**known.scopes, key(server): scope}))

    def forget(self, scope: str | None) -> int:
        """Forget the servers bound to `scope` (every server when None); how many. The pinned
        certificates stay: they say who a server is, not what the user logged in for."""
        with self.file.change() as known:
            kept = {k: v for k, v in known.scopes.items() if scope is not None and v != scope}
            if len(kept) != len(known.scopes):
                self.file.write(replace(known, scopes=kept))
        return len(known.scopes) - len(kept)


class ServerPins:
    """The servers.json of one user: the certificate each server is pinned to."""

    def __init__(self, directory: Path) -> None:
        self.file = ServersFile(directory)
        self.path = self.file.path

    def pinned(self, server: Server) -> str | None:
        return self.file.read().certificates.get(key(server))

    def settle(self, server: Server, fingerprint: str, replace_pinned: bool = False) -> str | None:
        """Pin `fingerprint` to `server` unless another one is pinned there (and may not be
        replaced): then that one, and nothing changes. Decided under the file's lock, so that of
        two first uses at once, the second sees the first's pin."""
        with self.file.change() as known:
            pinned = known.certificates.get(key(server))
            if pinned == fingerprint:
                return None
            if pinned is not None and not replace_pinned:
                return pinned
            self.file.write(replace(known, certificates={**known.certificates, key(server): fingerprint}))
        return None


class ServersFile:
    """The file itself: read as it is, changed under a lock so that two s2uc at once lose nothing."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / FILE

    @contextlib.contextmanager
    def change(self) -> Iterator[Known]:
        """The content, read under an exclusive lock held until the block ends (and its write is
        done): a login and a request that pins a server at the same time both keep their line."""
        import fcntl

        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise ConfigError(f"cannot write {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # on the directory: no lock file beside the tokens
            yield self.read()
        finally:
            os.close(fd)  # and the lock with it

    def read(self) -> Known:
        try:
            info = self.path.lstat()
        except FileNotFoundError:
            return Known()
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

    def write(self, known: Known) -> None:
        """Write a private temporary file, then swap it into place: never half a file."""
        import tempfile  # with shutil and random: a login or a first request to a server pays, not each

        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=self.directory, prefix=f".{FILE}.")  # mode 0600
        except OSError as exc:
            raise ConfigError(f"cannot write {self.path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(render(known))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, self.path)
        except OSError as exc:
            Path(temp).unlink(missing_ok=True)
            raise ConfigError(f"cannot write {self.path}: {exc.strerror}") from None
