"""The gateway's sessions on this host: its processes (or containers) and state.json.

`Host` is the `Site` (gateway.py) of a gateway of its own: it places sessions on this host's
port pool, runs their processes through the runtime (processes or containers), supervises them
and records every session in the state dir, from which the next s2cs recovers them. Every
launch leaves things as it found them when it fails: ports are returned, files deleted,
processes stopped (STYLE.md rule 3). What a request may ask is gateway.py's, not this module's.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from ..errors import BackendFailed, Conflict, ScistreamError
from ..protocol import format_rate, hostport
from ..s2ds.backend import Backend, Launch, Stats
from ..s2ds.diagnosis import Tally, merge
from ..s2ds.proxylog import LogWatch, last_lines
from ..s2ds.render import ProxySpec, SessionFiles
from ..s2ds.runtime import Handle, ProcessRuntime, Runtime, terminate
from ..s2ds.supervisor import STOP_GRACE, ProxyProcess, State, Supervisor
from .gateway import (
    Place,
    Settings,
    default_policy,
    entry_address,
    entry_addresses,
    inbound_bind,
    port_is_free,
    proxy_spec,
    within_quota,
)
from .policy import Grant, IPAddress, Policy
from .ports import PortPool
from .sessions import Phase, RecordedProcess, Session, SessionRegistry, parse_record, short
from .state import StateDir

log = logging.getLogger(__name__)

ENTRY_LOOK = 5.0  # seconds between two looks at what the plain entries refused, for the log


class _Recording:
    """The Runtime a session's processes get: each spawn is written to state.json before its
    program runs (Runtime.spawn). An s2cs that dies while a proxy starts so leaves it recorded,
    and the next one finds it by what was recorded, never by its command line."""

    def __init__(self, runtime: Runtime, spawned: Callable[[Handle], None]) -> None:
        self._runtime = runtime
        self._spawned = spawned

    def spawn(
        self, argv: Sequence[str], cwd: Path, log: Path, recorded: Callable[[Handle], None] = lambda _: None
    ) -> Handle:
        def record(handle: Handle) -> None:
            self._spawned(handle)
            recorded(handle)

        return self._runtime.spawn(argv, cwd, log, record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)  # all else as the Runtime it wraps


class Host:
    """Sessions as processes of this host, recorded in its state dir (the `Site` of gateway.py)."""

    streams_outlive_s2cs = False  # they are this s2cs's: it releases them when it stops

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        runtime: Runtime | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.policy = policy or default_policy(settings)
        self.runtime = runtime or ProcessRuntime()
        self.state = StateDir(settings.state_dir)
        self.registry = SessionRegistry()
        self.pool = PortPool(*settings.port_range, is_free=port_is_free)
        self.supervisor = Supervisor()
        self._save_lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}  # by sid, as last saved (_persist)
        # What each process's log has told of failed connections (diagnosis.py); a process's
        # entry goes with it.
        self._watches: weakref.WeakKeyDictionary[ProxyProcess, LogWatch] = weakref.WeakKeyDictionary()
        self._watch_lock = threading.Lock()
        self._found: list[tuple[Session, list[RecordedProcess]]] = []  # what state.json records
        # Where a request's proxy config is checked while the request starts the shaper (launch).
        self._checks = ThreadPoolExecutor(thread_name_prefix="config-check")
        self.inbound_bind = inbound_bind(settings)  # checked now, not at the first request
        self.entry_ips = entry_addresses(settings)  # as this one
        self._refused: dict[str, int] = {}  # by sid: sources refused by its plain entry, as logged
        self._refused_lock = threading.Lock()
        self._entry_watch = threading.Event()  # set: stop looking (close)

    # --- life of the server ----------------------------------------------------------------------

    def open(self) -> None:
        """Hold the state dir and read what it records, acting on nothing yet: a second s2cs, or
        a damaged state.json, fails here and changes nothing."""
        self.state.open()
        self._found = self._recorded()

    def start(self) -> None:
        """Recover the streams of the state dir and supervise them; `open()` came first."""
        self.recover()
        self.supervisor.start()
        threading.Thread(target=self._watch_entries, name="entry-watch", daemon=True).start()

    def close(self, keep_streams: bool = False) -> None:
        """Stop supervising; release every session unless the streams are to outlive us."""
        self._entry_watch.set()
        self.supervisor.close()
        self._checks.shutdown()
        sessions = self.registry.all()
        if keep_streams:
            for session in sessions:
                for proc in session.procs:
                    proc.detach()
            log.info("leaving %d stream(s) running for the next s2cs to re-adopt", len(sessions))
            return
        for session in sessions:
            self._discard(session)
        log.info("released %d stream(s)", len(sessions))

    def recover(self) -> None:
        """Re-adopt the processes of a previous s2cs that still run; restart the others.

        Refuses to start only when state.json cannot be used (StateDir.damaged says why), and
        then before it touches anything. A session whose processes cannot be started again
        (neither from the current templates nor from their last config) is FATAL with the
        reason, and its ports stay reserved.
        """
        active = []
        for session, recorded in self._found:
            if session.phase != Phase.ACTIVE:
                self._end_unfinished(session, recorded)
            else:
                active.append((session, recorded))
        running = self._running(active)
        for session, recorded in active:
            self.registry.add(session)
            self.pool.take(session.ports, owner=session.sid)
            files = SessionFiles(self.state.session_dir(session.sid))
            files.directory.mkdir(mode=0o700, exist_ok=True)
            files.run.mkdir(mode=0o700, exist_ok=True)
            spec = self._spec(session)
            gone = []
            for i, before in enumerate(recorded):
                launch = Launch(before.kind, before.argv, self.backend.ready(spec, files, before.kind))
                proc = self._process(session, files, launch)
                proc.restarts = before.restarts
                handle = running[(session.sid, i)]
                if handle is not None:
                    proc.adopt(handle)
                else:
                    gone.append(proc)
                session.procs.append(proc)
                self.supervisor.add(proc)
            if gone:
                self._restart_gone(session, files, gone)
        self._sweep()
        self._persist()
        if len(self.registry):
            log.info("recovered %d stream(s) from %s", len(self.registry), self.state.file)

    def _running(
        self, active: list[tuple[Session, list[RecordedProcess]]]
    ) -> dict[tuple[str, int], Handle | None]:
        """The process of each record (by sid and place) that still runs, adopted: the recorded
        one, or, where that is gone, the one that replaced it while state.json could not be
        written (a full disk), taken over rather than stopped and started anew, which would cut
        its connections (docs/reliability.md, finding 6). Those are looked for all at once: one
        pass over the process table however many streams a reboot left."""
        running: dict[tuple[str, int], Handle | None] = {}
        missing: list[tuple[Session, int, RecordedProcess]] = []
        for session, recorded in active:
            for i, before in enumerate(recorded):
                handle = None
                if before.pid and before.create_time:
                    handle = self.runtime.adopt(before.pid, before.create_time, before.argv)
                running[(session.sid, i)] = handle
                if handle is None:
                    missing.append((session, i, before))
        wanted = [(self.state.session_dir(session.sid), before.argv) for session, _, before in missing]
        for (session, i, before), handle in zip(missing, self.runtime.unrecorded(wanted), strict=True):
            if handle is not None:
                log.warning(
                    "session %s: re-adopted its %s, pid %d, though state.json had pid %s: it was "
                    "restarted while state.json could not be written",
                    short(session.sid),
                    before.kind,
                    handle.pid,
                    before.pid,
                )
                running[(session.sid, i)] = handle
        return running

    def _recorded(self) -> list[tuple[Session, list[RecordedProcess]]]:
        """Every session of state.json with its processes, all checked before any is acted on."""
        found = []
        seen: set[object] = set()
        for i, record in enumerate(self.state.load(), 1):
            try:
                session, processes = parse_record(record)
            except ValueError as exc:
                raise self.state.damaged(f"session {i}: {exc}") from None
            for key in (session.sid, (session.uid, session.role)):
                if key in seen:
                    raise self.state.damaged(f"session {i} is recorded twice")
                seen.add(key)
            found.append((session, processes))
        return found

    def _restart_gone(self, session: Session, files: SessionFiles, gone: list[ProxyProcess]) -> None:
        """Schedule the processes that did not survive, with their files written again from the
        current templates (the credentials derive from the UID). If that fails, the files they
        last ran with will do; without those, they are FATAL with the reason."""
        try:
            launches = {launch.name: launch for launch in self._prepare(session, files)}
        except ScistreamError as exc:
            if files.config.is_file() and files.pem.is_file():
                log.warning("%s: %s; starting it again with its last config", session.label, exc.message)
                for proc in gone:
                    proc.restart_later("it was not running when s2cs started")
                return
            for proc in gone:
                proc.fail(f"cannot start it again after the restart of s2cs: {exc.message}")
            log.error("%s: cannot start again: %s", session.label, exc.message)
            return
        for proc in gone:
            if proc.kind in launches:
                proc.argv = list(launches[proc.kind].argv)
            proc.restart_later("it was not running when s2cs started")
            log.warning("%s: was gone after the restart of s2cs; starting it again", proc.name)

    def _end_unfinished(self, session: Session, recorded: list[RecordedProcess]) -> None:
        """End a session the previous s2cs had not finished: one it was releasing, or one it was
        still starting (its request never answered: no user has it as a stream). These are the
        strays: processes recorded in state.json for no session that is kept. Each is stopped
        only if it is still the process recorded (pid, start time and command line); its ports
        are not taken, its files go with the sweep."""
        why = "was being released" if session.phase == Phase.RELEASING else "had not started yet"
        for before in reversed(recorded):  # the proxy first, then what it connects through
            if not (before.pid and before.create_time):
                continue
            handle = self.runtime.adopt(before.pid, before.create_time, before.argv)
            if handle is not None:
                log.warning("%s: stopping its %s, pid %d: it %s", session.label, before.kind, handle.pid, why)
                terminate(self.runtime, handle, STOP_GRACE)
        log.info("%s: ended, as it %s when the previous s2cs stopped", session.label, why)

    def _sweep(self) -> None:
        """Delete the directories of sessions that are not kept, and have the runtime stop what
        it started for this state dir that runs unrecorded (a record that never reached
        state.json). Never by a command line that names the state dir, which an operator's
        `tail -f` of a proxy log does too: by the mark each process or container carries."""
        known = self.registry.sids()
        for path in self.state.sessions.iterdir():
            if path.name not in known:
                shutil.rmtree(path, ignore_errors=True)
        running = {
            proc.handle.pid
            for session in self.registry.all()
            for proc in session.procs
            if proc.handle is not None
        }
        self.runtime.sweep(known, running, self.state.sessions)

    # --- what the gateway asks of its site --------------------------------------------------------

    def info(self) -> dict[str, Any]:
        pool = self.pool
        return {"port_range": pool.label, "free_ports": pool.available(), "streams": len(self.registry)}

    def addresses(self) -> frozenset[IPAddress]:
        return frozenset()  # where streams listen: this host's interfaces, which the gateway reads

    def sessions(self, uid: str | None = None) -> list[Session]:
        return self.registry.all() if uid is None else self.registry.of_uid(uid)

    def release(self, uid: str, visible: Callable[[list[Session]], list[Session]]) -> list[Session]:
        """End the sessions of `uid` that `visible` lets the asker see; those it ended."""
        with self.registry.lock:
            sessions = visible(self.registry.of_uid(uid))
            if not sessions:
                return []
            # A session still starting is its request's: releasing it now would free its ports
            # under it (maybe twice, once they are another stream's) or delete its directory
            # while it spawns there. The request answers within START_TIMEOUT or so.
            starting = [s for s in sessions if s.phase == Phase.STARTING]
            if starting:
                raise Conflict(
                    f"stream {short(uid)} is still starting its {starting[0].role} proxy here; "
                    "release it once that request has answered"
                )
            for session in sessions:
                session.phase = Phase.RELEASING  # a second release now finds nothing
        for session in sessions:
            self._discard(session)
            log.info("%s: released", session.label)
        return sessions

    def place(self, sid: str, count: int, requested: Sequence[int] = (), entry: str | None = None) -> Place:
        """`requested` ports, else `count` free ones, for session `sid`, on this host; `entry`:
        the plain entry address an outbound request names (entry_address), checked first."""
        chosen = entry_address(entry, self.entry_ips)
        ports = self.pool.reserve(count, requested, owner=sid)
        return Place(ports, self.settings.listener_ip, self.inbound_bind, entry=chosen)

    def _spec(self, session: Session) -> ProxySpec:
        return proxy_spec(self.backend, self.policy, session)

    def _prepare(self, session: Session, files: SessionFiles) -> list[Launch]:
        return self.backend.prepare(session.uid, self._spec(session), files)

    def _process(self, session: Session, files: SessionFiles, launch: Launch) -> ProxyProcess:
        def spawned(handle: Handle) -> None:
            proc.handle = handle  # as the process will hold it once spawn returns: record it now
            self._persist(session)

        proc = ProxyProcess(
            f"{session.label} {launch.name}",
            launch.name,
            launch.argv,
            files.directory,
            files.directory / f"{launch.name}.log",
            launch.ready,
            cast(Runtime, _Recording(self.runtime, spawned)),
            on_change=lambda proc: self._persist(session),
        )
        return proc

    def launch(self, session: Session, grant: Grant) -> None:
        try:
            with self.registry.lock:  # counted and added at once: two requests cannot both pass
                within_quota(grant, [s for s in self.registry.all() if s.owner == session.owner], session)
                self.registry.add(session)
        except ScistreamError:
            self.pool.release(session.ports, owner=session.sid)
            raise
        try:
            files = SessionFiles(self.state.session_dir(session.sid))
            files.directory.mkdir(mode=0o700)
            # Before any process: the shaper may start, and listen in run/, while another thread
            # still writes the proxy's config (below).
            files.run.mkdir(mode=0o700)
            spec = self._spec(session)
            session.procs = [
                self._process(session, files, launch) for launch in self.backend.launches(spec, files)
            ]
            # All at once, then each waited for: the request takes as long as the slowest. None
            # needs the other to be up to start (each connects to the other only when a
            # connection comes), and none is reachable before the reply names its ports. The
            # proxy's config is written and checked by the proxy itself (haproxy -c: about 20 ms)
            # in a thread, while this one records the session and starts the shaper, a Python
            # process; the proxy starts once its config passed.
            checked = self._checks.submit(self.backend.write_config, session.uid, spec, files)
            try:
                # Before a spawn: a crash now still leaves a trace of these ports.
                self._persist(session, strict=True)
                for proc in session.procs:
                    if proc.kind != "proxy":
                        proc.launch()
            finally:
                checked.exception()  # waited for in any case: the release below removes its files
            checked.result()
            for proc in session.procs:
                if proc.kind == "proxy":
                    proc.launch()
            for proc in session.procs:
                proc.wait_started()
                self.supervisor.add(proc)
        except BaseException as exc:
            self.registry.remove(session)
            self._discard(session)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # What the user can act on, not INTERNAL: only this request's files were touched.
                raise BackendFailed(
                    f"the disk of the state dir {self.state.path} is full ({exc.strerror}): free space "
                    "there, then try again; the streams running now are not affected"
                ) from None
            raise
        with self.registry.lock:
            session.phase = Phase.ACTIVE  # from now on a release may end it
        self._persist(session)  # and a restarted s2cs keeps it: its request is answered
        log.info(
            "%s: %s -> %s, %d connection(s), %s",
            session.label,
            ", ".join(session.advertised),
            ", ".join(hostport(lst.target_ip, lst.target_port) for lst in session.listeners),
            session.limits.num_conn,
            format_rate(session.limits.rate),
        )

    def _discard(self, session: Session) -> None:
        """Stop the processes, delete the session's files (its key among them), free its ports."""
        session.phase = Phase.RELEASING
        self._persist(session)  # first: should s2cs die meanwhile, the next one finishes the release
        files = SessionFiles(self.state.session_dir(session.sid))
        stats = self.backend.stats(files) if session.procs else None
        self.note_refused(session, stats)
        with self._refused_lock:
            self._refused.pop(session.sid, None)
        for proc in reversed(session.procs):  # the proxy first, then what it connects through
            self.supervisor.remove(proc)
            proc.stop()
        if stats:
            log.info(
                "%s: carried %d connection(s), %d bytes in, %d bytes out",
                session.label,
                stats.total_connections,
                stats.bytes_in,
                stats.bytes_out,
            )
        shutil.rmtree(files.directory, ignore_errors=True)
        self.registry.remove(session)
        self.pool.release(session.ports, owner=session.sid)
        self._persist(session)

    def _watch_entries(self) -> None:
        """Every ENTRY_LOOK seconds, what the plain entries refused since the last look, in the log."""
        while not self._entry_watch.wait(ENTRY_LOOK):
            for session in self.registry.all():
                if session.role == "outbound" and session.phase == Phase.ACTIVE:
                    files = SessionFiles(self.state.session_dir(session.sid))
                    self.note_refused(session, self.backend.stats(files))

    def note_refused(self, session: Session, stats: Stats | None) -> None:
        """Log the connections a session's plain entry refused since they were last logged: one
        line, naming the stream by its prefix; the proxy's (or shaper's) log has each source."""
        if stats is None or session.role != "outbound":
            return
        with self._refused_lock:
            before = self._refused.get(session.sid, 0)
            self._refused[session.sid] = stats.refused  # lower after a restart: counted from 0 again
        if stats.refused > before:
            log.warning(
                "%s: its plain entry refused %d connection(s) from sources that are not allowed "
                "(%d in all; s2cs --allow-sources, policy sources)",
                session.label,
                stats.refused - before,
                stats.refused,
            )

    def _persist(self, changed: Session | None = None, strict: bool = False) -> None:
        """Save every session in state.json. A request fails when that cannot be done (strict); a
        change the supervisor noticed is only logged, in one line: its stream runs on.

        Only the record of the session that `changed` is built again (of every session when None):
        each change to a session is followed by a save that names it, so the others are as they
        were last saved. Building all of them at every save cost a request more with every live
        stream, in time and in garbage for the collector (at 100 streams, 2 ms a request and a
        collection of every generation now and then)."""
        with self._save_lock:
            records = {}
            for session in self.registry.all():
                record = self._records.get(session.sid)
                if record is None or changed is None or session is changed:
                    record = session.to_record()
                records[session.sid] = record
            self._records = records
            try:
                self.state.save(list(records.values()))
            except OSError as exc:
                if strict:
                    raise
                log.error("cannot write %s: %s", self.state.file, exc.strerror or exc)

    def failure_counts(self) -> list[tuple[Session, dict[str, int]]]:
        """Every session with its failed connections so far by kind (diagnosis.KINDS), for the
        metrics. Counted from what its logs said since this s2cs first looked, beginning with
        the newest 64 KiB of each: they only grow while this s2cs runs."""
        return [(session, self._tally(session).by_kind()) for session in self.registry.all()]

    def _tally(self, session: Session) -> Tally:
        """What the logs of the session's processes have told of failures, read up to now."""
        targets = [hostport(lst.target_ip, lst.target_port) for lst in session.listeners]
        watches = []
        with self._watch_lock:
            for proc in session.procs:
                watch = self._watches.get(proc)
                if watch is None:
                    watch = self._watches[proc] = LogWatch(proc.log_path, session.role, targets)
                watches.append(watch)
        return merge(watch.look() for watch in watches)

    def describe(self, session: Session, full: bool, log: bool = False) -> dict[str, Any]:
        """Its state and restarts; with `full`, its processes and why its connections failed
        (only its owner sees the addresses); the proxy's counts when it can tell."""
        entry: dict[str, Any] = {"state": str(session.state), "restarts": session.restarts}
        if full:
            entry["processes"] = [
                {"name": p.kind, "pid": p.pid, "state": str(p.state), "restarts": p.restarts}
                for p in session.procs
            ]
            if log:
                for shown, proc in zip(entry["processes"], session.procs, strict=True):
                    shown["log"] = last_lines(proc.log_path)
            errors = [f"{p.kind}: {p.last_error}" for p in session.procs if p.state == State.FATAL]
            if errors:
                entry["last_error"] = "\n".join(errors)
            entry["failures"] = [f.as_dict() for f in self._tally(session).failures()]
        stats = self.backend.stats(SessionFiles(self.state.session_dir(session.sid)))
        self.note_refused(session, stats)
        if stats is not None:
            if session.role == "outbound":
                entry["refused_sources"] = stats.refused
            entry.update(
                connections=stats.connections,
                total_connections=stats.total_connections,
                bytes_in=stats.bytes_in,
                bytes_out=stats.bytes_out,
            )
        return entry
