"""The stunnel template and backend: golden files, and stunnel's own dry run of each config.

After a deliberate template change: SCISTREAM_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_stunnel.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import jinja2
import pytest

from scistream.errors import BackendFailed
from scistream.s2ds import backend as backend_module
from scistream.s2ds.haproxy import HaproxyBackend
from scistream.s2ds.render import SessionFiles, default_templates, environment, render
from scistream.s2ds.stunnel import StunnelBackend

from .test_render import GOLDEN, SESSION_DIR, SESSIONS, UID


@pytest.fixture(scope="module")
def env() -> jinja2.Environment:
    return environment(None, default_templates())


@pytest.fixture
def session_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ss-stunnel-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def stunnel_config(name: str, env: jinja2.Environment, directory: Path = SESSION_DIR) -> str:
    spec = SESSIONS[name]
    # As s2cs makes them: an outbound proxy has its shaper in front (Backend.shaper_in_front).
    spec = replace(spec, shaped=True, front=spec.role == "outbound")
    return render(spec, SessionFiles(directory), "stunnel.conf.j2", env)


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_rendered_stunnel_config_matches_the_golden_file(name, env):
    path = GOLDEN / f"{name}.stunnel.conf"
    text = stunnel_config(name, env)
    if os.environ.get("SCISTREAM_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} differs; regenerate with SCISTREAM_UPDATE_GOLDEN=1"


def test_every_listener_demands_the_stream_certificate_and_tls_1_3(env):
    text = stunnel_config("inbound-two-listeners-rate", env)
    assert text.count("verifyPeer = yes") == 2
    assert text.count(f"CAfile = {SESSION_DIR}/stream.crt") == 2
    assert text.count("sslVersionMin = TLSv1.3") == 2
    # stunnel logs to stderr, which s2cs sends to a file: no pid file, no syslog, no pipe
    assert "foreground = yes" in text and "pid =\n" in text


def test_an_inbound_stunnel_reaches_its_service_through_the_shaper(env):
    text = stunnel_config("inbound-one-listener-unlimited", env)
    assert "accept = 0.0.0.0:5100" in text
    assert f"connect = {SESSION_DIR}/run/shaper-0.sock" in text


def test_an_outbound_stunnel_has_its_shaper_in_front_and_reaches_the_peer_itself(env):
    """The shaper would cut the peer's TLS records into pieces, which stunnel 5.68 mishandles."""
    text = stunnel_config("outbound-rate", env)
    assert "client = yes" in text
    assert f"accept = {SESSION_DIR}/run/shaper-0.sock" in text
    assert "connect = 192.0.2.7:5100" in text


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_the_dry_run_accepts_every_golden_config(name, session_dir, env):
    backend = StunnelBackend(env)
    files = SessionFiles(session_dir)
    backend.write_credentials(UID, files)
    config = session_dir / "candidate.conf"
    config.write_text(stunnel_config(name, env, session_dir))
    backend.check(config, files)  # raises BackendFailed with stunnel's words otherwise
    assert [p.name for p in session_dir.iterdir() if p.name.startswith(".dry")] == []


def test_the_dry_run_refuses_a_broken_config_in_stunnel_s_words(session_dir, env):
    backend = StunnelBackend(env)
    files = SessionFiles(session_dir)
    backend.write_credentials(UID, files)
    config = session_dir / "candidate.conf"
    config.write_text(stunnel_config("outbound-rate", env, session_dir) + "no-such-option = 1\n")
    with pytest.raises(BackendFailed, match="no-such-option"):
        backend.check(config, files)


def test_the_dry_run_binds_none_of_the_real_ports(session_dir, env):
    """It must not take the listener ports: the real proxy starts right after it."""
    import socket

    backend = StunnelBackend(env)
    files = SessionFiles(session_dir)
    backend.write_credentials(UID, files)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        probe.listen()  # the port is busy: a dry run that bound it would fail
        port = probe.getsockname()[1]
        config = session_dir / "candidate.conf"
        text = stunnel_config("outbound-rate", env, session_dir).replace(
            "127.0.0.1:5200", f"127.0.0.1:{port}"
        )
        config.write_text(text)
        backend.check(config, files)


