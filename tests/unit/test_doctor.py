"""The verdicts of `s2cs --check` over given facts, and how they are shown."""

from __future__ import annotations

import datetime
import json

from scistream.errors import ExitStatus
from scistream.s2cs import doctor
from scistream.s2cs.doctor import Check, DirFacts, Proxy, Status
from scistream.s2cs.policy import Own, build_policy
from scistream.s2ds.backend import Capabilities, Capability

from ..certificates import pair_pem

NOW = datetime.datetime(2030, 6, 1, 12, 0, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)


def pem(not_before: datetime.datetime, not_after: datetime.datetime, ips: list[str], dns: list[str]) -> bytes:
    return pair_pem(not_before, not_after, ips, dns)[0]


def test_an_expired_certificate_fails_and_says_when_it_expired() -> None:
    old = pem(NOW - 400 * DAY, NOW - 2 * DAY, ["10.0.0.1"], [])
    found = doctor.certificate_check(old, "/etc/s2cs/crt.pem", NOW, "10.0.0.1", generated=False)
    assert found.status is Status.FAIL
    assert "expired on 2030-05-30" in found.detail
    assert "renew" in found.fix


def test_an_expired_generated_certificate_is_to_be_deleted_as_s2cs_would_keep_it() -> None:
    old = pem(NOW - 400 * DAY, NOW - DAY, ["10.0.0.1"], [])
    found = doctor.certificate_check(old, "/s/server.crt", NOW, "10.0.0.1", generated=True)
    assert found.status is Status.FAIL
    assert "delete /s/server.crt" in found.fix


def test_a_generated_ca_certificate_of_an_earlier_s2cs_warns_that_users_get_a_new_one() -> None:
    ca = pair_pem(NOW - DAY, NOW + 400 * DAY, ["10.0.0.1"], ca=True)[0]
    found = doctor.certificate_check(ca, "/s/server.crt", NOW, "10.0.0.1", generated=True)
    assert found.status is Status.WARN
    assert "is a CA certificate" in found.detail and "generates a new one at start" in found.detail
    assert "give users the new /s/server.crt" in found.fix


def test_an_operators_ca_certificate_warns_to_use_a_leaf() -> None:
    ca = pair_pem(NOW - DAY, NOW + 400 * DAY, ["10.0.0.1"], ca=True)[0]
    found = doctor.certificate_check(ca, "c.pem", NOW, "10.0.0.1", generated=False)
    assert found.status is Status.WARN
    assert "is a CA certificate" in found.detail and "CA:FALSE" in found.fix


def test_a_certificate_not_valid_yet_points_at_the_clock() -> None:
    early = pem(NOW + DAY, NOW + 400 * DAY, ["10.0.0.1"], [])
    found = doctor.certificate_check(early, "c.pem", NOW, "10.0.0.1", generated=False)
    assert found.status is Status.FAIL
    assert "not valid before" in found.detail and "clock" in found.fix


def test_a_certificate_expiring_within_30_days_warns() -> None:
    soon = pem(NOW - DAY, NOW + 10 * DAY, ["10.0.0.1"], [])
    found = doctor.certificate_check(soon, "c.pem", NOW, "10.0.0.1", generated=False)
    assert found.status is Status.WARN
    assert "expires soon" in found.detail and "(10 days)" in found.detail


def test_a_certificate_that_does_not_name_the_listener_ip_fails_saying_what_it_names() -> None:
    other = pem(NOW - DAY, NOW + 400 * DAY, ["10.0.0.9"], ["dtn.example.org"])
    found = doctor.certificate_check(other, "c.pem", NOW, "10.0.0.1", generated=False)
    assert found.status is Status.FAIL
    assert "names dtn.example.org, 10.0.0.9, not --listener-ip 10.0.0.1" in found.detail
    assert "IP:10.0.0.1" in found.fix


def test_a_generated_certificate_for_another_address_is_made_again_which_users_must_know() -> None:
    other = pem(NOW - DAY, NOW + 400 * DAY, ["10.0.0.9"], [])
    found = doctor.certificate_check(other, "/s/server.crt", NOW, "10.0.0.1", generated=True)
    assert found.status is Status.WARN
    assert "generates a new one" in found.detail and "give users the new /s/server.crt" in found.fix


