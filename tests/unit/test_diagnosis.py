"""Proxy log lines -> failures in plain words. The lines are the proxies' own, as HAProxy 2.6/2.8
(templates/haproxy.cfg.j2), stunnel 5.68 and the shaper wrote them in real runs."""

from __future__ import annotations

import datetime

import pytest

from scistream.s2ds.diagnosis import (
    HANDSHAKE,
    KINDS,
    NOT_TLS,
    PEER_REFUSED,
    PEER_UNREACHABLE,
    SERVICE_REFUSED,
    SERVICE_TIMEOUT,
    SERVICE_UNREACHABLE,
    Event,
    Tally,
    Threads,
    events,
    haproxy_time,
    merge,
    message,
    stunnel_time,
)

# A wrong UID on the outbound side, HAProxy on both: each side refuses the other's certificate.
HAPROXY_INBOUND_HANDSHAKE = [
    "127.0.0.1:57682 [02/Dec/2026:14:12:00.919] inbound~ 127.0.0.1:27766: SSL handshake failure "
    'tls="error:0A000418:SSL routines::tlsv1 alert unknown ca"',
    '127.0.0.1:57684 [02/Dec/2026:14:12:01.922] inbound~ 127.0.0.1:27766: SSL handshake failure tls=""',
]
HAPROXY_OUTBOUND_HANDSHAKE = (
    "127.0.0.1:51812 [02/Dec/2026:14:10:52.107] outbound target0/peer 1/-1/3014 0 SC 1/1/0/0/3 0/0 "
    'server=127.0.0.1:27766 error="SSL handshake failure" '
    'tls="error:0A000086:SSL routines::certificate verify failed"'
)
# HAProxy 2.8's own format, from a template of before the log-format (an operator's copy).
HAPROXY_DEFAULT_HANDSHAKE = (
    "127.0.0.1:58366 [02/Dec/2026:14:10:09.397] inbound/1: SSL handshake failure "
    "(error:0A000418:SSL routines::tlsv1 alert unknown ca)"
)
HAPROXY_SERVICE_REFUSED = (
    "127.0.0.1:36920 [02/Dec/2026:14:12:06.109] inbound~ target0/service 4/-1/3011 0 SC 1/1/0/0/3 0/0 "
    'server=127.0.0.1:54181 error="" tls=""'
)
HAPROXY_SERVICE_TIMEOUT = HAPROXY_SERVICE_REFUSED.replace(" SC ", " sC ")
HAPROXY_OLD_TCPLOG_REFUSED = (
    "127.0.0.1:41026 [02/Dec/2026:14:10:14.118] inbound~ target1/service 2/-1/3009 0 SC 1/1/0/0/3 0/0"
)
HAPROXY_PEER_REFUSED = (
    "127.0.0.1:48884 [02/Dec/2026:14:11:01.496] outbound target0/peer 1/-1/3007 0 SC 1/1/0/0/3 0/0 "
    'server=127.0.0.1:46757 error="" tls=""'
)
HAPROXY_FINE = (
    "127.0.0.1:48882 [02/Dec/2026:14:10:56.838] outbound target0/peer 1/1/3010 1000 -- 1/1/0/0/0 0/0 "
    'server=127.0.0.1:20720 error="Success" tls=""'
)
# Shaped: HAProxy reaches the shaper, which says why the service did not answer.
HAPROXY_TO_SHAPER = (
    "127.0.0.1:60982 [02/Dec/2026:14:12:50.685] inbound~ target0/service 3/0/6 0 SD 1/1/0/0/0 0/0 "
    'server=unix:0 error="Success" tls=""'
)
STUNNEL_INBOUND_HANDSHAKE = [
    "2026.12.02 14:13:23 LOG5[ui]: Configuration successful",
    "2026.12.02 14:13:23 LOG5[0]: Service [listener0] accepted connection from 127.0.0.1:34192",
    "2026.12.02 14:13:23 LOG3[0]: SSL_accept: ../ssl/record/rec_layer_s3.c:1601: "
    "error:0A000418:SSL routines::tlsv1 alert unknown ca",
    "2026.12.02 14:13:23 LOG5[0]: Connection reset/closed: 0 byte(s) sent to TLS, 0 byte(s) sent to socket",
]
STUNNEL_OUTBOUND_HANDSHAKE = [
    "2026.12.02 14:13:23 LOG5[0]: Service [listener0] accepted connection from unnamed socket",
    "2026.12.02 14:13:23 LOG5[0]: s_connect: connected 127.0.0.1:30895",
    "2026.12.02 14:13:23 LOG5[0]: Service [listener0] connected remote server from 127.0.0.1:34192",
    "2026.12.02 14:13:23 LOG4[0]: CERT: Pre-verification error: self-signed certificate",
    "2026.12.02 14:13:23 LOG4[0]: Rejected by CERT at depth=0: CN=scistream-stream",
    "2026.12.02 14:13:23 LOG3[0]: SSL_connect: ../ssl/statem/statem_clnt.c:1889: "
    "error:0A000086:SSL routines::certificate verify failed",
    "2026.12.02 14:13:23 LOG5[0]: Connection closed/reset: 0 byte(s) sent to TLS, 0 byte(s) sent to socket",
]
STUNNEL_PEER_REFUSED = [
    "2026.12.02 14:13:16 LOG5[0]: Service [listener0] accepted connection from unnamed socket",
    "2026.12.02 14:13:16 LOG3[0]: s_connect: connect 127.0.0.1:55821: Connection refused (111)",
    "2026.12.02 14:13:16 LOG3[0]: No more addresses to connect",
]
SHAPER_SERVICE_REFUSED = [
    "shaper: unlimited, 5 connections, routes /tmp/ss/hpc/sessions/c05c/shaper-0.sock -> 127.0.0.1:35315",
    "cannot connect to 127.0.0.1:35315: Connection refused",
]


