"""scistream/s2cs/logs.py: the JSON form of s2cs's log, and what reaches standard error."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from collections.abc import Iterator

from scistream.s2cs import logs


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("scistream.s2cs.gateway", logging.INFO, __file__, 1, msg, args, None)
    made.__dict__.update(extra)
    made.created = 1764000000.5
    return made


def as_json(made: logging.LogRecord) -> dict[str, object]:
    line = logs.JsonFormatter().format(made)
    assert "\n" not in line
    parsed: dict[str, object] = json.loads(line)
    return parsed


def test_time_is_rfc3339_in_utc():
    assert logs.rfc3339(1764000000.5) == "2025-11-24T16:00:00.500Z"


def test_a_line_about_a_stream_names_it_in_fields():
    assert as_json(record("%s: released", "inbound 0b7c1f2e")) == {
        "time": "2025-11-24T16:00:00.500Z",
        "level": "INFO",
        "logger": "scistream.s2cs.gateway",
        "message": "inbound 0b7c1f2e: released",
        "session": "inbound 0b7c1f2e",
        "uid_prefix": "0b7c1f2e",
    }


def test_a_line_about_a_process_names_its_stream_and_the_process():
    entry = as_json(record("%s: pid %d exited (%s); restarting", "outbound 0b7c1f2e shaper", 7, -9))
    assert (entry["session"], entry["uid_prefix"], entry["process"]) == (
        "outbound 0b7c1f2e",
        "0b7c1f2e",
        "shaper",
    )


def test_a_request_line_carries_its_fields_and_nothing_else_is_guessed():
    fields = {"peer": "127.0.0.1:4242", "op": "release", "uid_prefix": "0b7c1f2e", "code": "NOT_FOUND"}
    entry = as_json(record("%s release -> NOT_FOUND: no stream", "127.0.0.1:4242", **fields))
    assert {k: entry[k] for k in fields} == fields and "session" not in entry
    assert "uid_prefix" not in as_json(record("cannot write %s", "/var/lib/scistream/state.json"))
    # Only a whole first argument names a stream, not one that begins like it.
    assert "session" not in as_json(record("%s", "inbound 0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"))


def test_a_traceback_stays_on_the_line_of_its_record():
    try:
        raise ValueError("boom")
    except ValueError:
        made = record("failed")
        made.exc_info = sys.exc_info()
    entry = as_json(made)
    assert "ValueError: boom" in str(entry["exception"])


@contextlib.contextmanager
def json_mode() -> Iterator[io.StringIO]:
    """configure('json') as s2cs does, its standard error caught; the logging setup restored
    after. (In the test itself: pytest sets sys.stderr anew between a fixture and its test.)"""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.stderr, [logging.getLogger(n).level for n in logs.OURS])
    real = io.StringIO()
    sys.stderr = real
    try:
        logs.configure("json", verbose=False)
        yield real
        sys.stderr.flush()
    finally:
        root.handlers[:], root.level, sys.stderr = saved[0], saved[1], saved[2]
        for name, level in zip(logs.OURS, saved[3], strict=True):
            logging.getLogger(name).setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_mode_turns_printed_lines_into_records():
    with json_mode() as out:
        print("s2cs 1.0: control server on port 5000", file=sys.stderr)
        sys.stderr.write("  WARNING: authentication is OFF\nerror: cannot listen")
        sys.stderr.write(" on port 5000\n")
    assert [(e["logger"], e["level"], e["message"]) for e in lines(out)] == [
        ("s2cs", "INFO", "s2cs 1.0: control server on port 5000"),
        ("s2cs", "WARNING", "WARNING: authentication is OFF"),
        ("s2cs", "ERROR", "error: cannot listen on port 5000"),
    ]


def test_our_loggers_log_info_and_libraries_only_warnings():
    with json_mode() as out:
        logging.getLogger("scistream.s2cs.server").info("ours")
        logging.getLogger("scistream.s2cs.server").debug("ours, with --verbose only")
        logging.getLogger("asyncio").info("a library's")
        logging.getLogger("globus_sdk").warning("a library's warning")
    assert [e["message"] for e in lines(out)] == ["ours", "a library's warning"]
