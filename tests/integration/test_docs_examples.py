"""The docs' examples, run as written against real gateways: their output must be the one shown.

A fenced block in docs/*.md preceded by `<!-- example -->` is a transcript: `$ COMMAND` lines,
each followed by the output it prints (standard output and standard error, in order). One preceded
by `<!-- example: COMMAND -->` is the whole output of COMMAND, for a block that shows output only.
A transcript's `s2cs ...` starts a gateway, whose output up to its ready line is compared; it runs
on for the examples after it.

The docs' addresses are real here: interfaces of the test's private network namespace have them.
What differs is in SUBSTITUTIONS below (host names, ports, directories) and in `normalise` (times,
pids): nothing else may.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scistream.loopback import BIN, Sink, free_port, free_port_range, send

from ..needs import require_netns
from .conftest import field, port_of, s2uc, wait_for

DOCS = Path(__file__).resolve().parents[2] / "docs"
HPC, INSTRUMENT, SERVICE = "203.0.113.7", "198.51.100.20", "10.0.1.5"
ENTRY = "192.168.2.10"  # the instrument gateway on the instruments' network: its entry address
RANGE = 101  # 5100-5200, as in the docs

HPC_GATEWAY = "s2cs --listener-ip 203.0.113.7 --port-range 5100-5200 --state-dir /var/lib/scistream"
RESTART = "the last lines of s2cs, started again after kill -9"  # the operator guide's recovery

EXAMPLE = re.compile(r"<!-- example(?:: (?P<command>.*?))? -->\n```[a-z]*\n(?P<body>.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Example:
    where: str  # docs/FILE.md:LINE
    steps: tuple[tuple[str, tuple[str, ...]], ...]  # (command, the output shown)


def examples(name: str) -> list[Example]:
    text = (DOCS / name).read_text()
    found = []
    for match in EXAMPLE.finditer(text):
        where = f"docs/{name}:{text.count(chr(10), 0, match.start()) + 1}"
        lines = match["body"].splitlines()
        if match["command"] is not None:
            found.append(Example(where, ((match["command"], tuple(lines)),)))
            continue
        steps: list[tuple[str, list[str]]] = []
        for line in lines:
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                assert steps, f"{where}: a transcript starts with a $ line"
                steps[-1][1].append(line)
        found.append(Example(where, tuple((c, tuple(out)) for c, out in steps)))
    return found


class Facilities:
    """The docs' two gateways and the HPC service, on their addresses, with free ports."""

    def __init__(self, workdir: Path, service: Sink) -> None:
        self.workdir = workdir
        self.hpc_port, self.inst_port = free_port(), free_port()
        self.hpc_range = free_port_range(RANGE)[0]
        self.inst_range = free_port_range(RANGE)[0]
        self.service = service
        self.gateways: dict[str, subprocess.Popen[str]] = {}
        self.certs: dict[str, Path] = {}
        self.uids: dict[str, str] = {}  # real UID -> the one the docs show for it

    def substitutions(self) -> list[tuple[str, str]]:
        """SUBSTITUTIONS: what the docs write -> what runs here. Outputs are mapped back."""
        h, i = self.hpc_range, self.inst_range
        subs = [
            ("hpc.facility.org:5000", f"{HPC}:{self.hpc_port}"),
            (f"{HPC}:5000", f"{HPC}:{self.hpc_port}"),
            ("instrument.facility.org:5000", f"{INSTRUMENT}:{self.inst_port}"),
            # the operator guide's s2cs has the default control port, 5000, and the docs' state dir
            ("--state-dir /var/lib/scistream", f"--state-dir {self.workdir}/hpc --port {self.hpc_port}"),
            ("/var/lib/scistream", f"{self.workdir}/hpc"),
            ("--port-range 5100-5200", f"--port-range {h}-{h + RANGE - 1}"),
            (f"{SERVICE}:5001", f"{SERVICE}:{self.service.port}"),
            ("--receiver_ports 5001", f"--receiver_ports {self.service.port}"),
        ]
        for k in range(RANGE):
            subs += [
                (f"{HPC}:{5100 + k}", f"{HPC}:{h + k}"),
                (f"{INSTRUMENT}:{5100 + k}", f"{INSTRUMENT}:{i + k}"),
                (f"{ENTRY}:{5100 + k}", f"{ENTRY}:{i + k}"),
            ]
            subs += [(f"--receiver_ports {5100 + k}", f"--receiver_ports {i + k}")]  # outbound, instrument
        return subs

    def ports_back(self) -> dict[str, str]:
        """Each real port -> the docs' one, for outputs that name a port alone."""
        back = {str(self.hpc_port): "5000", str(self.inst_port): "5000", str(self.service.port): "5001"}
        for k in range(RANGE):
            back[str(self.hpc_range + k)] = back[str(self.inst_range + k)] = str(5100 + k)
        return back

    def forward(self, command: str) -> str:
        for doc_uid, real in ((d, r) for r, d in self.uids.items()):
            command = command.replace(doc_uid, real)
        return _replace(command, dict(self.substitutions()))

    def back(self, text: str, command: str = "") -> str:
        """An output as the docs show it; an address typed in `command` comes back as typed."""
        text = text.replace(str(self.workdir / "hpc"), "/var/lib/scistream")
        pairs = [(d, r) for d, r in self.substitutions() if ":" in d]
        table = {real: doc for doc, real in pairs}
        table.update({real: doc for doc, real in pairs if doc in command})
        text = _replace(text, table)
        for real, doc in self.uids.items():
            text = text.replace(real, doc).replace(real[:8], doc[:8])
        ports = self.ports_back()
        return re.sub(r"(?<![\d.])\d{5}(?!\d)", lambda m: ports.get(m[0], m[0]), text)

    def run(self, example: Example) -> None:
        for command, shown in example.steps:
            real = self.forward(command)
            if command == RESTART:
                got = self.restart_after_kill()[-len(shown) :]
            elif command.startswith("s2cs "):
                got = self.start_gateway(real)
            else:
                got = self.s2uc(real)
            self.learn_uids(shown, got)
            got = [self.back(line, command) for line in got]
            assert normalise(got) == normalise(list(shown)), f"{example.where}: $ {command}"

    def start_gateway(self, command: str) -> list[str]:
        """Start it, and return its output up to its ready line (or its end)."""
        argv = shlex.split(command)
        name = "hpc" if argv[argv.index("--listener-ip") + 1] == HPC else "instrument"
        proc = subprocess.Popen(
            [str(BIN / argv[0]), *argv[1:]], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.gateways[name] = proc
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith("s2cs ready on "):
                break
        # The rest of its log is not shown in the docs; read it so that the gateway never blocks.
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        state = Path(argv[argv.index("--state-dir") + 1])
        self.certs[name] = state / "server.crt"
        return lines

    def restart_after_kill(self) -> list[str]:
        """kill -9 the HPC gateway, then the same command again: it re-adopts the streams."""
        self.gateways["hpc"].kill()
        self.gateways["hpc"].wait(timeout=60)
        return self.start_gateway(self.forward(HPC_GATEWAY))

    def s2uc(self, command: str) -> list[str]:
        """As its user runs it: in a directory where the named gateway's server.crt is."""
        argv = shlex.split(command)
        target = argv[argv.index("--s2cs") + 1] if "--s2cs" in argv else ""
        name = "hpc" if target.startswith(HPC) else "instrument"
        shutil.copy(self.certs[name], self.workdir / "server.crt")
        result = subprocess.run(
            [str(BIN / argv[0]), *argv[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.workdir,
            timeout=180,
            env={**os.environ, "SCISTREAM_HOME": str(self.workdir / "home")},
        )
        return result.stdout.splitlines()

    def learn_uids(self, shown: tuple[str, ...], got: list[str]) -> None:
        """A UID the gateway made stands for the one the docs show in the same place."""
        for doc, real in zip(UID.findall("\n".join(shown)), UID.findall("\n".join(got)), strict=False):
            self.uids.setdefault(real, doc)

    def stop(self) -> None:
        for proc in self.gateways.values():
            proc.terminate()
        for proc in self.gateways.values():
            proc.wait(timeout=120)
        self.service.close()


UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def _replace(text: str, table: dict[str, str]) -> str:
    """Every key of `table` in `text` at once, longest first, never inside a longer number."""
    keys = sorted(table, key=len, reverse=True)
    pattern = re.compile(r"(?<![\d.])(?:" + "|".join(map(re.escape, keys)) + r")(?!\d)")
    return pattern.sub(lambda m: table[m[0]], text)


def normalise(lines: list[str]) -> list[str]:
    """What varies from run to run, in the docs and in the output alike: times and pids."""
    out = []
    for line in lines:
        line = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "TIME ", line)
        line = re.sub(r"\bpid \d+", "pid PID", line)
        out.append(line)
    return out


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


CLONE_NEWNET = 0x40000000


class ServiceHost:
    """The HPC facility's service host, 10.0.1.5: a network namespace of its own behind a veth
    from the gateway's 10.0.1.1/24. On the gateway's own interface, it would be one of the
    gateway's own addresses, which no default policy reaches."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(["unshare", "-n", "sleep", "infinity"])
        ours = os.readlink("/proc/self/ns/net")
        wait_for(lambda: os.readlink(f"/proc/{self.holder.pid}/ns/net") != ours, what="the host's namespace")
        ip("link", "add", "ss-svc", "type", "veth", "peer", "name", "ss-svc-p")
        ip("link", "set", "ss-svc-p", "netns", str(self.holder.pid))
        ip("addr", "add", "10.0.1.1/24", "dev", "ss-svc")
        ip("link", "set", "ss-svc", "up")
        inside = f"ip link set lo up && ip addr add {SERVICE}/24 dev ss-svc-p && ip link set ss-svc-p up"
        subprocess.run(
            ["nsenter", "-t", str(self.holder.pid), "-n", "sh", "-c", inside], check=True, timeout=30
        )

    def sink(self) -> Sink:
        """A Sink listening in the host's namespace: its socket is made by a thread that entered
        it (a network namespace is a thread's), and stays there whatever thread serves it."""
        made: list[Sink | BaseException] = []

        def enter_and_listen() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                with open(f"/proc/{self.holder.pid}/ns/net", "rb") as ns:
                    if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                made.append(Sink(SERVICE))
            except BaseException as exc:
                made.append(exc)

        thread = threading.Thread(target=enter_and_listen)
        thread.start()
        thread.join()
        if isinstance(made[0], BaseException):
            raise made[0]
        return made[0]

    def close(self) -> None:
        ip("link", "del", "ss-svc")
        self.holder.kill()
        self.holder.wait(timeout=30)


@pytest.fixture
def facilities(workdir: Path) -> Iterator[Facilities]:
    """The HPC gateway's interfaces (203.0.113.7/24, and 10.0.1.1/24 on the facility network,
    where the service host is); the instrument gateway's comes once the HPC gateway has read its
    own."""
    require_netns("adds interfaces")
    for name in ("ss-hpc", "ss-inst"):
        ip("link", "add", name, "type", "veth", "peer", "name", f"{name}-p")
        ip("link", "set", f"{name}-p", "up")
    ip("addr", "add", f"{HPC}/24", "dev", "ss-hpc")
    ip("link", "set", "ss-hpc", "up")
    host = ServiceHost()
    world = Facilities(workdir, host.sink())
    try:
        yield world
    finally:
        world.stop()
        host.close()
        ip("link", "del", "ss-hpc")
        ip("link", "del", "ss-inst")


def instrument_gateway(world: Facilities) -> None:
    ip("addr", "add", f"{INSTRUMENT}/24", "dev", "ss-inst")
    ip("addr", "add", f"{ENTRY}/24", "dev", "ss-inst")
    ip("link", "set", "ss-inst", "up")
    state, (first, last) = world.workdir / "inst", (world.inst_range, world.inst_range + RANGE - 1)
    command = f"s2cs --listener-ip {INSTRUMENT} --entry-ip {ENTRY} --port {world.inst_port}"
    command += f" --port-range {first}-{last}"
    assert world.start_gateway(f"{command} --state-dir {state}")[-1].startswith("s2cs ready on ")


def test_the_operator_guides_examples(facilities):
    found = examples("operator-guide.md")
    assert found[0].steps[0][0] == HPC_GATEWAY  # the gateway of the user guide too
    for example in found:
        if example.steps[0][0] == RESTART:  # the stream whose proxies s2cs re-adopts
            command = (
                "s2uc inbound_request --s2cs hpc.facility.org:5000 --remote_ip 10.0.1.5 --receiver_ports 5001"
            )
            uid = facilities.s2uc(facilities.forward(command))[0].removeprefix("UID: ")
            facilities.uids[uid] = "e4d39ff1-0000-4000-8000-000000000000"  # shown by its prefix only
        facilities.run(example)
    assert len(found) >= 4, [e.where for e in found]


def test_the_user_guides_examples(facilities):
    assert facilities.start_gateway(facilities.forward(HPC_GATEWAY))[-1].startswith("s2cs ready on ")
    instrument_gateway(facilities)
    found = examples("user-guide.md")
    status = facilities.forward("s2uc status --s2cs hpc.facility.org:5000")
    sent = False
    for example in found:
        if "s2uc status" in example.steps[0][0] and not sent:
            # What the guide's instrument did meanwhile: two connections of 2 MB each, which the
            # service answers with its 73-byte receipt.
            for _ in range(2):
                data = os.urandom(2_000_000)
                assert send((ENTRY, facilities.inst_range), data)[0] == len(data)
            wait_for(lambda: facilities.service.connections == 2, what="both connections at the service")
            # The stream's bytes are its shaper's counts, written at most once a second.
            wait_for(lambda: "146 B" in "\n".join(facilities.s2uc(status)), what="both receipts counted")
            sent = True
        facilities.run(example)
        if "--uid-file stream.uid" in example.steps[0][0] and "inbound_request" in example.steps[0][0]:
            real = (facilities.workdir / "stream.uid").read_text().strip()
            facilities.uids[real] = "46a4e0b5-0000-4000-8000-000000000000"  # shown by its prefix only
    assert sent and len(found) >= 8, [e.where for e in found]


def test_the_protocols_examples(facilities):
    assert facilities.start_gateway(facilities.forward(HPC_GATEWAY))[-1].startswith("s2cs ready on ")
    found = examples("protocol.md")
    for example in found:
        ((command, shown),) = example.steps
        got = facilities.s2uc(facilities.forward(command))
        assert json.loads(facilities.back("\n".join(got))) == json.loads("\n".join(shown)), example.where
    assert found, "no example in protocol.md"


# --- what the docs promise, where the behaviour was wrong for a user ----------------------------


def test_the_instrument_side_command_always_names_the_instrument_gateways_certificate(start_s2cs, workdir):
    hpc = start_s2cs("hpc")
    sink = Sink()
    args = ["--s2cs", hpc.address, "--remote_ip", "127.0.0.1", "--receiver_ports", str(sink.port)]
    given = s2uc("inbound_request", *args, "--server_cert", str(hpc.cert)).stdout
    uid, listener = field(given, "UID"), field(given, "Listeners")
    command = (
        f"s2uc outbound_request --s2cs INSTRUMENT_S2CS:5000 --server_cert INSTRUMENT_CERT {uid} {listener}"
    )
    assert given.splitlines()[-1] == f"  {command}"
    shutil.copy(hpc.cert, workdir / "server.crt")
    # ./server.crt here is the HPC gateway's: the instrument side needs its own gateway's.
    default = s2uc("inbound_request", *args, cwd=workdir).stdout
    assert " --server_cert INSTRUMENT_CERT " in default.splitlines()[-1]


def test_several_listeners_are_named_as_ports_in_the_summary(start_s2cs):
    hpc, inst = start_s2cs("hpc"), start_s2cs("instrument")
    sinks = [Sink(), Sink()]
    ports = ",".join(str(s.port) for s in sinks)
    hpc_args = ["--s2cs", hpc.address, "--server_cert", str(hpc.cert)]
    out = s2uc("inbound_request", *hpc_args, "--remote_ip", "127.0.0.1", "--receiver_ports", ports).stdout
    uid, listeners = field(out, "UID"), field(out, "Listeners")
    out = s2uc("outbound_request", "--s2cs", inst.address, "--server_cert", str(inst.cert), uid, listeners)
    first, second = (port_of(a) for a in field(out.stdout, "Listeners").split(","))
    assert (
        out.stdout.splitlines()[-1]
        == f"Send the instrument's data to ports {first} and {second} of this gateway."
    )


def test_a_busy_control_port_is_one_line_before_any_start_up_output(start_s2cs, workdir):
    other = start_s2cs("other")
    first, last = free_port_range(4)
    argv = [str(BIN / "s2cs"), "--port", str(other.port), "--port-range", f"{first}-{last}"]
    result = subprocess.run(
        [*argv, "--state-dir", str(workdir / "second")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    where = f"port {other.port} of every interface"
    assert result.stderr.splitlines() == [f"error: cannot listen on {where}: Address already in use"]
