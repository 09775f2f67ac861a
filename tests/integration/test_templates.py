"""Operators' templates (--templates) and policy: checked before anything is served, read again at
SIGHUP without touching the running streams."""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
from pathlib import Path

import pytest

from scistream.errors import ExitStatus, Forbidden
from scistream.loopback import S2csProcess, Sink, free_port_range
from scistream.s2ds.render import default_templates

from .conftest import open_stream, port_of, wait_for

TEMPLATE = {"haproxy": "haproxy.cfg.j2", "stunnel": "stunnel.conf.j2"}
RELOADED = "reloaded templates and policy"


def operator_templates(workdir: Path) -> Path:
    path = workdir / "templates"
    shutil.copytree(default_templates(), path)
    return path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def failed_start(workdir: Path, *extra: str, backend: str = "haproxy") -> tuple[int, str, S2csProcess]:
    """Start an s2cs that must not start: its exit status and what it said."""
    gw = S2csProcess("hpc", workdir / "hpc", free_port_range(10), ("--type", backend, *extra))
    gw.launch()
    assert gw.proc is not None
    try:
        status = gw.proc.wait(timeout=60)
    finally:
        gw.stop()  # one that started after all: stopped, not left behind
    return status, gw.log.read_text(), gw


def reload(gw: S2csProcess, expect: str) -> str:
    """SIGHUP, and the line the reload logged (its outcome must be `expect`)."""
    before = gw.log.read_text().count(RELOADED) + gw.log.read_text().count("reload refused")
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)

    def outcome() -> str | None:
        lines = [ln for ln in gw.log.read_text().splitlines() if RELOADED in ln or "reload refused" in ln]
        return lines[-1] if len(lines) > before else None

    line = str(wait_for(outcome, what="the reload's log line"))
    assert expect in line, line
    assert gw.proc.poll() is None, "s2cs exited on SIGHUP"
    return line


def configs(gw: S2csProcess) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in (gw.state_dir / "sessions").glob("*/proxy.conf")}


# --- at start-up --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "old", "new", "words"),
    [
        # does not render
        (
            "haproxy",
            "proxy.num_conn + 256",
            "proxy.max_connections + 256",
            "has no attribute 'max_connections'",
        ),
        (
            "stunnel",
            "{% if proxy.front %}",
            "{% iff proxy.front %}",
            "not a valid template: Encountered unknown tag 'iff'",
        ),
        # renders a config the proxy refuses
        ("haproxy", "option clitcpka", "option clitcpak", "unknown option 'clitcpak'"),
        ("stunnel", "TIMEOUTidle = 86400", "TIMEOUTidl = 86400", "Specified option name is not valid here"),
    ],
)
def test_a_broken_template_stops_s2cs_naming_the_template_and_line(workdir, backend, old, new, words):
    templates = operator_templates(workdir)
    path = templates / TEMPLATE[backend]
    edit(path, old, new)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if new in text)
    status, said, gw = failed_start(workdir, "--templates", str(templates), backend=backend)
    assert status == ExitStatus.USAGE
    (error,) = [ln for ln in said.splitlines() if ln.startswith("error: ")]
    assert error.startswith(f"error: template {path}, line {line}")
    assert words in error
    assert "ready" not in said
    assert not gw.cert.exists(), "s2cs went on to set up its state dir"


def test_the_check_says_which_sample_failed(workdir):
    templates = operator_templates(workdir)
    edit(
        templates / "haproxy.cfg.j2",
        "    option contstats\n",
        "    option contstats\n"
        "{% if proxy.role == 'outbound' and proxy.rate_bytes %}\n    option no_such\n{% endif %}\n",
    )
    status, said, _ = failed_start(workdir, "--templates", str(templates))
    assert status == ExitStatus.USAGE
    assert "rendered for an outbound session with a rate, 2 listeners: HAProxy refused the config" in said


