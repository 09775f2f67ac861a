"""What an operator reads in s2cs's own log (standard error): a line for every failed request and
every stream event at the default level, the successful requests with --verbose, and with
--log-format json nothing but JSON objects, for a log shipper. Never a whole UID. The operator
guide shows these lines ("Logs and disk space").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from typing import Any

import psutil
import pytest

from scistream.errors import ScistreamError
from scistream.loopback import S2csProcess, Sink, send

from .conftest import open_stream, pids_of, wait_for

UNKNOWN = "0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"  # no stream of these tests
REFUSED = "10.0.2.5"  # a target outside the tests' --allow-targets (loopback)
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def refused(gw: S2csProcess, op: str, **fields: Any) -> str:
    """The code of the error `op` gets."""
    with pytest.raises(ScistreamError) as failed:
        gw.call(op, **fields)
    return failed.value.code


def one(lines: list[str], *parts: str) -> str:
    """The one line that holds all of `parts`."""
    found = [line for line in lines if all(part in line for part in parts)]
    assert len(found) == 1, f"{parts} in {len(found)} lines of:\n" + "\n".join(lines)
    return found[0]


def test_failed_requests_and_stream_events_are_logged_at_the_default_level(start_s2cs):
    hpc = start_s2cs("hpc")
    sink = Sink()
    assert refused(hpc, "release", uid=UNKNOWN) == "NOT_FOUND"
    assert refused(hpc, "inbound", remote_ip=REFUSED, receiver_ports=[5001]) == "FORBIDDEN"
    uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])["uid"]
    hpc.call("status")
    hpc.call("release", uid=uid)
    assert hpc.stop() == 0
    log = hpc.log.read_text()
    lines = log.splitlines()
    one(lines, " INFO ", f" release {UNKNOWN[:8]} -> NOT_FOUND: no stream {UNKNOWN[:8]} on this server")
    one(lines, " INFO ", f" inbound -> FORBIDDEN: target {REFUSED}:5001 is not allowed on this gateway")
    one(lines, f" INFO inbound {uid[:8]}: 127.0.0.1:", f"-> 127.0.0.1:{sink.port}, 5 connection(s)")
    one(lines, f" INFO inbound {uid[:8]}: released")
    one(lines, " INFO stopping: releasing every stream")
    # Successful requests are not: they would drown the rest on a busy gateway.
    assert not [line for line in lines if " -> ok" in line or " DEBUG " in line]
    assert uid not in log and UNKNOWN not in log


def test_verbose_adds_the_successful_requests_and_no_library_debug_output(start_s2cs):
    hpc = start_s2cs("hpc", "--verbose", "--log-format", "json")
    sink = Sink()
    uid = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port])["uid"]
    hpc.call("status")
    hpc.call("release", uid=uid)
    assert hpc.stop() == 0
    entries = [json.loads(line) for line in hpc.log.read_text().splitlines()]
    ok = [(e["op"], e.get("uid_prefix")) for e in entries if e.get("code") == "ok"]
    assert ("inbound", uid[:8]) in ok and ("status", None) in ok and ("release", uid[:8]) in ok
    # Today's -v let asyncio, urllib3 and globus-sdk log their debug lines too.
    others = {
        e["logger"] for e in entries if e["level"] == "DEBUG" and not e["logger"].startswith("scistream.")
    }
    assert others == set()


def test_json_log_is_json_from_start_to_stop(start_s2cs):
    """Start-up summary, requests, a stream made, carrying data, restarted, released, and the stop:
    every line a JSON object with the fields a shipper indexes."""
    hpc = start_s2cs("hpc", "--log-format", "json")
    inst = start_s2cs("instrument", "--log-format", "json")
    sink = Sink()
    stream = open_stream(hpc, inst, sink.port, rate=0)
    data = os.urandom(100_000)
    assert send(("127.0.0.1", stream.port), data) == (len(data), hashlib.sha256(data).hexdigest())
    (proxy,) = pids_of(hpc.state_dir, "haproxy")
    psutil.Process(proxy).send_signal(signal.SIGKILL)
    wait_for(lambda: "running again" in hpc.log.read_text(), what="the inbound proxy restarted")
    assert refused(hpc, "release", uid=UNKNOWN) == "NOT_FOUND"
    hpc.call("release", uid=stream.uid)
    inst.call("release", uid=stream.uid)
    assert hpc.stop() == 0 and inst.stop() == 0

    for gw in (hpc, inst):
        text = gw.log.read_text()
        assert stream.uid not in text and UNKNOWN not in text
        entries = []
        for line in text.splitlines():
            entry = json.loads(line)  # fails on the first line that is not JSON
            assert {"time", "level", "logger", "message"} <= entry.keys(), line
            assert RFC3339_UTC.fullmatch(entry["time"]), line
            entries.append(entry)
        assert entries[0]["message"].startswith("s2cs ") and entries[0]["logger"] == "s2cs"
        assert any(e["message"].startswith("s2cs ready on ") for e in entries)
        assert entries[-1]["message"] == "released 0 stream(s)"

    entries = [json.loads(line) for line in hpc.log.read_text().splitlines()]
    session = {"session": f"inbound {stream.uid[:8]}", "uid_prefix": stream.uid[:8]}

    def about(words: str) -> dict[str, Any]:
        (found,) = [e for e in entries if words in e["message"]]
        return dict(found)

    for words in ("5 connection(s), unlimited", "carried ", ": released"):
        assert about(words).items() >= session.items(), words
    restarted = about("exited (-9); restarting")
    assert restarted["level"] == "WARNING" and restarted["process"] == "proxy"
    assert restarted.items() >= session.items()
    failed = about(f"release {UNKNOWN[:8]} -> NOT_FOUND")
    assert (failed["op"], failed["code"], failed["uid_prefix"]) == ("release", "NOT_FOUND", UNKNOWN[:8])
    assert failed["peer"].startswith("127.0.0.1:")
