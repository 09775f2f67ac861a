"""The swarm runtime's pure parts: which nodes run streams, where the next one goes, what a
service's tasks say of its session, the names that keep replicas apart, and the task's plan.

Its work with a real swarm is tested in tests/containers/test_swarm.py.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import docker.errors
import pytest

from scistream.errors import BackendFailed, ConfigError, Forbidden
from scistream.protocol import InboundRequest, Limits
from scistream.s2cs.auth import NoAuth
from scistream.s2cs.gateway import Gateway, Settings
from scistream.s2cs.policy import Own, build_policy
from scistream.s2cs.swarm import (
    RESTARTS,
    STALE_CLAIM,
    Node,
    Swarm,
    _age,
    facility_name,
    gateway_nodes,
    half_made,
    least_loaded,
    lost_node,
    no_gateway,
    node_addresses,
    other_managers,
    session_key,
    stamp,
)
from scistream.s2cs.swarm import task_state as state_of
from scistream.s2ds.backend import Backend
from scistream.s2ds.containers import LABEL
from scistream.s2ds.render import default_templates, environment
from scistream.s2ds.stunnel import StunnelBackend
from scistream.s2ds.task import plan_of

OWN = "own0node0id0000000000000a"


def node(
    ident: str,
    labels: dict[str, str] | None = None,
    state: str = "ready",
    availability: str = "active",
    addr: str = "",
) -> dict[str, Any]:
    """A node as the engine lists it (`docker node inspect`), with what gateway_nodes reads."""
    return {
        "ID": ident,
        "Spec": {"Labels": labels or {}, "Availability": availability},
        "Status": {"State": state, "Addr": addr},
    }


GATEWAY = {"scistream.gateway": "true"}


# --- gateway_nodes -------------------------------------------------------------------------------


def test_a_single_unlabelled_node_runs_the_streams_and_advertises_the_listener_ip():
    found = gateway_nodes([node(OWN, addr="10.0.0.5")], OWN, "198.51.100.7", "127.0.0.1")
    assert found == [Node(OWN, "198.51.100.7", "127.0.0.1", True)]


def test_without_labels_only_this_s2cs_own_node_runs_streams():
    """Other unlabelled nodes (a facility's compute nodes, say) are never given a stream."""
    nodes = [node("worker1", addr="10.0.0.7"), node(OWN, addr="10.0.0.5"), node("worker2")]
    assert [n.id for n in gateway_nodes(nodes, OWN, "198.51.100.1", "0.0.0.0")] == [OWN]


def test_once_a_node_is_labelled_only_labelled_nodes_run_streams():
    nodes = [
        node(OWN, addr="10.0.0.5"),  # the manager s2cs runs on, not a DTN
        node("dtn1", {**GATEWAY, "scistream.address": "192.0.2.11"}, addr="10.0.0.11"),
        node("dtn2", {**GATEWAY, "scistream.address": "192.0.2.12"}, addr="10.0.0.12"),
    ]
    found = gateway_nodes(nodes, OWN, "198.51.100.1", "0.0.0.0")
    assert [(n.id, n.address, n.local) for n in found] == [
        ("dtn1", "192.0.2.11", False),
        ("dtn2", "192.0.2.12", False),
    ]


def test_a_label_other_than_true_does_not_make_a_gateway():
    nodes = [node("dtn1", {"scistream.gateway": "false"}, addr="10.0.0.11"), node(OWN, addr="10.0.0.5")]
    assert [n.id for n in gateway_nodes(nodes, OWN, "198.51.100.1", "0.0.0.0")] == [OWN]


@pytest.mark.parametrize(
    ("state", "availability"),
    [("down", "active"), ("unknown", "active"), ("ready", "drain"), ("ready", "pause")],
)
def test_a_node_not_ready_or_drained_gets_no_stream(state, availability):
    nodes = [
        node("dtn1", {**GATEWAY, "scistream.address": "192.0.2.11"}, state, availability),
        node("dtn2", {**GATEWAY, "scistream.address": "192.0.2.12"}),
    ]
    assert [n.id for n in gateway_nodes(nodes, OWN, "198.51.100.1", "0.0.0.0")] == ["dtn2"]


def test_the_only_node_drained_leaves_no_node_for_streams():
    assert gateway_nodes([node(OWN, availability="drain")], OWN, "198.51.100.1", "0.0.0.0") == []


def test_address_and_bind_labels_are_what_users_get_and_where_proxies_listen():
    labels = {**GATEWAY, "scistream.address": "192.0.2.11", "scistream.bind-ip": "10.1.0.11"}
    (found,) = gateway_nodes([node("dtn1", labels, addr="10.0.0.11")], OWN, "198.51.100.1", "0.0.0.0")
    assert (found.address, found.bind) == ("192.0.2.11", "10.1.0.11")


def test_a_labelled_remote_node_without_address_label_is_given_by_its_swarm_address():
    (v4,) = gateway_nodes([node("dtn1", GATEWAY, addr="10.0.0.11")], OWN, "198.51.100.1", "127.0.0.1")
    assert (v4.address, v4.bind, v4.local) == ("10.0.0.11", "0.0.0.0", False)
    (v6,) = gateway_nodes([node("dtn2", GATEWAY, addr="2001:db8::12")], OWN, "198.51.100.1", "127.0.0.1")
    assert (v6.address, v6.bind) == ("2001:db8::12", "::")


def test_a_labelled_own_node_without_labels_of_address_uses_this_s2cs_settings():
    (found,) = gateway_nodes([node(OWN, GATEWAY, addr="10.0.0.5")], OWN, "198.51.100.7", "10.0.0.5")
    assert found == Node(OWN, "198.51.100.7", "10.0.0.5", True)


def test_a_labelled_node_without_any_address_is_left_out():
    assert gateway_nodes([node("dtn1", GATEWAY)], OWN, "198.51.100.1", "0.0.0.0") == []


def test_one_node_with_an_address_label_that_is_no_ip_address_does_not_stop_the_others():
    """Users are given IP addresses (as --listener-ip is one): a host name in one node's
    scistream.address must not make every request of the facility fail."""
    nodes = [
        node("dtn1", {**GATEWAY, "scistream.address": "dtn1.example.org"}, addr="10.0.0.11"),
        node("dtn2", {**GATEWAY, "scistream.address": "192.0.2.12"}, addr="10.0.0.12"),
    ]
    assert [n.id for n in gateway_nodes(nodes, OWN, "198.51.100.1", "0.0.0.0")] == ["dtn2"]


def test_the_addresses_of_every_gateway_node_are_the_gateways_own():
    nodes = [Node("a", "192.0.2.11", "10.0.0.11", True), Node("b", "::ffff:192.0.2.12", "0.0.0.0", False)]
    assert node_addresses(nodes) == {
        ipaddress.ip_address(ip) for ip in ("192.0.2.11", "10.0.0.11", "192.0.2.12")
    }


def test_a_swarm_gateway_refuses_targets_on_its_nodes_as_on_its_own_host(tmp_path):
    """A stream on one node must not open to another node's listeners (its plain entries among
    them) nor to other services there: the same rules as for this host's own addresses."""
    dtn = {"ID": "dtn1", "Spec": {"Labels": {**GATEWAY, "scistream.address": "10.0.0.11"}},
           "Status": {"State": "ready", "Addr": "10.0.0.11"}}  # fmt: skip
    engine = SimpleNamespace(nodes=SimpleNamespace(list=lambda: [SimpleNamespace(attrs=dtn)]))
    settings = Settings("198.51.100.7", None, (5100, 5200), tmp_path)
    policy = build_policy(Own(frozenset(), 5000, (5100, 5200)), [], allow_targets=["10.0.0.0/8"])
    gateway = Gateway(NoAuth(), Swarm(settings, cast(Backend, None), "img", policy=policy, client=engine))
    assert ipaddress.ip_address("10.0.0.11") in gateway.addresses()
    for port, says in ((5150, "own port range 5100-5200"), (22, "(this gateway's own address)")):
        with pytest.raises(Forbidden, match=re.escape(says)):
            gateway.inbound(InboundRequest("10.0.0.11", (port,), Limits()), None)


def test_max_streams_label_is_read_and_nonsense_means_no_limit():
    nodes = [
        node("dtn1", {**GATEWAY, "scistream.max-streams": "3"}, addr="10.0.0.11"),
        node("dtn2", {**GATEWAY, "scistream.max-streams": "many"}, addr="10.0.0.12"),
    ]
    assert [n.max_streams for n in gateway_nodes(nodes, OWN, "198.51.100.1", "0.0.0.0")] == [3, None]


# --- least_loaded --------------------------------------------------------------------------------


def dtn(ident: str, most: int | None = None) -> Node:
    return Node(ident, f"{ident}.example.org", "0.0.0.0", False, most)


def test_the_next_stream_goes_to_the_node_with_fewest_streams():
    nodes = [dtn("a"), dtn("b"), dtn("c")]
    assert [n.id for n in least_loaded(nodes, {"a": 2, "b": 1, "c": 3})] == ["b", "a", "c"]


def test_nodes_without_streams_count_as_empty_and_ties_go_by_id_so_replicas_agree():
    assert [n.id for n in least_loaded([dtn("c"), dtn("a"), dtn("b")], {"b": 1})] == ["a", "c", "b"]
    assert least_loaded([dtn("b"), dtn("a")], {}) == least_loaded([dtn("a"), dtn("b")], {})


def test_a_node_at_its_max_streams_gets_no_more():
    nodes = [dtn("a", most=2), dtn("b", most=5)]
    assert [n.id for n in least_loaded(nodes, {"a": 2, "b": 4})] == ["b"]
    assert least_loaded(nodes, {"a": 2, "b": 5}) == []
    assert [n.id for n in least_loaded([dtn("a", most=0)], {})] == []


# --- task_state ----------------------------------------------------------------------------------


def task(state: str, created: str, err: str = "") -> dict[str, Any]:
    return {"CreatedAt": created, "Status": {"State": state, "Err": err}}


def at(second: int) -> str:
    return f"2030-01-01T00:00:{second:02d}.000000000Z"


def test_a_service_without_tasks_yet_is_starting():
    assert state_of([]) == ("STARTING", 0, None)


@pytest.mark.parametrize("swarm_state", ["new", "pending", "assigned", "preparing", "starting"])
def test_a_first_task_on_its_way_is_starting(swarm_state):
    state, restarts, _ = state_of([task(swarm_state, at(1))])
    assert (state, restarts) == ("STARTING", 0)


def test_a_running_task_is_running_with_the_tasks_before_it_counted_as_restarts():
    newest = task("running", at(9))
    assert state_of([task("running", at(1))]) == ("RUNNING", 0, task("running", at(1)))
    state, restarts, shown = state_of([newest, task("failed", at(1)), task("failed", at(5))])
    assert (state, restarts, shown) == ("RUNNING", 2, newest)


def test_a_task_started_again_after_a_failure_is_in_backoff_until_it_runs():
    state, restarts, _ = state_of(
        [task("failed", at(1), "task: non-zero exit (137)"), task("pending", at(2))]
    )
    assert (state, restarts) == ("BACKOFF", 1)


def test_a_first_task_that_ended_is_in_backoff_the_swarm_starts_another():
    state, restarts, shown = state_of([task("failed", at(1), "task: non-zero exit (1)")])
    assert (state, restarts) == ("BACKOFF", 0)
    assert shown is not None and shown["Status"]["Err"] == "task: non-zero exit (1)"


def test_an_ended_newest_task_with_no_successor_for_seconds_is_fatal_one_just_ended_is_backoff():
    def ended(stamp: str) -> dict[str, Any]:
        found = task("failed", at(RESTARTS), "task: non-zero exit (1)")
        found["Status"]["Timestamp"] = stamp
        return found

    earlier = [task("failed", at(i)) for i in range(RESTARTS)]
    state, restarts, _ = state_of([*earlier, ended("2020-01-01T00:00:09.000000000Z")])
    assert (state, restarts) == ("FATAL", RESTARTS)  # the swarm gave it up: no task queued after it
    just_now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
    state, _, _ = state_of([*earlier, ended(just_now)])
    assert state == "BACKOFF"  # the swarm queues the next one within its delay


def test_the_newest_task_by_creation_time_decides_whatever_the_order_listed():
    state, restarts, shown = state_of(
        [task("running", at(30)), task("failed", at(10)), task("failed", at(20))]
    )
    assert (state, restarts) == ("RUNNING", 2) and shown is not None and shown["CreatedAt"] == at(30)
    state, _, _ = state_of([task("failed", at(30)), task("running", at(10))])
    assert state == "BACKOFF"  # the one that ran was replaced by one that failed


# --- _age ----------------------------------------------------------------------------------------


def test_the_age_of_a_swarm_time_stamp_with_nanoseconds():
    ten_ago = datetime.now(UTC) - timedelta(seconds=10)
    stamp = ten_ago.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"  # nine digits, as the swarm writes
    assert _age(stamp) == pytest.approx(10, abs=2)
    assert _age(ten_ago.strftime("%Y-%m-%dT%H:%M:%SZ")) == pytest.approx(10, abs=2)  # no fraction


def test_a_claim_made_hours_ago_is_old_and_a_garbled_stamp_is_new():
    """A stale port claim is removed by age: a stamp that cannot be read must not count as old,
    or a live stream's claim would be taken away."""
    hours_ago = datetime.fromtimestamp(time.time() - 3 * 3600, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
    assert _age(hours_ago) == pytest.approx(3 * 3600, abs=5)
    assert _age("") == 0.0
    assert _age("yesterday") == 0.0


# --- facility_name and session_key ---------------------------------------------------------------


@pytest.mark.parametrize("good", ["scistream", "hpc", "a", "dtn-2", "0lab", "a" * 20])
def test_good_facility_names_are_kept(good):
    assert facility_name(good) == good


@pytest.mark.parametrize("bad", ["", "HPC", "-hpc", "hpc_1", "hpc.lab", "hpc 1", "a" * 21, "hpc\n"])
def test_bad_facility_names_are_refused_with_what_to_use(bad):
    with pytest.raises(ConfigError) as refused:
        facility_name(bad)
    assert "1-20 lower-case letters, digits and -" in str(refused.value)
    assert repr(bad) in str(refused.value)


UID = "3f1c2d9e-7b4a-4c1e-9a55-0d2f6b8e1a77"


def test_a_session_key_is_the_same_from_every_replica_and_fits_a_service_name():
    key = session_key("hpc", UID, "inbound")
    assert key == session_key("hpc", UID, "inbound")
    assert len(key) == 12 and all(c in "0123456789abcdef" for c in key)
    assert UID[:8] not in key  # a service's name, which `docker service ls` shows, does not give the UID


def test_a_session_key_differs_by_role_by_facility_and_by_stream():
    keys = {
        session_key("hpc", UID, "inbound"),
        session_key("hpc", UID, "outbound"),
        session_key("lab", UID, "inbound"),
        session_key("hpc", "0c9e5d1a-2b3f-4e6a-8c7d-1f2e3a4b5c6d", "inbound"),
    }
    assert len(keys) == 4


def test_a_session_key_cannot_be_made_equal_by_moving_text_between_its_parts():
    assert session_key("hpc", "a" + UID, "inbound") != session_key("hpca", UID, "inbound")


# --- plan_of -------------------------------------------------------------------------------------


def test_a_good_plan_gives_its_processes_in_order():
    plan = {
        "processes": [
            {"name": "shaper", "argv": ["python", "-m", "scistream.s2ds.shaper"], "ready": ["/s/sock"]},
            {"name": "proxy", "argv": ["haproxy", "-db", "-f", "/s/proxy.conf"], "ready": [5100, 5101]},
            {"name": "other", "argv": ["stunnel4", "/s/proxy.conf"]},  # ready is optional
        ]
    }
    processes = plan_of(json.dumps(plan))
    assert [p["name"] for p in processes] == ["shaper", "proxy", "other"]
    assert processes[1]["ready"] == [5100, 5101]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"processes": []}', "a plan lists its processes under 'processes'"),
        ("{}", "a plan lists its processes under 'processes'"),
        ('[{"argv": ["haproxy"]}]', "a plan lists its processes under 'processes'"),
        ('{"processes": {"argv": ["haproxy"]}}', "a plan lists its processes under 'processes'"),
        ('{"processes": [{"name": "proxy"}]}', "process 'proxy': argv is not a list of strings"),
        ('{"processes": [{"name": "proxy", "argv": []}]}', "process 'proxy': argv is not a list of strings"),
        ('{"processes": [{"name": "proxy", "argv": "haproxy -db"}]}', "argv is not a list of strings"),
        ('{"processes": [{"name": "proxy", "argv": ["haproxy", 5]}]}', "argv is not a list of strings"),
        (
            '{"processes": [{"name": "proxy", "argv": ["haproxy"], "ready": 5100}]}',
            "process 'proxy': ready is not a list of ports and paths",
        ),
        (
            '{"processes": [{"name": "proxy", "argv": ["haproxy"], "ready": [5100.5]}]}',
            "ready is not a list of ports and paths",
        ),
        (
            '{"processes": [{"name": "proxy", "argv": ["haproxy"], "ready": [null]}]}',
            "ready is not a list of ports and paths",
        ),
    ],
)
def test_a_malformed_plan_is_refused_saying_what_is_wrong(text, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        plan_of(text)


def test_a_plan_that_is_not_json_is_refused_as_a_value_error():
    """task.main turns a ValueError into one line on the task's output: nothing else may escape."""
    with pytest.raises(ValueError):
        plan_of("processes: haproxy")


def test_a_process_that_is_not_an_object_is_refused_as_a_value_error():
    """Anything but a ValueError would be a traceback in the service's logs, not one line."""
    with pytest.raises(ValueError, match="process"):
        plan_of('{"processes": ["haproxy -db -f /s/proxy.conf"]}')


def test_a_ready_port_of_true_is_refused_not_taken_for_port_1():
    """JSON true is a Python bool, and a bool is an int: it would make the task wait for port 1."""
    with pytest.raises(ValueError, match="ready is not a list of ports and paths"):
        plan_of('{"processes": [{"name": "proxy", "argv": ["haproxy"], "ready": [true]}]}')


def _object(session: str | None, created: str | None = None, at: str = "") -> dict:
    labels = {f"{LABEL}.facility": "f"}
    if session is not None:
        labels[f"{LABEL}.session"] = session
    if created is not None:
        labels[f"{LABEL}.created"] = created
    return {"Spec": {"Labels": labels}, "CreatedAt": at}


def test_half_made_sessions_objects_are_those_of_no_live_session_older_than_the_bound():
    now = time.time()
    old, young = stamp(now - STALE_CLAIM - 60), stamp(now - 5)
    objects = [
        _object("dead", old),  # a half-made session's: swept
        _object("dead", None, at=old),  # no label of its own: the swarm's time
        _object("dead", young),  # maybe another replica's request in progress: kept
        _object("live", old),  # a live session's: kept
        _object(None, old),  # not a session's: kept
        _object("dead", "not a time"),  # an unreadable time is no age: kept
    ]
    assert half_made(objects, {"live"}) == [0, 1]


def test_a_stamp_reads_back_as_its_age():
    assert abs(_age(stamp(time.time() - 100)) - 100) < 5


# --- the swarm's refusals, with a stand-in for its engine ------------------------------------------


class Thing(SimpleNamespace):
    """A service, config or secret of the stand-in engine; `refuse`: its remove() fails."""

    def remove(self) -> None:
        if getattr(self, "refuse", ""):
            raise docker.errors.APIError("500 Server Error", explanation=self.refuse)
        self.store.remove(self)


def matches(thing: Thing, filters: dict[str, Any] | None) -> bool:
    wanted = (filters or {}).get("label", [])
    labels = thing.attrs["Spec"].get("Labels", {})
    if (filters or {}).get("name") and thing.name != filters["name"]:  # type: ignore[index]
        return False
    return all(labels.get(k) == v for k, _, v in (w.partition("=") for w in wanted))


class Kind:
    """One kind of the engine's objects (services, configs, secrets), listed by label."""

    def __init__(self) -> None:
        self.things: list[Thing] = []

    def add(self, name: str, labels: dict[str, str], created: str = "", **more: Any) -> Thing:
        thing = Thing(name=name, id=name, attrs={"Spec": {"Labels": labels}, "CreatedAt": created},
                      store=self.things, **more)  # fmt: skip
        self.things.append(thing)
        return thing

    def list(self, filters: dict[str, Any] | None = None) -> list[Thing]:
        return [t for t in self.things if matches(t, filters)]


def stand_in_engine() -> SimpleNamespace:
    own = {"ID": OWN, "Spec": {"Labels": {}}, "Status": {"State": "ready", "Addr": "127.0.0.1"}}
    return SimpleNamespace(
        services=Kind(),
        configs=Kind(),
        secrets=Kind(),
        containers=SimpleNamespace(list=lambda filters=None: []),
        nodes=SimpleNamespace(list=lambda: [SimpleNamespace(attrs=own)]),
    )


def swarm_gateway(tmp_path, engine: SimpleNamespace) -> Gateway:
    settings = Settings("127.0.0.1", None, (5100, 5200), tmp_path)
    policy = build_policy(Own(frozenset(), 5000, (5100, 5200)), [])
    return Gateway(NoAuth(), Swarm(settings, cast(Backend, None), "img", "f", policy, client=engine))


def a_service(engine: SimpleNamespace, uid: str, sid: str, **more: Any) -> Thing:
    """A stream's inbound session as a replica made it: its service, labelled with its record."""
    record = {
        "sid": sid,
        "role": "inbound",
        "owner": None,
        "listeners": [["127.0.0.1", 5100, "10.0.0.9", 80]],
        "advertised": ["127.0.0.1:5100"],
        "num_conn": 2,
        "rate": 0,
        "created": time.time(),
        "uid_prefix": uid[:8],
    }
    labels = {f"{LABEL}.facility": "f", f"{LABEL}.session": sid, f"{LABEL}.node": OWN,
              f"{LABEL}.uid-hash": hashlib.sha256(uid.encode()).hexdigest(),
              f"{LABEL}.record": json.dumps(record)}  # fmt: skip
    return engine.services.add(f"scistream-f-{sid}", labels, tasks=lambda: [], **more)


def test_a_release_the_swarm_refuses_says_so_and_what_is_left(tmp_path, caplog):
    """A user told "released" would think the ports free and the stream ended: it still runs."""
    engine = stand_in_engine()
    service = a_service(engine, UID, "0123456789ab", refuse="rpc error: node is not a manager")
    gateway = swarm_gateway(tmp_path, engine)
    with pytest.raises(BackendFailed) as failed:
        gateway.release(UID, None)
    says = failed.value.message
    assert service.name in says and "node is not a manager" in says and "still there" in says
    assert engine.services.list() == [service]
    assert any("node is not a manager" in r.getMessage() for r in caplog.records)  # and in the log


def test_a_release_removes_the_service_and_its_objects(tmp_path):
    engine = stand_in_engine()
    a_service(engine, UID, "0123456789ab")
    engine.configs.add("claim", {f"{LABEL}.facility": "f", f"{LABEL}.session": "0123456789ab"})
    reply = swarm_gateway(tmp_path, engine).release(UID, None)
    assert reply["released"] == ["inbound"]
    assert engine.services.list() == [] and engine.configs.list() == []


def test_a_service_whose_request_never_answered_is_removed_by_the_next_replicas_sweep(tmp_path, caplog):
    """A replica that died while its new service started left a stream nobody has the UID of: it
    would run, and hold its node's ports, for ever. One being started now, or answered, stays."""
    engine = stand_in_engine()
    long_ago, just_now = stamp(time.time() - STALE_CLAIM - 60), stamp(time.time() - 5)

    def made(sid: str, phase: str | None, created: str) -> Thing:
        labels = {f"{LABEL}.created": created, **({f"{LABEL}.phase": phase} if phase else {})}
        service = a_service(engine, str(uuid.uuid4()), sid)
        service.attrs["Spec"]["Labels"].update(labels)
        engine.configs.add(f"claim-{sid}", {f"{LABEL}.facility": "f", f"{LABEL}.session": sid, **labels})
        return service

    made("00000000dead", "STARTING", long_ago)  # its replica died before it answered
    kept = [
        made("000000young0", "STARTING", just_now),  # another replica's request, in progress
        made("00000answer0", "ACTIVE", long_ago),  # answered: a user's stream
        made("000000older0", None, long_ago),  # made before services were marked: a user's
    ]
    gateway = swarm_gateway(tmp_path, engine)
    gateway.state.open()
    gateway.start()
    assert engine.services.list() == kept
    assert [c.name for c in engine.configs.list()] == [
        "claim-000000young0",
        "claim-00000answer0",
        "claim-000000older0",
    ]
    assert any("scistream-f-00000000dead" in r.getMessage() for r in caplog.records)


def test_a_swarm_replica_supervises_nothing_and_records_no_stream_on_its_disk(tmp_path):
    """The swarm restarts the tasks and holds the records: a replica that kept a supervisor or a
    state.json of its own would watch nothing, or disagree with the swarm after another replica
    released a stream."""
    engine = stand_in_engine()
    a_service(engine, UID, "0123456789ab")
    gateway = swarm_gateway(tmp_path, engine)
    gateway.site.backend = StunnelBackend(environment(None, default_templates()))  # for the limits shown
    gateway.open = gateway.site.state.open  # type: ignore[method-assign]  # no engine to check
    gateway.open()
    gateway.start()
    assert [s["role"] for s in gateway.status(UID, None)["streams"]] == ["inbound"]
    gateway.release(UID, None)
    gateway.close()
    assert not [t for t in threading.enumerate() if t.name in ("supervisor", "entry-watch")]
    assert not (tmp_path / "state.json").exists()
    assert not hasattr(gateway.site, "supervisor") and not hasattr(gateway.site, "runtime")


# --- lost nodes and managers ---------------------------------------------------------------------


def named(ident: str, hostname: str, state: str = "ready", manager: str = "", **kw: Any) -> dict[str, Any]:
    found = node(ident, state=state, **kw)
    found["Description"] = {"Hostname": hostname}
    if manager:
        found["ManagerStatus"] = {"Addr": manager, "Reachability": "reachable"}
    return found


def test_a_stream_on_a_ready_node_has_nothing_to_say_of_its_node():
    assert lost_node(named("n3", "dtn3", addr="192.168.2.13")) == ""


@pytest.mark.parametrize("state", ["down", "unknown", "disconnected"])
def test_a_stream_on_a_node_not_ready_names_it_says_it_waits_there_and_how_to_end_it(state):
    words = lost_node(named("n3", "dtn3", state=state, labels={"scistream.address": "203.0.113.13"}))
    assert words.startswith(f"node dtn3 (203.0.113.13) is {state}: ")  # the users' address of it
    assert "at the same listeners" in words and "release it" in words


def test_a_stream_whose_node_left_the_swarm_cannot_come_back():
    assert "no longer in the swarm" in lost_node(None) and "release it" in lost_node(None)


def test_the_other_managers_are_named_by_hostname_and_address_without_this_node_or_workers():
    nodes = [
        named(OWN, "dtn1", manager="192.168.2.11:2377", addr="192.168.2.11"),
        named("n2", "dtn2", manager="192.168.2.12:2377", addr="192.168.2.12"),
        named("n3", "dtn3", manager="192.168.2.13:2377"),  # no Status.Addr: its manager address
        named("n4", "dtn4", addr="192.168.2.14"),  # a worker runs no replica
    ]
    nodes[2]["Status"].pop("Addr")
    assert other_managers(nodes, OWN) == ("dtn2 (192.168.2.12)", "dtn3 (192.168.2.13)")


def test_with_no_node_labelled_the_operator_is_told_to_label_one():
    assert "docker node update --label-add scistream.gateway=true" in no_gateway([named(OWN, "dtn1")])


def test_labelled_nodes_none_ready_are_named_with_their_state_not_asked_to_be_labelled():
    """While the managers elect a new leader (one was lost), the swarm lists every node unknown:
    telling the operator to label a node would send them the wrong way."""
    nodes = [
        named("n2", "dtn2", state="unknown", labels={**GATEWAY, "scistream.address": "192.168.2.12"}),
        named("n3", "dtn3", state="down", labels=GATEWAY, addr="192.168.2.13"),
    ]
    words = no_gateway(nodes)
    assert "label-add" not in words
    assert "dtn2 (192.168.2.12) unknown" in words and "dtn3 (192.168.2.13) down" in words
    assert "try again" in words


def test_labelled_nodes_all_ready_but_unusable_point_to_their_labels():
    words = no_gateway([named("n2", "dtn2", labels={**GATEWAY, "scistream.address": "dtn2.example.org"})])
    assert "not an IP address" in words and "label-add" not in words and "try again" not in words


def test_a_drained_gateway_node_is_said_to_be_drained_and_no_election_is_blamed():
    words = no_gateway([named("n2", "dtn2", availability="drain", labels=GATEWAY, addr="192.168.2.12")])
    assert "dtn2 (192.168.2.12) ready, drain" in words and "leader" not in words


def test_a_check_that_cannot_list_the_other_managers_serves_and_says_why_in_the_log(tmp_path, caplog):
    """The other managers are only named in a later error, so failing to list them is no reason
    to stop; but an engine failure is never kept from the operator."""
    engine = stand_in_engine()
    own = engine.nodes.list()
    listed = iter([own])

    def nodes() -> list[SimpleNamespace]:
        try:
            return next(listed)
        except StopIteration:
            raise docker.errors.APIError("500 Server Error", explanation="the engine went away") from None

    engine.nodes = SimpleNamespace(list=nodes)
    engine.info = lambda: {"Swarm": {"LocalNodeState": "active", "ControlAvailable": True, "NodeID": OWN}}
    engine.images = SimpleNamespace(get=lambda image: SimpleNamespace(id=image))
    settings = Settings("127.0.0.1", None, (5100, 5200), tmp_path)
    swarm = Swarm(settings, cast(Backend, None), "img", "f", None, client=engine)
    assert "node" in swarm.check()
    assert any("the engine went away" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
