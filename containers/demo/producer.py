"""The instrument of the compose demo: it sends random data into the stream.

It connects to the outbound proxy's listener, sends `--mib` MiB of random data, half-closes, and
waits for the service's answer (`<bytes> <sha256>`, back through the stream). It prints one JSON
line: what it sent and what the service says it received. The standard library and typer only
(the image has typer, a dependency of SciStream).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time

import typer


def send(
    to: str = typer.Option(..., metavar="HOST:PORT", help="The outbound proxy's listener."),
    mib: int = typer.Option(8, help="How much to send, in MiB."),
) -> None:
    host, _, port = to.rpartition(":")
    digest = hashlib.sha256()
    sent = 0
    started = time.monotonic()
    with socket.create_connection((host.strip("[]"), int(port)), timeout=300) as sock:
        for _ in range(mib):
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


def main(argv: list[str] | None = None) -> None:
    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    app.command(help=__doc__.splitlines()[0])(send)
    app(args=argv, prog_name="producer.py")


if __name__ == "__main__":
    main()
