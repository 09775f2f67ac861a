"""`s2cs`: run the control server of one facility gateway.

A start goes in three steps, each in a function of its own: the options checked together
(options.check), nothing made yet; the gateway built from them (`build`: templates, policy,
backend, runtime), nothing written yet; then served (`serve`: the audit log, the metrics port,
the state dir and its lock, the certificate, the control port). A start refused for its options
leaves nothing behind. `--check` judges the same checked options instead (examine.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import typer

from .. import __version__
from ..errors import ConfigError, ScistreamError
from ..protocol import DEFAULT_PORT
from ..s2ds import preflight
from ..s2ds.backend import Backend
from ..s2ds.containers import DEFAULT_LIMITS, ENGINE_TIMEOUT, DockerRuntime, engine_error
from ..s2ds.haproxy import HaproxyBackend
from ..s2ds.render import default_templates, environment
from ..s2ds.runtime import ProcessRuntime, Runtime, SpawnFailed
from ..s2ds.stunnel import StunnelBackend
from . import examine, logs, tuning
from .audit import AuditLog
from .auth import Authenticator, GlobusAuth, NoAuth
from .certs import FIRST, is_ca, server_certificate
from .gateway import Gateway, Settings, interfaces
from .host import Host
from .metrics import Metrics, MetricsServer, serve_metrics
from .options import (
    DEFAULT_IMAGE,
    AllowGroups,
    AllowPeers,
    AllowSources,
    AllowTargets,
    AllowUsers,
    AsJson,
    AuditLogFile,
    AuthScope,
    BindIp,
    CertName,
    CheckOnly,
    ClientId,
    ClientSecret,
    ControlIp,
    EntryIp,
    Facility,
    HaproxyBin,
    Image,
    KeepStreamsOnExit,
    ListenerIp,
    LogFormat,
    LogMaxBytes,
    MaxClientsPerAddress,
    MetricsAddress,
    MetricsPort,
    Options,
    PathRate,
    PathRtt,
    Plan,
    PolicyPath,
    Port,
    PortRange,
    ProxyType,
    RuntimeName,
    ServerCrt,
    ServerKey,
    StateDirPath,
    Templates,
    Verbose,
    Version,
)
from .options import check as check_options
from .policy import ContainerLimits, Own, Policy, PolicyFile, build_policy, entry_networks, parse_policy
from .server import MAX_PER_ADDRESS, ControlServer, server_context
from .swarm import Swarm, describe, facility_name

log = logging.getLogger("s2cs")


def make_runtime(name: str, image: str | None, state_dir: Path) -> Runtime:
    """The runtime of the proxies; with swarm, the engine's, which `--check` judges as docker's."""
    if name in ("docker", "swarm"):
        return DockerRuntime(image or DEFAULT_IMAGE, state_dir)
    return ProcessRuntime()  # --image without docker or swarm: refused by options.check


def swarm_view(settings: Settings, image: str | None, facility: str) -> Callable[[], str]:
    """What `--check` says of the swarm, as a start would find it (swarm.describe)."""

    def look() -> str:
        import docker

        facility_name(facility)
        try:
            client = docker.from_env(timeout=ENGINE_TIMEOUT)
        except docker.errors.DockerException as exc:
            raise ConfigError(engine_error(exc, image or DEFAULT_IMAGE)) from None
        bind = settings.bind_ip or settings.listener_ip
        return (
            f"facility {facility}, " + describe(client, image or DEFAULT_IMAGE, settings.listener_ip, bind)[0]
        )

    return look


def runtime_lines(runtime: Runtime) -> list[str]:
    """What the start-up output says of where proxies run."""
    if not isinstance(runtime, DockerRuntime):
        return []
    try:
        return [f"  runtime docker: a container per proxy, {runtime.check()}"]
    except SpawnFailed as exc:
        return [f"  runtime docker: WARNING: {exc}; requests fail until it can be used"]


def make_backend(kind: str, templates: Path | None, haproxy_bin: str | None) -> Backend:
    env = environment(templates, default_templates())
    if kind == "stunnel":
        return StunnelBackend(env)
    return HaproxyBackend(env, haproxy_bin)


def make_policy(
    own: Own,
    auth: bool,
    policy_path: Path | None,
    allow_targets: list[str],
    allow_peers: list[str],
    allow_users: list[str],
    allow_groups: list[str],
    allow_sources: Sequence[str] = (),
    entries: Sequence[str] = ("127.0.0.1",),
) -> Policy:
    """The operator's policy from the options and the policy file; ConfigError when it is wrong.
    `entries`: the entry addresses, whose networks are the default sources of plain entries."""
    file = PolicyFile()
    if policy_path is not None:
        try:
            text = policy_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"--policy: cannot read {policy_path}: {reason}") from None
        file = parse_policy(text, str(policy_path))
    found = interfaces()
    policy = build_policy(
        own,
        found,
        allow_targets,
        allow_peers,
        allow_users,
        allow_groups,
        file,
        allow_sources=allow_sources,
        entry_networks=entry_networks(entries, found),
    )
    if policy.restricts_identities and not auth:
        named = "--allow-users" if allow_users else "--allow-groups" if allow_groups else str(policy_path)
        raise ConfigError(
            f"{named} names users or groups, which needs authentication: "
            "pass --client-id and --client-secret too"
        )
    return policy


def entry_lines(policy: Policy, entries: Sequence[str]) -> list[str]:
    """What the start-up output says of the plain entries: where and from whom."""
    sources = ", ".join(str(rule) for rule in policy.sources)
    if policy.default_sources:
        sources += " (the networks of the entry addresses; --allow-sources to choose others)"
    return [
        f"  plain entries (outbound proxies' listeners) on {', '.join(entries)} only (--entry-ip)",
        f"  plain entries accept connections from: {sources}",
    ]


def policy_lines(policy: Policy, policy_path: Path | None, audit_log: Path | None) -> list[str]:
    """What the start-up output says of the policy."""
    described = policy.describe()
    targets = ", ".join(described["targets"]) or "none"
    if policy.default_targets:
        targets += " (the networks of this gateway's interfaces; --allow-targets to choose others)"
    *ports, last = policy.own.never
    lines = [
        f"  inbound proxies open to: {targets}",
        f"  never to this gateway's {', '.join(ports)} or {last}, on any of its addresses; to its "
        "other ports only by a rule that names the address",
    ]
    if policy.peers is None:
        lines.append("  outbound proxies connect to any remote listener (--allow-peers to restrict)")
    else:
        lines.append(f"  outbound proxies connect to: {', '.join(described['peers']) or 'none'}")
    if policy.restricts_identities:
        lines.append(
            f"  identities allowed: {len(policy.users)} user(s), {len(policy.groups)} group(s)"
            + (f", {len(policy.allows)} [[allow]] entr(ies) of {policy_path}" if policy.allows else "")
        )
    if described["quota"]:
        quota = ", ".join(f"{k} {v}" for k, v in described["quota"].items())
        lines.append(f"  per identity at most: {quota}")
    if audit_log:
        lines.append(f"  audit log {audit_log}")
    return lines


def container_lines(limits: ContainerLimits, runtime_name: str) -> list[str]:
    """What the start-up output says of what each proxy's container may use: the limits in force,
    the runtime's defaults among them, or that the policy's have no effect with processes."""
    given = limits.as_dict()
    if runtime_name not in ("docker", "swarm"):
        if not given:
            return []
        told = ", ".join(f"{name} {_container_limit(name, value)}" for name, value in given.items())
        return [
            f"  [containers] of the policy ({told}) applies with --runtime docker or swarm only: not here"
        ]
    shown = []
    for name, value, default in (
        ("memory", limits.memory, DEFAULT_LIMITS.memory),
        ("cpus", limits.cpus, DEFAULT_LIMITS.cpus),
        ("pids", limits.pids, DEFAULT_LIMITS.pids),
    ):
        used = _container_limit(name, default if value is None else value)
        shown.append(f"{name} {used}{' (default)' if value is None else ''}")
    return [f"  each proxy's container at most: {', '.join(shown)}"]


def _container_limit(name: str, value: float | None) -> str:
    """`256 MiB`, `1.5`, `no limit` (0 or None, as the engine takes them)."""
    if not value:
        return "no limit"
    return f"{int(value) >> 20} MiB" if name == "memory" else f"{value:g}"


def login_lines(scope: str) -> list[str]:
    """How users log in here: s2uc needs the facility's native-app client id (SCISTREAM_CLIENT_ID),
    which this s2cs names when its operator set it in s2cs's environment too."""
    import os

    from ..scopes import login_form  # loads globus-sdk, as authentication does

    command = f"s2uc login --scope {login_form(scope)}"
    native = os.environ.get("SCISTREAM_CLIENT_ID", "").strip()
    if native:
        return [f"  users log in with: SCISTREAM_CLIENT_ID={native} {command}"]
    return [
        f"  users log in with: {command}",
        "    with SCISTREAM_CLIENT_ID set to your facility's Globus native-app client id (s2uc has "
        "none built in): register one, and give users both",
    ]


