"""The supervisor: binds every listener, runs its worker processes, restarts the ones that die or
hang, reloads the config on SIGHUP, and stops them all gracefully.

Signal handlers only queue the signal; the main loop takes it off the queue and calls
`handle_<name>` (gunicorn's arbiter). The supervisor knows listeners, sockets and processes, never
a model or a handler: those live in the worker.
"""

from __future__ import annotations

import collections
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import structlog

from sockd import counters, metrics, systemd
from sockd.config import Config, ConfigError, Listener, UnixListener, load
from sockd.sockets import BindError, Bound, adopt, bind, reason, retune
from sockd.spec import WorkerSpec

log = structlog.get_logger()

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

# Restart backoff: a worker that keeps dying is restarted ever less often, never in a tight loop.
FIRST_BACKOFF, MAX_BACKOFF, STABLE_AFTER = 0.1, 30.0, 60.0
BOOT_TIMEOUT = 30.0  # a worker gets at least this long to start before worker_timeout applies


@dataclass(eq=False)
class Worker:
    slot: Slot
    process: subprocess.Popen[bytes]
    channel: socket.socket  # the supervisor's end; closing it tells the worker to stop
    counters: counters.Shared  # what the worker counted, readable even after it died
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    heartbeat: int = 0  # the last heartbeat seen in its counters
    beat_at: float = field(default_factory=time.monotonic)
    drain_until: float | None = None  # set once told to stop: killed if still running then


@dataclass(eq=False)
class Place:
    """One of a listener's `workers` positions, with its own restart schedule."""

    worker: Worker | None = None
    backoff: float = 0.0
    restart_at: float | None = None


@dataclass(eq=False)
class Slot:
    """One listener: its socket, its current workers, and the older ones still draining."""

    listener: Listener
    bound: Bound
    retired: counters.Totals  # what its exited workers counted
    places: list[Place] = field(default_factory=list)
    draining: set[Worker] = field(default_factory=set)
    restarts: int = 0

    def workers(self) -> Iterator[Worker]:
        yield from [place.worker for place in self.places if place.worker is not None]
        yield from list(self.draining)


