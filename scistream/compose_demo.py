"""`make compose-demo`: the user guide's two use cases across two facilities, in containers.

containers/compose.yaml puts an HPC facility (its gateway's s2cs, and a service that checks what
it gets) and an instrument facility (its gateway's s2cs, and a producer) on networks of their
own, with a wide-area network between the two gateways only. This brings that up under a compose
project of its own, hands each gateway's certificate to the user's s2uc container, runs
`s2uc inbound_request` and `s2uc outbound_request` there, streams data from the producer through
both gateways to the service, compares SHA-256, releases the stream on both sides, and takes
everything down again: containers, networks, volumes, also when a step fails or is interrupted.

It drives the docker and compose command lines only (`docker compose`, or docker-compose 1.29),
so that what it shows is what an operator types; SciStream itself runs in the containers.
Usage: `python -m scistream.compose_demo [--project NAME] [--mib N]`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from . import __version__

COMPOSE_FILE = Path(__file__).resolve().parents[1] / "containers" / "compose.yaml"
PROJECT_LABEL = "com.docker.compose.project"
STATE = "/var/lib/scistream"  # each gateway's state dir; also the s2uc container's working dir
DEFAULT_MIB = 8  # at the guide's default 10 Mbit/s, about 7 s
NET_CHOICES = range(100, 255)  # N of 10.N.0.0/16
UP_ATTEMPTS = 4

# Bounded waits, generous for a busy small machine.
UP_TIMEOUT = 600.0  # includes both gateways becoming healthy
DOWN_TIMEOUT = 300.0
COMMAND_TIMEOUT = 120.0


class DemoFailed(Exception):
    pass


@dataclass(frozen=True)
class Layout:
    """The addresses of compose.yaml for one N: 10.N.1.0/24 is the HPC network, 10.N.2.0/24 the
    instrument's, 10.N.3.0/24 the wide area."""

    net: int

    @property
    def block(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.{self.net}.0.0/16")

    @property
    def hpc(self) -> str:
        return f"10.{self.net}.1.0/24"

    @property
    def service(self) -> str:
        return f"10.{self.net}.1.20"

    @property
    def instrument_gateway(self) -> str:
        return f"10.{self.net}.2.10"

    @property
    def hpc_listener(self) -> str:
        return f"10.{self.net}.3.10"


def free_net(taken: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network], avoid: set[int]) -> Layout:
    """A layout whose 10.N.0.0/16 overlaps none of `taken` (the engine's networks, the host's
    routes), and whose N is not in `avoid` (tried already)."""
    taken4 = [net for net in taken if isinstance(net, ipaddress.IPv4Network)]
    free = [n for n in NET_CHOICES if n not in avoid and not any(Layout(n).block.overlaps(t) for t in taken4)]
    if not free:
        raise DemoFailed(
            "no free 10.N.0.0/16 for the demo's networks: every one is in use by the engine or a route"
        )
    return Layout(random.choice(free))


def host_routes(table: str) -> list[ipaddress.IPv4Network]:
    """The destinations of /proc/net/route (hex, little-endian), but the default route."""
    routes = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        dest, mask = (ipaddress.IPv4Address(int(f, 16).to_bytes(4, "little")) for f in (fields[1], fields[7]))
        if int(mask):
            routes.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    return routes


def show(argv: Sequence[str]) -> str:
    return " ".join(a if a and not re.search(r"[^\w@%+=:,./-]", a) else repr(a) for a in argv)


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(
    argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT, input: str | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False, **kw
        )
    except subprocess.TimeoutExpired:
        raise DemoFailed(f"`{show(argv)}` did not finish within {timeout:.0f}s") from None
    except FileNotFoundError:
        raise DemoFailed(f"{argv[0]} is not installed; run scripts/docker-engine") from None


def compose_command() -> list[str]:
    """`docker compose` (v2) when the engine's client has it, else docker-compose (1.29)."""
    try:
        if run(["docker", "compose", "version"]).returncode == 0:
            return ["docker", "compose"]
    except DemoFailed:
        pass
    if run(["docker-compose", "version"]).returncode == 0:
        return ["docker-compose"]
    raise DemoFailed("neither `docker compose` nor docker-compose works; run scripts/docker-engine")