def kinds(lines: list[str], role: str, **options: object) -> list[tuple[str, str]]:
    return [(e.kind, e.address) for e in events(lines, role, **options)]  # type: ignore[arg-type]


def test_a_wrong_uid_is_a_handshake_failure_on_both_sides_with_haproxy() -> None:
    assert kinds(HAPROXY_INBOUND_HANDSHAKE, "inbound") == [(HANDSHAKE, "127.0.0.1")] * 2
    assert kinds([HAPROXY_OUTBOUND_HANDSHAKE], "outbound") == [(HANDSHAKE, "127.0.0.1:27766")]
    assert kinds([HAPROXY_DEFAULT_HANDSHAKE], "inbound") == [(HANDSHAKE, "127.0.0.1")]


def test_a_wrong_uid_is_a_handshake_failure_on_both_sides_with_stunnel() -> None:
    assert kinds(STUNNEL_INBOUND_HANDSHAKE, "inbound") == [(HANDSHAKE, "127.0.0.1")]
    # One failure for the connection, though stunnel says it in three lines.
    assert kinds(STUNNEL_OUTBOUND_HANDSHAKE, "outbound") == [(HANDSHAKE, "127.0.0.1:30895")]


def test_stunnel_connections_are_followed_across_two_reads_of_the_log() -> None:
    threads = Threads()
    assert kinds(STUNNEL_OUTBOUND_HANDSHAKE[:2], "outbound", threads=threads) == []
    assert kinds(STUNNEL_OUTBOUND_HANDSHAKE[2:], "outbound", threads=threads) == [
        (HANDSHAKE, "127.0.0.1:30895")
    ]


def test_a_service_that_is_not_running_refused_the_connection() -> None:
    assert kinds([HAPROXY_SERVICE_REFUSED], "inbound") == [(SERVICE_REFUSED, "127.0.0.1:54181")]
    assert kinds(SHAPER_SERVICE_REFUSED, "inbound") == [(SERVICE_REFUSED, "127.0.0.1:35315")]


def test_a_connect_timeout_and_no_route_are_told_apart_from_a_refusal() -> None:
    assert kinds([HAPROXY_SERVICE_TIMEOUT], "inbound") == [(SERVICE_TIMEOUT, "127.0.0.1:54181")]
    assert kinds(["cannot connect to 10.0.1.5:5001: connecting timed out"], "inbound") == [
        (SERVICE_TIMEOUT, "10.0.1.5:5001")
    ]
    assert kinds(["cannot connect to 10.0.1.5:5001: No route to host"], "inbound") == [
        (SERVICE_UNREACHABLE, "10.0.1.5:5001")
    ]
    stunnel = [
        "2026.12.02 14:13:16 LOG3[4]: s_connect: s_poll_wait 203.0.113.7:5100: TIMEOUTconnect exceeded",
        "2026.12.02 14:13:17 LOG3[5]: s_connect: connect 203.0.113.7:5100: Network is unreachable (101)",
    ]
    assert kinds(stunnel, "outbound") == [(PEER_UNREACHABLE, "203.0.113.7:5100")] * 2
    assert kinds([HAPROXY_PEER_REFUSED.replace(" SC ", " sC ")], "outbound") == [
        (PEER_UNREACHABLE, "127.0.0.1:46757")
    ]


def test_the_peer_refusing_is_the_peer_s_on_the_outbound_side() -> None:
    assert kinds([HAPROXY_PEER_REFUSED], "outbound") == [(PEER_REFUSED, "127.0.0.1:46757")]
    assert kinds(STUNNEL_PEER_REFUSED, "outbound") == [(PEER_REFUSED, "127.0.0.1:55821")]


def test_a_line_without_the_server_address_takes_the_target_of_its_backend() -> None:
    targets = ["10.0.1.5:5001", "10.0.1.5:5002"]
    assert kinds([HAPROXY_OLD_TCPLOG_REFUSED], "inbound", targets=targets) == [
        (SERVICE_REFUSED, "10.0.1.5:5002")
    ]