class Supervisor:
    def __init__(self, config: Config, path: str | os.PathLike[str]) -> None:
        self.config = config
        self.path = path
        self.bucket_count = len(config.metrics.buckets) + 1
        self.slots: dict[str, Slot] = {}
        self.leaving: list[Slot] = []  # removed by a reload; their workers are still draining
        # Held while counts move between a worker and its slot's `retired`, or slots come and go,
        # so that a scrape never sees a count twice or not at all.
        self.counting = threading.Lock()
        self.signals: collections.deque[int] = collections.deque()
        self.selector = selectors.DefaultSelector()
        self.notifier = systemd.Notifier()
        self.activated = systemd.listen_fds()
        self.stopping = False
        self.announced_ready = False
        self.reloads = metrics.Reloads(last_success_time=time.time())
        self.next_watchdog = time.monotonic()

    def run(self) -> int:
        """Bind everything (raising BindError before anything serves), serve until stopped."""
        exporter = None
        try:
            for listener in self.config.listeners:
                self._add_slot(listener, self._bind(listener))
            if self.config.metrics.enabled:
                exporter = self._exporter()
            for name in self.activated:
                log.warning("systemd passed a socket that no listener is named after", name=name)
        except BaseException:
            self._close_sockets()
            raise
        wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
        self.selector.register(wakeup_read, selectors.EVENT_READ, None)
        for signum in SIGNALS:
            signal.signal(signum, lambda signum, _: self.signals.append(signum))
        try:
            if exporter is not None:
                exporter.start()
                log.info("metrics", address=exporter.address, path="/metrics")
            for slot in self.slots.values():
                self._start(slot)
            self._loop(wakeup_read)
        finally:
            for signum in SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            os.close(wakeup_read)
            os.close(wakeup_write)
            if exporter is not None:
                exporter.close()
            self._close_sockets()
        log.info("stopped")
        return 0

    # -- the loop

    def _loop(self, wakeup: int) -> None:
        while not (self.stopping and not any(self._workers())):
            for key, _ in self.selector.select(self._timeout()):
                if key.data is None:
                    _drain_pipe(wakeup)
                else:
                    self._on_message(key.data)
            while self.signals:
                name = signal.Signals(self.signals.popleft()).name.removeprefix("SIG").lower()
                try:
                    getattr(self, f"handle_{name}")()
                except Exception:  # a bug or a failed fork must not take every listener down
                    log.exception("handling a signal failed", signal=name)
            self._reap()
            now = time.monotonic()
            self._check_heartbeats(now)
            for worker in list(self._workers()):
                if worker.drain_until is not None and now >= worker.drain_until:
                    self._kill(worker, "shutdown_timeout passed")
            for slot in self.slots.values():
                for place in slot.places:
                    if place.restart_at is not None and now >= place.restart_at and not self.stopping:
                        slot.restarts += 1
                        self._spawn(slot, place)
            if self.notifier.watchdog_interval and now >= self.next_watchdog:
                # Only a turning loop pings: a supervisor stuck anywhere gets restarted by systemd.
                self.notifier.watchdog()
                self.next_watchdog = now + self.notifier.watchdog_interval

    def _timeout(self) -> float:
        due = [p.restart_at for slot in self.slots.values() for p in slot.places if p.restart_at is not None]
        due += [worker.drain_until for worker in self._workers() if worker.drain_until is not None]
        if self.notifier.watchdog_interval:
            due.append(self.next_watchdog)
        # Heartbeats are checked at least this often.
        due.append(time.monotonic() + min(1.0, self.config.worker_timeout / 4))
        return max(0.0, min(due) - time.monotonic())

    def _workers(self) -> Iterator[Worker]:
        for slot in [*self.slots.values(), *self.leaving]:
            yield from slot.workers()

    # -- signals

    def handle_term(self) -> None:
        if self.stopping:
            for worker in list(self._workers()):
                self._kill(worker, "second stop signal")
            return
        log.info("stopping", shutdown_timeout=self.config.shutdown_timeout)
        self.notifier.stopping("stopping: draining in-flight requests")
        self.stopping = True
        for slot in self.slots.values():
            for place in slot.places:
                place.restart_at = None
        for worker in list(self._workers()):
            self._retire(worker)

    handle_int = handle_term

    def handle_chld(self) -> None:
        pass  # every turn of the loop reaps; the signal only wakes it up

    def handle_hup(self) -> None:
        if self.stopping:
            return
        self.notifier.reloading()
        log.info("reloading", path=str(self.path))
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
        old, self.config = self.config, new  # the new workers start with the new settings
        try:
            plan = self._apply(new)
        except BindError as exc:
            self.config = old
            self._reloaded(False, f"reload failed, still serving the previous config: {exc}")
            log.error("reload rolled back", error=str(exc))
            return
        summary = ", ".join(f"{kind} {len(names)}" for kind, names in plan.items())
        self._reloaded(True, f"reloaded: {summary}")
        log.info("reloaded", **plan)

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

    # -- reload

    def _apply(self, new: Config) -> dict[str, list[str]]:
        """Move to `new`'s listeners: every new socket is bound before anything changes, so a
        bind failure leaves the running config untouched (BindError)."""
        wanted = {listener.name: listener for listener in new.listeners}
        fresh: dict[str, Bound] = {}
        try:
            for name, listener in wanted.items():
                old = self.slots.get(name)
                if old is None or _endpoint(old.listener) != _endpoint(listener):
                    fresh[name] = self._bind(listener)
        except BaseException:
            for bound in fresh.values():
                bound.close()
            raise
        plan: dict[str, list[str]] = {"kept": [], "restarted": [], "rebound": [], "added": [], "removed": []}
        for name in [name for name in self.slots if name not in wanted]:
            self._remove(self.slots[name])
            plan["removed"].append(name)
        for name, listener in wanted.items():
            plan[self._renew(listener, fresh.get(name))].append(name)
        # Keep the config file's order, for the log and the metrics.
        with self.counting:
            self.slots = {name: self.slots[name] for name in wanted}
        return {kind: names for kind, names in plan.items() if names}

    def _remove(self, slot: Slot) -> None:
        """Stop accepting, let the workers drain, close the socket (and remove its file)."""
        with self.counting:
            del self.slots[slot.listener.name]
            if any(slot.workers()):  # it leaves once they have drained (see _reap)
                self.leaving.append(slot)
        for place in slot.places:
            place.restart_at = None
        for worker in list(slot.workers()):
            self._retire(worker)
        slot.bound.close()

    def _renew(self, listener: Listener, fresh: Bound | None) -> str:
        """Bring one listener to its new config; `fresh` is its new socket if its address changed."""
        slot = self.slots.get(listener.name)
        if slot is None:
            assert fresh is not None
            self._add_slot(listener, fresh)
            self._start(self.slots[listener.name])
            return "added"
        if listener == slot.listener:
            return "kept"  # same workers, same socket, open connections untouched
        # A new generation of workers; the old one stops accepting and drains.
        for worker in list(slot.workers()):
            self._retire(worker)
        if fresh is not None:
            slot.bound.close()
            slot.bound, kind = fresh, "rebound"
        else:
            slot.bound, kind = Bound(listener, slot.bound.sock, slot.bound.address, slot.bound.file_id), "restarted"
            retune(slot.bound.sock, listener)
            if _bind_options(listener) != _bind_options(slot.listener):
                log.warning("reuse_port, ipv6_only and freebind apply when a socket is bound", listener=listener.name)
            if isinstance(listener, UnixListener):
                try:
                    os.chmod(listener.path, listener.mode_bits)
                except FileNotFoundError:  # removed behind our back: the socket still serves
                    log.warning("socket file is gone; its new mode cannot be applied", path=listener.path)
        slot.listener = listener
        self._start(slot)
        return kind

    # -- workers

    def _add_slot(self, listener: Listener, bound: Bound) -> None:
        with self.counting:
            self.slots[listener.name] = Slot(listener, bound, counters.Totals.zero(self.bucket_count))

    def _bind(self, listener: Listener) -> Bound:
        if listener.name in self.activated:
            return adopt(listener, self.activated.pop(listener.name))
        return bind(listener)

    def _start(self, slot: Slot) -> None:
        slot.places = [Place() for _ in range(slot.listener.workers)]
        pids = [self._spawn(slot, place).process.pid for place in slot.places]
        listener = slot.listener
        log.info(
            "listening",
            listener=listener.name,
            protocol=listener.protocol,
            address=slot.bound.address,
            concurrency=listener.concurrency,
            handler=listener.handler,
            pids=pids,
        )

    def _spawn(self, slot: Slot, place: Place) -> Worker:
        place.restart_at = None
        ours, theirs = socket.socketpair()
        counters_fd = counters.create(self.bucket_count)
        try:
            spec = WorkerSpec(
                listener=slot.listener,
                logging=self.config.logging,
                listen_fd=slot.bound.sock.fileno(),
                channel_fd=theirs.fileno(),
                counters_fd=counters_fd,
                buckets=self.config.metrics.buckets,
                metrics=self.config.metrics.enabled,
                shutdown_timeout=self.config.shutdown_timeout,
                worker_timeout=self.config.worker_timeout,
            )
            process = subprocess.Popen(
                [sys.executable, "-m", "sockd.worker", spec.model_dump_json(exclude_unset=True)],
                pass_fds=(spec.listen_fd, spec.channel_fd, counters_fd),
            )
            shared = counters.Shared(counters_fd, self.bucket_count)
        finally:
            theirs.close()
            os.close(counters_fd)  # the worker has its copy; our mapping outlives the descriptor
        worker = Worker(slot, process, ours, shared)
        place.worker = worker
        self.selector.register(ours, selectors.EVENT_READ, worker)
        log.info("worker started", listener=slot.listener.name, pid=process.pid)
        return worker

    def _on_message(self, worker: Worker) -> None:
        try:
            data = worker.channel.recv(4096)
        except OSError:
            data = b""
        if not data:  # the worker is gone or going: the next reap will tell how it ended
            self._close_channel(worker)
            return
        if b"ready\n" in data and not worker.ready:
            worker.ready = True
            worker.beat_at = time.monotonic()
            if not self.announced_ready and all(w.ready for s in self.slots.values() for w in s.workers()):
                self.announced_ready = True
                log.info("ready", listeners=len(self.slots))
                self.notifier.ready(f"serving {len(self.slots)} listeners")

    def _retire(self, worker: Worker) -> None:
        """Tell a worker to stop: it stops accepting, drains for up to shutdown_timeout and exits."""
        with self.counting:  # a scrape must see the worker in one place or the other, always
            for place in worker.slot.places:
                if place.worker is worker:
                    place.worker = None
                    worker.slot.draining.add(worker)
        if worker.drain_until is None:
            worker.drain_until = time.monotonic() + self.config.shutdown_timeout
        self._close_channel(worker)

    def _close_channel(self, worker: Worker) -> None:
        if worker.channel.fileno() >= 0:
            self.selector.unregister(worker.channel)
            worker.channel.close()

    def _kill(self, worker: Worker, why: str) -> None:
        if worker.process.poll() is None:
            log.warning("killing worker", listener=worker.slot.listener.name, pid=worker.process.pid, why=why)
            worker.process.kill()
            worker.process.wait()  # the next turn of the loop reaps it

    def _check_heartbeats(self, now: float) -> None:
        timeout = self.config.worker_timeout
        for worker in list(self._workers()):
            if not worker.ready:
                if now - worker.started > max(timeout, BOOT_TIMEOUT):
                    self._kill(worker, "never became ready")
                continue  # still starting: its heartbeat begins once it serves
            beat = worker.counters.heartbeat()
            if beat != worker.heartbeat:
                worker.heartbeat, worker.beat_at = beat, now
            elif now - worker.beat_at > timeout:
                self._kill(worker, f"no heartbeat for {timeout:g} s")

    def _reap(self) -> None:
        for worker in list(self._workers()):
            if worker.process.poll() is None:
                continue
            slot = worker.slot
            self._close_channel(worker)
            final = worker.counters.read()
            final.closed = final.connections  # a dead worker holds no connection open
            place = next((place for place in slot.places if place.worker is worker), None)
            with self.counting:
                slot.retired.add(final)
                slot.draining.discard(worker)
                if place is not None:
                    place.worker = None
                if slot in self.leaving and not any(slot.workers()):
                    self.leaving.remove(slot)
            worker.counters.close()
            self._exited(slot, worker, place)

    def _exited(self, slot: Slot, worker: Worker, place: Place | None) -> None:
        name, pid, code = slot.listener.name, worker.process.pid, worker.process.returncode
        if place is None or self.stopping:  # told to stop: this is the end it was asked for
            log.info("worker exited", listener=name, pid=pid, code=code)
            return
        lived = time.monotonic() - worker.started
        doubled = min(max(place.backoff * 2, FIRST_BACKOFF), MAX_BACKOFF)
        place.backoff = FIRST_BACKOFF if lived >= STABLE_AFTER else doubled
        place.restart_at = time.monotonic() + place.backoff
        log.warning("worker died; restarting", listener=name, pid=pid, code=code, restart_in=round(place.backoff, 3))

    # -- metrics

    def _exporter(self) -> metrics.Exporter:
        settings = self.config.metrics
        try:
            return metrics.Exporter(settings, self.snapshot)
        except OSError as exc:
            raise BindError("the metrics endpoint", f"{settings.host}:{settings.port}", reason(exc)) from None

    def snapshot(self) -> metrics.Snapshot:
        """Each listener's counts as of now (its exited workers' plus its running ones'), and
        how the reloads went. Called from the metrics thread."""
        reports = []
        with self.counting:
            for slot in self.slots.values():
                totals = counters.Totals.zero(self.bucket_count)
                totals.add(slot.retired)
                for worker in slot.workers():
                    totals.add(worker.counters.read())
                up = bool(slot.places) and all(p.worker is not None and p.worker.ready for p in slot.places)
                reports.append(metrics.ListenerReport(slot.listener, slot.bound.address, totals, slot.restarts, up))
        return metrics.Snapshot(reports, self.reloads)

    def _close_sockets(self) -> None:
        for slot in self.slots.values():
            slot.bound.close()


def _endpoint(listener: Listener) -> tuple[str, str]:
    """What a listener's socket is bound to: a change of it needs a new socket."""
    return listener.protocol, listener.address


def _bind_options(listener: Listener) -> tuple[object, ...]:
    """What only a new socket can change (and a new socket on the same address cannot be bound
    while the old one serves): these apply at the next start or change of address."""
    if isinstance(listener, UnixListener):
        return ()
    return listener.reuse_port, listener.ipv6_only, listener.freebind


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
