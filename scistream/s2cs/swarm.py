"""`s2cs --runtime swarm`: each session one Docker Swarm service, and the swarm is the state.

A facility that outgrows one DTN runs several, as the nodes of a swarm; any number of s2cs
replicas, each stateless, serve them together (docs/scale-out.md). `Swarm` is the gateway's site
there (`Site`, gateway.py): the rules of a request are the gateway's, as on a host of its own.

- **A session is a service** of one replica on host networking, placed on a gateway node (label
  `scistream.gateway=true`; the one with the fewest streams). Its container runs every process
  of the session (`python -m scistream.s2ds.task`, task.py), in a tmpfs at the session
  directory's path; the config and the plan are swarm configs, the stream's key and certificate
  swarm secrets, mounted at the paths they were rendered for. The swarm restarts the task when it
  fails (restart policy on failure); s2cs supervises nothing.
- **The state is the services' labels.** The session's record (role, owner, listeners, limits,
  the UID's short prefix, never the UID: whoever may inspect a service must not be able to join
  or release its stream) is a label of its service, and the UID's SHA-256 another (`uid-hash`),
  so a replica finds every stream of the facility, finds one by its UID, lists and releases any
  of them, and loses nothing when it dies. A listing shows the whole UID of the streams this
  replica made since it started (it keeps them in memory only), the prefix of the others. The
  service's name derives from the facility, the UID and the role (a hash): a second proxy of the
  same stream and role is refused by the swarm itself.
- **Limits**: each task as each container of `--runtime docker` (containers.effective: memory,
  CPUs, processes); no new privileges for its processes (task.py sets it before it starts them:
  a swarm service of this engine's API cannot ask for it).
- **Ports are claimed by names.** A listener port of a node is a swarm config named after the
  facility, the node and the port: the swarm refuses a second object of that name, so two
  replicas never hand out the same port, without a lock service. A claim left by a replica that
  died before it made its service is removed once older than STALE_CLAIM; so are the configs and
  secrets of a session whose service was never made (each labelled with its session and the time
  it was made: `half_made`), and a service whose request never answered (labelled
  `phase=STARTING` until just before the reply: `never_answered`).
- The address a user gets is the node's `scistream.address` label; a node without one (a
  single-node swarm) advertises `--listener-ip`; `scistream.bind-ip` is where its inbound proxies
  listen, `scistream.max-streams` the most streams placed on it; `scistream.entry-ip` (addresses,
  comma-separated) where its outbound proxies' plain entries listen, else `--entry-ip`: an
  outbound request goes to a node where the address it names is one, or is refused.

- **A node lost** (down, as the swarm's heartbeats tell) keeps its streams: a stream's listeners
  are its node's, and the partner's proxy has them, so it is neither moved nor ended. `status`
  shows it BACKOFF, naming the node, until the node is back and the swarm has started its task
  there again (the returning engine kills the task it ran before); a stream released meanwhile is
  gone from the swarm, and its old task with it when the engine returns. A replica whose own
  engine stops answering names the swarm's other managers, where the other replicas run.

Not here (docs/scale-out.md says so): byte counts and failure diagnosis in `s2uc status` (they
are inside the task's container, on another node), and metrics of the streams.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from ..errors import (
    BackendFailed,
    BadRequest,
    ConfigError,
    Conflict,
    Forbidden,
    NoPorts,
    ScistreamError,
)
from ..protocol import hostport
from ..s2ds.backend import Backend
from ..s2ds.containers import ENGINE_LOGS, ENGINE_TIMEOUT, LABEL, effective, engine_error, image_command
from ..s2ds.render import SessionFiles
from ..s2ds.runtime import bound_endpoints
from ..s2ds.task import READY
from .gateway import (
    Place,
    Settings,
    any_address,
    default_policy,
    entry_address,
    entry_addresses,
    inbound_bind,
    port_is_free,
    proxy_spec,
    within_quota,
)
from .policy import Grant, IPAddress, Policy, normalised
from .sessions import Phase, Session, short
from .state import StateDir

log = logging.getLogger(__name__)

FACILITY = re.compile(r"[a-z0-9][a-z0-9-]{0,19}")
START_TIMEOUT = 60.0  # seconds for a new task to be placed, started and listening
STALE_CLAIM = 180.0  # seconds after which a port claim without its service is a dead replica's
RELEASE_WAIT = 15.0  # seconds for a released task's container to end on this node
GATEWAY_NODE = "scistream.gateway"  # node label: "true" on the nodes that run streams
ADDRESS = "scistream.address"  # node label: the address users are given for that node
BIND = "scistream.bind-ip"  # node label: where its inbound proxies listen (default: every address)
MAX_STREAMS = "scistream.max-streams"  # node label: the most streams placed on it
ENTRY = "scistream.entry-ip"  # node label: where its plain entries listen (default: --entry-ip)
RESTARTS = 5  # the swarm gives a task up after this many failures within RESTART_WINDOW
RESTART_WINDOW = 60  # seconds
GIVEN_UP = 3.0  # seconds after which an ended newest task has no successor: the swarm gave up
SECRETS = ("stream.crt", "stream.pem")  # files the swarm keeps as secrets
NOT_MOUNTED = ("stream.key",)  # no proxy reads the key alone: the PEM has it
TASK_TMPFS = 16 << 20  # bytes: the session directory of a task, sockets and counts
PHASE = f"{LABEL}.phase"  # service label: STARTING until its request answers, then ACTIVE

_RUNNING = {"running"}
_STARTING = {"new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting"}


def facility_name(value: str) -> str:
    if not FACILITY.fullmatch(value):
        raise ConfigError(
            f"--facility {value!r}: use 1-20 lower-case letters, digits and -, a letter or digit first"
        )
    return value


def session_key(facility: str, uid: str, role: str) -> str:
    """What names the service of a stream's session of a role: the same from every replica, so
    the swarm, which refuses a second object of a name, refuses a second such session. Every other
    object of a session is labelled with its sid, random, one request's."""
    return hashlib.sha256(f"{facility}\0{uid}\0{role}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Node:
    id: str
    address: str  # what users are given
    bind: str  # where inbound proxies listen
    local: bool  # the node of this s2cs's own engine: its ports can be probed here
    max_streams: int | None = None  # label scistream.max-streams: what this DTN may carry
    entries: tuple[str, ...] = ("127.0.0.1",)  # label scistream.entry-ip, else --entry-ip


def gateway_nodes(
    nodes: Sequence[dict[str, Any]],
    own: str,
    listener_ip: str,
    own_bind: str,
    entries: Sequence[str] = ("127.0.0.1",),
) -> list[Node]:
    """The nodes that may run streams, from the swarm's node list. Pure.

    Nodes labelled `scistream.gateway=true`; without any such label in the swarm, this s2cs's own
    node alone (a single-node swarm), advertising --listener-ip."""
    found = []
    labelled = [n for n in nodes if n.get("Spec", {}).get("Labels", {}).get(GATEWAY_NODE) == "true"]
    for node in labelled or [n for n in nodes if n.get("ID") == own]:
        spec, status = node.get("Spec", {}), node.get("Status", {})
        if status.get("State") != "ready" or spec.get("Availability", "active") != "active":
            continue
        labels = spec.get("Labels", {})
        local = node.get("ID") == own
        address = labels.get(ADDRESS) or (listener_ip if local or not labelled else status.get("Addr", ""))
        if not _is_ip(address) or not _is_ip(labels.get(BIND) or address):
            log.warning(
                "swarm node %s: no usable %s label (an IP address): it runs no stream", node["ID"], ADDRESS
            )
            continue
        bind = labels.get(BIND) or (own_bind if local else any_address(address))
        most = labels.get(MAX_STREAMS, "")
        entry = node_entries(labels.get(ENTRY, ""), entries)
        if entry is None:
            log.warning(
                "swarm node %s: its %s label is not a list of IP addresses: it runs no stream",
                node["ID"],
                ENTRY,
            )
            continue
        found.append(Node(node["ID"], address, bind, local, int(most) if most.isdigit() else None, entry))
    return found


def node_addresses(nodes: Sequence[Node]) -> frozenset[IPAddress]:
    """The addresses of the gateway nodes, where streams listen: to a stream, each is the
    gateway itself as much as this s2cs's host is. Pure."""
    found = {normalised(ip) for node in nodes for ip in (node.address, node.bind)}
    return frozenset(ip for ip in found if not ip.is_unspecified)


def node_entries(label: str, default: Sequence[str]) -> tuple[str, ...] | None:
    """A node's entry addresses: its label's (comma-separated), else `default` (--entry-ip);
    None when the label holds something else than specific IP addresses. Pure."""
    if not label.strip():
        return tuple(default)
    found = []
    for text in label.split(","):
        try:
            ip = ipaddress.ip_address(text.strip())
        except ValueError:
            return None
        if ip.is_unspecified:
            return None  # never every interface
        found.append(str(ip))
    return tuple(found)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def least_loaded(nodes: Sequence[Node], streams: dict[str, int]) -> list[Node]:
    """Nodes with room (below their scistream.max-streams), by how many streams they run, fewest
    first (then by id, so replicas agree). Pure."""
    room = [n for n in nodes if n.max_streams is None or streams.get(n.id, 0) < n.max_streams]
    return sorted(room, key=lambda n: (streams.get(n.id, 0), n.id))


def node_name(node: dict[str, Any]) -> str:
    """A node as an operator knows it: its hostname and address ('dtn3 (192.168.2.13)'). Pure."""
    spec, status = node.get("Spec", {}), node.get("Status", {})
    hostname = node.get("Description", {}).get("Hostname") or str(node.get("ID", "?"))[:12]
    manager = (node.get("ManagerStatus") or {}).get("Addr", "")
    address = spec.get("Labels", {}).get(ADDRESS) or status.get("Addr") or manager.rpartition(":")[0]
    return f"{hostname} ({address})" if address else hostname


def lost_node(node: dict[str, Any] | None) -> str:
    """What a stream's owner is told while its node is not ready (down, or gone from the swarm);
    empty while it is. A stream is pinned to its node (its listeners are that node's, and the
    partner's proxy has them): it is neither moved nor ended, the swarm starts it there again
    when the node is back. Pure."""
    if node is None:
        return "its node is no longer in the swarm: the stream cannot run again; release it"
    state = node.get("Status", {}).get("State", "unknown")
    if state == "ready":
        return ""
    return (
        f"node {node_name(node)} is {state}: the swarm starts this stream again there, at the same "
        "listeners, when the node is back; release it to end it now"
    )


def no_gateway(nodes: Sequence[dict[str, Any]]) -> str:
    """Why no node can take a stream, for the operator: none labelled, those labelled not ready
    (each named, with its state), or their labels unusable (gateway_nodes logged which). Pure."""
    labelled = [n for n in nodes if n.get("Spec", {}).get("Labels", {}).get(GATEWAY_NODE) == "true"]
    if not labelled:
        how = f"docker node update --label-add {GATEWAY_NODE}=true NODE"
        return f"no swarm node can run streams: label one ({how})"

    def state(node: dict[str, Any]) -> str:
        availability = node.get("Spec", {}).get("Availability", "active")
        return str(node.get("Status", {}).get("State", "unknown")) + (
            "" if availability == "active" else f", {availability}"
        )

    states = [state(n) for n in labelled]
    if all(s == "ready" for s in states):
        return (
            f"no gateway node can take a stream: each has a {ADDRESS}, {BIND} or {ENTRY} label that "
            "is not an IP address (this s2cs's log names them)"
        )
    named = ", ".join(f"{node_name(n)} {s}" for n, s in zip(labelled, states, strict=True))
    words = f"no gateway node can take a stream now ({named})"
    if "unknown" in states:
        words += (
            "; after a manager's loss the swarm shows its nodes unknown until the other managers "
            "have elected a leader: try again shortly"
        )
    return words


def other_managers(nodes: Sequence[dict[str, Any]], own: str) -> tuple[str, ...]:
    """The swarm's managers but this s2cs's own node, as operators know them: where the
    facility's other s2cs replicas run (the stack runs one on each manager). Pure."""
    return tuple(node_name(n) for n in nodes if n.get("ManagerStatus") and n.get("ID") != own)


def task_state(tasks: Sequence[dict[str, Any]]) -> tuple[str, int, dict[str, Any] | None]:
    """A service's state as a session's (RUNNING, STARTING, BACKOFF, FATAL), the restarts the
    swarm reports (tasks it started again, within its task history), and its newest task. Pure
    but for the clock.

    The swarm queues the next task as soon as one fails (it starts it after its delay): a newest
    task that has ended, and for longer than the delay, has no successor coming: the swarm gave
    the session up (RESTARTS failures within RESTART_WINDOW)."""
    if not tasks:
        return "STARTING", 0, None
    ordered = sorted(tasks, key=lambda t: t.get("CreatedAt", ""))
    newest = ordered[-1]
    restarts = len(ordered) - 1
    status = newest.get("Status", {})
    state = status.get("State", "")
    if state in _RUNNING:
        return "RUNNING", restarts, newest
    if state in _STARTING:
        return ("BACKOFF" if restarts else "STARTING"), restarts, newest
    given_up = _age(status.get("Timestamp", "")) > GIVEN_UP
    return ("FATAL" if given_up else "BACKOFF"), restarts, newest


def failure(tasks: Sequence[dict[str, Any]]) -> str:
    """The swarm's words for the newest task that failed or was rejected; empty when none. Pure."""
    ended = [t for t in tasks if t.get("Status", {}).get("State") in ("failed", "rejected")]
    if not ended:
        return ""
    status = max(ended, key=lambda t: t.get("CreatedAt", "")).get("Status", {})
    return str(status.get("Err") or status.get("Message") or status.get("State"))


def stamp(now: float) -> str:
    """A time as the swarm writes them (RFC 3339, UTC), for the `created` label. Pure."""
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def half_made(objects: Sequence[dict[str, Any]], live: set[str]) -> list[int]:
    """Which of a facility's configs and secrets (their attrs) belong to no live session and are
    older than STALE_CLAIM: left by a replica that died between making them and making the
    session's service (or a port claim's). Their own `created` label says when they were made,
    else the swarm's CreatedAt; a time that cannot be read is no age. Pure but for the clock."""
    found = []
    for i, obj in enumerate(objects):
        labels = obj.get("Spec", {}).get("Labels", {}) or {}
        session = labels.get(f"{LABEL}.session")
        if session is None or session in live:
            continue
        if _age(labels.get(f"{LABEL}.created") or obj.get("CreatedAt", "")) > STALE_CLAIM:
            found.append(i)
    return found


def never_answered(services: Sequence[dict[str, Any]]) -> list[int]:
    """Which of a facility's services (their attrs) a replica made, then died before its request
    answered, older than STALE_CLAIM: no user has their UID, so nobody would ever release them.
    A service is marked `phase=ACTIVE` once its task is ready, just before the reply; one made
    before that mark existed has none and is a user's. Pure but for the clock."""
    found = []
    for i, service in enumerate(services):
        labels = service.get("Spec", {}).get("Labels", {}) or {}
        if labels.get(PHASE) != str(Phase.STARTING):
            continue
        if _age(labels.get(f"{LABEL}.created") or service.get("CreatedAt", "")) > STALE_CLAIM:
            found.append(i)
    return found


def _age(created: str) -> float:
    """Seconds since a swarm time stamp (RFC 3339, nanoseconds)."""
    stamp = re.sub(r"(\.\d{6})\d*", r"\1", created.rstrip("Z")) + "+00:00"
    try:
        return time.time() - datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return 0.0


def describe(client: Any, image: str, listener_ip: str, own_bind: str) -> tuple[str, str]:
    """What the swarm of this engine is, and this engine's node id; ConfigError says why this
    engine cannot serve (no swarm, not a manager, no image, no gateway node)."""
    try:
        info = client.info()
        client.images.get(image)
    except Exception as exc:
        raise ConfigError(engine_error(exc, image)) from None
    swarm = info.get("Swarm", {})
    if swarm.get("LocalNodeState") != "active":
        raise ConfigError(
            "this Docker engine is not part of a swarm: docker swarm init (or join one), "
            "or use --runtime docker"
        )
    if not swarm.get("ControlAvailable"):
        raise ConfigError("this engine's node is not a swarm manager: run s2cs on a manager node")
    node_id = str(swarm.get("NodeID", ""))
    try:
        nodes = gateway_nodes([n.attrs for n in client.nodes.list()], node_id, listener_ip, own_bind)
    except Exception as exc:
        raise ConfigError(engine_error(exc, image)) from None
    if not nodes:
        raise ConfigError(f"no swarm node can run streams: none is labelled {GATEWAY_NODE}=true and ready")
    cluster = str(swarm.get("Cluster", {}).get("ID", "?"))[:12]
    return f"swarm {cluster}, {len(nodes)} gateway node(s), image {image}", node_id


def _with_entry(nodes: Sequence[Node], entry: str) -> list[Node]:
    """The nodes where `entry` is an entry address; Forbidden (entry_address's) when none is."""
    found = []
    refusal: ScistreamError | None = None
    for node in nodes:
        try:
            entry_address(entry, node.entries)
        except ScistreamError as exc:
            refusal = exc
            continue
        found.append(node)
    if not found and refusal is not None:
        raise Forbidden(f"{refusal.message} (on a swarm node: the node label {ENTRY})")
    return found


class Swarm:
    """Sessions as services of a swarm, found again by their labels (the `Site` of gateway.py).

    Of the state dir it keeps the lock, the control-plane certificate and the scratch files of
    the requests it serves (their configs until the swarm has them): what start() removes would
    be another replica's, were two to share one state dir. No supervisor, no runtime, no port
    pool, no state.json: the swarm restarts the tasks, the claims hold the ports, the labels
    the records."""

    streams_outlive_s2cs = True  # they are the facility's: any other replica serves them

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        image: str,
        facility: str = "scistream",
        policy: Policy | None = None,
        client: Any = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.policy = policy or default_policy(settings)
        self.state = StateDir(settings.state_dir)
        self.inbound_bind = inbound_bind(settings)  # checked now, not at the first request
        self.entry_ips = entry_addresses(settings)  # where a node without its label has them
        self.image = image
        self.facility = facility_name(facility)
        self._client = client
        self.node_id = ""
        self._uids: dict[str, str] = {}  # uid-hash -> UID of the streams this replica made
        self._others: tuple[str, ...] = ()  # the other managers, as last listed: named when ours is lost

    # --- the swarm -------------------------------------------------------------------------------

    def client(self) -> Any:
        if self._client is None:
            import docker

            try:
                self._client = docker.from_env(timeout=ENGINE_TIMEOUT)
            except docker.errors.DockerException as exc:
                raise ConfigError(engine_error(exc, self.image)) from None
        return self._client

    def _engine(self, what: str, exc: Exception) -> ScistreamError:
        return BackendFailed(f"{what}: {self._words(exc)}")

    def check(self) -> str:
        """What the swarm is, or ConfigError with why this s2cs cannot use it."""
        summary, self.node_id = describe(
            self.client(), self.image, self.settings.listener_ip, self.inbound_bind
        )
        try:
            self._listed()
        except Exception as exc:  # only a better error later: never a reason to stop
            log.warning("cannot list the swarm's nodes to name its other managers: %s", self._words(exc))
        return summary

    def _labels(self, **more: str) -> dict[str, str]:
        return {f"{LABEL}.facility": self.facility, **{f"{LABEL}.{k}": v for k, v in more.items()}}

    def _filter(self, **more: str) -> dict[str, Any]:
        return {"label": [f"{k}={v}" for k, v in self._labels(**more).items()]}

    def _service_name(self, key: str) -> str:
        return f"scistream-{self.facility}-{key}"

    def _listed(self) -> list[dict[str, Any]]:
        """The swarm's nodes (their attrs); the other managers noted, to be named should this
        replica's engine stop answering."""
        nodes = [n.attrs for n in self.client().nodes.list()]
        self._others = other_managers(nodes, self.node_id)
        return nodes

    def _nodes(self) -> list[Node]:
        return gateway_nodes(
            self._listed(),
            self.node_id,
            self.settings.listener_ip,
            self.inbound_bind,
            self.entry_ips,
        )

    def _services(self, **more: str) -> list[Any]:
        try:
            return list(self.client().services.list(filters=self._filter(**more)))
        except Exception as exc:
            raise self._engine("cannot list the swarm's services", exc) from None

    def _sessions(self, **more: str) -> list[tuple[Session, Any]]:
        found = []
        for service in self._services(**more):
            labels = service.attrs["Spec"].get("Labels", {})
            try:
                record = json.loads(labels[f"{LABEL}.record"])
                # The UID is not in the swarm: this replica's memory, else its prefix (_of_uid
                # puts in the one asked for).
                known = self._uids.get(labels.get(f"{LABEL}.uid-hash", ""))
                record["uid"] = known or record.get("uid") or record["uid_prefix"]
                session = Session.from_record(record)
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("service %s has no session record a s2cs can read: %s", service.name, exc)
                continue
            session.node = labels.get(f"{LABEL}.node", "")
            found.append((session, service))
        return sorted(found, key=lambda pair: pair[0].created)

    def addresses(self) -> frozenset[IPAddress]:
        """The addresses of every gateway node: a target on another node's port range would
        reach that node's listeners, a plain entry among them."""
        try:
            nodes = self._nodes()
        except ScistreamError:
            raise
        except Exception as exc:
            raise self._engine("cannot list the swarm's gateway nodes", exc) from None
        return node_addresses(nodes)

    # --- life of the server ----------------------------------------------------------------------

    def open(self) -> None:
        self.state.open()  # this replica's own scratch space and control-plane certificate
        self.check()

    def start(self) -> None:
        for path in self.state.sessions.iterdir():  # scratch of requests a killed s2cs was serving
            shutil.rmtree(path, ignore_errors=True)
        self._sweep()

    def _sweep(self) -> None:
        """Remove the services whose request never answered, and the configs and secrets (port
        claims among them) of sessions never made."""
        client = self.client()
        try:
            services = self._services()
            for i in never_answered([service.attrs for service in services]):
                service = services[i]
                log.warning(
                    "removing service %s: the s2cs that made it stopped before its request answered, "
                    "so no user has its stream",
                    service.name,
                )
                sid = service.attrs["Spec"]["Labels"].get(f"{LABEL}.session", "")
                self._remove(sid, service)  # what it leaves is logged, and looked for again next time
            found = [
                *client.configs.list(filters=self._filter()),
                *client.secrets.list(filters=self._filter()),
            ]
            live = {s.attrs["Spec"]["Labels"].get(f"{LABEL}.session") for s in self._services()}
        except Exception as exc:
            log.warning("cannot look for objects of half-made sessions: %s", self._words(exc))
            return
        for i in half_made([obj.attrs for obj in found], live):
            log.warning(
                "removing %s: left by a half-made session (its service was never made)", found[i].name
            )
            self._gone(found[i], "config or secret")

    def close(self, keep_streams: bool = False) -> None:
        """The streams are the swarm's: they outlive every replica, and any other one serves them."""
        log.info("the swarm keeps the facility's streams; release them with s2uc release")

    # --- ports -----------------------------------------------------------------------------------

    def _claim_name(self, node: str, port: int) -> str:
        return f"scistream-{self.facility}-port-{node[:12]}-{port}"

    def _claimed(self, node: Node) -> set[int]:
        """The ports of a node claimed by a stream; the claims of dead replicas are removed."""
        client = self.client()
        claims = client.configs.list(filters=self._filter(**{"port-node": node.id}))
        live = {s.attrs["Spec"]["Labels"].get(f"{LABEL}.session") for s in self._services()}
        taken = set()
        for claim in claims:
            labels = claim.attrs["Spec"].get("Labels", {})
            if (
                labels.get(f"{LABEL}.session") not in live
                and _age(claim.attrs.get("CreatedAt", "")) > STALE_CLAIM
            ):
                log.warning("removing the port claim %s: its stream was never made", claim.name)
                self._gone(claim, "port claim")
                continue
            with contextlib.suppress(KeyError, ValueError):
                taken.add(int(labels[f"{LABEL}.port"]))
        return taken

    def _claim(self, node: Node, port: int, sid: str) -> bool:
        """True when this port of the node is now the session's; False when another has it."""
        import docker.errors

        try:
            self.client().configs.create(
                name=self._claim_name(node.id, port),
                data=sid.encode(),
                labels=self._labels(
                    **{"port-node": node.id, "port": str(port), "session": sid, "created": stamp(time.time())}
                ),
            )
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                return False
            raise
        return True

    def _unclaim(self, sid: str) -> list[str]:
        """Remove the session's port claims; what is left, in the engine's words."""
        try:
            claims = self.client().configs.list(filters=self._filter(session=sid))
        except Exception as exc:
            log.warning("cannot list the port claims of session %s: %s", sid, self._words(exc))
            return [f"the port claims of session {sid}: {self._words(exc)}"]
        return [
            f"{claim.name}: {refused}" for claim in claims if (refused := self._gone(claim, "port claim"))
        ]

    def place(self, sid: str, count: int, requested: Sequence[int] = (), entry: str | None = None) -> Place:
        first, last = self.settings.port_range
        if len(set(requested)) != len(requested):
            raise BadRequest("the same port is requested twice")
        for port in requested:
            if not first <= port <= last:
                raise BadRequest(f"port {port} is outside this server's port range {first}-{last}")
        try:
            nodes = self._nodes()
            if not nodes:
                raise BackendFailed(no_gateway(self._listed()))
            if entry is not None:  # an outbound request naming its plain entry: only nodes that have it
                nodes = _with_entry(nodes, entry)
            load: dict[str, int] = {}
            for session, _ in self._sessions():
                load[session.node] = load.get(session.node, 0) + 1
            ranked = least_loaded(nodes, load)
            if not ranked:
                raise NoPorts(
                    f"every gateway node carries as many streams as its {MAX_STREAMS} label allows: "
                    "release some, or raise the label"
                )
            node = ranked[0]
            self._sweep()
            taken = self._claimed(node)
            chosen: list[int] = []
            try:
                for port in requested or range(first, last + 1):
                    if len(chosen) == count:
                        break
                    free = port not in taken and (not node.local or port_is_free(port))
                    if free and self._claim(node, port, sid):
                        chosen.append(port)
                    elif requested:
                        raise Conflict(f"port {port} of {node.address} is already used by another stream")
                if len(chosen) < count:
                    raise NoPorts(f"no free port in {first}-{last} on {node.address}: {count} needed")
            except BaseException:
                self._unclaim(sid)
                raise
        except ScistreamError:
            raise
        except Exception as exc:
            raise self._engine("cannot place the stream on the swarm", exc) from None
        return Place(chosen, node.address, node.bind, node.id, entry_address(entry, node.entries))

    # --- what the gateway asks of its site --------------------------------------------------------

    def info(self) -> dict[str, Any]:
        sessions = self._sessions()
        first, last = self.settings.port_range
        free = (last - first + 1) * max(1, len(self._nodes())) - sum(len(s.ports) for s, _ in sessions)
        return {
            "port_range": f"{first}-{last}",
            "free_ports": free,
            "streams": len(sessions),
            "runtime": {"type": "swarm", "facility": self.facility, "image": self.image},
        }

    def sessions(self, uid: str | None = None) -> list[Session]:
        """Every session of the facility, or those of a stream; each with its service."""
        found = self._sessions() if uid is None else self._of_uid(uid)
        for session, service in found:
            session.service = service
        return [session for session, _ in found]

    def launch(self, session: Session, grant: Grant) -> None:
        """Make the session's service and wait until its task listens; on any failure nothing
        of it is left (service, configs, secrets, port claims, scratch files)."""
        import docker.errors

        owned = [s for s, _ in self._sessions() if s.owner == session.owner]
        name = self._service_name(session_key(self.facility, session.uid, session.role))
        files = SessionFiles(self.state.session_dir(session.sid))
        made: list[Any] = []
        service = None
        try:
            within_quota(grant, owned, session)
            if self.client().services.list(filters={"name": name}):
                raise Conflict(f"stream {short(session.uid)} already has an {session.role} proxy here")
            files.directory.mkdir(mode=0o700)
            spec = proxy_spec(self.backend, self.policy, session)
            launches = self.backend.prepare(session.uid, spec, files)
            plan = {
                "processes": [
                    {"name": launch.name, "argv": image_command(launch.argv), "ready": list(launch.ready)}
                    for launch in launches
                ]
            }
            (files.directory / "task.json").write_text(json.dumps(plan))
            service = self._create(session, files, name, made)
            self._wait_ready(session, service)
            self._answered(service)
        except BaseException as exc:
            self._remove(session.sid, service, made)
            shutil.rmtree(files.directory, ignore_errors=True)
            if isinstance(exc, docker.errors.APIError) and exc.status_code == 409:
                raise Conflict(
                    f"stream {short(session.uid)} already has an {session.role} proxy here"
                ) from None
            if isinstance(exc, ScistreamError | KeyboardInterrupt | SystemExit):
                raise
            if isinstance(exc, Exception):
                raise self._engine(f"{session.label} did not start", exc) from None
            raise
        shutil.rmtree(files.directory, ignore_errors=True)  # the swarm has it all now
        session.phase = Phase.ACTIVE
        self._uids[hashlib.sha256(session.uid.encode()).hexdigest()] = session.uid
        log.info(
            "%s: service %s on node %s: %s -> %s",
            session.label,
            name,
            session.node[:12],
            ", ".join(session.advertised),
            ", ".join(hostport(lst.target_ip, lst.target_port) for lst in session.listeners),
        )

    def _create(self, session: Session, files: SessionFiles, name: str, made: list[Any]) -> Any:
        from docker.types import ConfigReference, Mount, Resources, RestartPolicy, SecretReference

        client = self.client()
        uid, gid = str(os.getuid()), str(os.getgid())
        labels = self._labels(session=session.sid)
        made_labels = {**labels, f"{LABEL}.created": stamp(time.time())}
        secrets, configs = [], []
        for path in sorted(files.directory.iterdir()):
            if not path.is_file() or path.name in NOT_MOUNTED:
                continue
            object_name = f"{name}-{path.name}"
            if path.name in SECRETS:
                secret = client.secrets.create(name=object_name, data=path.read_bytes(), labels=made_labels)
                made.append(secret)
                secrets.append(SecretReference(secret.id, object_name, str(path), uid, gid, 0o400))
            else:
                config = client.configs.create(name=object_name, data=path.read_bytes(), labels=made_labels)
                made.append(config)
                configs.append(ConfigReference(config.id, object_name, str(path), uid, gid, 0o400))
        record = session.to_record()
        del record["processes"], record["phase"], record["uid"]
        record["uid_prefix"] = short(session.uid)
        limits = effective(self.policy.containers)
        resources = Resources(
            mem_limit=limits.memory, cpu_limit=int(limits.cpus * 1e9) if limits.cpus else None
        )
        if limits.pids:
            resources.setdefault("Limits", {})["Pids"] = limits.pids  # the SDK has no name for it
        return client.services.create(
            self.image,
            ["python", "-m", "scistream.s2ds.task", str(files.directory / "task.json")],
            name=name,
            labels={
                **made_labels,
                PHASE: str(Phase.STARTING),  # until its request answers (_answered)
                f"{LABEL}.uid-hash": hashlib.sha256(session.uid.encode()).hexdigest(),
                f"{LABEL}.node": session.node,
                f"{LABEL}.record": json.dumps(record),
            },
            container_labels=labels,
            workdir=str(files.directory),
            user=f"{uid}:{gid}",
            networks=["host"],
            constraints=[f"node.id=={session.node}"],
            mounts=[Mount(str(files.directory), None, type="tmpfs", tmpfs_size=TASK_TMPFS)],
            secrets=secrets,
            configs=configs,
            read_only=True,
            init=True,
            cap_drop=["ALL"],
            cap_add=["NET_BIND_SERVICE"],
            restart_policy=RestartPolicy(
                condition="on-failure",
                delay=500_000_000,
                max_attempts=RESTARTS,
                window=RESTART_WINDOW * 10**9,
            ),
            resources=resources,
            log_driver="json-file",
            log_driver_options=ENGINE_LOGS,
            stop_grace_period=5 * 10**9,
        )

    def _lost(self, session: Session) -> str:
        """lost_node's words for the session's node; empty when the swarm cannot say (logged)."""
        if not session.node:
            return ""  # a service of an older release, without the label: no node to look at
        import docker.errors

        try:
            return lost_node(self.client().nodes.get(session.node).attrs)
        except docker.errors.NotFound:
            return lost_node(None)
        except Exception as exc:
            log.warning("cannot look up swarm node %s: %s", session.node, self._words(exc))
            return ""

    def _wait_ready(self, session: Session, service: Any) -> None:
        """Until the task listens (its READY line); a first task that fails or is rejected (no
        such image, say) fails the request with the swarm's words, as a first start does."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            tasks = service.tasks()
            state, _, task = task_state(tasks)
            if state == "RUNNING" and READY in self._output(service, 50):
                return
            why = failure(tasks)
            if why or (task is not None and state not in ("RUNNING", "STARTING")):
                status = (task or {}).get("Status", {})
                why = why or status.get("Message") or status.get("State")
                raise BackendFailed(f"{session.label} did not start: {why}; {self._said(service, 5)}")
            if time.monotonic() > deadline:
                where = (task or {}).get("Status", {}).get("State", "not scheduled")
                raise BackendFailed(
                    f"{session.label} did not start within {START_TIMEOUT:.0f}s: the task is {where}; "
                    + self._said(service, 5)
                )
            time.sleep(0.05)

    def _answered(self, service: Any) -> None:
        """Mark the service as its request's answer (label phase=ACTIVE): a user has it from now
        on, and no sweep removes it. Only the labels change: its task runs on untouched. A
        service left STARTING is the sweep's (never_answered), so a mark that fails fails the
        request, which then removes the service itself."""
        service.reload()  # its spec as made, and its version, which an update must name
        spec = service.attrs["Spec"]
        # The spec as it is, but for one label: the SDK's fetch_current_spec would fill in the
        # engine's defaults, a task template the swarm takes for a new one (it replaces the task).
        self.client().api.update_service(
            service.id,
            service.version,
            task_template=spec["TaskTemplate"],
            name=spec["Name"],
            labels={**spec.get("Labels", {}), PHASE: str(Phase.ACTIVE)},
            mode=spec.get("Mode"),
            update_config=spec.get("UpdateConfig"),
            rollback_config=spec.get("RollbackConfig"),
            endpoint_spec=spec.get("EndpointSpec"),
        )

    def _listening(self, task: dict[str, Any] | None, session: Session) -> bool:
        """Whether the task's processes listen on all the session's ports: where this s2cs sees
        them (its node, its process namespace: the pid is the container's), else as the swarm says."""
        status = (task or {}).get("Status", {}).get("ContainerStatus", {})
        pid, container = int(status.get("PID") or 0), str(status.get("ContainerID") or "")
        try:
            if not container or container not in Path(f"/proc/{pid}/cgroup").read_text():
                return True  # not a process this s2cs can see: the swarm's "running" it is
            first = psutil.Process(pid)
            processes = [first, *first.children(recursive=True)]
        except (OSError, psutil.Error, ValueError):
            return True
        return set(session.ports) <= bound_endpoints(processes, session.ports)

    def _output(self, service: Any, lines: int | None = None) -> str:
        """What the service's tasks printed (the newest `lines`), as the swarm has it; the engine's
        errors are raised: readiness is read from it."""
        chunks = service.logs(stdout=True, stderr=True, tail=lines or "all")
        text = b"".join(chunks).decode("utf-8", "replace")
        return "\n".join(line for line in text.splitlines() if line.strip() and "[NOTICE]" not in line)

    def _said(self, service: Any, lines: int) -> str:
        """_output, for a message or a listing: the engine's error, logged, in its place."""
        try:
            return self._output(service, lines) or "no output"
        except Exception as exc:
            log.warning("cannot read the output of service %s: %s", service.name, self._words(exc))
            return f"its output cannot be read: {self._words(exc)}"

    def _tasks(self, service: Any) -> tuple[list[dict[str, Any]], str]:
        """The service's tasks, and the engine's words when it would not list them (logged)."""
        try:
            return list(service.tasks()), ""
        except Exception as exc:
            log.warning("cannot list the tasks of service %s: %s", service.name, self._words(exc))
            return [], self._words(exc)

    def _remove(self, sid: str, service: Any, made: Sequence[Any] = ()) -> list[str]:
        """The service, then its configs and secrets and port claims, once its task has ended here.
        What the swarm would not remove, each in the engine's words (and in the log): empty when
        all of it is gone.

        A task of this node is stopped first, by the engine: its processes end at once (a
        task stopped by SIGTERM exits 0, which the restart policy leaves alone), where the
        swarm would take seconds to get round to it; and its ports are free when this returns."""
        client = self.client()
        left: list[str] = []
        if service is not None:
            running = {"label": f"com.docker.swarm.service.id={service.id}"}
            try:
                for container in client.containers.list(filters=running, ignore_removed=True):
                    container.stop(timeout=5)
            except Exception as exc:  # the swarm ends its task when the service goes: only slower
                log.warning("cannot stop the task of service %s here: %s", service.name, self._words(exc))
            refused = self._gone(service, "service")
            if refused:
                left.append(f"service {service.name}: {refused}")
            else:
                self._wait_ended(service, running)
        try:
            objects = list(made) or [
                *client.configs.list(filters=self._filter(session=sid)),
                *client.secrets.list(filters=self._filter(session=sid)),
            ]
        except Exception as exc:
            log.warning("cannot list the configs and secrets of session %s: %s", sid, self._words(exc))
            return [*left, f"the configs and secrets of session {sid}: {self._words(exc)}"]
        for obj in objects:
            refused = self._gone(obj, "config or secret")
            if refused:
                left.append(f"{obj.name}: {refused}")
        return left + self._unclaim(sid)

    def _wait_ended(self, service: Any, running: dict[str, Any]) -> None:
        """Until the removed service's task container has ended on this node (its ports free)."""
        deadline = time.monotonic() + RELEASE_WAIT
        while time.monotonic() < deadline:
            try:
                if not self.client().containers.list(filters=running, ignore_removed=True):
                    return
            except Exception as exc:
                log.warning(
                    "cannot see whether service %s has ended here: %s", service.name, self._words(exc)
                )
                return
            time.sleep(0.1)
        log.warning(
            "the task of service %s still runs here %.0fs after its removal", service.name, RELEASE_WAIT
        )

    def _gone(self, obj: Any, what: str) -> str:
        """Remove a swarm object: empty when it is gone (or was already), else the engine's words,
        logged in one line."""
        import docker.errors

        try:
            obj.remove()
        except docker.errors.NotFound:
            return ""
        except Exception as exc:
            words = self._words(exc)
            log.warning("the swarm refused to remove %s %s: %s", what, obj.name, words)
            return words
        return ""

    def _words(self, exc: Exception) -> str:
        """The engine's words; when it does not answer at all, where the facility's other
        replicas are (the swarm's other managers, as last listed)."""
        import docker.errors

        words = engine_error(exc, self.image)
        unreachable = isinstance(exc, OSError | docker.errors.DockerException)
        if unreachable and not isinstance(exc, docker.errors.APIError) and self._others:
            words += (
                " The facility's other s2cs replicas run on its other managers: "
                f"{', '.join(self._others)}; use one of them (or the facility's DNS name)"
            )
        return words

    def _of_uid(self, uid: str) -> list[tuple[Session, Any]]:
        """The sessions of a stream, with their services."""
        digest = hashlib.sha256(uid.encode()).hexdigest()
        found = self._sessions(**{"uid-hash": digest})
        for session, _ in found:
            session.uid = uid  # not in the swarm (only its hash): the one asked for
        return found

    def release(self, uid: str, visible: Callable[[list[Session]], list[Session]]) -> list[Session]:
        mine = visible(self.sessions(uid))
        left = []
        for session in mine:
            refused = self._remove(session.sid, session.service)
            if refused:
                left.append((session, refused))
            else:
                log.info("%s: released (service %s)", session.label, session.service.name)
        if left:
            # Not "released": its service may still run, and its ports stay claimed.
            session, refused = left[0]
            raise BackendFailed(
                f"the swarm refused to remove what {session.label} is made of ({'; '.join(refused)}); "
                f"it is still there: release it again, or remove it with docker service rm "
                f"{session.service.name}"
            )
        if mine:
            self._uids.pop(hashlib.sha256(uid.encode()).hexdigest(), None)
        return mine

    def describe(self, session: Session, full: bool, log: bool = False) -> dict[str, Any]:
        """Its state as the swarm reports its task; with `full`, the task, the service and its node
        (no byte counts, no failure diagnosis: they are inside the task, maybe on another node)."""
        service = session.service
        tasks, unlisted = self._tasks(service)
        state, restarts, task = task_state(tasks)
        if state == "RUNNING" and session.node == self.node_id and not self._listening(task, session):
            state = "STARTING"  # its container runs, its proxy does not listen yet
        lost = self._lost(session)
        if lost and state in ("RUNNING", "STARTING"):
            state = "BACKOFF"  # the swarm's word for its task lags: it cannot run on a lost node
        entry: dict[str, Any] = {"state": state, "restarts": restarts}
        if full:
            status = (task or {}).get("Status", {})
            shown: dict[str, Any] = {
                "name": "task",
                "pid": status.get("ContainerStatus", {}).get("PID") or None,
                "state": str(status.get("State", "none")).upper(),
                "restarts": restarts,
            }
            if log:
                shown["log"] = self._said(service, 20)
            entry["processes"] = [shown]
            entry["service"] = service.name
            entry["node"] = session.node
            why = failure(tasks)
            if unlisted:
                entry["last_error"] = f"the swarm did not list its tasks: {unlisted}"
            elif lost:
                entry["last_error"] = lost
            elif why and state != "RUNNING":
                entry["last_error"] = f"task: {why}"
            entry["failures"] = []
        return entry
