"""The host-tuning verdicts of `s2cs --check` over given values: a gateway as ESnet's fasterdata
says a data transfer node should be tuned for wide-area streams."""

from __future__ import annotations

import pytest

from scistream.errors import ConfigError
from scistream.s2cs import tuning
from scistream.s2cs.doctor import Status
from scistream.s2cs.tuning import HostTuning, NetworkPath

# A Linux host as installed: buffers of a few MiB, cubic, fq_codel, 1024 open files.
UNTUNED = HostTuning(
    rmem_max=212992,
    wmem_max=212992,
    tcp_rmem=(4096, 131072, 6291456),
    tcp_wmem=(4096, 16384, 4194304),
    congestion_control="cubic",
    available_congestion_control=("reno", "cubic"),
    default_qdisc="fq_codel",
    open_files=1024,
    nr_open=1048576,
)
# As fasterdata tunes a 10G host for paths up to 100 ms.
TUNED = HostTuning(
    rmem_max=134217728,
    wmem_max=134217728,
    tcp_rmem=(4096, 87380, 67108864),
    tcp_wmem=(4096, 65536, 67108864),
    congestion_control="bbr",
    available_congestion_control=("reno", "cubic", "bbr"),
    default_qdisc="fq",
    open_files=65536,
    nr_open=1048576,
)
PATH = NetworkPath(rate=10e9, rtt=0.050)  # --path-rate 10G --path-rtt 50ms


def by_name(host: HostTuning, path: NetworkPath | None, ports: int = 101) -> dict[str, tuning.Check]:
    return {c.check: c for c in tuning.checks(host, path, ports, control_clients=1000)}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("50ms", 0.05), ("50 ms", 0.05), ("0.2s", 0.2), ("1.5s", 1.5), ("800us", 0.0008), ("120MS", 0.12)],
)
def test_a_round_trip_time_reads_with_its_unit(text: str, seconds: float) -> None:
    assert tuning.parse_rtt(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "bits"),
    [("10G", 10e9), ("10g", 10e9), ("400M", 400e6), ("2.5Gbit/s", 2.5e9), ("100Gbps", 100e9), ("1T", 1e12)],
)
def test_a_path_rate_reads_in_bits_per_second(text: str, bits: float) -> None:
    assert tuning.parse_rate(text) == pytest.approx(bits)


@pytest.mark.parametrize("text", ["50", "fast", "-5ms", "0ms", "20s", ""])
def test_a_round_trip_time_without_a_unit_or_out_of_range_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--path-rtt .* such as 50ms"):
        tuning.parse_rtt(text)


@pytest.mark.parametrize("text", ["10", "10GB/s", "0G", "fast", "5P"])
def test_a_path_rate_without_a_unit_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--path-rate .* such as 10G"):
        tuning.parse_rate(text)


def test_the_path_needs_both_options() -> None:
    assert tuning.path_of(None, None) is None
    assert tuning.path_of("50ms", "10G") == PATH
    with pytest.raises(ConfigError, match="together"):
        tuning.path_of("50ms", None)


def test_the_window_of_a_path_is_its_rate_times_its_round_trip_time() -> None:
    assert PATH.window == 62_500_000  # 10 Gbit/s x 50 ms / 8
    assert PATH.describe() == "a 10 Gbit/s path of 50 ms"


def test_buffers_below_the_window_warn_with_the_sysctls_to_set() -> None:
    found = by_name(UNTUNED, PATH)
    receive = found["receive buffers"]
    assert receive.status is Status.WARN
    assert "62500000 bytes" in receive.detail and "a 10 Gbit/s path of 50 ms" in receive.detail
    # The next power of two at or above the window: 64 MiB, fasterdata's figure for such a host.
    # The autotuning minimum and default are kept as they are.
    assert receive.fix.startswith(
        "sysctl -w net.core.rmem_max=67108864 net.ipv4.tcp_rmem='4096 131072 67108864'"
    )
    send = found["send buffers"]
    assert send.status is Status.WARN
    assert send.fix.startswith("sysctl -w net.core.wmem_max=67108864 net.ipv4.tcp_wmem='4096 16384 67108864'")


def test_only_the_buffer_limit_that_is_short_is_named() -> None:
    host = HostTuning(**{**TUNED.__dict__, "rmem_max": 4194304})
    receive = by_name(host, PATH)["receive buffers"]
    assert receive.status is Status.WARN
    assert "net.core.rmem_max 4 MiB" in receive.detail
    assert "tcp_rmem" not in receive.fix and "net.core.rmem_max=67108864" in receive.fix


