"""How `s2cs` writes its own log to standard error: the text lines people read, or, with
`--log-format json`, one JSON object a line for log shippers.

What is logged and at which level is decided where it happens; this module only decides what
reaches standard error and how it looks. Our own loggers (`scistream.*`, `s2cs`) log at INFO, or
DEBUG with `--verbose`; the libraries' (asyncio, globus-sdk, urllib3) only their warnings, as
their debug output would drown ours.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

FORMATS = ("text", "json")
TEXT = "%(asctime)s s2cs %(levelname)s %(message)s"
OURS = ("scistream", "s2cs")

# Fields a log call may give with `extra=`; the JSON form carries them as they are.
FIELDS = ("peer", "op", "uid_prefix", "code")

# A line about a stream names it first: its session (`inbound 0b7c1f2e`, Session.label) or one of
# its processes (`inbound 0b7c1f2e proxy`, as the gateway names them for the supervisor, which
# knows processes, not sessions). The JSON form gives those as fields, so a shipper can find
# every line of a stream without parsing messages.
_NAMED = re.compile(r"(?P<session>(?:inbound|outbound) (?P<uid_prefix>[0-9a-f]{8}))(?: (?P<process>\w+))?")


def rfc3339(created: float) -> str:
    """1764000000.5 -> '2025-11-24T16:00:00.500Z'."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record: those its call gave, and the stream it names first."""
    found: dict[str, Any] = {}
    args = record.args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        named = _NAMED.fullmatch(args[0])
        if named:
            found.update({k: v for k, v in named.groupdict().items() if v is not None})
    for name in FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            found[name] = value
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (RFC 3339, UTC), level, logger, message, the
    structured fields where known, and a traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


class _PrintedLines(io.RawIOBase):
    """What is printed to standard error rather than logged (the start-up summary, a fatal
    `error:` line, a traceback) becomes a log record of logger `s2cs`, one per line: in JSON mode
    a shipper never meets a line that is not JSON."""

    def __init__(self, handler: logging.Handler) -> None:
        self.handler = handler
        self._partial = b""
        self._lock = threading.Lock()
        self._inside = threading.local()  # a handler that fails prints its own error here

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        chunk = bytes(data)
        with self._lock:
            *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            self._emit(line.decode("utf-8", "backslashreplace"))
        return len(chunk)

    def close(self) -> None:
        if self._partial:
            self._emit(self._partial.decode("utf-8", "backslashreplace"))
            self._partial = b""
        super().close()

    def _emit(self, line: str) -> None:
        if getattr(self._inside, "now", False) or not line.strip():
            return
        text = line.strip()
        level = (
            logging.ERROR
            if text.startswith("error:")
            else logging.WARNING
            if text.startswith("WARNING:")
            else logging.INFO
        )
        record = logging.LogRecord("s2cs", level, __file__, 0, text, None, None)
        self._inside.now = True
        try:
            self.handler.handle(record)
        finally:
            self._inside.now = False


def configure(log_format: str, verbose: bool, stream: TextIO | None = None) -> None:
    """Send the log to `stream` (standard error) in `log_format`; see the module docstring."""
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        if stream is None:
            sys.stderr = io.TextIOWrapper(
                io.BufferedWriter(_PrintedLines(handler)), encoding="utf-8", line_buffering=True
            )
    else:
        handler.setFormatter(logging.Formatter(TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in OURS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
