"""The service of the compose demo, at the HPC facility: it checks what arrives.

It reads each connection to its end, then answers `<bytes> <sha256>` to the sender and logs the
same numbers, so that both the sender and the service's own log say what arrived. The standard
library only: it must not depend on SciStream, which only carries the data.
"""

from __future__ import annotations

import argparse
import hashlib
import socketserver


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args()
    with Server(("0.0.0.0", args.port), Check) as server:
        print(f"service listening on port {args.port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