def test_buffers_that_hold_the_window_pass() -> None:
    found = by_name(TUNED, PATH)
    for name in ("receive buffers", "send buffers"):
        assert found[name].status is Status.OK, found[name]
    assert "hold the 59.6 MiB window a 10 Gbit/s path of 50 ms needs" in found["receive buffers"].detail


def test_a_longer_path_asks_for_more_than_a_host_tuned_for_a_shorter_one() -> None:
    found = by_name(TUNED, NetworkPath(rate=10e9, rtt=0.2))  # 250 MB
    assert found["receive buffers"].status is Status.WARN
    assert "net.ipv4.tcp_rmem='4096 87380 268435456'" in found["receive buffers"].fix


def test_without_a_path_the_buffers_are_described_not_judged() -> None:
    found = by_name(UNTUNED, None)
    receive = found["receive buffers"]
    assert receive.status is Status.OK
    assert "at most 503 Mbit/s per connection over 100 ms" in receive.detail  # 6 MiB / 100 ms
    assert "--path-rtt and --path-rate" in receive.detail


def test_a_congestion_control_not_made_for_long_paths_warns() -> None:
    found = by_name(UNTUNED, None)["congestion control"]
    assert found.status is Status.WARN
    assert "cubic" in found.detail
    assert found.fix == "modprobe tcp_bbr && sysctl -w net.ipv4.tcp_congestion_control=bbr"
    loaded = HostTuning(**{**UNTUNED.__dict__, "available_congestion_control": ("reno", "cubic", "bbr")})
    assert by_name(loaded, None)["congestion control"].fix == "sysctl -w net.ipv4.tcp_congestion_control=bbr"
    htcp = HostTuning(**{**UNTUNED.__dict__, "available_congestion_control": ("cubic", "htcp")})
    assert by_name(htcp, None)["congestion control"].fix == "sysctl -w net.ipv4.tcp_congestion_control=htcp"


@pytest.mark.parametrize("algorithm", ["bbr", "htcp"])
def test_bbr_and_htcp_pass(algorithm: str) -> None:
    host = HostTuning(**{**UNTUNED.__dict__, "congestion_control": algorithm})
    assert by_name(host, None)["congestion control"].status is Status.OK


def test_a_queueing_discipline_other_than_fq_warns() -> None:
    found = by_name(UNTUNED, None)["queueing"]
    assert found.status is Status.WARN
    assert "fq_codel" in found.detail
    assert found.fix.startswith("sysctl -w net.core.default_qdisc=fq")
    assert by_name(TUNED, None)["queueing"].status is Status.OK


def test_values_this_namespace_does_not_show_are_not_judged() -> None:
    hidden = HostTuning(
        rmem_max=None,
        wmem_max=None,
        tcp_rmem=None,
        tcp_wmem=None,
        congestion_control=None,
        available_congestion_control=(),
        default_qdisc=None,
        open_files=65536,
        nr_open=None,
    )
    found = by_name(hidden, PATH)
    for name in ("receive buffers", "send buffers", "congestion control", "queueing"):
        assert found[name].status is Status.OK and "not visible" in found[name].detail, found[name]


def test_a_namespace_that_shows_only_the_autotuning_limits_has_them_judged() -> None:
    host = HostTuning(**{**UNTUNED.__dict__, "rmem_max": None})
    receive = by_name(host, PATH)["receive buffers"]
    assert receive.status is Status.WARN
    assert receive.fix.startswith("sysctl -w net.ipv4.tcp_rmem='4096 131072 67108864' (")
    assert "rmem_max" not in receive.detail


def test_an_open_files_limit_below_what_a_full_port_range_costs_warns() -> None:
    found = by_name(UNTUNED, None, ports=101)["open files"]
    assert found.status is Status.WARN
    # 1000 control connections, a proxy's and a shaper's log per stream, 64 of its own.
    assert "1024" in found.detail and "1266" in found.detail and "101 ports" in found.detail
    assert found.fix.startswith("LimitNOFILE=65536 in the service unit")
    assert by_name(TUNED, None, ports=101)["open files"].status is Status.OK


def test_a_port_range_beyond_fs_nr_open_names_that_sysctl_too() -> None:
    host = HostTuning(**{**UNTUNED.__dict__, "nr_open": 65536})
    found = by_name(host, None, ports=60000)["open files"]
    assert found.status is Status.WARN
    assert "121064" in found.detail  # 1000 + 2 x 60000 + 64
    assert found.fix.startswith("sysctl -w fs.nr_open=121856, then LimitNOFILE=121856")


def test_tuning_never_fails_a_check() -> None:
    worst = HostTuning(**{**UNTUNED.__dict__, "open_files": 16})
    assert {c.status for c in tuning.checks(worst, PATH, 64512, control_clients=1000)} == {Status.WARN}
