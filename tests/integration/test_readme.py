"""README.md's use cases, its commands run as written, from a directory of the user's own: each
names its gateway's certificate, and nothing relies on a ./server.crt that is not there."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

from scistream.loopback import Sink, send

from .conftest import field, port_of, s2uc, wait_for

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> dict[str, list[str]]:
    """The s2uc commands of README's shell blocks, by their subcommand, in order."""
    text = README.read_text()
    found: dict[str, list[str]] = {}
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            if line.startswith("s2uc "):
                found.setdefault(line.split()[1], []).append(line)
    return found


def test_every_s2uc_command_of_the_readme_names_its_gateways_certificate():
    for lines in readme_commands().values():
        for line in lines:
            if "--s2cs" in line:
                assert "--server_cert" in line, f"README: {line}"


def test_the_readmes_use_cases_run_as_written_from_another_directory(start_s2cs, workdir):
    hpc = start_s2cs("hpc")
    inst = start_s2cs("instrument")
    user = workdir / "user"  # no server.crt here: the user's own directory
    user.mkdir()
    shutil.copy(hpc.cert, user / "hpc.crt")
    shutil.copy(inst.cert, user / "instrument.crt")
    sink = Sink()
    port = inst.port_range[0]
    names = {
        "hpc.facility.org:5000": hpc.address,
        "instrument.facility.org:5000": inst.address,
        "10.0.1.5": "127.0.0.1",
        "192.168.2.10": "127.0.0.1",
        "--receiver_ports 5001": f"--receiver_ports {sink.port}",
        "--receiver_ports 5100": f"--receiver_ports {port}",
    }

    def run(line: str, **more: str) -> str:
        for doc, here in {**names, **more}.items():
            line = line.replace(doc, here)
        return s2uc(*shlex.split(line)[1:], cwd=user).stdout

    commands = readme_commands()
    (inbound,) = commands["inbound_request"]
    made = run(inbound)
    uid, listener = field(made, "UID"), field(made, "Listeners")
    (outbound,) = commands["outbound_request"]
    sent_to = run(outbound, **{"UID": uid, "203.0.113.7:5100": listener})
    assert port_of(field(sent_to, "Listeners")) == port

    data = b"beamline frame " * 1000
    send(("127.0.0.1", port), data)
    wait_for(lambda: sink.received == len(data), what="the instrument's bytes at the service")
    for line in commands["release"][:2]:  # "When done": each side on its own gateway
        assert "Released" in run(line, UID=uid)
    sink.close()
