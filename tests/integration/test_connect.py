"""One command, one call: `s2uc connect`, the two-sided `s2uc release` and the Python API, against
real gateways (s2cs processes, real proxies, real TLS) on 127.0.0.1, and the docs' examples of them
on the docs' addresses."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

import scistream
from scistream.errors import BadRequest, Conflict, Forbidden, NotFound, Unreachable
from scistream.loopback import BIN, S2csProcess, Sink, free_port, send

from .conftest import field, port_of, s2uc
from .test_docs_examples import (  # the docs' gateways, on the docs' addresses
    DOCS,
    HPC_GATEWAY,
    Example,
    Facilities,
    facilities,
    instrument_gateway,
    normalise,
)

__all__ = ["facilities"]  # a fixture of the docs' tests, which the tests below ask for by name


@pytest.fixture
def two(start_s2cs, workdir: Path) -> tuple[S2csProcess, S2csProcess, Path]:
    """An HPC gateway, an instrument gateway, and one PEM file with both their certificates."""
    hpc, inst = start_s2cs("hpc"), start_s2cs("instrument")
    bundle = workdir / "gateways.pem"
    bundle.write_bytes(hpc.cert.read_bytes() + inst.cert.read_bytes())
    return hpc, inst, bundle


@pytest.fixture(autouse=True)
def no_login(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    """The API in this process reads no token store but the test's own (empty) one."""
    monkeypatch.setenv("SCISTREAM_HOME", str(workdir / "home"))


def streams(gw: S2csProcess) -> list[object]:
    return list(gw.call("status")["streams"])


def connect_args(hpc: S2csProcess, inst: S2csProcess, sink_port: int, bundle: Path) -> list[str]:
    return [
        "connect",
        "--inbound-s2cs", hpc.address,
        "--outbound-s2cs", inst.address,
        "--remote_ip", "127.0.0.1",
        "--receiver_ports", str(sink_port),
        "--server_cert", str(bundle),
    ]  # fmt: skip


# --- s2uc connect --------------------------------------------------------------------------------


@pytest.mark.parametrize(("inbound", "outbound"), [("haproxy", "haproxy"), ("stunnel", "haproxy")])
def test_s2uc_connect_carries_data_exactly_and_its_release_command_releases_both(
    start_s2cs, workdir, inbound, outbound
):
    hpc = start_s2cs("hpc", backend=inbound)
    inst = start_s2cs("instrument", backend=outbound)
    bundle = workdir / "gateways.pem"  # both gateways generated their certificate for 127.0.0.1
    bundle.write_bytes(hpc.cert.read_bytes() + inst.cert.read_bytes())
    sink = Sink()
    out = s2uc(*connect_args(hpc, inst, sink.port, bundle)).stdout
    uid, local = field(out, "UID"), field(out, "Listeners")
    (inbound_session,) = hpc.call("status", uid=uid)["streams"]
    assert inbound_session["role"] == "inbound" and inbound_session["targets"] == [f"127.0.0.1:{sink.port}"]
    (outbound_session,) = inst.call("status", uid=uid)["streams"]
    assert outbound_session["targets"] == inbound_session["listeners"]
    assert f"Send the instrument's data to port {port_of(local)} of the instrument gateway." in out

    data = os.urandom(2_000_000)  # at the default 10 Mbit/s: under two seconds
    assert send(("127.0.0.1", port_of(local)), data) == (len(data), hashlib.sha256(data).hexdigest())
    sink.close()

    release = out.splitlines()[-1].split(": ", 1)[1]  # "When done, release both sides: s2uc release ..."
    assert release == (
        f"s2uc release {uid} --s2cs {inst.address} --s2cs {hpc.address} --server_cert {bundle}"
    )
    done = s2uc(*release.split()[1:])
    assert done.stdout.splitlines() == [
        f"Released outbound proxy of stream {uid} on {inst.address}.",
        f"Released inbound proxy of stream {uid} on {hpc.address}.",
    ]
    assert streams(hpc) == [] and streams(inst) == []