def run(
    listener_ip: ListenerIp = "127.0.0.1",
    port: Port = DEFAULT_PORT,
    control_ip: ControlIp = None,
    port_range: PortRange = "5100-5200",
    kind: ProxyType = "haproxy",
    runtime_name: RuntimeName = "process",
    facility: Facility = "scistream",
    image: Image = None,
    server_crt: ServerCrt = None,
    server_key: ServerKey = None,
    cert_name: CertName = None,
    state_dir: StateDirPath = None,
    templates: Templates = None,
    bind_ip: BindIp = None,
    entry_ip: EntryIp = None,
    allow_sources: AllowSources = None,
    haproxy_bin: HaproxyBin = None,
    client_id: ClientId = None,
    client_secret: ClientSecret = None,
    auth_scope: AuthScope = None,
    allow_targets: AllowTargets = None,
    allow_peers: AllowPeers = None,
    allow_users: AllowUsers = None,
    allow_groups: AllowGroups = None,
    policy_path: PolicyPath = None,
    audit_log: AuditLogFile = None,
    max_clients_per_address: MaxClientsPerAddress = MAX_PER_ADDRESS,
    metrics_port: MetricsPort = None,
    metrics_address: MetricsAddress = "127.0.0.1",
    keep_streams_on_exit: KeepStreamsOnExit = False,
    log_max_bytes: LogMaxBytes = 10 * 1024 * 1024,
    verbose: Verbose = False,
    log_format: LogFormat = "text",
    check: CheckOnly = False,
    as_json: AsJson = False,
    path_rtt: PathRtt = None,
    path_rate: PathRate = None,
    version: Version = None,
) -> None:
    """Run the SciStream control server of this facility gateway."""
    options = Options(
        listener_ip=listener_ip,
        port=port,
        control_ip=control_ip,
        port_range=port_range,
        kind=kind,
        runtime_name=runtime_name,
        facility=facility,
        image=image,
        server_crt=server_crt,
        server_key=server_key,
        cert_names=tuple(cert_name or ()),
        state_dir=state_dir,
        templates=templates,
        bind_ip=bind_ip,
        entry_ip=tuple(entry_ip or ()),
        allow_sources=tuple(allow_sources or ()),
        haproxy_bin=haproxy_bin,
        client_id=client_id,
        client_secret=client_secret,
        auth_scope=auth_scope,
        allow_targets=tuple(allow_targets or ()),
        allow_peers=tuple(allow_peers or ()),
        allow_users=tuple(allow_users or ()),
        allow_groups=tuple(allow_groups or ()),
        policy_path=policy_path,
        audit_log=audit_log,
        max_clients_per_address=max_clients_per_address,
        metrics_port=metrics_port,
        metrics_address=metrics_address,
        keep_streams_on_exit=keep_streams_on_exit,
        log_max_bytes=log_max_bytes,
        check_only=check,
        as_json=as_json,
        path_rtt=path_rtt,
        path_rate=path_rate,
    )
    logs.configure(log_format, verbose)
    # Until the server's own handlers take over (ControlServer.serve): a SIGTERM during the
    # start-up checks ends s2cs as an exception would, so their scratch files are removed.
    signal.signal(signal.SIGTERM, _stopped_while_starting)
    try:
        plan = check_options(options)
        if options.check_only:  # the same options, judged instead of used (examine.py)
            raise typer.Exit(examine.main(setup(options, plan), options.as_json))
        serve(options, plan, build(options, plan))
    except ScistreamError as exc:  # a refused option or part, the control port taken, recovery failed
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(exc.exit_status) from None


