"""The instrument of the compose demo: it sends random data into the stream.

It connects to the outbound proxy's listener, sends `--mib` MiB of random data, half-closes, and
waits for the service's answer (`<bytes> <sha256>`, back through the stream). It prints one JSON
line: what it sent and what the service says it received. The standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--to", required=True, metavar="HOST:PORT", help="the outbound proxy's listener")
    parser.add_argument("--mib", type=int, default=8, help="how much to send, in MiB")
    args = parser.parse_args()
    host, _, port = args.to.rpartition(":")
    digest = hashlib.sha256()
    sent = 0
    started = time.monotonic()
    with socket.create_connection((host.strip("[]"), int(port)), timeout=300) as sock:
        for _ in range(args.mib):
            block = os.urandom(1 << 20)
            digest.update(block)
            sock.sendall(block)
            sent += len(block)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.makefile("rb").readline().split()
    seconds = time.monotonic() - started
    received, received_sha256 = (int(answer[0]), answer[1].decode()) if len(answer) == 2 else (None, None)
    report = {
        "sent": sent,
        "sent_sha256": digest.hexdigest(),
        "received": received,
        "received_sha256": received_sha256,
        "seconds": round(seconds, 3),
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