def test_what_is_not_a_failure_of_the_stream_is_not_one() -> None:
    lines = [
        HAPROXY_FINE,
        HAPROXY_TO_SHAPER,  # the shaper's own line says why
        "127.0.0.1:1 [02/Dec/2026:14:12:00.919] inbound~ 127.0.0.1:27766: "
        "Connection closed during SSL handshake",
        "[NOTICE]   (1) : haproxy version is 2.8.25",
        "2026.12.02 14:13:14 LOG5[0]: Certificate accepted at depth=0: CN=scistream-stream",
        "2026.12.02 14:13:14 LOG3[0]: s_connect: connect /tmp/x/shaper-0.sock: No such file or directory (2)",
        "cannot connect to /tmp/x/shaper-0.sock: Connection refused",  # the outbound shaper's proxy
        "pipes hold 8192 bytes, not 1048576: the kernel refused more",
        "",
        "garbage [ that ] is: not a log line",
    ]
    assert kinds(lines, "inbound") == []
    assert kinds(lines, "outbound") == []


def test_a_client_that_speaks_no_tls_is_told_so() -> None:
    stunnel = (
        "2026.12.02 14:13:23 LOG3[7]: SSL_accept: ../ssl/record/ssl3_record.c:354: "
        "error:0A00010B:SSL routines::wrong version number"
    )
    haproxy = HAPROXY_INBOUND_HANDSHAKE[0].replace("tlsv1 alert unknown ca", "http request")
    assert [k for k, _ in kinds([stunnel, haproxy], "inbound")] == [NOT_TLS, NOT_TLS]


def test_times_are_this_host_s_local_time() -> None:
    local = datetime.datetime(2026, 12, 2, 14, 10, 52, 107000).timestamp()
    assert haproxy_time("02/Dec/2026:14:10:52.107") == local
    assert stunnel_time("2026.12.02 14:10:52") == local - 0.107
    assert haproxy_time("31/Foo/2026:14:10:52") is None
    assert haproxy_time("31/Feb/2026:14:10:52") is None
    shaper = list(events(SHAPER_SERVICE_REFUSED, "inbound", undated=123.0))
    assert [e.when for e in shaper] == [123.0]


def test_messages_name_the_address_and_what_to_check() -> None:
    assert message(SERVICE_REFUSED, "10.0.1.5:5001") == (
        "the service at 10.0.1.5:5001 refused the connection: is it running?"
    )
    assert message(HANDSHAKE, "203.0.113.7:5100") == (
        "the peer at 203.0.113.7:5100 did not present this stream's certificate: "
        "is the UID the same on both sides?"
    )
    for kind in KINDS:
        assert message(kind, "192.0.2.1:1").count("192.0.2.1") == 1
        assert "?" in message(kind, "") or kind == NOT_TLS
    with pytest.raises(ValueError):
        message("weather", "")


def test_a_tally_counts_each_failure_once_newest_first_at_most_five() -> None:
    found = [Event(SERVICE_REFUSED, f"10.0.1.5:{5000 + i}", float(i)) for i in range(7)]
    found += [Event(SERVICE_REFUSED, "10.0.1.5:5001", 0.5), Event(HANDSHAKE, "192.0.2.1", None)]
    tally = Tally().add(found)
    shown = tally.failures()
    assert [f.message.split()[3] for f in shown] == [f"10.0.1.5:{5000 + i}" for i in (6, 5, 4, 3, 2)]
    assert len(tally.failures(limit=10)) == 8  # the one of unknown time comes last
    assert tally.failures(limit=10)[-1].kind == HANDSHAKE
    again = dict(((f.kind, f.message), f) for f in tally.failures(limit=10))
    assert again[(SERVICE_REFUSED, message(SERVICE_REFUSED, "10.0.1.5:5001"))].count == 2
    assert again[(SERVICE_REFUSED, message(SERVICE_REFUSED, "10.0.1.5:5001"))].last == 1.0
    assert tally.by_kind() == {SERVICE_REFUSED: 8, HANDSHAKE: 1}
    assert shown[0].as_dict() == {
        "kind": SERVICE_REFUSED,
        "message": message(SERVICE_REFUSED, "10.0.1.5:5006"),
        "count": 1,
        "last": 6.0,
    }


def test_merged_tallies_of_a_session_s_processes_add_up() -> None:
    proxy = Tally().add([Event(SERVICE_REFUSED, "10.0.1.5:5001", 5.0)])
    shaper = Tally().add([Event(SERVICE_REFUSED, "10.0.1.5:5001", 9.0), Event(HANDSHAKE, "", None)])
    both = merge([proxy, shaper])
    assert both.by_kind() == {SERVICE_REFUSED: 2, HANDSHAKE: 1}
    assert both.failures()[0].last == 9.0
    assert merge([]).failures() == []


@pytest.mark.parametrize(
    "reason",
    [
        "SSL client certificate not trusted",  # HAProxy 2.8, a client's certificate of another stream
        "SSL client CA chain cannot be verified",
    ],
)
def test_a_client_certificate_haproxy_does_not_trust_is_a_refused_handshake(reason) -> None:
    line = (
        f"127.0.0.1:41180 [07/Dec/2026:05:45:47.607] inbound~ 127.0.0.1:20099: {reason} "
        'tls="error:0A000086:SSL routines::certificate verify failed"'
    )
    assert kinds([line], "inbound") == [(HANDSHAKE, "127.0.0.1")]
