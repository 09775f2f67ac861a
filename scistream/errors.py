"""The one exception family of SciStream.

Each error carries a stable wire code (sent in replies, see docs/protocol.md) and maps to one exit
status of the command-line tools, so scripts can tell "try again later" from "fix your request".
Pure: imported by the protocol, the server and the client alike.
"""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0
    ERROR = 1  # the server failed or an unexpected error
    USAGE = 2  # the request is wrong: fix the command line
    UNREACHABLE = 3  # no connection, TLS failure, timeout
    AUTH = 4  # not logged in, or not allowed
    NOT_FOUND = 5
    UNAVAILABLE = 6  # no free port, conflict, unsupported: the server cannot do it now


class ScistreamError(Exception):
    """Root of every error SciStream raises on purpose."""

    code = "INTERNAL"
    exit_status = ExitStatus.ERROR
    remote = False  # True when a server sent it (an error reply), False when raised here

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ScistreamError):
    code = "BAD_REQUEST"
    exit_status = ExitStatus.USAGE


class Unauthenticated(ScistreamError):
    code = "UNAUTHENTICATED"
    exit_status = ExitStatus.AUTH


class Forbidden(ScistreamError):
    code = "FORBIDDEN"
    exit_status = ExitStatus.AUTH


class NotFound(ScistreamError):
    code = "NOT_FOUND"
    exit_status = ExitStatus.NOT_FOUND


class Conflict(ScistreamError):
    code = "CONFLICT"
    exit_status = ExitStatus.UNAVAILABLE


class NoPorts(ScistreamError):
    code = "NO_PORTS"
    exit_status = ExitStatus.UNAVAILABLE


class Unsupported(ScistreamError):
    code = "UNSUPPORTED"
    exit_status = ExitStatus.UNAVAILABLE


class BackendFailed(ScistreamError):
    code = "BACKEND_FAILED"
    exit_status = ExitStatus.ERROR


class Internal(ScistreamError):
    code = "INTERNAL"
    exit_status = ExitStatus.ERROR


class Unreachable(ScistreamError):
    """Client side only: the control server could not be reached or did not answer."""

    code = "UNREACHABLE"
    exit_status = ExitStatus.UNREACHABLE


class ConfigError(ScistreamError):
    """A local setting is wrong (a missing file, a bad option); never sent on the wire."""

    code = "CONFIG"
    exit_status = ExitStatus.USAGE


WIRE_ERRORS: dict[str, type[ScistreamError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unauthenticated,
        Forbidden,
        NotFound,
        Conflict,
        NoPorts,
        Unsupported,
        BackendFailed,
        Internal,
    )
}


def from_wire(code: str, message: str) -> ScistreamError:
    """The exception for an error reply; an unknown code (a newer server) becomes a plain error."""
    err = WIRE_ERRORS.get(code, ScistreamError)(message)
    err.code = code
    err.remote = True
    return err
