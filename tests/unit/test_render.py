"""The HAProxy template, tested three ways: golden files, StrictUndefined, and `haproxy -c`.

After a deliberate template change, regenerate the golden files and review the diff:

    SCISTREAM_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_render.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jinja2
import pytest

from scistream.credentials import stream_credentials
from scistream.errors import ConfigError
from scistream.protocol import rate_bytes_per_second
from scistream.s2ds.haproxy import find_binary
from scistream.s2ds.render import (
    ListenerSpec,
    ProxySpec,
    SessionFiles,
    default_templates,
    environment,
    hostport,
    render,
)

GOLDEN = Path(__file__).parent / "golden"
UID = "0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"
# Golden configs are rendered for this session directory; the `haproxy -c` check moves them to a real one.
SESSION_DIR = Path("/var/lib/scistream/sessions/5f0c2a9e41b7")

SESSIONS = {
    # s2uc inbound_request --remote_ip 10.0.1.5 --receiver_ports 5001 --rate 0
    "inbound-one-listener-unlimited": ProxySpec(
        name="5f0c2a9e41b7",
        role="inbound",
        listeners=(ListenerSpec("0.0.0.0", 5100, "10.0.1.5", 5001),),
        num_conn=5,
        rate_bytes=0,
        shaped=False,
    ),
    # s2uc inbound_request --remote_ip fd00::5 --receiver_ports 5001,5002 --num_conn 8 (rate: default)
    "inbound-two-listeners-rate": ProxySpec(
        name="5f0c2a9e41b7",
        role="inbound",
        listeners=(
            ListenerSpec("0.0.0.0", 5100, "fd00::5", 5001),
            ListenerSpec("0.0.0.0", 5101, "fd00::5", 5002),
        ),
        num_conn=8,
        rate_bytes=rate_bytes_per_second(10_000),
        shaped=True,
    ),
    # s2uc outbound_request --remote_ip 127.0.0.1 --receiver_ports 5200 --rate 100000 UID 192.0.2.7:5100
    "outbound-rate": ProxySpec(
        name="5f0c2a9e41b7",
        role="outbound",
        listeners=(ListenerSpec("127.0.0.1", 5200, "192.0.2.7", 5100),),
        num_conn=5,
        rate_bytes=rate_bytes_per_second(100_000),
        shaped=True,
        front=True,  # as s2cs makes it: an outbound proxy's shaper is in front (Backend.shaper_in_front)
        sources=("127.0.0.0/8", "::1/128"),  # the default of the default entry address, loopback
    ),
    # s2cs --entry-ip 10.0.2.1 (a /24); s2uc outbound_request --rate 0 UID 192.0.2.7:5100
    "outbound-unlimited": ProxySpec(
        name="5f0c2a9e41b7",
        role="outbound",
        listeners=(ListenerSpec("10.0.2.1", 5200, "192.0.2.7", 5100),),
        num_conn=5,
        rate_bytes=0,
        shaped=False,  # HAProxy: no shaper, its own listener is the plain entry
        sources=("10.0.2.0/24",),
    ),
}


@pytest.fixture(scope="module")
def env() -> jinja2.Environment:
    return environment(None, default_templates())


def render_session(name: str, env: jinja2.Environment, directory: Path = SESSION_DIR) -> str:
    return render(SESSIONS[name], SessionFiles(directory), "haproxy.cfg.j2", env)


def assert_matches_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.cfg"
    if os.environ.get("SCISTREAM_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.is_file(), f"no golden file {path}; create it with SCISTREAM_UPDATE_GOLDEN=1"
    assert text == path.read_text(), (
        f"{path.name} differs from the rendered config; if the change is intended, "
        "regenerate with SCISTREAM_UPDATE_GOLDEN=1 and review the diff"
    )


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_rendered_config_matches_the_golden_file(name, env):
    assert_matches_golden(name, render_session(name, env))


# --- what the golden files promise, stated where a reader of a failure will look ------------------


def test_inbound_listeners_demand_the_stream_certificate(env):
    text = render_session("inbound-two-listeners-rate", env)
    for index, port in enumerate((5100, 5101), start=1):
        assert (
            f"bind 0.0.0.0:{port} id {index} ssl crt {SESSION_DIR}/stream.pem "
            f"ca-file {SESSION_DIR}/stream.crt verify required"
        ) in text
    assert "maxconn 8" in text


def test_outbound_proxy_verifies_the_peer_holds_the_stream_certificate(env):
    text = render_session("outbound-rate", env)
    assert "server peer 192.0.2.7:5100 maxconn 5 ssl crt" in text
    assert "verify required verifyhost scistream-stream" in text


def test_a_rate_limited_outbound_proxy_has_its_shaper_on_the_plain_side(env):
    """The shaper has the listener port and passes plain data on; TLS leaves HAProxy whole."""
    text = render_session("outbound-rate", env)
    assert f"bind unix@{SESSION_DIR}/run/shaper-0.sock id 1 mode 600\n" in text
    assert "bind 127.0.0.1:5200" not in text
    assert "unix@" not in text.split("backend target0")[1]


def test_a_rate_limited_session_reaches_its_targets_through_the_shaper(env):
    text = render_session("inbound-two-listeners-rate", env)
    assert f"server service unix@{SESSION_DIR}/run/shaper-0.sock" in text
    assert f"server service unix@{SESSION_DIR}/run/shaper-1.sock" in text
    assert "relays to [fd00::5]:5002" in text


def test_an_unlimited_session_connects_straight_to_its_target(env):
    text = render_session("inbound-one-listener-unlimited", env)
    assert "server service 10.0.1.5:5001 maxconn 5\n" in text
    assert "shaper" not in text.split("backend target0")[1]


def test_the_uid_never_appears_in_a_config(env):
    for name in SESSIONS:
        assert UID not in render_session(name, env)


@pytest.mark.parametrize(("ip", "shown"), [("10.0.1.5", "10.0.1.5:5001"), ("fd00::5", "[fd00::5]:5001")])
def test_hostport_brackets_v6_addresses(ip, shown):
    assert hostport(ip, 5001) == shown


# --- StrictUndefined and the finalize guard ------------------------------------------------------


def test_a_template_naming_a_missing_variable_fails_instead_of_rendering_blank(tmp_path):
    (tmp_path / "haproxy.cfg.j2").write_text("frontend x\n    maxconn {{ proxy.max_connections }}\n")
    env = environment(tmp_path, default_templates())
    with pytest.raises(jinja2.UndefinedError, match="max_connections"):
        render_session("inbound-one-listener-unlimited", env)


def test_a_template_naming_an_unknown_top_level_variable_fails(tmp_path):
    (tmp_path / "haproxy.cfg.j2").write_text("bind {{ listener_ip }}:5100\n")
    env = environment(tmp_path, default_templates())
    with pytest.raises(jinja2.UndefinedError, match="listener_ip"):
        render_session("inbound-one-listener-unlimited", env)


def test_an_operators_template_takes_precedence_over_the_shipped_one(tmp_path):
    (tmp_path / "haproxy.cfg.j2").write_text("# site template for {{ proxy.name }}\n")
    env = environment(tmp_path, default_templates())
    assert render_session("inbound-one-listener-unlimited", env) == "# site template for 5f0c2a9e41b7\n"


@pytest.mark.parametrize(
    "bad",
    [
        "5f0c\n    bind *:22",
        "5f0c#x",
        '5f0c"x',
        "5f0c'x",
        "5f0c{x",
        "5f0c x",
        "5f0c;x",
    ],
)
def test_values_that_could_inject_a_config_line_are_refused(bad, env):
    spec = SESSIONS["inbound-one-listener-unlimited"]
    with pytest.raises(ConfigError, match="refusing to render unsafe value"):
        render(
            ProxySpec(bad, spec.role, spec.listeners, spec.num_conn, spec.rate_bytes, spec.shaped),
            SessionFiles(SESSION_DIR),
            "haproxy.cfg.j2",
            env,
        )


@pytest.mark.parametrize(
    "listener",
    [
        ListenerSpec("0.0.0.0\n    bind *", 5100, "10.0.1.5", 5001),
        ListenerSpec("0.0.0.0", 5100, "10.0.1.5 # x", 5001),
    ],
)
def test_a_filtered_value_is_checked_after_the_filter(listener, env):
    spec = SESSIONS["inbound-one-listener-unlimited"]
    with pytest.raises(ConfigError, match="refusing to render unsafe value"):
        render(
            ProxySpec(spec.name, spec.role, (listener,), spec.num_conn, spec.rate_bytes, spec.shaped),
            SessionFiles(SESSION_DIR),
            "haproxy.cfg.j2",
            env,
        )


def test_a_session_directory_with_a_space_is_refused(env):
    with pytest.raises(ConfigError, match="refusing to render unsafe value"):
        render_session("inbound-one-listener-unlimited", env, Path("/srv/my streams/5f0c"))


# --- the real HAProxy accepts every golden config ------------------------------------------------


@pytest.fixture
def session_dir() -> Iterator[Path]:
    # Short on purpose: the config names Unix sockets, whose paths must fit in 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="ss-render-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_haproxy_accepts_the_golden_config(name, session_dir):
    golden = (GOLDEN / f"{name}.cfg").read_text()
    files = SessionFiles(session_dir)
    creds = stream_credentials(UID)
    files.cert.write_bytes(creds.cert_pem)
    files.key.write_bytes(creds.key_pem)
    files.pem.write_bytes(creds.cert_pem + creds.key_pem)
    files.config.write_text(golden.replace(str(SESSION_DIR), str(session_dir)))
    binary = find_binary(None)
    result = subprocess.run(
        [binary, "-c", "-f", str(files.config)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"{binary} -c refused {name}:\n{result.stdout}{result.stderr}"
    assert "Configuration file is valid" in result.stdout + result.stderr