def test_a_good_certificate_is_ok_with_its_dates_and_names() -> None:
    good = pem(NOW - DAY, NOW + 365 * DAY, ["10.0.0.1", "::1"], ["dtn"])
    found = doctor.certificate_check(good, "c.pem", NOW, "10.0.0.1", generated=False)
    assert found == Check(
        "certificate", Status.OK, "c.pem: valid until 2031-06-01 (365 days), names dtn, 10.0.0.1, ::1"
    )


def test_busy_ports_are_listed_compactly_with_what_holds_them() -> None:
    busy = {
        5100: "in use by nc (pid 7)",
        5102: "in use by nc (pid 7)",
        5103: "in use by nc (pid 7)",
        5150: "in use",
    }
    busy[5104] = busy[5100]
    found = doctor.port_range_check((5100, 5200), "0.0.0.0", busy, ours=[])
    assert found.status is Status.FAIL
    assert "5100, 5102-5104 in use by nc (pid 7)" in found.detail
    assert "5150 in use" in found.detail
    assert "--port-range" in found.fix


def test_ports_of_the_recorded_streams_are_not_a_problem() -> None:
    found = doctor.port_range_check(
        (5100, 5109), "127.0.0.1", {5100: "in use by haproxy (pid 9)"}, ours=[5100]
    )
    assert found.status is Status.OK
    assert "9 of 10 free" in found.detail and "5100 carry the streams recorded" in found.detail


def test_compact_makes_runs_into_ranges() -> None:
    assert doctor.compact([5104, 5100, 5102, 5103, 5100, 7]) == "7, 5100, 5102-5104"
    assert doctor.compact([]) == ""


def test_a_busy_control_port_fails_unless_the_s2cs_of_this_state_dir_holds_it() -> None:
    theirs = doctor.port_check(
        "control port", "port 5000 of every interface", "in use by nginx (pid 3)", False, "--port"
    )
    assert theirs.status is Status.FAIL and "nginx (pid 3)" in theirs.detail and "--port" in theirs.fix
    ours = doctor.port_check(
        "control port", "port 5000 of every interface", "in use by s2cs (pid 4)", True, "--port"
    )
    assert ours.status is Status.OK and "held by the s2cs of this state dir" in ours.detail


def test_state_dir_verdicts_name_the_problem_and_the_fix() -> None:
    me = "svc"
    missing = doctor.state_dir_check(DirFacts("/s", "missing"), me)
    assert missing.status is Status.OK and "creates it" in missing.detail
    blocked = doctor.state_dir_check(DirFacts("/f/s", "missing", blocker="a part of that path is a file"), me)
    assert blocked.status is Status.FAIL and "a part of that path is a file" in blocked.detail
    unreadable = doctor.state_dir_check(
        DirFacts("/s", "dir", me, 0o40000, "cannot read it: Permission denied"), me
    )
    assert unreadable.status is Status.FAIL and "Permission denied" in unreadable.detail
    assert "chmod 700 /s" in unreadable.fix
    theirs = doctor.state_dir_check(DirFacts("/s", "dir", "root", 0o40700), me)
    assert theirs.status is Status.FAIL and "belongs to root" in theirs.detail
    writable = doctor.state_dir_check(DirFacts("/s", "dir", me, 0o40770), me)
    assert (
        writable.status is Status.FAIL and "mode 0770" in writable.detail and "chmod 700 /s" in writable.fix
    )
    readable = doctor.state_dir_check(DirFacts("/s", "dir", me, 0o40755), me)
    assert (
        readable.status is Status.WARN and "mode 0755" in readable.detail and readable.fix == "chmod 700 /s"
    )
    private = doctor.state_dir_check(DirFacts("/s", "dir", me, 0o40700), me)
    assert private.status is Status.OK
    other = doctor.state_dir_check(DirFacts("/s", "other"), me)
    assert other.status is Status.FAIL and "not a directory" in other.detail


def test_a_held_lock_warns_naming_the_pid_of_the_running_s2cs() -> None:
    held = doctor.lock_check("/s/s2cs.lock", True, "4242")
    assert held.status is Status.WARN
    assert "s2cs pid 4242" in held.detail and "that s2cs is running" in held.detail
    assert doctor.lock_check("/s/s2cs.lock", False, "").status is Status.OK