def read_policy(options: Options, plan: Plan) -> Policy:
    """The policy of these options: at start, for --check, and again at each SIGHUP."""
    return make_policy(
        plan.own,
        options.authenticates,
        options.policy_path,
        list(options.allow_targets),
        list(options.allow_peers),
        list(options.allow_users),
        list(options.allow_groups),
        options.allow_sources,
        plan.settings.entry_ips,
    )


def setup(options: Options, plan: Plan) -> examine.Setup:
    """What `--check` judges: the checked options and the start's own builders."""
    return examine.Setup(
        settings=plan.settings,
        kind=options.kind,
        port=options.port,
        control_ip=plan.control_ip,
        server_crt=options.server_crt,
        server_key=options.server_key,
        client_id=options.client_id,
        secret_given=bool(options.client_secret),
        auth_scope=options.auth_scope,
        metrics=plan.metrics,
        backend=lambda k: make_backend(k, options.templates, options.haproxy_bin),
        runtime=make_runtime(options.runtime_name, options.image, plan.settings.state_dir),
        policy=lambda: read_policy(options, plan),
        swarm=swarm_view(plan.settings, options.image, options.facility)
        if options.runtime_name == "swarm"
        else None,
        path=tuning.path_of(options.path_rtt, options.path_rate),
    )


