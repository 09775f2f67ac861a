"""The shaper's own end of stream (`--frame`), apart from how it is sent: what a framing shaper
writes to and expects from its Unix side, the socket toward its proxy.

Everything between the two shapers of a stream (two proxies and the TLS hop) passes bytes
unchanged, but turns a cut, such as a process killed on the far side, into an orderly end: the end
on the other side would read a FIN with bytes missing. Framed, each direction of a connection's
Unix side carries PREAMBLE once, right when the connection is made (nothing waits for the other
side's, so a service that speaks first is not held up), then frames: a 4-byte big-endian length
N and N bytes of payload, N from 1 to MOST. A frame of length 0 (END) is the end of that direction,
written where the FIN of the TCP side is passed on. A reader turns END into the FIN of its TCP
side; a Unix side that ends without END was cut, and the reader resets its TCP side instead.

The payload is spliced and never enters Python; only the preamble and the headers do (a send or a
recv of a few bytes). Pure, like shaping.py: no sockets, no splice; shaper.py does the system
calls, and imports this module only when it frames. docs/reliability.md has why and what it does.
"""

from __future__ import annotations

from .shaping import Value, _but

PREAMBLE = b"\x00SCIFRM1"  # a NUL first: no text protocol starts so, nor TLS (0x16) or HTTP/2
HEADER = 4  # bytes of a frame's length
MOST = 1 << 20  # the longest frame: what a shaper's pipe holds (shaper.PIPE_SIZE)
END = bytes(HEADER)  # the frame of length 0


class NotFramed(ValueError):
    """What came is not a framed stream: the other side does not frame, or lost its place."""


class Framer(Value):
    """The writer of one direction's frames: the bytes of the preamble or of a header still to be
    sent, and the payload of the open frame still to be spliced, in that order."""

    fields = ("owed", "left", "ended")
    owed: bytes  # sent before any payload: the preamble, a header, the end
    left: int  # payload bytes of the open frame not spliced yet
    ended: bool  # the end frame is owed or sent: nothing may follow it

    def __init__(self, owed: bytes, left: int, ended: bool) -> None:
        self._set(owed=owed, left=left, ended=ended)

    @classmethod
    def start(cls) -> Framer:
        return cls(PREAMBLE, 0, False)

    def opened(self, pending: int) -> Framer:
        """A frame for the `pending` bytes the pipe holds (at most MOST): its header is owed."""
        if self.ended:
            raise ValueError("a frame after the end")
        if self.owed or self.left:
            raise ValueError("a frame opened while another is open or the writer owes bytes")
        if pending <= 0:
            raise ValueError(f"a frame of {pending} bytes")
        size = min(pending, MOST)
        return _but(self, owed=size.to_bytes(HEADER, "big"), left=size)

    def sent(self, n: int) -> Framer:
        if not 0 < n <= len(self.owed):
            raise ValueError(f"sent {n} of {len(self.owed)} bytes owed")
        return _but(self, owed=self.owed[n:])

    def spliced(self, n: int) -> Framer:
        if self.owed or not 0 < n <= self.left:
            raise ValueError(f"a splice of {n} bytes into a frame with {self.left} left")
        return _but(self, left=self.left - n)

    def ending(self) -> Framer:
        """The TCP side ended after every byte before it: the end frame is owed, after whatever
        else is (the preamble, when the connection carried nothing)."""
        if self.ended or self.left:
            raise ValueError("the end while a frame is open" if self.left else "the end twice")
        return _but(self, owed=self.owed + END, ended=True)


class Deframer(Value):
    """The reader of one direction's frames: the preamble first, then each header, then as many
    payload bytes as it said, until END."""

    fields = ("got", "left", "framed", "ended")
    got: bytes  # of the preamble or of a header, so far
    left: int  # payload bytes of the current frame still to come
    framed: bool  # the preamble came
    ended: bool  # END came

    def __init__(self, got: bytes, left: int, framed: bool, ended: bool) -> None:
        self._set(got=got, left=left, framed=framed, ended=ended)

    @classmethod
    def start(cls) -> Deframer:
        return cls(b"", 0, False, False)

    @property
    def need(self) -> int:
        """How many bytes to read through Python now (of the preamble or of a header); 0: none,
        the payload is spliced (`left`) or the stream ended."""
        if self.left or self.ended:
            return 0
        return (HEADER if self.framed else len(PREAMBLE)) - len(self.got)

    def heard(self, data: bytes) -> Deframer:
        """`data`, at most `need` bytes of the preamble or of a header, came. NotFramed when they
        cannot be: from the first wrong byte of the preamble, or a length beyond MOST."""
        if not 0 < len(data) <= self.need:
            raise ValueError(f"read {len(data)} bytes where the reader needs {self.need}")
        got = self.got + data
        if not self.framed:
            if not PREAMBLE.startswith(got):
                raise NotFramed("the other side does not frame (a shaper without --frame, or no shaper)")
            if len(got) < len(PREAMBLE):
                return _but(self, got=got)
            return _but(self, got=b"", framed=True)
        if len(got) < HEADER:
            return _but(self, got=got)
        size = int.from_bytes(got, "big")
        if size > MOST:
            raise NotFramed(
                f"a frame of {size} bytes, more than the {MOST} a frame holds: "
                "the other side does not frame (a shaper without --frame, or no shaper)"
            )
        return _but(self, got=b"", left=size, ended=not size)

    def spliced(self, n: int) -> Deframer:
        if not 0 < n <= self.left:
            raise ValueError(f"a splice of {n} bytes from a frame with {self.left} left")
        return _but(self, left=self.left - n)

    def cut(self) -> str:
        """Where a stream that ended without END stopped, for the log line."""
        if not self.framed:
            return "before its first frame"
        if self.left:
            return "in the middle of a frame"
        return "in the middle of a frame header" if self.got else "between two frames"