@pytest.mark.parametrize(
    ("local_port", "status", "says"),
    [
        ("80", 2, "port 80 is outside this server's port range"),
        ("taken", 6, "CONFLICT from"),
    ],
    ids=["outside-the-range", "taken-by-another-program"],
)
def test_a_failing_outbound_side_leaves_no_inbound_side_behind(two, local_port, status, says):
    hpc, inst, bundle = two
    sink = Sink()
    holder = None
    if local_port == "taken":
        holder = socket.create_server(("0.0.0.0", inst.port_range[0]))
        local_port = str(inst.port_range[0])
    try:
        result = s2uc(*connect_args(hpc, inst, sink.port, bundle), "--local_port", local_port, check=False)
    finally:
        if holder is not None:
            holder.close()
    assert result.returncode == status and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: the outbound side failed: ") and says in line
    assert line.endswith(f"; the inbound side on {hpc.address} was released: nothing is left")
    assert streams(hpc) == [] and streams(inst) == []
    assert hpc.call("info")["free_ports"] == hpc.port_range[1] - hpc.port_range[0] + 1


def test_a_refused_inbound_side_makes_nothing_and_says_so(two):
    hpc, inst, bundle = two
    args = connect_args(hpc, inst, 5001, bundle)
    args[args.index("127.0.0.1")] = "10.9.9.9"  # the test gateways allow loopback targets only
    result = s2uc(*args, check=False)
    assert result.returncode == 4
    assert result.stderr.startswith("error: the inbound side failed: target 10.9.9.9:5001 is not allowed")
    assert result.stderr.rstrip().endswith(f"(FORBIDDEN from {hpc.address}); nothing was made")
    assert streams(hpc) == [] and streams(inst) == []


def test_s2uc_connect_json_and_a_uid_file_for_the_release(two, workdir):
    hpc, inst, bundle = two
    sink = Sink()
    uid_file = workdir / "stream.uid"
    args = [*connect_args(hpc, inst, sink.port, bundle), "--uid-file", str(uid_file)]
    out = s2uc(*args).stdout
    assert field(out, "UID file").startswith(f"{uid_file} (readable by you only")
    uid = uid_file.read_text().strip()
    assert uid not in out and oct(uid_file.stat().st_mode & 0o777) == "0o600"
    release = out.splitlines()[-1].split(": ", 1)[1].split()
    assert release[:4] == ["s2uc", "release", "--uid-file", str(uid_file)]
    s2uc(*release[1:])
    assert streams(hpc) == [] and streams(inst) == []

    found = json.loads(s2uc(*connect_args(hpc, inst, sink.port, bundle), "--json").stdout)
    assert found["listeners"] == inst.call("status", uid=found["uid"])["streams"][0]["listeners"]
    assert found["inbound_listeners"] == found["inbound"]["listeners"]
    assert found["inbound"]["s2cs"] == hpc.address and found["outbound"]["s2cs"] == inst.address
    assert found["limits"]["rate"] == {
        "value": 10000,
        "unit": "kb/s",
        "human": "10 Mbit/s",
        "enforced": True,
        "by": "both sides: the session's shaper",
    }
    s2uc("release", found["uid"], "--s2cs", hpc.address, "--s2cs", inst.address, "--server_cert", str(bundle))


# --- s2uc release on both sides --------------------------------------------------------------------


def test_a_two_sided_release_reports_a_side_already_gone_and_still_releases_the_other(two):
    hpc, inst, bundle = two
    sink = Sink()
    uid = field(s2uc(*connect_args(hpc, inst, sink.port, bundle)).stdout, "UID")
    s2uc("release", uid, "--s2cs", inst.address, "--server_cert", str(bundle))  # one side, by itself

    both = ["release", uid, "--s2cs", inst.address, "--s2cs", hpc.address, "--server_cert", str(bundle)]
    result = s2uc(*both)  # exit status 0: what is gone is what the user wanted
    assert result.stdout == f"Released inbound proxy of stream {uid} on {hpc.address}.\n"
    assert result.stderr == (
        f"note: no stream {uid[:8]} on this server (already released?) (NOT_FOUND from {inst.address})\n"
    )
    assert streams(hpc) == [] and streams(inst) == []

    again = s2uc(*both, check=False)  # on no gateway: as for one --s2cs, NOT_FOUND
    assert again.returncode == 5 and again.stdout == ""
    assert [line.rsplit(" from ", 1)[1] for line in again.stderr.splitlines()] == [
        f"{inst.address})",
        f"{hpc.address})",
    ]


