"""The supervisor: binds every listener, keeps a group of worker processes serving each
(sockd.group), forked by its fork server (sockd.forkserver), reloads the config on SIGHUP
(sockd.reloading), upgrades in place on SIGUSR2 (sockd.upgrade: it re-executes itself and
adopts its workers), ends what a worker that died left running (sockd.orphans), tells systemd
and the metrics endpoint (through sockd.ledger) how it goes, keeps its listening sockets in
systemd's file descriptor store so that a restart refuses no connection, and stops them all
gracefully.

A stop signal first says the instance drains, at once and everywhere a balancer looks (/healthz
answers 503 `draining`, `sockd_draining` is 1, systemd hears STOPPING=1, an agent listener answers
`drain`), while the listeners go on accepting and serving for `drain_delay` seconds; then the
stop proper: every group stops (sockd.group). A second stop signal cuts the delay short, and one
during the stop kills the workers.

Signal handlers only queue the signal; the main loop takes it off the queue and calls
`handle_<name>` (gunicorn's arbiter). The supervisor knows listeners, sockets and processes, never
a model or a handler: those live in the worker.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import selectors
import signal
import time

import structlog

from sockd import __version__, metrics, reloading, reloads, systemd, upgrade
from sockd.bind_retry import BIND_WAIT, bind_retrying
from sockd.config import Config, Listener
from sockd.counters import BEAT_INTERVAL
from sockd.descriptors import make_room
from sockd.forkserver import ForkServerError, Process, Spawner
from sockd.group import Group, Worker
from sockd.ledger import Ledger
from sockd.logging import configure, flush_throttled
from sockd.orphans import KILL_AFTER, Orphans
from sockd.plan import summary
from sockd.sockets import BindError, Bound, adopt, bind, reason, serves, tcp_port, udp_ports
from sockd.spec import WorkerSettings
from sockd.tls.material import Loaded, expiries

log = structlog.get_logger()

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR2)
# Signals whose default action ends a process and that mean nothing to sockd (a stray `kill
# -USR1`, a timer signal meant for a profiler): caught, logged the first time, and ignored. Not
# SIGQUIT, SIGABRT and the like, which dump a core on purpose (systemd's watchdog sends SIGABRT).
IGNORED = (
    signal.SIGUSR1,
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,
    signal.SIGPWR,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)
CAUGHT = (*SIGNALS, *IGNORED)
# The metrics endpoint's socket in systemd's file descriptor store: a name no listener can have.
METRICS_FDNAME = "+metrics"


class Supervisor:
    def __init__(
        self, loaded: Loaded, path: str | os.PathLike[str], signals: collections.deque[int] | None = None
    ) -> None:
        # The config in force and its TLS material: replaced only by a reload that succeeded.
        self.loaded = loaded
        self.path = path
        self.ledger = Ledger()  # the groups, by listener name, and what the metrics endpoint reports
        self.ledger.certificates = expiries(loaded.material)
        _warn(loaded)
        # What the signal handlers queue for the loop; `signals` if the command caught some before
        # the supervisor existed (see sockd.__main__).
        self.signals: collections.deque[int] = collections.deque() if signals is None else signals
        self.selector = selectors.DefaultSelector()
        self.spawner = Spawner()
        self.orphans = Orphans()  # what workers that are gone left running (see sockd.orphans)
        self.notifier = systemd.Notifier()
        self.activated = systemd.listen_fds()
        # What the supervisor this process was before an upgrade hands over (see sockd.upgrade).
        handoff = upgrade.received()
        self.adoption = upgrade.Adoption(handoff) if handoff is not None else None
        self.exporter: metrics.Exporter | None = None
        self.stopping = False  # the stop proper has begun: every group stopped
        self.stop_at: float | None = None  # set by a stop signal with a drain_delay: when the stop begins
        self.announced_ready = False
        self.outcomes = reloads.Published()  # for `sockd reload`
        self.ignored: set[int] = set()  # the ignored signals that came, each logged once
        self.next_watchdog = time.monotonic()

    @property
    def config(self) -> Config:
        return self.loaded.config

    def run(self) -> int:
        """Bind everything (raising BindError before anything serves), serve until stopped."""
        # First of all: a stop or a reload sent while sockd starts waits for the loop, rather
        # than ending the process (SIGHUP's default) or raising in the middle of a bind (SIGINT).
        # They stay caught to the end (see _ignore_signals).
        for signum in CAUGHT:
            signal.signal(signum, lambda signum, _: self.signals.append(signum))
        # Blocked across an upgrade's exec (see sockd.upgrade): what came meanwhile comes now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CAUGHT)
        bounds: dict[str, Bound] = {}
        try:
            make_room(self.config)
            # Said before binding: a listener that then fails to bind may be the one meant.
            for name in sorted(self.activated.keys() - {listener.name for listener in self.config.listeners}):
                if name != METRICS_FDNAME:
                    log.warning("systemd passed a socket that no listener is named after", name=name)
                if name != METRICS_FDNAME and self.notifier.store_room:  # a listener gone while sockd was stopped
                    self.notifier.unstore(name)
                    self.activated.pop(name).close()
            deadline = time.monotonic() + BIND_WAIT  # one wait for all: connections end together
            for listener in self.config.listeners:
                bind_listener = functools.partial(self._bind, listener)
                where = {"listener": listener.name, "address": listener.address}
                bounds[listener.name] = bind_retrying(
                    bind_listener, tcp_port(listener), deadline, where, self._stop_requested
                )
            settings = WorkerSettings.of(self.config, self.loaded.material, udp_ports(bounds.values()))
            groups = {name: self._group(bound.listener, bound, settings) for name, bound in bounds.items()}
            leaving = self._adopt(groups, settings) if self.adoption is not None else []
            self.ledger.replace(groups, leaving)
            self.exporter = self._exporter(deadline)
            self._store_sockets()
            self._start_spawner()  # before the exporter's thread: nothing forks a threaded process
        except BaseException:
            for bound in bounds.values():
                bound.close()
            self.outcomes.close()
            _ignore_signals()
            raise
        wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
        self.selector.register(wakeup_read, selectors.EVENT_READ, None)
        try:
            if self.exporter is not None:
                self.exporter.start()
                log.info("metrics", address=self.exporter.address, path="/metrics")
            self._inform()  # the agents' first workers start with it: after an upgrade, the adopted ones' state
            for group in self.ledger.groups.values():
                group.start()
            self._loop(wakeup_read)
        finally:
            signal.set_wakeup_fd(-1)
            os.close(wakeup_read)
            os.close(wakeup_write)
            if self.exporter is not None:
                self.exporter.close()
            self._close_sockets()
            self.spawner.close()
            self.outcomes.close()
            _ignore_signals()
        flush_throttled()
        log.info("stopped")
        return 0

    # -- the loop

    def _loop(self, wakeup: int) -> None:
        while not self.stopping or any(any(group.workers()) for group in self.ledger.all()) or self.orphans:
            for key, _ in self.selector.select(self._timeout()):
                if key.data is None:
                    _drain_pipe(wakeup)
                elif key.data():  # a worker's channel (see sockd.group): it has just become ready
                    self._announce_ready()
            self._handle_signals()
            now = time.monotonic()
            if not self.stopping and self.stop_at is not None and now >= self.stop_at:
                self._stop()
            for group in self.ledger.all():
                for worker in group.tend(now):
                    self._orphaned(group, worker, now)
            self.orphans.tend(self._own_pids(), now)
            if not self.stopping:  # no new fork server for a stop's drain
                self.spawner.tend(lambda: {*self._worker_pids(), *self.orphans.pids()})
            self.ledger.depart()
            self._inform()
            if self.notifier.watchdog_interval and now >= self.next_watchdog:
                # Only a turning loop pings: a supervisor stuck anywhere gets restarted by systemd.
                self.notifier.watchdog()
                self.next_watchdog = now + self.notifier.watchdog_interval

    def _handle_signals(self) -> None:
        """Act on the signals queued before this turn; those that come meanwhile wait for the
        next, after the groups are tended: a storm of HUPs is one reload a turn, each bounded
        (see Group.renew), never a run of reloads with nothing tended in between."""
        queued = [self.signals.popleft() for _ in range(len(self.signals))]
        for index, signum in enumerate(queued):
            if signum == signal.SIGHUP and signal.SIGHUP in queued[index + 1 :]:
                continue  # HUPs that queued up meanwhile: one reload, of the file as it is now
            if signum in IGNORED:
                self._ignore(signum)
                continue
            name = signal.Signals(signum).name.removeprefix("SIG").lower()
            try:
                getattr(self, f"handle_{name}")()
            except Exception as exc:  # a bug or a failed fork must not take every listener down
                log.exception("handling a signal failed", signal=name)
                outcome = self.outcomes.outcome
                if outcome.begun > outcome.done:  # a reload it left unfinished failed, and says so
                    self._reloaded(False, f"reload failed, see the log: {exc!r}")

    def _ignore(self, signum: int) -> None:
        if signum not in self.ignored:  # once: a stream of them must not flood the log
            self.ignored.add(signum)
            log.warning("signal ignored: sockd gives it no meaning", signal=_signal_name(signum))

    def _timeout(self) -> float:
        if self.signals:  # queued before the loop began (see run), or during the last turn
            return 0.0
        due = [when for group in self.ledger.all() if (when := group.due()) is not None]
        if self.notifier.watchdog_interval:
            due.append(self.next_watchdog)
        if self.stop_at is not None and not self.stopping:
            due.append(self.stop_at)
        if (kill_at := self.orphans.due()) is not None:
            due.append(kill_at)
        # Heartbeats are checked at least this often (see Worker.beating).
        due.append(time.monotonic() + min(BEAT_INTERVAL, self.config.worker_timeout / 4))
        return max(0.0, min(due) - time.monotonic())

    def _worker_pids(self) -> set[int]:
        return {worker.process.pid for group in self.ledger.all() for worker in group.workers()}

    def _own_pids(self) -> set[int]:
        """The children the supervisor started: its workers and fork servers."""
        return self._worker_pids() | self.spawner.pids()

    def _orphaned(self, group: Group, worker: Worker, now: float) -> None:
        """`worker` is reaped: what it left running is ended (see sockd.orphans), at once if its
        time was up (killed at shutdown_timeout, or by a second stop signal), else with SIGTERM
        first and SIGKILL KILL_AFTER later, or at the stopped worker's shutdown_timeout."""
        kill_at = now + KILL_AFTER
        if worker.drain_until is not None:
            kill_at = min(kill_at, worker.drain_until)
        count = group.count_exit if group.listener.handler == "exec" else None
        self.orphans.adopt(
            group.listener.name, worker.process.pid, self._own_pids(), kill_at=kill_at, now=now, count=count
        )

    def _group(self, listener: Listener, bound: Bound, settings: WorkerSettings) -> Group:
        return Group(listener, bound, settings, self.selector, self.spawner)

    def _inform(self) -> None:
        """Tell the agent listeners' workers the instance's state as it changes: each turn, so a
        stop signal, a worker down or up again, a reload's new listener, reach them within one."""
        agents = [group for group in self.ledger.all() if group.listener.handler == "agent"]
        if agents:
            state = self.ledger.state()
            for group in agents:
                group.inform(state)

    def _start_spawner(self) -> None:
        """The first fork server. After an upgrade one that does not start is no reason to stop:
        the old workers serve on, and new ones are tried again with the restart backoff."""
        try:
            self.spawner.start()
        except ForkServerError as exc:
            if self.adoption is None:
                raise
            log.error("no new workers yet: the fork server did not start; the old ones serve on", error=str(exc))

    def _announce_ready(self) -> None:
        """Once, when every listener's workers have all said they serve."""
        groups = self.ledger.groups
        if not self.announced_ready and all(group.ready() for group in groups.values()):
            self.announced_ready = True
            log.info("ready", listeners=len(groups))
            self.notifier.ready(f"serving {len(groups)} listeners")

    # -- signals

    def handle_term(self) -> None:
        """The first stop signal drains (then stops, `drain_delay` later), the next one during the
        delay stops at once, and one during the stop kills."""
        if self.stopping:
            for group in self.ledger.all():
                group.kill("second stop signal")
            return
        if self.stop_at is not None:
            log.info("second stop signal: the drain delay is cut short")
            self._stop()
            return
        self.ledger.draining = True
        delay = self.config.drain_delay
        if not delay:
            self._stop()
            return
        log.info("draining", drain_delay=delay)
        self.notifier.stopping(f"draining: serving on for {delay:g} s while balancers take this instance out")
        self.stop_at = time.monotonic() + delay

    handle_int = handle_term

    def _stop(self) -> None:
        log.info("stopping", shutdown_timeout=self.config.shutdown_timeout)
        self.notifier.stopping("stopping: draining in-flight requests")
        self.stopping = True
        for group in self.ledger.all():
            group.stop()

    def handle_chld(self) -> None:
        pass  # every turn of the loop reaps; the signal only wakes it up

    def handle_usr2(self) -> None:
        """Upgrade in place: check the sockd now on disk, then re-execute it with this pid, handing
        it the sockets and the workers (see sockd.upgrade). Returns only if that failed: the old
        supervisor and its workers serve on. None once a stop signal came."""
        if self.ledger.draining:
            return
        self.notifier.reloading()
        command = upgrade.program()
        log.info("upgrading", program=" ".join(command), version=__version__)
        why = upgrade.check(command, str(self.path))
        if why is None:
            try:
                self._execute(command)
            except OSError as exc:
                why = f"cannot execute {command[0]}: {reason(exc)}"
        self._upgraded(False, f"upgrade failed, the old sockd serves on: {why}")
        log.error("upgrade failed, the old sockd serves on", reason=why)

    def _execute(self, command: list[str]) -> None:
        """Re-execute this process as `command` (OSError if that fails)."""
        handoff = upgrade.describe(
            self.ledger.groups.values(),
            leaving=self.ledger.leaving,
            metrics=self.exporter.sock if self.exporter is not None else None,
            metrics_settings=self.config.metrics,
            fork_server=self.spawner.server.pid if self.spawner.server is not None else None,
            upgrades=(self.ledger.upgrades.ok, self.ledger.upgrades.failed),
            reloads=dataclasses.astuple(self.ledger.reloads),
        )
        flush_throttled()
        queued = [self.signals.popleft() for _ in range(len(self.signals))]
        upgrade.execute([*command, "-c", str(self.path)], handoff, CAUGHT, queued)

    def _adopt(self, groups: dict[str, Group], settings: WorkerSettings) -> list[Group]:
        """Take over what the supervisor this process was before an upgrade handed over: its
        workers, its counts, its fork server to reap. The groups of listeners gone: returned."""
        assert self.adoption is not None
        handoff = self.adoption.handoff
        leaving = self.adoption.hand_over(groups, functools.partial(self._group, settings=settings), settings)
        for name in self.adoption.moved():
            self.notifier.unstore(name)
        if handoff.fork_server is not None:
            self.spawner.exiting.append(Process(handoff.fork_server))
        self.ledger.reloads = metrics.Reloads(*handoff.reloads)
        self.ledger.upgrades = metrics.Upgrades(*handoff.upgrades)
        workers = sum(len(group.workers) for group in handoff.groups)
        self._upgraded(True, f"upgraded from sockd {handoff.version} to {__version__}")
        log.info("upgraded", previous=handoff.version, version=__version__, pid=os.getpid(), workers=workers)
        return leaving

    def _upgraded(self, ok: bool, status: str) -> None:
        self.ledger.count_upgrade(ok)
        self.notifier.status(status)
        if not ok:  # else READY=1 comes once the new workers serve (see _announce_ready)
            self.notifier.ready(status)

    def handle_hup(self) -> None:
        """Reload: read the file, plan, bind every new socket, then carry the plan out. A bad file
        or a socket that cannot be bound changes nothing. None once a stop signal came."""
        if self.ledger.draining:
            return
        self.outcomes.begin()
        self.notifier.reloading()
        log.info("reloading", path=str(self.path))
        try:
            self._reload()
        except Exception as exc:
            # What no check foresaw (a bug): systemd must still hear that the reload ended, and
            # the count must have it. The loop logs the traceback.
            self._reloaded(False, f"reload failed: {type(exc).__name__}: {exc}")
            raise

    def _reload(self) -> None:
        serving = [group.listener for group in self.ledger.groups.values()]
        try:
            prepared = reloading.prepare(self.path, self.loaded, serving, self.spawner, self._bind)
        except reloading.Refused as exc:
            self._reloaded(False, f"reload failed, still serving the previous config: {exc}")
            exc.log()
            return
        new = prepared.loaded.config
        if new.logging != self.config.logging:
            configure(new.logging)
            line = b"logging " + new.logging.model_dump_json().encode()
            for group in self.ledger.all():  # the workers of kept listeners too
                group.tell(line)
        self.loaded = prepared.loaded
        _warn(self.loaded)
        self.ledger.certificates = expiries(prepared.loaded.material)
        unstarted = reloading.apply(prepared, self.ledger, self._group)
        for step in prepared.steps:  # systemd's store keeps the sockets the listeners have now
            if step.action in ("removed", "rebound"):
                self.notifier.unstore(step.name)
            if step.binds:
                self.notifier.store(step.name, prepared.fresh[step.name].sock)
        done = summary(prepared.steps)
        if unstarted:  # tried again after a backoff; meanwhile their old workers, if any, serve on
            names = ", ".join(unstarted)
            self._reloaded(False, f"reload failed in part: no new workers for {names}; the old ones serve on")
            log.error("reload failed in part: new workers could not be started", listeners=unstarted, **done)
            return
        self._reloaded(True, "reloaded: " + ", ".join(f"{kind} {len(names)}" for kind, names in done.items()))
        log.info("reloaded", **done)

    def _reloaded(self, success: bool, status: str) -> None:
        self.ledger.count_reload(success)
        # The reason on its own first, then READY=1 carrying it again, so that `systemctl status`
        # shows why before the reload ends and after.
        self.notifier.status(status)
        self.notifier.ready(status)
        self.outcomes.end(success, status)

    # -- binding

    def _bind(self, listener: Listener) -> Bound:
        if self.adoption is not None and (inherited := self.adoption.inherit(listener)) is not None:
            return inherited
        passed = self.activated.pop(listener.name, None)
        if passed is not None and (not self.notifier.store_room or serves(listener, passed)):
            return adopt(listener, passed)
        if passed is not None:  # from the file descriptor store: its listener has moved since
            log.info("systemd passed a socket where the listener no longer is", listener=listener.name)
            self.notifier.unstore(listener.name)
            passed.close()
        try:
            return bind(listener)
        except BindError as exc:
            if not self.activated:
                raise
            names = ", ".join(repr(name) for name in sorted(self.activated))
            raise exc.noting(f"systemd passed sockets named {names}, none named {listener.name!r}") from None

    def _stop_requested(self) -> bool:
        """Whether a stop signal came: it ends a wait to bind (see sockd.bind_retry)."""
        return any(signum in (signal.SIGTERM, signal.SIGINT) for signum in self.signals)

    # -- metrics

    def _exporter(self, deadline: float) -> metrics.Exporter | None:
        """The metrics endpoint, if enabled, on the socket it had before an upgrade or a restart
        (from systemd's store) if it is where the settings say, else its port waited for as a
        listener's is (see sockd.bind_retry)."""
        settings = self.config.metrics
        sock = None
        if self.adoption is not None:
            sock = self.adoption.metrics(settings)
            if sock is None:
                self.notifier.unstore(METRICS_FDNAME)
        passed = self.activated.pop(METRICS_FDNAME, None)
        if passed is not None and settings.enabled and metrics.serves(settings, passed):
            sock = passed
        elif passed is not None:  # the endpoint has moved, or is off, since it was stored
            self.notifier.unstore(METRICS_FDNAME)
            passed.close()
        if not settings.enabled:
            return None
        if sock is None:
            where = {"endpoint": "metrics", "address": f"{settings.host}:{settings.port}"}
            bind_endpoint = functools.partial(metrics.bind, settings)
            sock = bind_retrying(bind_endpoint, settings.port, deadline, where, self._stop_requested)
        return metrics.Exporter(sock, settings.buckets, self.ledger.snapshot, self.ledger.unwell)

    def _store_sockets(self) -> None:
        """Every listening socket into systemd's file descriptor store, by its listener's name:
        `systemctl restart` passes them to the next sockd, so that clients wait in their backlogs
        rather than being refused meanwhile."""
        for name, group in self.ledger.groups.items():
            self.notifier.store(name, group.bound.sock)
        if self.exporter is not None:
            self.notifier.store(METRICS_FDNAME, self.exporter.sock)

    def _close_sockets(self) -> None:
        for name, group in self.ledger.groups.items():
            if name in self.notifier.stored:
                group.bound.release()
            else:
                group.bound.close()


def _ignore_signals() -> None:
    """Once the supervisor is done: its signals are ignored for the little the process has left.
    Until then they were queued (so a HUP during a stop's cleanup could not end the process before
    its socket files were removed); not restored to their default, which would end it with no exit
    status (nor left to the interpreter, which restores the default of a signal it handles as it
    exits)."""
    for signum in CAUGHT:
        signal.signal(signum, signal.SIG_IGN)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # a real-time signal other than the first and the last
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _warn(loaded: Loaded) -> None:
    """What `sockd --check` warns of, logged as the config comes into force."""
    for line in loaded.warnings:
        log.warning("config warning", warning=line)