@dataclass
class Project:
    """One compose project of containers/compose.yaml: its name, its layout, its containers."""

    name: str
    compose: list[str]
    layout: Layout
    file: Path = COMPOSE_FILE

    def env(self) -> dict[str, str]:
        return {**os.environ, "SCISTREAM_NET": str(self.layout.net), "SCISTREAM_VERSION": __version__}

    def run_compose(self, *args: str, timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
        argv = [*self.compose, "--project-name", self.name, "--file", str(self.file), *args]
        return run(argv, timeout=timeout, env=self.env(), **kw)

    def up(self) -> subprocess.CompletedProcess[str]:
        return self.run_compose("up", "--detach", timeout=UP_TIMEOUT)

    def down(self) -> subprocess.CompletedProcess[str]:
        # Its own session: a Ctrl-C at the terminal must not cut the clean-up short.
        return self.run_compose(
            "down", "--volumes", "--remove-orphans", "--timeout", "60",
            timeout=DOWN_TIMEOUT, start_new_session=True,
        )  # fmt: skip

    def container(self, service: str) -> str:
        ps = self.run_compose("ps", "--quiet", service, timeout=COMMAND_TIMEOUT)
        ids = ps.stdout.split()
        if ps.returncode != 0 or len(ids) != 1:
            raise DemoFailed(f"no container for {service}: {ps.stderr.strip() or ps.stdout.strip()}")
        return ids[0]

    def leftovers(self) -> list[str]:
        """Whatever of this project the engine still has: containers, networks, volumes."""
        label = f"label={PROJECT_LABEL}={self.name}"
        left = []
        for kind, argv in (
            ("container", ["docker", "ps", "--all", "--quiet", "--filter", label]),
            ("network", ["docker", "network", "ls", "--quiet", "--filter", label]),
            ("volume", ["docker", "volume", "ls", "--quiet", "--filter", label]),
        ):
            result = run(argv)
            if result.returncode != 0:
                raise DemoFailed(f"`{show(argv)}` failed: {result.stderr.strip()}")
            left += [f"{kind} {ref}" for ref in result.stdout.split()]
        return left


def taken_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The engine's networks and the host's routes: what the demo's networks must not overlap."""
    ids = run(["docker", "network", "ls", "--quiet"]).stdout.split()
    taken: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    if ids:
        inspected = run(["docker", "network", "inspect", *ids])
        for network in json.loads(inspected.stdout or "[]"):
            for config in (network.get("IPAM") or {}).get("Config") or []:
                if config.get("Subnet"):
                    taken.append(ipaddress.ip_network(config["Subnet"], strict=False))
    try:
        taken += host_routes(Path("/proc/net/route").read_text())
    except OSError:
        pass  # not Linux: the engine refuses an overlap with its own networks all the same
    return taken


class Demo:
    def __init__(self, project: Project, mib: int) -> None:
        self.project = project
        self.mib = mib
        self.ids: dict[str, str] = {}

    def exec(
        self, service: str, *argv: str, input: str | None = None, timeout: float = COMMAND_TIMEOUT
    ) -> str:
        cmd = ["docker", "exec", *(["--interactive"] if input is not None else []), self.ids[service], *argv]
        result = run(cmd, input=input, timeout=timeout)
        if result.returncode != 0:
            raise DemoFailed(
                f"{service}: `{show(argv)}` failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result.stdout

    def s2uc(self, *args: str) -> dict[str, Any]:
        """s2uc in the user's container, as the user types it; its --json reply."""
        print(f"  s2uc$ s2uc {show(args)}", flush=True)
        reply: dict[str, Any] = json.loads(self.exec("s2uc", "s2uc", *args, "--json"))
        return reply

    def s2uc_text(self, *args: str) -> None:
        print(f"  s2uc$ s2uc {show(args)}", flush=True)
        for line in self.exec("s2uc", "s2uc", *args).splitlines():
            print(f"    {line}")

    def wait_for_log(self, service: str, text: str, timeout: float = 60.0) -> None:
        """Until `service` has logged `text`; it may not exit meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            logs = run(["docker", "logs", self.ids[service]])
            if text in logs.stdout + logs.stderr:
                return
            running = run(["docker", "inspect", "--format", "{{.State.Running}}", self.ids[service]])
            if running.stdout.strip() != "true":
                raise DemoFailed(f"{service} exited: {last_lines(logs.stdout + logs.stderr, 5)}")
            if time.monotonic() > deadline:
                raise DemoFailed(f"{service} did not say {text!r} within {timeout:.0f}s")
            time.sleep(0.5)

    def bring_up(self) -> None:
        project = self.project
        tried: set[int] = set()
        for attempt in range(1, UP_ATTEMPTS + 1):
            tried.add(project.layout.net)
            print(
                f"  $ {show(project.compose)} --project-name {project.name} --file containers/compose.yaml"
                f" up --detach   (SCISTREAM_NET={project.layout.net}: 10.{project.layout.net}.1-3.0/24)",
                flush=True,
            )
            result = project.up()
            if result.returncode == 0:
                return
            project.down()
            if "overlap" not in result.stderr or attempt == UP_ATTEMPTS:
                raise DemoFailed(f"compose up failed: {last_lines(result.stderr, 15)}")
            # Another network took these addresses meanwhile: take others.
            print(f"  10.{project.layout.net}.0.0/16 was taken meanwhile; another one")
            project.layout = free_net(taken_networks(), tried)
        raise AssertionError("unreachable")

    def hand_out_certificates(self) -> None:
        for gateway, name in (("hpc-gateway", "hpc.crt"), ("instrument-gateway", "instrument.crt")):
            pem = self.exec(gateway, "cat", f"{STATE}/server.crt")
            if not pem.startswith("-----BEGIN CERTIFICATE-----") or "PRIVATE" in pem:
                raise DemoFailed(f"{gateway}'s {STATE}/server.crt is not a certificate alone")
            self.exec("s2uc", "sh", "-c", f"cat > {name}", input=pem)
            print(
                f"  {gateway}:{STATE}/server.crt -> s2uc:{STATE}/{name} (the certificate only, never the key)"
            )

    def stream(self) -> str:
        """The guide's two requests; the outbound proxy's listener, where the instrument sends."""
        layout = self.project.layout
        step("HPC facility: an inbound proxy in front of the service (use case 1)")
        inbound = self.s2uc(
            "inbound_request", "--s2cs", "hpc-gateway:5000", "--server_cert", "hpc.crt",
            "--remote_ip", layout.service, "--receiver_ports", "5001", "--uid-file", "stream.uid",
        )  # fmt: skip
        listener = inbound["listeners"][0]
        print(
            f"  stream {inbound['uid'][:8]} (UID in stream.uid, readable by the user only): "
            f"HPC listener {listener} (TLS) -> service {layout.service}:5001, "
            f"limit {inbound['limits']['rate']['human']}"
        )
        step("Instrument facility: an outbound proxy to the HPC listener (use case 2)")
        outbound = self.s2uc(
            "outbound_request", "--s2cs", "instrument-gateway:5000", "--server_cert", "instrument.crt",
            "--remote_ip", layout.instrument_gateway, "--uid-file", "stream.uid", listener,
        )  # fmt: skip
        local: str = outbound["listeners"][0]
        print(
            f"  the instrument sends to {local} -> {listener} (TLS 1.3, wide area) -> {layout.service}:5001"
        )
        return local

    def send(self, local: str) -> dict[str, Any]:
        step(f"The producer sends {self.mib} MiB of random data through both gateways")
        argv = ["python", "/demo/producer.py", "--to", local, "--mib", str(self.mib)]
        print(f"  producer$ {show(argv)}", flush=True)
        report: dict[str, Any] = json.loads(self.exec("producer", *argv, timeout=600.0).splitlines()[-1])
        return report

    def verdict(self, report: dict[str, Any]) -> None:
        sent, received = report["sent"], report["received"]
        print(f"  sent     {sent:>10} bytes, SHA-256 {report['sent_sha256']}")
        if received is None:
            print("verdict: FAILED: the service never answered; the stream broke")
            raise DemoFailed("the service never answered: the stream broke")
        print(f"  received {received:>10} bytes, SHA-256 {report['received_sha256']} (the service's answer)")
        log = run(["docker", "logs", self.ids["service"]]).stdout
        logged = f"received {received} bytes, SHA-256 {report['received_sha256']}" in log
        print(f"  the service's log {'says the same' if logged else 'DOES NOT say so'}")
        rate = sent * 8 / max(report["seconds"], 1e-6) / 1e6
        if sent == received and report["sent_sha256"] == report["received_sha256"] and logged:
            print(
                f"verdict: the SHA-256 matched: {sent} bytes sent, {received} bytes received "
                f"({rate:.1f} Mbit/s)"
            )
            return
        print(
            f"verdict: FAILED: the SHA-256 differs or the counts do ({sent} bytes sent, {received} received)"
        )
        raise DemoFailed("the data that arrived is not the data that was sent")

    def release(self) -> None:
        step("Release the stream on both gateways")
        for gateway, cert in (("instrument-gateway", "instrument.crt"), ("hpc-gateway", "hpc.crt")):
            self.s2uc_text(
                "release", "--uid-file", "stream.uid", "--s2cs", f"{gateway}:5000", "--server_cert", cert
            )
        for gateway, cert in (("instrument-gateway", "instrument.crt"), ("hpc-gateway", "hpc.crt")):
            left = self.s2uc("status", "--s2cs", f"{gateway}:5000", "--server_cert", cert)["streams"]
            if left:
                raise DemoFailed(f"{gateway} still has {len(left)} stream(s) after release")
        print("  no stream left on either gateway")

    def run(self) -> None:
        project = self.project
        step(f"Two facilities in containers: compose project {project.name}")
        self.bring_up()
        for service in ("hpc-gateway", "service", "instrument-gateway", "producer", "s2uc"):
            self.ids[service] = project.container(service)
        for gateway in ("hpc-gateway", "instrument-gateway"):
            lines = run(["docker", "logs", self.ids[gateway]]).stderr.splitlines()
            policy = [
                line.strip()
                for line in lines
                if "proxies" in line and ("open to" in line or "connect to" in line)
            ]
            print(f"  {gateway}: s2cs ready; {'; '.join(policy)}")
        self.wait_for_log("service", "service listening")
        print(f"  service: listening on {project.layout.service}:5001")

        step("The operators hand out their gateways' certificates")
        self.hand_out_certificates()
        report = self.send(self.stream())
        self.verdict(report)
        for gateway, cert in (("instrument-gateway", "instrument.crt"), ("hpc-gateway", "hpc.crt")):
            self.s2uc_text("status", "--s2cs", f"{gateway}:5000", "--server_cert", cert)
        self.release()

    def diagnose(self) -> None:
        for service, cid in self.ids.items():
            if service in ("producer", "s2uc"):
                continue
            logs = run(["docker", "logs", "--tail", "25", cid])
            print(f"--- last lines of {service}:\n{(logs.stdout + logs.stderr).rstrip()}", file=sys.stderr)


def last_lines(text: str, n: int) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def take_down(project: Project) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """compose down, then what of the project is still there (nothing, normally). It prints
    nothing: it must also run when the output is gone (a closed pipe, a closed terminal)."""
    try:
        result = project.down()
    except DemoFailed as exc:
        result = subprocess.CompletedProcess([], 1, "", str(exc))
    try:
        return result, project.leftovers()
    except DemoFailed as exc:
        return result, [f"(could not check: {exc})"]


def report_down(project: Project, result: subprocess.CompletedProcess[str], left: list[str]) -> None:
    step(f"Take everything down: compose project {project.name}")
    print(f"  $ {show(project.compose)} --project-name {project.name} down --volumes --remove-orphans")
    if result.returncode != 0:
        print(f"  compose down failed: {last_lines(result.stderr, 10)}", file=sys.stderr)
    if left:
        print(f"  LEFT BEHIND: {', '.join(left)}", file=sys.stderr)
    else:
        print(f"  no container, network or volume of {project.name} is left")


def interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: its options checked (a usage error exits 2), then the demo run; exits
    with the demo's status. typer is imported here, not by the tests that import this module."""
    import typer

    def command(
        project: str | None = typer.Option(
            None, help="The compose project name.  [default: scistream-demo-RANDOM, new each run]"
        ),
        mib: int = typer.Option(DEFAULT_MIB, help="MiB the producer sends."),
    ) -> None:
        name = project or f"scistream-demo-{secrets.token_hex(4)}"
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
            raise typer.BadParameter(
                f"{name!r}: lower-case letters, digits, '-' and '_' only", param_hint="'--project'"
            )
        raise typer.Exit(compose_demo(name, mib))

    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    app.command(help=__doc__.splitlines()[0])(command)
    app(args=argv, prog_name="python -m scistream.compose_demo")


def compose_demo(name: str, mib: int) -> int:
    """The demo under compose project `name`, `mib` MiB through it; the exit status."""
    started = time.monotonic()
    signal.signal(signal.SIGTERM, interrupted)
    image = f"scistream:{__version__}"
    try:
        if not COMPOSE_FILE.is_file():
            raise DemoFailed(
                f"{COMPOSE_FILE} is missing: run the demo from a source checkout (make compose-demo)"
            )
        info = run(["docker", "version", "--format", "{{.Server.Version}}"])
        if info.returncode != 0:
            raise DemoFailed(
                f"no Docker engine answers: {last_lines(info.stderr, 1)}; run scripts/docker-engine"
            )
        if run(["docker", "image", "inspect", image]).returncode != 0:
            raise DemoFailed(f"the image {image} does not exist; build it with make images")
        compose = compose_command()
        print(f"Docker engine {info.stdout.strip()}, {show(compose)}, image {image}")
        project = Project(name, compose, free_net(taken_networks(), set()))
    except DemoFailed as exc:
        print(f"\ncompose demo FAILED: {exc}", file=sys.stderr)
        return 1
    demo = Demo(project, mib)
    status = 1
    try:
        demo.run()
        status = 0
    except DemoFailed as exc:
        print(f"\ncompose demo FAILED: {exc}", file=sys.stderr)
        demo.diagnose()
    except KeyboardInterrupt:
        print("\ncompose demo interrupted", file=sys.stderr)
        status = 130
    finally:
        # Whatever happened, and before anything is printed (the output may be gone): no second
        # interruption may leave the project half taken down.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        result, left = take_down(project)
    report_down(project, result, left)
    if left:
        return status or 1
    if status == 0:
        print(f"\nCompose demo passed in {time.monotonic() - started:.0f}s.")
    return status


if __name__ == "__main__":
    main()
