"""Every byte that goes in comes out: half-closed echoes, many times, through every backend pair.

A stunnel inbound proxy behind a rate-limited HAProxy outbound one used to cut about one reply in
six after 150-320 kB: the outbound shaper sat on the TLS side and passed records on in pieces as
small as a wake-up's worth of the rate, and stunnel 5.68 resets a connection whose records come
in more than about a hundred pieces ("transfer() loop executes not transferring any data").
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from scistream.loopback import Echo
from scistream.protocol import DEFAULT_RATE

from .conftest import BACKENDS, open_stream

TRIES = 20
PAYLOAD = 1_050_000  # under a second each way at the default 10 Mbit/s


def half_closed_echo(port: int, payload: bytes) -> bytes:
    """Send `payload`, half-close, and read the answer to its end while sending."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        back = bytearray()

        def read_back() -> None:
            while chunk := sock.recv(1 << 16):
                back.extend(chunk)

        reader = threading.Thread(target=read_back)
        reader.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reader.join(120)
        assert not reader.is_alive(), "the answer did not end within 120 s"
    return bytes(back)


@pytest.mark.parametrize("rate", [DEFAULT_RATE, 0], ids=["default-rate", "unlimited"])
@pytest.mark.parametrize(("inbound", "outbound"), [(a, b) for a in BACKENDS for b in BACKENDS])
def test_half_closed_echoes_lose_no_byte(start_s2cs, inbound, outbound, rate):
    hpc = start_s2cs("hpc", backend=inbound)
    inst = start_s2cs("instrument", backend=outbound)
    echo = Echo()
    port = open_stream(hpc, inst, echo.port, rate=rate).port
    payload = os.urandom(PAYLOAD)
    missing, wrong = [], 0
    for _ in range(TRIES):
        back = half_closed_echo(port, payload)
        missing.append(len(payload) - len(back))
        wrong += back != payload[: len(back)]
    echo.close()
    assert missing == [0] * TRIES, f"bytes missing from the answers of {TRIES} echoes: {missing}"
    assert wrong == 0, "an answer differed from what was sent"
