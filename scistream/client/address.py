"""Which S2CS a request goes to: its host and port, as the user typed them (--s2cs).

Pure: no socket, file or process.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..protocol import DEFAULT_PORT, hostport
from .naming import S2UC, Names


@dataclass(frozen=True)
class Server:
    """An S2CS: the host and port a request goes to."""

    host: str
    port: int

    def __str__(self) -> str:
        return hostport(self.host, self.port)


def parse_server(text: str, names: Names = S2UC) -> Server:
    """`host:port`, `host` (port 5000), `[v6]:port`; ConfigError in the words of `names`."""
    text = text.strip()
    rest = ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{names.s2cs} must look like HOST:PORT or [IPV6]:PORT, not {text!r}")
        port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    good_port = port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
    if not host or (port and not good_port) or (rest == ":"):
        raise ConfigError(f"{names.s2cs} must look like HOST:PORT or [IPV6]:PORT, not {text!r}")
    return Server(host, int(port) if port else DEFAULT_PORT)