def test_a_two_sided_release_releases_one_side_when_the_other_gateway_is_down(two):
    hpc, inst, bundle = two
    sink = Sink()
    uid = field(s2uc(*connect_args(hpc, inst, sink.port, bundle)).stdout, "UID")
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = s2uc(
        "release", uid, "--s2cs", down, "--s2cs", hpc.address, "--server_cert", str(bundle), check=False
    )
    assert result.returncode == 3
    assert result.stdout == f"Released inbound proxy of stream {uid} on {hpc.address}.\n"
    assert result.stderr == f"error: cannot reach s2cs at {down}: Connection refused\n"
    assert streams(hpc) == []
    s2uc("release", uid, "--s2cs", inst.address, "--server_cert", str(bundle))


def test_release_of_one_side_is_as_the_user_guide_shows_it(two, workdir):
    hpc, inst, bundle = two
    sink = Sink()
    uid = field(s2uc(*connect_args(hpc, inst, sink.port, bundle)).stdout, "UID")
    (workdir / "server.crt").write_bytes(hpc.cert.read_bytes())
    out = s2uc("release", uid, "--s2cs", hpc.address, cwd=workdir).stdout
    assert out == f"Released inbound proxy of stream {uid} on {hpc.address}.\n"
    result = s2uc("release", uid, "--s2cs", hpc.address, cwd=workdir, check=False)
    assert result.returncode == 5
    assert result.stderr == (
        f"error: no stream {uid[:8]} on this server (already released?) (NOT_FOUND from {hpc.address})\n"
    )
    s2uc("release", uid, "--s2cs", inst.address, "--server_cert", str(bundle))


# --- the Python API --------------------------------------------------------------------------------


def test_the_api_streams_data_in_a_with_block_and_releases_both_sides(two):
    hpc, inst, bundle = two
    sink = Sink()
    with scistream.connect(
        inbound=hpc.address,
        outbound=inst.address,
        remote_ip="127.0.0.1",
        receiver_ports=[sink.port],
        server_cert=bundle,
    ) as stream:
        assert stream.limits.rate.value == 10000 and stream.limits.rate.enforced
        data = os.urandom(1_000_000)
        assert send(stream.addresses[0], data) == (len(data), hashlib.sha256(data).hexdigest())
        assert stream.listeners[0] == f"127.0.0.1:{stream.addresses[0][1]}"
        here = scistream.Client(inst.address, bundle).status(stream.uid)
        (session,) = here.streams
        assert (session.role, session.state, session.targets) == (
            "outbound",
            "RUNNING",
            stream.inbound.listeners,
        )
        assert [s.role for s in scistream.Client(hpc.address, str(bundle)).status().streams] == ["inbound"]
    assert stream.released
    assert streams(hpc) == [] and streams(inst) == []


def test_leaving_the_with_block_by_an_exception_releases_both_sides(two):
    hpc, inst, bundle = two
    sink = Sink()
    with (
        pytest.raises(RuntimeError, match="the analysis crashed"),
        scistream.connect(
            inbound=hpc.address,
            outbound=inst.address,
            remote_ip="127.0.0.1",
            receiver_ports=[sink.port],
            server_cert=bundle,
        ) as stream,
    ):
        assert len(streams(hpc)) == 1 and len(streams(inst)) == 1
        raise RuntimeError("the analysis crashed")
    assert stream.released
    assert streams(hpc) == [] and streams(inst) == []


def test_the_api_raises_the_projects_errors_with_their_codes(two):
    hpc, inst, bundle = two
    with pytest.raises(Forbidden) as refused:
        scistream.connect(
            inbound=hpc.address,
            outbound=inst.address,
            remote_ip="10.9.9.9",
            receiver_ports=[5001],
            server_cert=bundle,
        )
    assert refused.value.code == "FORBIDDEN" and refused.value.exit_status == 4
    assert streams(hpc) == []

    client = scistream.Client(hpc.address, bundle)
    unknown = "0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"
    with pytest.raises(NotFound) as missing:
        client.release(unknown)
    assert missing.value.code == "NOT_FOUND" and missing.value.remote
    assert missing.value.message == "no stream 0b7c1f2e on this server (already released?)"
    with pytest.raises(NotFound):
        client.status(unknown)
    with pytest.raises(BadRequest, match="outside this server's port range"):
        scistream.Client(inst.address, bundle).outbound(unknown, ["127.0.0.1:5100"], receiver_ports=[80])
    with pytest.raises(Unreachable, match="cannot reach s2cs at"):
        scistream.Client(f"127.0.0.1:{free_port()}", bundle).info()
    with pytest.raises(Unreachable, match="does not vouch for"):
        scistream.Client(hpc.address, inst.cert).info()  # the other gateway's certificate alone

    info = client.info()
    assert info.server == hpc.address and info.port_range == f"{hpc.port_range[0]}-{hpc.port_range[1]}"
    assert info.backend.type == "haproxy" and info.auth.enabled is False