def build(options: Options, plan: Plan) -> Gateway:
    """The gateway of these options, its parts made and checked; nothing written yet. A template
    the proxy refuses, a policy that is wrong or a state dir path proxies cannot use stops the
    start here."""
    backend = make_backend(options.kind, options.templates, options.haproxy_bin)
    preflight.check(backend)  # before anything is served: a broken template stops the start
    policy = read_policy(options, plan)
    auth: Authenticator = NoAuth()
    if options.client_id and options.client_secret:
        auth = GlobusAuth(options.client_id, options.client_secret, options.auth_scope)
        auth.lookup_groups = policy.needs_groups
    if options.runtime_name == "swarm":  # the swarm's tasks are its own: no runtime here
        image = options.image or DEFAULT_IMAGE
        return Gateway(auth, Swarm(plan.settings, backend, image, options.facility, policy))
    runtime = make_runtime(options.runtime_name, options.image, plan.settings.state_dir)
    host = Host(plan.settings, backend, runtime, policy)
    host.supervisor.limit_logs(options.log_max_bytes)
    gateway = Gateway(auth, host)
    if isinstance(runtime, DockerRuntime):
        runtime.limits = lambda: gateway.policy.containers  # as a SIGHUP leaves it
    return gateway


def serve(options: Options, plan: Plan, gateway: Gateway) -> None:
    """Take what the start writes and listens on, then serve until SIGTERM or SIGINT. The audit
    log and the metrics port first: a file s2cs cannot write or a port taken leaves no state dir."""
    audit = AuditLog(options.audit_log) if options.audit_log else None
    # The streams' counts are a Host's: check() refuses --metrics-port with --runtime swarm.
    metrics = Metrics(gateway.site) if plan.metrics and isinstance(gateway.site, Host) else None
    exporter = serve_metrics(metrics, *plan.metrics) if metrics and plan.metrics else None
    try:
        gateway.open()  # before anything else touches the state dir
        addresses = [
            ip
            for ip in (plan.settings.bind_ip, plan.control_ip)
            if ip and not ipaddress.ip_address(ip).is_unspecified
        ]
        crt, key, generated = server_certificate(
            options.server_crt,
            options.server_key,
            gateway.state.path,
            plan.settings.listener_ip,
            *addresses,
            names=options.cert_names,
        )
        context = server_context(str(crt), str(key))
        if metrics is not None:
            metrics.control_certificate(crt)  # its expiry, for the alert before users are refused
        _raise_fd_limit()
        reload = reloader(options, plan, gateway)
        server = ControlServer(
            gateway, context, plan.control_ip, options.port, audit, options.max_clients_per_address, metrics,
            reload=reload,
        )  # fmt: skip

        def ready() -> None:
            typer.echo(f"s2cs ready on {plan.control_where}", err=True)

        def listening() -> None:
            banner(options, plan, gateway, crt, generated, exporter)

        asyncio.run(server.serve(ready, options.keep_streams_on_exit, listening))
    finally:
        if exporter is not None:
            exporter.close()


