"""servers.json: which S2CS gets the token of which scope."""

from __future__ import annotations

import json
import os
import stat

import pytest

from scistream.client.address import Server
from scistream.client.servers import Known, ServerPins, ServerScopes, key, parse, render
from scistream.errors import ConfigError

A = "https://auth.globus.org/scopes/3a1b6c2d-0e4f-4a5b-8c7d-9e0f1a2b3c4d/scistream"
B = "https://auth.globus.org/scopes/9c8b7a6d-5e4f-4321-8fed-cba987654321/scistream"


def test_a_server_is_kept_by_host_and_port_as_the_user_names_it():
    assert key(Server("HPC.Facility.org", 5000)) == "hpc.facility.org:5000"
    assert key(Server("::1", 5001)) == "[::1]:5001"
    assert key(Server("hpc", 5000)) != key(Server("hpc", 5001))


PIN = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def test_render_and_parse_round_trip(tmp_path):
    known = Known({"hpc:5000": A, "[::1]:5001": B}, {"hpc:5000": PIN})
    assert parse(render(known), tmp_path / "servers.json") == known


def test_a_file_of_an_s2uc_from_before_pinning_is_read_with_nothing_pinned(tmp_path):
    text = json.dumps({"version": 1, "servers": {"hpc:5000": A}})
    assert parse(text, tmp_path / "servers.json") == Known({"hpc:5000": A}, {})


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '{"servers": {}}',
        '{"version": 2, "servers": {}}',
        '{"version": 1, "servers": {"h:1": 5}}',
        '{"version": 1, "servers": {}, "certificates": ["h:1"]}',
    ],
)
def test_a_file_that_is_not_a_servers_file_is_named_with_what_to_do(tmp_path, text):
    path = tmp_path / "servers.json"
    with pytest.raises(ConfigError) as caught:
        parse(text, path)
    assert str(path) in caught.value.message and "s2uc login --s2cs" in caught.value.message


def test_bind_forget_and_a_private_file(tmp_path):
    home = tmp_path / ".scistream"
    store = ServerScopes(home)
    hpc, beamline = Server("hpc", 5000), Server("beamline", 5000)
    assert store.scope_of(hpc) is None  # no file yet
    store.bind(hpc, A)
    store.bind(beamline, B)
    assert store.scope_of(Server("HPC", 5000)) == A
    assert store.scope_of(Server("hpc", 5001)) is None
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert os.listdir(home) == ["servers.json"]  # no temporary file left behind
    assert store.forget(A) == 1
    assert store.scope_of(hpc) is None and store.scope_of(beamline) == B
    assert store.forget(None) == 1
    assert store.scope_of(beamline) is None


def test_a_servers_file_others_could_write_is_refused(tmp_path):
    store = ServerScopes(tmp_path)
    store.bind(Server("hpc", 5000), A)
    store.path.chmod(0o622)
    with pytest.raises(ConfigError, match="could have been written by another user"):
        store.scope_of(Server("hpc", 5000))
    store.path.unlink()
    store.path.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ConfigError, match="could have been written by another user"):
        store.scope_of(Server("hpc", 5000))


def test_a_pin_is_kept_per_server_and_a_logout_keeps_it(tmp_path):
    pins, scopes = ServerPins(tmp_path), ServerScopes(tmp_path)
    hpc = Server("hpc", 5000)
    assert pins.pinned(hpc) is None
    scopes.bind(hpc, A)
    assert pins.settle(hpc, PIN) is None  # the first: pinned
    assert pins.settle(hpc, OTHER) == PIN  # another: refused, the pinned one said
    assert pins.settle(hpc, PIN) is None
    assert pins.pinned(Server("HPC", 5000)) == PIN and pins.pinned(Server("hpc", 5001)) is None
    assert scopes.scope_of(hpc) == A  # pinning kept the login
    assert scopes.forget(None) == 1
    assert pins.pinned(hpc) == PIN  # who the server is does not depend on a login
    assert stat.S_IMODE(pins.path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["servers.json"]  # no lock or temporary file left behind
    assert pins.settle(hpc, OTHER, replace_pinned=True) is None
    assert pins.pinned(hpc) == OTHER
