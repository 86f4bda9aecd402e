"""The supervisor: binds every listener, keeps a group of worker processes serving each
(sockd.group), forked by its fork server (sockd.forkserver), reloads the config on SIGHUP as
sockd.plan decides, tells systemd and the metrics endpoint how it goes, and stops them all
gracefully.

Signal handlers only queue the signal; the main loop takes it off the queue and calls
`handle_<name>` (gunicorn's arbiter). The supervisor knows listeners, sockets and processes, never
a model or a handler: those live in the worker.
"""

from __future__ import annotations

import collections
import errno
import functools
import os
import resource
import selectors
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import structlog

from sockd import metrics, reloads, systemd
from sockd.config import Config, ConfigError, Listener, load
from sockd.counters import BEAT_INTERVAL
from sockd.errors import SockdError
from sockd.forkserver import ForkServerError, Spawner
from sockd.group import Group
from sockd.logging import configure, flush_throttled
from sockd.plan import Step, plan, summary
from sockd.sockets import BindError, Bound, adopt, bind, connections_holding, tcp_port, udp_ports
from sockd.spec import WorkerSettings

log = structlog.get_logger()

T = TypeVar("T")

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
# Signals whose default action ends a process and that mean nothing to sockd (a stray `kill
# -USR1`, a timer signal meant for a profiler): caught, logged the first time, and ignored. Not
# SIGQUIT, SIGABRT and the like, which dump a core on purpose (systemd's watchdog sends SIGABRT).
IGNORED = (
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,
    signal.SIGPWR,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)

# The supervisor's descriptors besides its listeners' and the metrics endpoint's: the standard
# streams, its selector and wake-up pipe, systemd's socket, the fork server's, the reloads'
# outcome (see sockd.reloads), a starting worker's socketpair and counters, and room to spare.
# Nothing a client does can spend them (the endpoint's connections are capped), so a dead worker
# can always be replaced.
SUPERVISOR_RESERVED_DESCRIPTORS = 32
# A TIME-WAIT lasts 60 s on Linux (TCP_TIMEWAIT_LEN), ended by a timer that may fire a little late.
BIND_WAIT = 65.0
BIND_RETRY = 0.2


class DescriptorLimit(SockdError):
    """The descriptor limit is below what a config needs (see make_room), and cannot be raised."""


def descriptors_needed(config: Config) -> int:
    """The descriptors the supervisor holds for `config`: a socket for each listener and a
    channel for each of its workers, twice over (a reload starts the new generation before it
    retires the old one), the metrics endpoint's at their cap, and SUPERVISOR_RESERVED_DESCRIPTORS. (Old
    generations that serve sessions on through a storm of reloads hold more: a worker that
    cannot be started then is retried after a backoff.)"""
    listeners = sum(1 + 2 * listener.workers for listener in config.listeners)
    endpoint = 1 + metrics.MAX_CONNECTIONS + 2 if config.metrics.enabled else 0  # its socket, its socketpair
    return SUPERVISOR_RESERVED_DESCRIPTORS + listeners + endpoint


