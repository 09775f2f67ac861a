"""What one session's proxy costs the gateway in memory (docs/performance.md, "Per stream, at
scale"): it must not depend on how many descriptors the operator lets s2cs open."""

from __future__ import annotations

import contextlib
import resource
import socket
from dataclasses import dataclass
from pathlib import Path

from scistream.loopback import S2csProcess, free_port, free_port_range

from .conftest import pids_of, port_of


@dataclass
class LimitedS2cs(S2csProcess):
    """An s2cs whose descriptor limit is `nofile` (soft and hard: s2cs raises its soft limit to
    the hard one at start), which its proxies inherit."""

    nofile: int = 1024

    def argv(self) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--", *super().argv()]


def private_kib(pid: int) -> int:
    """Memory only this process holds (Private_Clean + Private_Dirty of smaps_rollup), in KiB."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        private = [line for line in f if line.startswith(("Private_Clean:", "Private_Dirty:"))]
    return sum(int(line.split()[1]) for line in private)


def past_start_up(port: int) -> None:
    """Returns once the proxy has served a connection: it is past its start-up, its tables made.
    (One that is not TLS, which it ends at once, the same way at either descriptor limit.)"""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"not TLS\n")
        with contextlib.suppress(ConnectionError):
            while sock.recv(4096):
                pass


def proxy_private_kib(workdir: Path, nofile: int) -> int:
    """The private memory of the HAProxy of an unlimited session."""
    gw = LimitedS2cs(f"nofile{nofile}", workdir / f"nofile{nofile}", free_port_range(4), nofile=nofile)
    try:
        gw.start()
        reply = gw.call("inbound", remote_ip="127.0.0.1", receiver_ports=[free_port()], rate=0)
        (pid,) = pids_of(gw.state_dir, "haproxy")
        with open(f"/proc/{pid}/limits") as f:
            assert [line.split()[3] for line in f if "open files" in line] == [str(nofile)]
        past_start_up(port_of(reply["listeners"][0]))
        return private_kib(pid)
    finally:
        gw.stop()  # SIGTERM: it releases the session


def test_a_session_proxy_takes_the_same_memory_whatever_the_descriptor_limit(workdir: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # as high as s2cs may go here
    assert hard >= 16384, f"this test needs a descriptor limit of 16384 or more, not {hard}"
    small = proxy_private_kib(workdir, 1024)
    large = proxy_private_kib(workdir, hard)
    # Without a maxconn of its own, HAProxy sized its tables by the limit: about 1.2 MiB more at
    # 20000 descriptors than at 1024, and more for each descriptor beyond.
    assert large - small < 512, f"{small} KiB with a limit of 1024 descriptors, {large} KiB with {hard}"
