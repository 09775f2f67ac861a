"""Readiness from the kernel's socket diagnostics (scistream/s2ds/sockdiag.py), with real sockets
of this process: a request counts a proxy as started only once it listens."""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import pytest

from scistream.s2ds import runtime
from scistream.s2ds.runtime import ProcessRuntime, bound_endpoints
from scistream.s2ds.sockdiag import (
    probe,
    socket_inodes,
    tcp_listeners,
    unix_listener,
    unix_listener_files,
    unix_listeners,
)


@dataclass(frozen=True)
class Me:
    pid: int
    create_time: float = 0.0

    def poll(self) -> int | None:
        return None


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def test_listening_tcp_sockets_are_found_and_connections_are_not():
    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6, socket.socket() as bound:
        v4.bind(("127.0.0.1", 0))
        v4.listen()
        v6.bind(("::1", 0))
        v6.listen()
        bound.bind(("127.0.0.1", 0))  # bound, not listening: nothing can connect yet
        with socket.create_connection(v4.getsockname()) as client:
            accepted, _ = v4.accept()
            with accepted:
                found = tcp_listeners()
                assert found[inode(v4)] == v4.getsockname()[1]
                assert found[inode(v6)] == v6.getsockname()[1]
                for other in (bound, client, accepted):
                    assert inode(other) not in found


def test_listening_unix_sockets_are_found_by_path(tmp_path):
    with socket.socket(socket.AF_UNIX) as listening, socket.socket(socket.AF_UNIX) as bound:
        listening.bind(str(tmp_path / "shaper-0.sock"))
        listening.listen()
        bound.bind(str(tmp_path / "not-yet.sock"))
        found = unix_listeners()
        assert found[inode(listening)] == str(tmp_path / "shaper-0.sock")
        assert inode(bound) not in found


def test_a_unix_socket_file_counts_as_live_only_while_a_socket_listens_on_it(tmp_path):
    """What tells a stale socket file (its process killed) from a live one: the file itself, as
    stat(2) names it, not its path, which a new socket may take over."""
    live, stale, rebound = tmp_path / "live.sock", tmp_path / "stale.sock", tmp_path / "rebound.sock"
    with socket.socket(socket.AF_UNIX) as a, socket.socket(socket.AF_UNIX) as c:
        a.bind(str(live))
        a.listen()
        with socket.socket(socket.AF_UNIX) as b:
            b.bind(str(stale))
            b.listen()
        c.bind(str(rebound))
        c.listen()
        old = os.stat(rebound)
        os.unlink(rebound)  # the listening socket keeps its name, not the file
        rebound.write_text("")
        files = unix_listener_files()
        assert (os.stat(live).st_dev, os.stat(live).st_ino) in files
        assert (os.stat(stale).st_dev, os.stat(stale).st_ino) not in files
        assert (old.st_dev, old.st_ino) in files
        assert (os.stat(rebound).st_dev, os.stat(rebound).st_ino) not in files


def test_the_kernel_answers_only_for_the_port_asked_about():
    """What a request asks while its proxy starts: its own port, not every listener of the host."""
    socks = [socket.socket() for _ in range(5)] + [socket.socket(socket.AF_INET6)]
    try:
        for sock in socks:
            sock.bind(("::1" if sock.family == socket.AF_INET6 else "127.0.0.1", 0))
            sock.listen()
        for sock in (socks[2], socks[5]):
            assert tcp_listeners(sock.getsockname()[1]) == {inode(sock): sock.getsockname()[1]}
        assert {inode(sock) for sock in socks} <= set(tcp_listeners())
    finally:
        for sock in socks:
            sock.close()


def test_a_unix_socket_is_asked_about_by_its_inode(tmp_path):
    with (
        socket.socket(socket.AF_UNIX) as listening,
        socket.socket(socket.AF_UNIX) as bound,
        socket.socket(socket.AF_UNIX) as abstract,
        socket.socket() as tcp,
    ):
        listening.bind(str(tmp_path / "shaper-0.sock"))
        listening.listen()
        bound.bind(str(tmp_path / "not-yet.sock"))
        abstract.bind(b"\0scistream-test-%d" % os.getpid())
        abstract.listen()
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        assert unix_listener(inode(listening)) == str(tmp_path / "shaper-0.sock")
        for other in (bound, abstract, tcp):
            assert unix_listener(inode(other)) is None