def make_room(config: Config) -> None:
    """Raise the soft descriptor limit to what `config` needs, as HAProxy does from its maxconn
    (systemd's default soft limit is 1024, under a hard one of 524288, for programs to raise
    themselves); DescriptorLimit if the hard limit is lower."""
    needed = descriptors_needed(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # never unlimited, on Linux
    if soft >= needed:
        return
    if hard < needed:
        count = len(config.listeners)
        raise DescriptorLimit(
            f"the descriptor limit ({hard}) is too low for {count} listener{'s' if count != 1 else ''}: "
            f"the supervisor needs {needed} descriptors; raise LimitNOFILE= (or ulimit -n)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    log.info("raised the descriptor limit", soft=needed, was=soft)


class Supervisor:
    def __init__(
        self, config: Config, path: str | os.PathLike[str], signals: collections.deque[int] | None = None
    ) -> None:
        self.config = config  # the config in force: replaced only by a reload that succeeded
        self.path = path
        # By listener name, in the config file's order. Once the metrics thread reads it, it is
        # replaced whole, never changed in place.
        self.groups: dict[str, Group] = {}
        self.leaving: list[Group] = []  # removed by a reload; their workers still serve
        # The last counts of removed listeners whose workers have all exited, by name: one added
        # back under the name counts on from them.
        self.departed: dict[str, metrics.ListenerReport] = {}
        # Held while a group moves between `groups`, `leaving` and `departed`, so that a scrape
        # sees its counts once, never twice or not at all.
        self.reporting = threading.Lock()
        # What the signal handlers queue for the loop; `signals` if the command caught some before
        # the supervisor existed (see sockd.__main__).
        self.signals: collections.deque[int] = collections.deque() if signals is None else signals
        self.selector = selectors.DefaultSelector()
        self.spawner = Spawner()
        self.notifier = systemd.Notifier()
        self.activated = systemd.listen_fds()
        self.stopping = False
        self.announced_ready = False
        self.reloads = metrics.Reloads(last_success_time=time.time())
        self.outcomes = reloads.Published()  # for `sockd reload`
        self.ignored: set[int] = set()  # the ignored signals that came, each logged once
        self.next_watchdog = time.monotonic()

    def run(self) -> int:
        """Bind everything (raising BindError before anything serves), serve until stopped."""
        # First of all: a stop or a reload sent while sockd starts waits for the loop, rather
        # than ending the process (SIGHUP's default) or raising in the middle of a bind (SIGINT).
        # They stay caught to the end (see _ignore_signals).
        for signum in (*SIGNALS, *IGNORED):
            signal.signal(signum, lambda signum, _: self.signals.append(signum))
        exporter = None
        bounds: dict[str, Bound] = {}
        try:
            make_room(self.config)
            # Said before binding: a listener that then fails to bind may be the one meant.
            for name in sorted(self.activated.keys() - {listener.name for listener in self.config.listeners}):
                log.warning("systemd passed a socket that no listener is named after", name=name)
            deadline = time.monotonic() + BIND_WAIT  # one wait for all: connections end together
            for listener in self.config.listeners:
                bind_listener = functools.partial(self._bind, listener)
                where = {"listener": listener.name, "address": listener.address}
                bounds[listener.name] = self._bind_at_start(bind_listener, tcp_port(listener), deadline, where)
            settings = WorkerSettings.of(self.config, udp_ports(bounds.values()))
            self.groups = {name: self._group(bound.listener, bound, settings) for name, bound in bounds.items()}
            if self.config.metrics.enabled:
                exporter = self._exporter(deadline)
            self.spawner.start()  # before the exporter's thread: nothing forks a threaded process
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
            if exporter is not None:
                exporter.start()
                log.info("metrics", address=exporter.address, path="/metrics")
            for group in self.groups.values():
                group.start()
            self._loop(wakeup_read)
        finally:
            signal.set_wakeup_fd(-1)
            os.close(wakeup_read)
            os.close(wakeup_write)
            if exporter is not None:
                exporter.close()
            self._close_sockets()
            self.spawner.close()
            self.outcomes.close()
            _ignore_signals()
        flush_throttled()
        log.info("stopped")
        return 0

    # -- the loop

    def _loop(self, wakeup: int) -> None:
        while not self.stopping or any(any(group.workers()) for group in self._groups()):
            for key, _ in self.selector.select(self._timeout()):
                if key.data is None:
                    _drain_pipe(wakeup)
                elif key.data():  # a worker's channel (see sockd.group): it has just become ready
                    self._announce_ready()
            self._handle_signals()
            now = time.monotonic()
            for group in self._groups():
                group.tend(now)
            if not self.stopping:  # no new fork server for a stop's drain
                self.spawner.tend(self._worker_pids)
            if any(not any(group.workers()) for group in self.leaving):
                self._depart()
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
        due = [when for group in self._groups() if (when := group.due()) is not None]
        if self.notifier.watchdog_interval:
            due.append(self.next_watchdog)
        # Heartbeats are checked at least this often (see Worker.beating).
        due.append(time.monotonic() + min(BEAT_INTERVAL, self.config.worker_timeout / 4))
        return max(0.0, min(due) - time.monotonic())

    def _groups(self) -> Iterator[Group]:
        yield from self.groups.values()
        yield from self.leaving

    def _worker_pids(self) -> set[int]:
        return {worker.process.pid for group in self._groups() for worker in group.workers()}

    def _group(self, listener: Listener, bound: Bound, settings: WorkerSettings) -> Group:
        return Group(listener, bound, settings, self.selector, self.spawner)

    def _announce_ready(self) -> None:
        """Once, when every listener's workers have all said they serve."""
        if not self.announced_ready and all(group.ready() for group in self.groups.values()):
            self.announced_ready = True
            log.info("ready", listeners=len(self.groups))
            self.notifier.ready(f"serving {len(self.groups)} listeners")

    # -- signals

    def handle_term(self) -> None:
        if self.stopping:
            for group in self._groups():
                group.kill("second stop signal")
            return
        log.info("stopping", shutdown_timeout=self.config.shutdown_timeout)
        self.notifier.stopping("stopping: draining in-flight requests")
        self.stopping = True
        for group in self._groups():
            group.stop()

    handle_int = handle_term

    def handle_chld(self) -> None:
        pass  # every turn of the loop reaps; the signal only wakes it up

    def handle_hup(self) -> None:
        """Reload: read the file, plan, bind every new socket, then carry the plan out. A bad file
        or a socket that cannot be bound changes nothing."""
        if self.stopping:
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
        try:
            new = load(self.path)
        except ConfigError as exc:
            self._reloaded(False, f"reload failed, still serving the previous config: {exc.problems[0]}")
            for problem in exc.problems:
                log.error("config error", problem=problem)
            return
        if new.metrics != self.config.metrics:
            # The endpoint's socket and the histogram's buckets are fixed for the process's life.
            log.warning("metrics settings change at the next restart, not on reload")
            new = new.model_copy(update={"metrics": self.config.metrics})
        try:
            make_room(new)
        except DescriptorLimit as exc:
            self._reloaded(False, f"reload failed, still serving the previous config: {exc}")
            log.error("reload rolled back", error=str(exc))
            return
        # New workers from sockd's old files would not run the new ones: all of them are renewed.
        new_code = self.spawner.code_changed()
        steps = plan([group.listener for group in self.groups.values()], new.listeners, new_code=new_code)
        try:
            fresh = self._bind_new(steps)
            if new_code:
                self._renew_spawner(fresh)
        except (BindError, ForkServerError) as exc:
            self._reloaded(False, f"reload failed, still serving the previous config: {exc}")
            log.error("reload rolled back", error=str(exc))
            return
        if new.logging != self.config.logging:
            configure(new.logging)
            line = b"logging " + new.logging.model_dump_json().encode()
            for group in self._groups():  # the workers of kept listeners too
                group.tell(line)
        self.config = new
        unstarted = self._apply(steps, fresh)
        done = summary(steps)
        if unstarted:  # tried again after a backoff; meanwhile their old workers, if any, serve on
            names = ", ".join(unstarted)
            self._reloaded(False, f"reload failed in part: no new workers for {names}; the old ones serve on")
            log.error("reload failed in part: new workers could not be started", listeners=unstarted, **done)
            return
        self._reloaded(True, "reloaded: " + ", ".join(f"{kind} {len(names)}" for kind, names in done.items()))
        log.info("reloaded", **done)

    def _reloaded(self, success: bool, status: str) -> None:
        last = self.reloads
        self.reloads = metrics.Reloads(
            succeeded=last.succeeded + success,
            failed=last.failed + (not success),
            last_successful=success,
            last_success_time=time.time() if success else last.last_success_time,
        )
        # The reason on its own first, then READY=1 carrying it again, so that `systemctl status`
        # shows why before the reload ends and after.
        self.notifier.status(status)
        self.notifier.ready(status)
        self.outcomes.end(success, status)

    # -- reload

    def _renew_spawner(self, fresh: dict[str, Bound]) -> None:
        """A fork server on sockd's files as they are now; if it does not start, the sockets
        bound for the reload are closed again (ForkServerError) and nothing has changed."""
        try:
            self.spawner.renew()
        except ForkServerError:
            for bound in fresh.values():
                bound.close()
            raise
        log.info("sockd's files changed: new workers run the new code")

    def _bind_new(self, steps: list[Step]) -> dict[str, Bound]:
        """A new socket for each listener whose steps need one, by name; or, if one cannot be
        bound, none at all (BindError), so that the running config stays untouched."""
        fresh: dict[str, Bound] = {}
        try:
            for step in steps:
                if step.binds:
                    fresh[step.name] = self._bind(step.listener)
        except BaseException:
            for bound in fresh.values():
                bound.close()
            raise
        return fresh

    def _apply(self, steps: list[Step], fresh: dict[str, Bound]) -> list[str]:
        """Carry out a reload's steps (of self.config, the new config), with every new socket
        bound: the listeners whose new workers could not all be started."""
        running = self.groups
        bounds = [fresh.get(step.name) or running[step.name].bound for step in steps if step.action != "removed"]
        settings = WorkerSettings.of(self.config, udp_ports(bounds))
        # From now on every worker starts with the new settings (a kept listener's restarted ones
        # too), and every drain that begins and every heartbeat is timed by them.
        for group in self._groups():
            group.settings = settings
        with self.reporting:
            self.groups = {
                step.name: self._group(step.listener, fresh[step.name], settings)
                if step.action == "added"
                else running[step.name]
                for step in steps
                if step.action != "removed"
            }
            # Each leaves once its workers have exited (see _depart).
            self.leaving = [*self.leaving, *(running[step.name] for step in steps if step.action == "removed")]
        unstarted = []
        for step in steps:
            match step.action:
                case "removed":
                    running[step.name].close()
                case "added":
                    if not self.groups[step.name].start():
                        unstarted.append(step.name)
                case "restarted" | "rebound":
                    if step.bind_options_deferred:
                        log.warning(
                            "reuse_port, ipv6_only and freebind apply when a socket is bound", listener=step.name
                        )
                    if not self.groups[step.name].renew(step.listener, fresh.get(step.name)):
                        unstarted.append(step.name)
                case "kept":
                    pass  # same workers, same socket, open connections untouched
        return unstarted

    def _bind(self, listener: Listener) -> Bound:
        if listener.name in self.activated:
            return adopt(listener, self.activated.pop(listener.name))
        try:
            return bind(listener)
        except BindError as exc:
            if not self.activated:
                raise
            names = ", ".join(repr(name) for name in sorted(self.activated))
            raise exc.noting(f"systemd passed sockets named {names}, none named {listener.name!r}") from None

    def _bind_at_start(self, bind: Callable[[], T], port: int, deadline: float, where: dict[str, str]) -> T:
        """Bind a listener or the metrics endpoint (`where` says which, and its address), waiting
        until `deadline` while its TCP `port` is held by connections alone.

        A client connection's TIME-WAIT holds its port for a minute after it closed, even against
        SO_REUSEADDR: `make test` leaves some on the example config's ports, which lie in the
        kernel's range for client ports, and `make run` right after would fail. nginx retries
        its binds at start too. Only at start: a reload must not hold up the loop for a minute.
        A stop signal ends the wait."""
        waiting = False
        while True:
            try:
                return bind()
            except BindError as exc:
                held = connections_holding(port) if exc.errno == errno.EADDRINUSE else None
                stop = any(signum in (signal.SIGTERM, signal.SIGINT) for signum in self.signals)
                if held is None or stop or time.monotonic() > deadline:
                    raise
                if not waiting:
                    log.warning(
                        "address in use by connections, not a server: waiting for them to end",
                        **where,
                        held_by=held,
                        at_most_seconds=round(deadline - time.monotonic(), 1),
                    )
                    waiting = True
            time.sleep(BIND_RETRY)

    # -- metrics

    def _exporter(self, deadline: float) -> metrics.Exporter:
        """The metrics endpoint, its port waited for as a listener's is (see _bind_at_start)."""
        settings = self.config.metrics
        where = {"endpoint": "metrics", "address": f"{settings.host}:{settings.port}"}
        sock = self._bind_at_start(functools.partial(metrics.bind, settings), settings.port, deadline, where)
        return metrics.Exporter(sock, settings.buckets, self.snapshot, self.down)

    def down(self) -> list[str]:
        """The listeners none of whose generations accepts whole (see Group.up), for /healthz.
        Called from the metrics thread."""
        return [name for name, group in self.groups.items() if not group.up()]

    def _depart(self) -> None:
        """Let go of the removed listeners whose workers have all exited, keeping their counts."""
        with self.reporting:
            departed = dict(self.departed)
            for group in self.leaving:
                if not any(group.workers()):
                    _add(departed, group.report())
            self.departed = departed
            self.leaving = [group for group in self.leaving if any(group.workers())]

    def snapshot(self) -> metrics.Snapshot:
        """Each listener's counts as of now, and how the reloads went. A listener removed and
        added back under its name is one listener to Prometheus, its counts summed. Called from
        the metrics thread."""
        with self.reporting:
            current = {name: group.report() for name, group in self.groups.items()}
            leaving_reports = [group.report() for group in self.leaving]
            departed = self.departed
        leaving: dict[str, metrics.ListenerReport] = {}
        for report in leaving_reports:
            _add(current if report.listener.name in current else leaving, report)
        for name, report in departed.items():
            if name in current or name in leaving:
                _add(current if name in current else leaving, report)
        return metrics.Snapshot(list(current.values()), self.reloads, list(leaving.values()))

    def _close_sockets(self) -> None:
        for group in self.groups.values():
            group.bound.close()


def _add(reports: dict[str, metrics.ListenerReport], report: metrics.ListenerReport) -> None:
    name = report.listener.name
    reports[name] = reports[name].plus(report) if name in reports else report


def _ignore_signals() -> None:
    """Once the supervisor is done: its signals are ignored for the little the process has left.
    Until then they were queued (so a HUP during a stop's cleanup could not end the process before
    its socket files were removed); not restored to their default, which would end it with no exit
    status (nor left to the interpreter, which restores the default of a signal it handles as it
    exits)."""
    for signum in (*SIGNALS, *IGNORED):
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