def test_the_api_client_sets_up_and_releases_each_side_itself(two):
    hpc, inst, bundle = two
    sink = Sink()
    hpc_client, inst_client = scistream.Client(hpc.address, bundle), scistream.Client(inst.address, bundle)
    made = hpc_client.inbound("127.0.0.1", [sink.port], num_conn=2, rate=0)
    assert made.limits.rate.value == 0 and made.limits.num_conn.value == 2
    port = inst.port_range[1]
    sent = inst_client.outbound(made.uid, made.listeners, receiver_ports=[port], num_conn=2, rate=0)
    assert sent.listeners == (f"127.0.0.1:{port}",) and sent.bind == "127.0.0.1"
    with pytest.raises(Conflict):  # the stream has its outbound side here already
        inst_client.outbound(made.uid, made.listeners)
    data = os.urandom(500_000)
    assert send(("127.0.0.1", port), data)[0] == len(data)
    outcomes = scistream.release(made.uid, s2cs=[inst.address, hpc.address], server_cert=bundle)
    assert [(o.server, o.roles) for o in outcomes] == [
        (inst.address, ("outbound",)),
        (hpc.address, ("inbound",)),
    ]
    assert streams(hpc) == [] and streams(inst) == []


# --- the docs' examples, on the docs' addresses --------------------------------------------------

TRANSCRIPT = re.compile(r"<!-- connect example -->\n```\n(?P<body>.*?)```", re.DOTALL)


def connect_examples() -> list[Example]:
    text = (DOCS / "user-guide.md").read_text()
    found = []
    for match in TRANSCRIPT.finditer(text):
        steps: list[tuple[str, list[str]]] = []
        for line in match["body"].splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                steps[-1][1].append(line)
        where = f"docs/user-guide.md:{text.count(chr(10), 0, match.start()) + 1}"
        found.append(Example(where, tuple((c, tuple(out)) for c, out in steps)))
    return found


def both_gateways(world: Facilities) -> Path:
    """The docs' two gateways, and their certificates in gateways.pem as the docs make it."""
    assert world.start_gateway(world.forward(HPC_GATEWAY))[-1].startswith("s2cs ready on ")
    instrument_gateway(world)
    bundle = world.workdir / "gateways.pem"
    bundle.write_bytes(world.certs["hpc"].read_bytes() + world.certs["instrument"].read_bytes())
    return bundle


def test_the_user_guides_connect_and_release_examples(facilities):
    both_gateways(facilities)
    found = connect_examples()
    for example in found:
        facilities.run(example)
    assert len(found) >= 3, [e.where for e in found]


def test_the_python_api_guides_example(facilities):
    both_gateways(facilities)
    text = (DOCS / "python-api.md").read_text()
    code = re.search(r"<!-- python example -->\n```python\n(.*?)```", text, re.DOTALL)
    shown = re.search(r"<!-- python output -->\n```\n(.*?)```", text, re.DOTALL)
    assert code and shown
    program = facilities.forward(code[1]).replace(
        "receiver_ports=[5001]", f"receiver_ports=[{facilities.service.port}]"
    )
    result = subprocess.run(
        [str(BIN / "python"), "-c", program],
        capture_output=True,
        text=True,
        cwd=facilities.workdir,
        timeout=180,
        env={**os.environ, "SCISTREAM_HOME": str(facilities.workdir / "home")},
    )
    assert result.returncode == 0, result.stderr
    uid_prefix = re.search(r"stream (\w{8}):", result.stdout)
    assert uid_prefix
    got = [facilities.back(line) for line in result.stdout.replace(uid_prefix[1], "5d2f8a61").splitlines()]
    assert normalise(got) == normalise(shown[1].splitlines())
    assert facilities.service.connections == 1  # what the example sent reached the service
