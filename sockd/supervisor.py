"""The supervisor: binds every listener, runs a worker process per listener, restarts the ones
that die, and stops them all gracefully.

Signal handlers only queue the signal; the main loop takes it off the queue and calls
`handle_<name>` (gunicorn's arbiter). The supervisor knows listeners and processes, never a
model or a handler: those live in the worker.
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
from dataclasses import dataclass, field

import structlog

from sockd import counters, metrics
from sockd.config import Config
from sockd.sockets import BindError, Bound, bind, reason
from sockd.worker import WorkerSpec

log = structlog.get_logger()

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

# Restart backoff: a worker that keeps dying is restarted ever less often, never in a tight loop.
FIRST_BACKOFF, MAX_BACKOFF, STABLE_AFTER = 0.1, 30.0, 60.0


@dataclass(eq=False)
class Worker:
    bound: Bound
    process: subprocess.Popen[bytes]
    channel: socket.socket  # the supervisor's end; closing it tells the worker to stop
    counters: counters.Shared  # what the worker counted, readable even after it died
    started: float = field(default_factory=time.monotonic)
    ready: bool = False


@dataclass
class Slot:
    """One listener's place: its socket, its worker (if running) and its restart schedule."""

    bound: Bound
    retired: counters.Totals  # what its dead workers counted
    worker: Worker | None = None
    backoff: float = 0.0
    restart_at: float | None = None
    restarts: int = 0


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.bucket_count = len(config.metrics.buckets) + 1
        self.slots: list[Slot] = []
        # Held while a dead worker's counts move into its slot's `retired`, so that a scrape
        # never sees them twice or not at all.
        self.counting = threading.Lock()
        self.signals: collections.deque[int] = collections.deque()
        self.selector = selectors.DefaultSelector()
        self.stopping_until: float | None = None
        self.announced_ready = False

    def run(self) -> int:
        """Bind everything (raising BindError before anything serves), serve until stopped."""
        exporter = None
        try:
            for listener in self.config.listeners:
                self.slots.append(Slot(bind(listener), counters.Totals.zero(self.bucket_count)))
            if self.config.metrics.enabled:
                exporter = self._exporter()
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
            for slot in self.slots:
                worker = self._spawn(slot)
                log.info(
                    "listening",
                    listener=slot.bound.listener.name,
                    protocol=slot.bound.listener.protocol,
                    address=slot.bound.address,
                    concurrency=slot.bound.listener.concurrency,
                    handler=slot.bound.listener.handler,
                    pid=worker.process.pid,
                )
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

    def _loop(self, wakeup: int) -> None:
        while not (self.stopping_until is not None and not self._running()):
            for key, _ in self.selector.select(self._timeout()):
                if key.data is None:
                    _drain_pipe(wakeup)
                else:
                    self._on_message(key.data)
            while self.signals:
                name = signal.Signals(self.signals.popleft()).name.removeprefix("SIG").lower()
                getattr(self, f"handle_{name}")()
            self._reap()
            now = time.monotonic()
            if self.stopping_until is not None and now >= self.stopping_until:
                self._kill_all("shutdown_timeout passed")
            for slot in self.slots:
                if slot.restart_at is not None and now >= slot.restart_at and self.stopping_until is None:
                    slot.restarts += 1
                    self._spawn(slot)

    def _timeout(self) -> float | None:
        due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        if self.stopping_until is not None:
            due.append(self.stopping_until)
        return max(0.0, min(due) - time.monotonic()) if due else None

    # -- signals

    def handle_term(self) -> None:
        if self.stopping_until is not None:
            self._kill_all("second stop signal")
            return
        log.info("stopping", shutdown_timeout=self.config.shutdown_timeout)
        self.stopping_until = time.monotonic() + self.config.shutdown_timeout
        for slot in self.slots:
            slot.restart_at = None
            if slot.worker is not None:
                self._retire(slot.worker)

    handle_int = handle_term

    def handle_hup(self) -> None:
        log.warning("SIGHUP received: reloading the config is not supported yet; still serving")

    def handle_chld(self) -> None:
        pass  # every turn of the loop reaps; the signal only wakes it up

    # -- workers

    def _spawn(self, slot: Slot) -> Worker:
        slot.restart_at = None
        ours, theirs = socket.socketpair()
        counters_fd = counters.create(self.bucket_count)
        try:
            spec = WorkerSpec(
                listener=slot.bound.listener,
                logging=self.config.logging,
                listen_fd=slot.bound.sock.fileno(),
                channel_fd=theirs.fileno(),
                counters_fd=counters_fd,
                bounds_ns=self.config.metrics.bounds_ns,
                metrics=self.config.metrics.enabled,
            )
            process = subprocess.Popen(
                [sys.executable, "-m", "sockd.worker", spec.model_dump_json(exclude_unset=True)],
                pass_fds=(spec.listen_fd, spec.channel_fd, counters_fd),
            )
            shared = counters.Shared(counters_fd, self.bucket_count)
        finally:
            theirs.close()
            os.close(counters_fd)  # the worker has its copy; our mapping outlives the descriptor
        worker = Worker(slot.bound, process, ours, shared)
        slot.worker = worker
        self.selector.register(ours, selectors.EVENT_READ, worker)
        log.info("worker started", listener=slot.bound.listener.name, pid=process.pid)
        return worker

    def _on_message(self, worker: Worker) -> None:
        try:
            data = worker.channel.recv(4096)
        except OSError:
            data = b""
        if not data:  # the worker is gone or going: the next reap will tell how it ended
            self._retire(worker)
            return
        if b"ready\n" in data and not worker.ready:
            worker.ready = True
            if not self.announced_ready and all(s.worker and s.worker.ready for s in self.slots):
                self.announced_ready = True
                log.info("ready", listeners=len(self.slots))

    def _retire(self, worker: Worker) -> None:
        """Close our end of the worker's channel: the worker stops accepting, drains and exits."""
        if worker.channel.fileno() >= 0:
            self.selector.unregister(worker.channel)
            worker.channel.close()

    def _reap(self) -> None:
        for slot in self.slots:
            worker = slot.worker
            if worker is None or worker.process.poll() is None:
                continue
            self._retire(worker)
            final = worker.counters.read()
            final.closed = final.connections  # a dead worker holds no connection open
            with self.counting:
                slot.retired.add(final)
                slot.worker = None
            worker.counters.close()
            code = worker.process.returncode
            name = slot.bound.listener.name
            if self.stopping_until is not None:
                log.info("worker exited", listener=name, pid=worker.process.pid, code=code)
                continue
            lived = time.monotonic() - worker.started
            doubled = min(max(slot.backoff * 2, FIRST_BACKOFF), MAX_BACKOFF)
            slot.backoff = FIRST_BACKOFF if lived >= STABLE_AFTER else doubled
            slot.restart_at = time.monotonic() + slot.backoff
            log.warning(
                "worker died; restarting",
                listener=name,
                pid=worker.process.pid,
                code=code,
                restart_in=round(slot.backoff, 3),
            )

    def _running(self) -> list[Worker]:
        return [slot.worker for slot in self.slots if slot.worker is not None]

    def _kill_all(self, why: str) -> None:
        for worker in self._running():
            log.warning("killing worker", listener=worker.bound.listener.name, pid=worker.process.pid, why=why)
            worker.process.kill()
        for worker in self._running():
            worker.process.wait()
        self._reap()

    def _exporter(self) -> metrics.Exporter:
        settings = self.config.metrics
        try:
            return metrics.Exporter(settings, self.reports)
        except OSError as exc:
            raise BindError("the metrics endpoint", f"{settings.host}:{settings.port}", reason(exc)) from None

    def reports(self) -> list[metrics.ListenerReport]:
        """Each listener's counts as of now: its dead workers' plus its live worker's."""
        reports = []
        with self.counting:
            for slot in self.slots:
                totals = counters.Totals.zero(self.bucket_count)
                totals.add(slot.retired)
                worker = slot.worker
                if worker is not None:
                    totals.add(worker.counters.read())
                up = worker is not None and worker.ready
                reports.append(
                    metrics.ListenerReport(slot.bound.listener, slot.bound.address, totals, slot.restarts, up)
                )
        return reports

    def _close_sockets(self) -> None:
        for slot in self.slots:
            slot.bound.close()


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