def test_auth_off_warns_and_half_configured_fails() -> None:
    assert doctor.auth_check(None, False, None, 5000).status is Status.WARN
    assert "port 5000" in doctor.auth_check(None, False, None, 5000).detail
    assert doctor.auth_check("abc", False, None, 5000).status is Status.FAIL
    on = doctor.auth_check("abc", True, "https://auth.globus.org/scopes/abc/scistream", 5000)
    assert on.status is Status.OK and "abc" in on.detail and "scopes/abc/scistream" in on.detail


OWN = Own(frozenset(), 5000, (5100, 5200))


def test_a_policy_that_allows_every_target_warns() -> None:
    found = doctor.policy_check(build_policy(OWN, [], ["0.0.0.0/0", "10.1.0.0/16:5001"]))
    assert found.status is Status.WARN
    assert "0.0.0.0/0 lets users open streams to any host" in found.detail
    narrow = doctor.policy_check(build_policy(OWN, [], ["10.1.0.0/16:5001"], ["192.0.2.0/24"]))
    assert narrow.status is Status.OK
    assert "10.1.0.0/16:5001" in narrow.detail and "remote listeners in 192.0.2.0/24" in narrow.detail
    nothing = doctor.policy_check(build_policy(OWN, [("127.0.0.1", "255.0.0.0")]))  # loopback only
    assert nothing.status is Status.WARN and "no inbound stream can be made" in nothing.detail
    broken = doctor.policy_check("--policy: cannot read p.toml: No such file or directory")
    assert broken.status is Status.FAIL and "p.toml" in broken.detail


def test_a_missing_proxy_fails_only_for_the_backend_in_use() -> None:
    gone = "stunnel is not installed: apt-get install stunnel4 (or use --type haproxy)"
    assert doctor.proxy_check("stunnel", True, gone).status is Status.FAIL
    other = doctor.proxy_check("stunnel", False, gone)
    assert other.status is Status.WARN and "stunnel sessions are unavailable" in other.detail
    caps = Capabilities(Capability(True, by="HAProxy maxconn"), Capability(True, by="the session's shaper"))
    found = doctor.proxy_check("haproxy", True, Proxy("/usr/sbin/haproxy", "HAProxy 2.8.5", caps))
    assert found.status is Status.OK
    assert "/usr/sbin/haproxy, HAProxy 2.8.5; num_conn enforced by HAProxy maxconn" in found.detail
    weak = Capabilities(caps.num_conn, Capability(False, reason="no splice(2)"))
    assert doctor.proxy_check("haproxy", True, Proxy("h", "HAProxy 2.8.5", weak)).status is Status.WARN


CHECKS = [
    Check("haproxy", Status.OK, "/usr/sbin/haproxy"),
    Check("port range", Status.FAIL, "5100 in use", "choose another --port-range"),
    Check("auth", Status.WARN, "OFF", "pass --client-id"),
    Check("state dir", Status.OK, "/s", "never shown for OK"),
]


def test_the_table_has_one_aligned_line_per_check_and_the_fix_after_warn_and_fail() -> None:
    lines = doctor.table(CHECKS).splitlines()
    assert lines[:4] == [
        "haproxy     OK    /usr/sbin/haproxy",
        "port range  FAIL  5100 in use; fix: choose another --port-range",
        "auth        WARN  OFF; fix: pass --client-id",
        "state dir   OK    /s",
    ]
    assert lines[4] == "1 FAIL, 1 WARN, 2 OK"


def test_json_has_the_same_verdicts() -> None:
    found = json.loads(doctor.as_json(CHECKS))
    assert [(c["check"], c["status"]) for c in found] == [(c.check, str(c.status)) for c in CHECKS]
    assert found[1]["fix"] == "choose another --port-range"
    assert found[0]["fix"] is None


def test_any_fail_makes_the_exit_status_an_error() -> None:
    assert doctor.exit_status(CHECKS) is ExitStatus.ERROR
    assert doctor.exit_status([c for c in CHECKS if c.status is not Status.FAIL]) is ExitStatus.OK


def test_readiness_says_which_way_s2cs_tells_that_proxies_listen() -> None:
    assert doctor.table([doctor.readiness_check(None)]).splitlines()[0] == (
        "readiness  OK    kernel socket diagnostics (netlink)"
    )
    slower = doctor.readiness_check("Operation not permitted")
    assert slower.status is Status.WARN
    assert slower.detail == "psutil (netlink unavailable: Operation not permitted), slower with many streams"
    assert "seccomp" in slower.fix
