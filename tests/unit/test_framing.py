"""The shaper's framing decisions (scistream/s2ds/framing.py), without sockets or pipes.

A writer's frames, cut into the pieces a socket may deliver, read back by a reader: every payload
byte and the end come out as they went in, whatever the pieces; a stream that stops short, or
that was never framed, is told from one that ended.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scistream.s2ds.framing import END, MOST, PREAMBLE, Deframer, Framer, NotFramed
from scistream.s2ds.shaper import UsageError, parse


def header(n: int) -> bytes:
    return n.to_bytes(4, "big")


# --- the writer ----------------------------------------------------------------------------------


def test_the_writer_owes_the_preamble_from_the_start():
    framer = Framer.start()
    assert framer.owed == PREAMBLE and not framer.left and not framer.ended


def test_a_frame_is_what_the_pipe_holds_capped():
    framer = Framer.start().sent(len(PREAMBLE))
    opened = framer.opened(5000)
    assert (opened.owed, opened.left) == (header(5000), 5000)
    big = framer.opened(MOST + 1)
    assert (big.owed, big.left) == (header(MOST), MOST)


def test_a_header_sent_in_pieces_and_a_frame_spliced_in_pieces():
    framer = Framer.start().sent(3)
    assert framer.owed == PREAMBLE[3:]
    framer = framer.sent(len(PREAMBLE) - 3).opened(100).sent(1)
    assert framer.owed == header(100)[1:]
    framer = framer.sent(3).spliced(60)
    assert (framer.owed, framer.left) == (b"", 40)
    assert framer.spliced(40).left == 0


def test_the_writer_refuses_what_would_break_the_frames():
    framer = Framer.start()
    with pytest.raises(ValueError, match="owes"):
        framer.opened(10)  # before the preamble is out
    framer = framer.sent(len(PREAMBLE)).opened(10).sent(4)
    with pytest.raises(ValueError, match="open"):
        framer.opened(10)  # before the open frame is whole
    with pytest.raises(ValueError, match="splice"):
        framer.spliced(11)  # beyond its length
    with pytest.raises(ValueError, match="open"):
        framer.ending()  # the end in the middle of a frame


def test_the_end_is_a_frame_of_length_zero_after_everything_owed():
    framer = Framer.start().ending()  # a connection that carried nothing still says it ended
    assert framer.owed == PREAMBLE + END and framer.ended
    with pytest.raises(ValueError, match="after the end"):
        framer.sent(len(framer.owed)).opened(1)


# --- the reader ----------------------------------------------------------------------------------


def test_the_reader_wants_the_preamble_then_headers_then_the_payload():
    deframer = Deframer.start()
    assert deframer.need == len(PREAMBLE)
    deframer = deframer.heard(PREAMBLE)
    assert deframer.framed and deframer.need == 4
    deframer = deframer.heard(header(1000))
    assert (deframer.need, deframer.left) == (0, 1000)
    assert deframer.spliced(999).left == 1
    assert deframer.spliced(1000).need == 4


def test_a_header_split_across_reads():
    deframer = Deframer.start().heard(PREAMBLE[:1]).heard(PREAMBLE[1:5])
    assert deframer.need == len(PREAMBLE) - 5 and not deframer.framed
    deframer = deframer.heard(PREAMBLE[5:]).heard(header(7)[:3])
    assert deframer.need == 1 and not deframer.left
    assert deframer.heard(header(7)[3:]).left == 7


@pytest.mark.parametrize("first", [b"G", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"\x00SCIFRM2"])
def test_a_stream_that_does_not_start_with_the_preamble_is_not_framed(first):
    with pytest.raises(NotFramed, match="does not frame"):
        Deframer.start().heard(first[: len(PREAMBLE)])


def test_a_wrong_byte_is_found_at_once_not_after_the_whole_preamble():
    with pytest.raises(NotFramed):
        Deframer.start().heard(b"\x00X")


def test_a_length_beyond_the_most_a_frame_holds_is_refused():
    framed = Deframer.start().heard(PREAMBLE)
    assert framed.heard(header(MOST)).left == MOST
    with pytest.raises(NotFramed, match=str(MOST + 1)):
        framed.heard(header(MOST + 1))


def test_the_end_frame_ends_the_stream_and_wants_nothing_more():
    deframer = Deframer.start().heard(PREAMBLE).heard(header(3)).spliced(3).heard(END)
    assert deframer.ended and deframer.need == 0 and not deframer.left


@pytest.mark.parametrize(
    ("fed", "where"),
    [
        (b"", "before its first frame"),
        (PREAMBLE[:4], "before its first frame"),
        (PREAMBLE + header(10), "in the middle of a frame"),
        (PREAMBLE + header(10)[:2], "in the middle of a frame header"),
    ],
)
def test_where_a_cut_stream_stopped(fed, where):
    deframer = Deframer.start()
    for byte in fed:
        deframer = deframer.heard(bytes([byte]))
    assert deframer.cut() == where


def test_reading_more_than_is_needed_is_a_bug_not_a_stream():
    with pytest.raises(ValueError, match="needs"):
        Deframer.start().heard(PREAMBLE + b"x")


# --- writer and reader together ------------------------------------------------------------------


@given(
    chunks=st.lists(st.integers(1, 3 * MOST), max_size=6),
    pieces=st.lists(st.integers(1, 9), min_size=1, max_size=20),
)
def test_what_the_writer_frames_the_reader_reads_back(chunks, pieces):
    """Payload sizes the pipe might hold, headers delivered in pieces of any size: the reader
    counts out every payload byte and then the end, in order."""
    wire = bytearray()
    framer = Framer.start()
    payload = 0
    for chunk in chunks:
        left = chunk
        while left:
            if framer.owed:
                wire += framer.owed
                framer = framer.sent(len(framer.owed))
            framer = framer.opened(left)
            wire += framer.owed
            n = framer.left
            framer = framer.sent(len(framer.owed)).spliced(n)
            wire += b"\xff" * min(n, 16)  # a token for the payload: its length is what counts
            payload += n
            left -= n
    framer = framer.ending()
    wire += framer.owed

    deframer = Deframer.start()
    counted, at, turn = 0, 0, 0
    while not deframer.ended:
        if deframer.left:
            n = deframer.left
            at += min(n, 16)
            counted += n
            deframer = deframer.spliced(n)
            continue
        size = min(deframer.need, pieces[turn % len(pieces)])
        turn += 1
        deframer = deframer.heard(bytes(wire[at : at + size]))
        at += size
    assert counted == payload == sum(chunks)
    assert at == len(wire)


# --- the option ----------------------------------------------------------------------------------


def test_frame_is_an_option_of_the_shaper_and_off_by_default():
    routes = ["--route", "127.0.0.1:5000", "/run/s/shaper-0.sock"]
    assert parse(["--rate=0", "--frame", *routes]).frame
    assert not parse(["--rate=0", *routes]).frame


@pytest.mark.parametrize(
    "route",
    [["127.0.0.1:5000", "127.0.0.1:5001"], ["/run/s/a.sock", "/run/s/b.sock"]],
    ids=["tcp-tcp", "unix-unix"],
)
def test_frames_go_only_between_a_tcp_address_and_a_unix_socket(route):
    with pytest.raises(UsageError, match=r"--frame: route .* is not between a TCP address and a Unix socket"):
        parse(["--rate=0", "--frame", "--route", *route])


def test_a_shaper_that_does_not_frame_does_not_load_framing():
    """Its start is waited for by every rate-limited request (test_shaping.py, the start)."""
    import subprocess
    import sys

    check = "import sys, scistream.s2ds.shaper\nprint('scistream.s2ds.framing' in sys.modules)\n"
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"