# --- SIGHUP: templates --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", sorted(TEMPLATE))
def test_an_edited_template_is_used_by_the_next_stream_after_sighup_only(start_s2cs, workdir, backend):
    templates = operator_templates(workdir)
    path = templates / TEMPLATE[backend]
    hpc = start_s2cs("hpc", "--templates", str(templates), backend=backend)
    sink = Sink()
    first = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)["uid"]
    mark = "#" if backend == "haproxy" else ";"
    path.write_text(f"{mark} site edit\n" + path.read_text())
    hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)
    assert not any("site edit" in text for text in configs(hpc).values()), "used before SIGHUP"

    reload(hpc, RELOADED)
    before = set(configs(hpc))
    hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)
    (new,) = set(configs(hpc)) - before
    assert configs(hpc)[new].startswith(f"{mark} site edit\n")
    assert sum("site edit" in text for text in configs(hpc).values()) == 1
    assert hpc.call("status", uid=first)["streams"][0]["state"] == "RUNNING"


def test_sighup_with_a_broken_template_keeps_the_old_one_and_the_running_streams(start_s2cs, workdir):
    templates = operator_templates(workdir)
    path = templates / "haproxy.cfg.j2"
    hpc = start_s2cs("hpc", "--templates", str(templates))
    inst = start_s2cs("inst")
    sink = Sink()
    stream = open_stream(hpc, inst, sink.port, rate=0)
    pids = [p["pid"] for p in hpc.call("status", uid=stream.uid)["streams"][0]["processes"]]
    data = b"frame %04d\n" * 1000
    with socket.create_connection(("127.0.0.1", stream.port), timeout=60) as sock:
        sock.sendall(data[:5000])  # a connection open across the reload
        edit(path, "option clitcpka", "option clitcpak")
        line = reload(hpc, "reload refused")
        assert f"reload refused: template {path}, line " in line
        assert "unknown option 'clitcpak'" in line
        assert line.endswith("; the old templates and policy stay")
        sock.sendall(data[5000:])
        sock.shutdown(socket.SHUT_WR)
        answer = sock.makefile("rb").readline().split()
    assert answer == [str(len(data)).encode(), hashlib.sha256(data).hexdigest().encode()]
    assert [p["pid"] for p in hpc.call("status", uid=stream.uid)["streams"][0]["processes"]] == pids
    # New streams still get the old, good template.
    second = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[sink.port], rate=0)
    assert hpc.call("status", uid=second["uid"])["streams"][0]["state"] == "RUNNING"
    assert not any("clitcpak" in text for text in configs(hpc).values())
    assert port_of(second["listeners"][0]) != stream.listener


# --- SIGHUP: policy -----------------------------------------------------------------------------


def test_sighup_applies_a_changed_policy_to_new_requests_and_refuses_a_bad_one(start_s2cs, workdir):
    allowed, other = Sink(), Sink()
    policy = workdir / "policy.toml"
    policy.write_text(f'targets = ["127.0.0.1/32:{allowed.port}"]\n')
    hpc = start_s2cs("hpc", "--policy", str(policy))
    running = hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[allowed.port], rate=0)["uid"]
    with pytest.raises(Forbidden):
        hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[other.port], rate=0)

    policy.write_text(f'targets = ["127.0.0.1/32:{other.port}"]\n')
    reload(hpc, RELOADED)
    hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[other.port], rate=0)
    with pytest.raises(Forbidden):
        hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[allowed.port], rate=0)
    assert hpc.call("status", uid=running)["streams"][0]["state"] == "RUNNING"  # made under the old one

    policy.write_text('targets = ["not a network"]\n')
    line = reload(hpc, "reload refused")
    assert f"reload refused: {policy}:1: " in line
    assert line.endswith("; the old templates and policy stay")
    hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[other.port], rate=0)  # the old one stays
    with pytest.raises(Forbidden):
        hpc.call("inbound", remote_ip="127.0.0.1", receiver_ports=[allowed.port], rate=0)
