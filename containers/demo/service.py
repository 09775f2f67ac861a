"""The service of the compose demo, at the HPC facility: it checks what arrives.

It reads each connection to its end, then answers `<bytes> <sha256>` to the sender and logs the
same numbers, so that both the sender and the service's own log say what arrived. The standard
library and typer only (the image has typer, a dependency of SciStream): it must not depend on
SciStream itself, which only carries the data.
"""

from __future__ import annotations

import hashlib
import socketserver

import typer


class Check(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        digest = hashlib.sha256()
        nbytes = 0
        while chunk := self.request.recv(1 << 20):
            digest.update(chunk)
            nbytes += len(chunk)
        host, port = self.client_address[:2]
        peer = f"{host}:{port}"
        print(f"received {nbytes} bytes, SHA-256 {digest.hexdigest()}, from {peer}", flush=True)
        self.request.sendall(f"{nbytes} {digest.hexdigest()}\n".encode())


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve(port: int = typer.Option(5001, min=1, max=65535, help="The TCP port to listen on.")) -> None:
    with Server(("0.0.0.0", port), Check) as server:
        print(f"service listening on port {port}", flush=True)
        server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    app.command(help=__doc__.splitlines()[0])(serve)
    app(args=argv, prog_name="service.py")


if __name__ == "__main__":
    main()