def test_only_the_sockets_of_the_process_asked_about_count(tmp_path):
    """A port another process listens on does not make this one ready (a squatter)."""
    other = subprocess.Popen(
        [sys.executable, "-c", "import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1',0)); "
         "s.listen(); print(s.getsockname()[1], flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert other.stdout is not None
        theirs = int(other.stdout.readline())
        with socket.socket() as mine:
            mine.bind(("127.0.0.1", 0))
            mine.listen()
            port = mine.getsockname()[1]
            me = Me(os.getpid())
            assert inode(mine) in socket_inodes(me.pid)
            assert ProcessRuntime().listening(me, [port])
            assert not ProcessRuntime().listening(me, [port, theirs])
            assert ProcessRuntime().listening(Me(other.pid), [theirs])
    finally:
        other.kill()
        other.wait()


def test_a_haproxy_socket_counts_once_renamed_to_its_path(tmp_path):
    """HAProxy binds PATH.PID.tmp and renames it to PATH; the kernel keeps the name bound."""
    import psutil

    path = tmp_path / "proxy.sock"
    temporary = tmp_path / f"proxy.sock.{os.getpid()}.tmp"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(temporary))
        sock.listen()
        me = [psutil.Process(os.getpid())]
        assert str(path) not in bound_endpoints(me)
        assert bound_endpoints(me, [str(path)]) == set()
        os.rename(temporary, path)
        assert str(path) in bound_endpoints(me)
        assert bound_endpoints(me, [str(path)]) == {str(path)}


def test_a_gone_process_holds_no_socket():
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    assert socket_inodes(int(done.stdout)) == set()


def test_another_users_process_holds_no_socket_we_may_count(monkeypatch):
    """Its /proc/PID/fd is closed to a non-root s2cs: it is not ready, and looking is no error."""

    def closed(path: str) -> list[str]:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "listdir", closed)
    assert socket_inodes(os.getpid()) == set()


# --- without the kernel's socket diagnostics: psutil -------------------------------------------

LISTENER = """
import socket, sys, time
tcp = socket.socket(); tcp.bind(("127.0.0.1", 0)); tcp.listen()
unix = socket.socket(socket.AF_UNIX); unix.bind(sys.argv[1]); unix.listen()
bound = socket.socket(); bound.bind(("127.0.0.1", 0))  # bound, not listening: nothing can connect
print(tcp.getsockname()[1], bound.getsockname()[1], flush=True)
time.sleep(60)
"""


def no_netlink(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without NETLINK_SOCK_DIAG, or a seccomp profile that forbids it: every netlink
    socket refused, every other made as usual. The readiness decided anew under it."""
    real = socket.socket

    def refused(family: int = -1, *args: object, **kwargs: object) -> socket.socket:
        if family == socket.AF_NETLINK:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real(family, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "socket", refused)
    monkeypatch.setattr(runtime, "_readiness", None)


def test_without_netlink_the_listeners_of_a_child_are_found_by_psutil(tmp_path, monkeypatch, caplog):
    no_netlink(monkeypatch)
    path = str(tmp_path / "shaper-0.sock")
    child = subprocess.Popen([sys.executable, "-c", LISTENER, path], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port, bound = (int(word) for word in child.stdout.readline().split())
        it = Me(child.pid)
        with caplog.at_level(logging.WARNING, logger="scistream.s2ds.runtime"):
            assert ProcessRuntime().listening(it, [port, path])
            assert not ProcessRuntime().listening(it, [port, bound])  # bound is no listener
            assert not ProcessRuntime().listening(it, [port, path + ".other"])
            assert not ProcessRuntime().listening(Me(os.getpid()), [port])  # not ours: a squatter
        assert runtime.readiness().reason == "Operation not permitted"
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warned == [
            "readiness: kernel socket diagnostics (netlink) unavailable (Operation not permitted): "
            "psutil tells which sockets listen instead, slower with many streams"
        ]
    finally:
        child.kill()
        child.wait()
    assert not ProcessRuntime().listening(it, [port])  # gone


def test_with_netlink_the_probe_finds_its_own_sockets(monkeypatch):
    monkeypatch.setattr(runtime, "_readiness", None)
    assert probe() is None
    assert runtime.readiness() == runtime.Readiness(netlink=True)


def test_an_answer_that_does_not_fit_the_structures_read_is_not_trusted(monkeypatch):
    """Offsets of another kernel's structures: the probe's own listener is not found as it is."""
    from scistream.s2ds import sockdiag

    monkeypatch.setattr(sockdiag, "tcp_listeners", lambda port=0: {1: port})
    assert probe() == "its answer about a listening TCP socket was not that socket"


def test_without_netlink_a_stale_socket_file_is_still_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    no_netlink(monkeypatch)
    live, stale = str(tmp_path / "live.sock"), str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX) as a:
        a.bind(live)
        a.listen()
        with socket.socket(socket.AF_UNIX) as b:
            b.bind(stale)
            b.listen()
        assert runtime.clear_stale_sockets([live, stale, 5100]) == [stale]
        assert os.path.exists(live) and not os.path.exists(stale)