def reloader(options: Options, plan: Plan, gateway: Gateway) -> Callable[[], None]:
    """What a SIGHUP does: templates and policy read again from the same options, checked, then
    swapped in for new requests; on any ConfigError the old ones stay."""
    reloading = threading.Lock()  # one SIGHUP at a time: a slow check cannot swap in older files
    auth = gateway.auth

    def reload() -> None:
        with reloading:
            env = environment(options.templates, default_templates())
            preflight.check(gateway.site.backend, env)
            new_policy = read_policy(options, plan)
            if isinstance(auth, GlobusAuth):  # groups looked up before a policy that needs them
                auth.lookup_groups = auth.lookup_groups or new_policy.needs_groups
            gateway.reconfigure(env, new_policy)
            if isinstance(auth, GlobusAuth):
                auth.lookup_groups = new_policy.needs_groups

    return reload


def banner(
    options: Options,
    plan: Plan,
    gateway: Gateway,
    crt: Path,
    generated: str | None,
    exporter: MetricsServer | None,
) -> None:
    """What this s2cs is and does, once it has the control port: a busy port is one line."""

    def say(line: str) -> None:
        typer.echo(line, err=True)

    say(f"s2cs {__version__}: control server on {plan.control_where}, TLS certificate {crt}")
    if generated:
        anew = "" if generated == FIRST else f" anew ({generated})"
        say(f"  generated that certificate{anew}; give it to users: s2uc ... --server_cert {crt}")
    elif is_ca(crt):
        say(
            f"  warning: {crt} is a CA certificate (CA:TRUE); s2uc trusts it only for this "
            "gateway, but a CA's key can sign certificates for others: give the control port "
            "a leaf certificate (CA:FALSE)"
        )
    backend = gateway.site.backend
    caps = backend.capabilities
    say(f"  backend {backend.name} ({backend.version})")
    say(f"  num_conn {caps.num_conn.describe()}; rate {caps.rate.describe()}")
    if isinstance(gateway.site, Swarm):
        facility = options.facility
        say(f"  runtime swarm: a service per stream, facility {facility}, {gateway.site.check()}")
    elif isinstance(gateway.site, Host):
        for line in runtime_lines(gateway.site.runtime):
            say(line)
    settings = plan.settings
    say(
        f"  listeners advertised as {settings.listener_ip}, bound on {gateway.inbound_bind}, "
        f"ports {settings.port_range[0]}-{settings.port_range[1]}; state in {gateway.state.path}"
    )
    for line in entry_lines(gateway.policy, gateway.entry_ips):
        say(line)
    for line in policy_lines(gateway.policy, options.policy_path, options.audit_log):
        say(line)
    for line in container_lines(gateway.policy.containers, options.runtime_name):
        say(line)
    if exporter is not None:
        say(f"  metrics on {exporter.url}")
    if gateway.auth.enabled:
        say(f"  authentication ON: Globus tokens with scope {gateway.auth.scope}")
        if gateway.auth.scope is not None:
            for line in login_lines(gateway.auth.scope):
                say(line)
    else:
        say(
            "  WARNING: authentication is OFF: anyone who can reach this port can create and release "
            "streams. Pass --client-id and --client-secret to require Globus tokens."
        )


def _stopped_while_starting(signum: int, frame: object) -> None:
    typer.echo("s2cs stopped before it started serving", err=True)
    raise SystemExit(128 + signum)


def _raise_fd_limit() -> None:
    """Every stream costs descriptors (sockets, logs); the common soft limit of 1024 is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(args: list[str] | None = None, prog_name: str = "s2cs") -> None:
    """`args`: what to run with instead of the command line (`scistream doctor` passes its own)."""
    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    app.command()(run)
    app(args=args, prog_name=prog_name)
