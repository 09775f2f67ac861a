"""Which sockets listen, asked of the kernel through NETLINK_SOCK_DIAG (what `ss -l` does).

A request waits until the processes of its session listen, and the supervisor looks again and
again meanwhile. Reading /proc/net/tcp, as psutil does, reads a line for every TCP socket of the
host, open connections included, so each look cost more with every stream the gateway carries
(about 5 ms with none). The kernel's socket diagnostics dump only the listening sockets, filtered
by state in the kernel. And a request asks only about its own: the TCP ports it wants, filtered
by port in the kernel, and the Unix sockets its process holds, one by one by inode. The cost of
a look follows what the session listens on, not how many streams the gateway carries.

A kernel built without these diagnostics, or a seccomp profile that forbids netlink sockets,
leaves them unavailable; `probe` says so (and why), and readiness then asks psutil instead
(runtime.readiness). The probe asks about sockets of its own, so a kernel whose answers do not
fit the fixed offsets of the structures read here is found out too, not trusted.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10  # also the state of a listening Unix socket
UDIAG_SHOW_NAME = 0x1
UDIAG_SHOW_VFS = 0x2
UNIX_DIAG_NAME = 0
UNIX_DIAG_VFS = 1

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
NO_COOKIE = 0xFFFFFFFF  # INET_DIAG_NOCOOKIE, each half of a cookie: look a socket up by inode alone
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (48 bytes), of which
# only the source port (big-endian) is set: a dump of listeners skips every other port (0: none)
_INET_REQUEST = struct.Struct("=BBBBI2s46x")
# unix_diag_req: family, protocol, pad, states, inode, show, cookie
_UNIX_REQUEST = struct.Struct("=BBHIIIII")
_ATTRIBUTE = struct.Struct("=HH")  # rtattr: length, type


def _align(n: int) -> int:
    return (n + 3) & ~3


def _dump(request: bytes, flags: int = NLM_F_DUMP) -> list[bytes]:
    """The payloads of the kernel's answer to one dump request; without NLM_F_DUMP, to a request
    about one socket (an empty list when there is no such socket)."""
    message = _HEADER.pack(_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | flags, 1, 0)
    payloads: list[bytes] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
        sock.sendall(message + request)
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise OSError("a malformed answer from NETLINK_SOCK_DIAG")
                body = data[offset + _HEADER.size : offset + length]
                if kind == NLMSG_DONE:
                    return payloads
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", body)
                    if code == -errno.ENOENT and not flags & NLM_F_DUMP:
                        return payloads  # no socket of that inode (or not a Unix one)
                    if code:
                        raise OSError(-code, f"NETLINK_SOCK_DIAG: {os.strerror(-code)}")
                else:
                    payloads.append(body)
                offset += _align(length)
            if not flags & NLM_F_DUMP:
                return payloads  # one answer, and no NLMSG_DONE after it


def tcp_listeners(port: int = 0) -> dict[int, int]:
    """Inode -> port of every listening TCP socket (IPv4 and IPv6) of this network namespace; with
    a `port`, only of those listening on it, chosen by the kernel."""
    found: dict[int, int] = {}
    sport = struct.pack("!H", port)
    for family in (socket.AF_INET, socket.AF_INET6):
        for body in _dump(_INET_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN, sport)):
            # inet_diag_msg: family, state, timer, retrans (4 bytes), the sockid (source port
            # first, big-endian), expires, rqueue, wqueue, uid, inode
            (port,) = struct.unpack_from("!H", body, 4)
            (inode,) = struct.unpack_from("=I", body, 68)
            found[inode] = port
    return found


def unix_listeners() -> dict[int, str]:
    """Inode -> bound path of every listening Unix socket with a path in the file system."""
    found: dict[int, str] = {}
    request = _UNIX_REQUEST.pack(socket.AF_UNIX, 0, 0, 1 << TCP_LISTEN, 0, UDIAG_SHOW_NAME, 0, 0)
    for body in _dump(request):
        inode, name = _unix_name(body)
        if name is not None:
            found[inode] = name
    return found


def unix_listener_files() -> set[tuple[int, int]]:
    """(device, inode) of the file each listening Unix socket of this network namespace is
    bound to: what tells a live socket file from one its dead process left behind, by the file
    itself and not by its name (a file unlinked and bound again keeps the old socket's name)."""
    found: set[tuple[int, int]] = set()
    request = _UNIX_REQUEST.pack(socket.AF_UNIX, 0, 0, 1 << TCP_LISTEN, 0, UDIAG_SHOW_VFS, 0, 0)
    for body in _dump(request):
        vfs = _attribute(body, UNIX_DIAG_VFS)
        if vfs is not None and len(vfs) >= 8:
            inode, device = struct.unpack_from("=II", vfs)  # struct unix_diag_vfs
            # The kernel's own dev_t (major << 20 | minor), not stat(2)'s encoding of it.
            found.add((os.makedev(device >> 20, device & 0xFFFFF), inode))
    return found


def unix_listener(inode: int) -> str | None:
    """The bound path of the Unix socket of this inode if it listens and has a path in the file
    system, else None (as for a TCP socket's inode)."""
    body = _unix_socket(inode)
    if body is not None and body[2] == TCP_LISTEN:  # asked by inode, the kernel answers whatever its state
        return _unix_name(body)[1]
    return None


def _unix_socket(inode: int) -> bytes | None:
    """The kernel's unix_diag_msg of the Unix socket of this inode, with its name; None if none."""
    cookie = (NO_COOKIE, NO_COOKIE)
    request = _UNIX_REQUEST.pack(socket.AF_UNIX, 0, 0, 1 << TCP_LISTEN, inode, UDIAG_SHOW_NAME, *cookie)
    for body in _dump(request, flags=0):
        return body
    return None


def _unix_name(body: bytes) -> tuple[int, str | None]:
    """The inode and the path of a unix_diag_msg, None for an abstract or unnamed socket."""
    (inode,) = struct.unpack_from("=I", body, 4)  # after family, type, state, pad
    name = _attribute(body, UNIX_DIAG_NAME)
    if name is not None and name[:1] not in (b"", b"\0"):  # not an abstract or unnamed socket
        return inode, os.fsdecode(name.rstrip(b"\0"))
    return inode, None


def _attribute(body: bytes, wanted: int) -> bytes | None:
    """The payload of the first attribute of kind `wanted` of a unix_diag_msg."""
    offset = 16  # after family, type, state, pad, inode and the cookie
    while offset + _ATTRIBUTE.size <= len(body):
        length, kind = _ATTRIBUTE.unpack_from(body, offset)
        if length < _ATTRIBUTE.size:
            break
        if kind == wanted:
            return body[offset + _ATTRIBUTE.size : offset + length]
        offset += _align(length)
    return None


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` holds open; empty when it is gone or not ours to
    look into (as psutil's AccessDenied was: such a process is never ready)."""
    inodes: set[int] = set()
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:  # gone, or another user's: none this s2cs may count as its own
        return inodes
    for name in names:
        try:
            target = os.readlink(f"{fds}/{name}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def probe() -> str | None:
    """Why the kernel's socket diagnostics cannot tell which sockets listen, None when they can:
    asked about a listening TCP socket and a listening Unix socket of this process, which must
    come back as they are. The Unix one is abstract: no file, so a read-only file system (a
    swarm task's) cannot fail the probe."""
    try:
        with socket.socket() as tcp, socket.socket(socket.AF_UNIX) as unix:
            tcp.bind(("127.0.0.1", 0))
            tcp.listen()
            unix.bind(b"\0scistream-probe-%d-%d" % (os.getpid(), id(unix)))
            unix.listen()
            port = tcp.getsockname()[1]
            if tcp_listeners(port) != {os.fstat(tcp.fileno()).st_ino: port}:
                return "its answer about a listening TCP socket was not that socket"
            inode = os.fstat(unix.fileno()).st_ino
            body = _unix_socket(inode)
            if body is None or body[2] != TCP_LISTEN or _unix_name(body)[0] != inode:
                return "its answer about a listening Unix socket was not that socket"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