@pytest.mark.parametrize("make", [HaproxyBackend, StunnelBackend])
def test_without_splice_no_limit_is_claimed_that_nobody_enforces(make, env, monkeypatch):
    backend = make(env)
    caps = backend.capabilities
    assert caps.rate.enforced and caps.num_conn.enforced
    monkeypatch.setattr(backend_module, "SHAPER", False)
    monkeypatch.setattr("scistream.s2ds.stunnel.SHAPER", False)
    caps = backend.capabilities
    assert not caps.rate.enforced
    assert "splice" in caps.rate.reason
    assert caps.num_conn.enforced == (make is HaproxyBackend)  # maxconn needs no shaper
    assert not backend.shaped(1_250_000, 2)


@pytest.mark.parametrize("make", [HaproxyBackend, StunnelBackend])
@pytest.mark.parametrize("name", ["inbound-two-listeners-rate", "outbound-rate"])
def test_the_shaper_command_line_keeps_a_state_dir_with_an_equals_sign_whole(make, name, env):
    """The operator guide allows any state dir; `--route=PATH=ADDR` was split at the first "=",
    so the shaper listened on a path outside the state dir and every request failed."""
    from scistream.s2ds import shaper

    directory = Path("/srv/state=a/b=c/sessions/5f0c2a9e41b7")
    spec = replace(SESSIONS[name], shaped=True)
    launch = make(env).shaper_launch(spec, SessionFiles(directory))
    assert launch.argv[1:3] == ("-m", "scistream.s2ds.shaper")
    found = shaper.options(launch.argv[3:])
    sockets = [str(directory / "run" / f"shaper-{i}.sock") for i in range(len(spec.listeners))]
    if spec.front:  # outbound: the listener port in front, the proxy behind it
        expected = tuple(((lst.bind_ip, lst.port), s) for lst, s in zip(spec.listeners, sockets, strict=True))
    else:
        expected = tuple(
            (s, (lst.target_ip, lst.target_port)) for lst, s in zip(spec.listeners, sockets, strict=True)
        )
    assert found.routes == expected
    assert found.rate == spec.rate_bytes and found.max_conn == spec.num_conn


def test_a_dry_run_does_not_outlive_the_s2cs_that_started_it(tmp_path):
    """A config check that an s2cs killed with SIGKILL leaves behind would run for ever, known to
    no later s2cs (found by the soak). Here the dry run is a stand-in that never finishes; the
    process that checks is killed while it waits."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    fake = tmp_path / "stunnel"
    fake.write_text('#!/bin/sh\n[ "$1" = -version ] && { echo "stunnel 5.68"; exit 0; }\nexec sleep 300\n')
    fake.chmod(0o755)
    config = tmp_path / "proxy.conf"
    config.write_text("foreground = yes\n")
    checker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path\n"
            "from scistream.s2ds.render import SessionFiles, default_templates, environment\n"
            "from scistream.s2ds.stunnel import StunnelBackend\n"
            "backend = StunnelBackend(environment(None, default_templates()), sys.argv[1])\n"
            "backend.check(Path(sys.argv[2]), SessionFiles(Path(sys.argv[3])))\n",
            str(fake),
            str(config),
            str(tmp_path),
        ]
    )
    try:
        deadline = time.monotonic() + 60
        dry: list[psutil.Process] = []
        while not dry and time.monotonic() < deadline:
            dry = psutil.Process(checker.pid).children()
            time.sleep(0.05)
        assert dry, "the check started no dry run"
        checker.send_signal(signal.SIGKILL)
        checker.wait(60)
        _, alive = psutil.wait_procs(dry, timeout=30)
        assert alive == [], "the dry run outlived the s2cs that started it"
    finally:
        checker.kill()
        checker.wait(60)
        for proc in dry:
            if proc.is_running():
                proc.kill()
