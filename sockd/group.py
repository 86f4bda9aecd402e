"""One listener's worker processes, from their start to their last count.

A `Group` starts its listener's `workers` processes on the listener's socket, hears when each
serves, watches their heartbeats, restarts the ones that die (backing off from 0.1 s to 30 s for
one that keeps dying), aborts the hung ones (SIGABRT: their stacks reach the log, see _abort),
retires, stops and kills them, and keeps what the exited ones counted. The
supervisor decides when groups come, change and go, and tends each on every turn of its loop;
each worker's channel is registered with the loop's selector, its data a callable that reads the
channel and returns True when the worker has just become ready.

Each start is a generation. A supervisor upgraded in place (sockd.upgrade) adopts the workers
its predecessor left as generations of their own (`adopt`). A reload starts a new one, and once
that one serves retires the one before: it accepts no more but serves its open connections on
until their clients close them, or until reload_drain_timeout passes if the config sets one, and
is stopped then as a stop stops a worker, shutdown_timeout to end its drain (see sockd.worker). A
storm of reloads is bounded: past MAX_SERVING old generations the oldest is stopped at once, past
MAX_ALIVE the oldest is killed; so, without a reload_drain_timeout, are the processes that
sessions no client ends keep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import selectors
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import structlog

from sockd import counters, metrics
from sockd.config import Listener, UnixListener
from sockd.counters import BEAT_INTERVAL
from sockd.forkserver import ForkServerError, Process, Spawner
from sockd.logging import exit_status
from sockd.sockets import Bound, reason, retune, set_file
from sockd.spec import InstanceState, WorkerSettings

log = structlog.get_logger()

# Restart backoff: a worker that keeps dying is restarted ever less often, never in a tight loop.
FIRST_BACKOFF, MAX_BACKOFF, STABLE_AFTER = 0.1, 30.0, 60.0
BOOT_TIMEOUT = 30.0  # a worker gets at least this long to start before worker_timeout applies
MAX_SERVING = 4  # old generations serving their sessions on, per listener
MAX_ALIVE = 8  # old generations alive at all (serving, or stopped and draining), per listener
MISSED_BEATS = 2  # a worker whose heartbeat has not moved for this many intervals is reported down
ABORT_GRACE = 1.0  # seconds a hung worker has, after SIGABRT, to write its stacks and die before SIGKILL


@dataclass(eq=False)
class Worker:
    process: Process
    channel: socket.socket  # the supervisor's end; closing it tells the worker to stop
    counters: counters.Shared  # what the worker counted, readable even after it died
    generation: int
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    heartbeat: int = 0  # the last heartbeat seen in its counters
    beat_at: float = field(default_factory=time.monotonic)
    stop_at: float | None = None  # retired under a reload_drain_timeout: stopped then if its clients have not all left
    drain_until: float | None = None  # set once stopped: killed if still running then
    kill_at: float | None = None  # set once aborted as hung: killed if still running then
    cpu_seen: float = 0.0  # the most CPU seconds a scrape has seen it use: its count never goes back

    def serving(self) -> bool:
        """Whether it has connections open, as of its last publication."""
        totals = self.counters.read()
        return totals.connections > totals.closed

    @property
    def stopped(self) -> bool:
        return self.drain_until is not None

    def tell(self, line: bytes) -> None:
        """Say `line` on its channel (see sockd.worker), unless it is stopped or gone."""
        with contextlib.suppress(OSError):  # gone: the next reap will tell how it ended
            if not self.stopped:
                self.channel.send(line + b"\n", socket.MSG_DONTWAIT)

    def beating(self, now: float) -> bool:
        """Whether its heartbeat moved in the last MISSED_BEATS intervals: the last change the
        supervisor's loop saw, or one it has not seen yet. Read from the metrics thread."""
        return self.counters.heartbeat() != self.heartbeat or now - self.beat_at <= MISSED_BEATS * BEAT_INTERVAL


@dataclass(eq=False)
class Place:
    """One of a listener's `workers` positions, with its own restart schedule."""

    worker: Worker | None = None
    backoff: float = 0.0
    restart_at: float | None = None


class Group:
    """One listener: its socket, its current workers (one per place), the older ones still
    draining, and the counts of those that exited."""

    def __init__(
        self,
        listener: Listener,
        bound: Bound,
        settings: WorkerSettings,
        selector: selectors.BaseSelector,
        spawner: Spawner,
    ) -> None:
        self.listener = listener
        self.bound = bound
        # What its workers start with and are timed by; a reload hands every group the new ones.
        self.settings = settings
        self.selector = selector
        self.spawner = spawner
        self.places: list[Place] = []
        self.draining: set[Worker] = set()  # the old generations' workers, and the current ones stopped
        # A generation a reload replaced, still accepting until the new one serves (see renew),
        # and its socket when the new one has another.
        self.replacing: list[Worker] = []
        self.replaced_bounds: list[Bound] = []
        self.generation = 0
        self.retired = counters.Totals.zero(settings.bucket_count)  # what its exited workers counted
        self.retired_cpu = 0.0  # the CPU seconds its exited workers used
        self.restarts = 0
        # What its workers were last told of the instance (see inform); a new worker starts with it.
        self.state: InstanceState = "maint"
        # Held while a worker moves between a place, `draining` and `retired`, so that a scrape
        # never sees a count twice or not at all.
        self.counting = threading.Lock()

    def workers(self) -> Iterator[Worker]:
        yield from [place.worker for place in self.places if place.worker is not None]
        yield from list(self.draining)

    def ready(self) -> bool:
        """Whether every worker it has, draining ones included, has said it serves."""
        return all(worker.ready for worker in self.workers())

    # -- generations

    def start(self) -> bool:
        """A generation of `workers` processes, one per place: False if one could not be started
        (it is tried again after a backoff)."""
        self.generation += 1
        self.places = [Place() for _ in range(self.listener.workers)]
        started = [self._spawn(place) for place in self.places]
        pids = [worker.process.pid for worker in started if worker is not None]
        listener = self.listener
        log.info(
            "listening",
            listener=listener.name,
            protocol=listener.protocol,
            address=self.bound.address,
            concurrency=listener.concurrency,
            handler=listener.handler,
            pids=pids,
        )
        return len(pids) == len(self.places)

    def renew(self, listener: Listener, bound: Bound | None) -> bool:
        """A new generation for a changed listener, on `bound` when its address changed, else on
        the socket it has. The old generation goes on accepting until every new worker serves,
        and is retired then (its socket closed, if it was another): at no moment of a reload does
        nobody accept, and new workers that cannot start leave the old ones serving. False if a
        new worker could not be started."""
        self._vacate(replacing=True)
        # Before the new generation starts, whatever comes between two reloads: the bound holds
        # at every moment of a storm of them, not from the next turn of the loop on.
        self._bound_generations()
        if bound is not None:
            self.replaced_bounds.append(self.bound)
            self.bound = bound
        else:
            self.bound = dataclasses.replace(self.bound, listener=listener)
            retune(self.bound.sock, listener)
            if isinstance(listener, UnixListener):
                try:
                    set_file(self.bound, listener)
                except OSError as exc:  # removed or replaced behind our back: the socket still serves
                    log.warning("cannot apply the socket file's new mode", path=listener.path, error=reason(exc))
        self.listener = listener
        return self.start()

    def adopt(self, workers: list[Worker], accepting: list[Worker], bounds: list[Bound], generation: int) -> None:
        """`workers`: its listener's, started by the supervisor before an upgrade re-executed it
        (see sockd.upgrade); `accepting`: those of them that accepted then, on `bound` or on
        `bounds` (sockets of theirs that are no longer the listener's). They are a reload's old
        generation: they accept until the first generation started here serves, and are retired
        then, their sockets closed; the others go on as they were (retired, or stopped)."""
        self.generation = max(self.generation, generation)
        with self.counting:
            self.draining.update(workers)
            self.replacing += accepting
        self.replaced_bounds += bounds
        for worker in workers:
            if worker.channel.fileno() >= 0:
                self.selector.register(worker.channel, selectors.EVENT_READ, functools.partial(self._hear, worker))

    def retire(self) -> None:
        """Its listener is gone: every generation accepts no more and serves its open connections on
        until the clients close them (or reload_drain_timeout passes, see _retire). None of its
        places is restarted."""
        self._retire([*self._vacate(), *self._replaced()])

    def stop(self) -> None:
        """Every worker stops now (SIGTERM): accepts no more, ends its connections as a drain does,
        exits within shutdown_timeout or is killed."""
        self._vacate()
        self._replaced()
        for worker in list(self.workers()):
            self._stop(worker)

    def close(self) -> None:
        """Its listener is gone: the workers are retired, and the socket is closed (no process
        listens on it any more) and its file removed."""
        self.retire()
        self.bound.close()

    def tell(self, line: bytes) -> None:
        """Say `line` to every worker that still listens (see sockd.worker)."""
        for worker in self.workers():
            worker.tell(line)

    def inform(self, state: InstanceState) -> None:
        """Tell its workers the instance's state, if it changed since they were last told (an
        agent listener answers from it); the workers started later get it in their spec."""
        if state != self.state:
            self.state = state
            self.tell(b"state " + state.encode())

    def generations(self) -> int:
        """How many generations have a worker alive: the current one and those still draining."""
        return len({worker.generation for worker in self.workers()})

    def kill(self, why: str) -> None:
        for worker in list(self.workers()):
            self._kill(worker, why)

    # -- every turn of the supervisor's loop

    def tend(self, now: float) -> None:
        """Reap the workers that exited, kill the hung and the overdue, stop the retired ones whose
        time is up, start the ones due again."""
        self._reap()
        self._check_heartbeats(now)
        # On every turn, not only at a reload: what a worker counted reaches us up to a
        # publication later, and a generation's clients may come and go.
        self._bound_generations()
        for worker in list(self.workers()):
            if worker.kill_at is not None and now >= worker.kill_at:
                self._kill(worker, f"still running {ABORT_GRACE:g} s after SIGABRT")
            elif worker.drain_until is not None and now >= worker.drain_until:
                self._kill(worker, "shutdown_timeout passed")
            elif not worker.stopped and worker.stop_at is not None and now >= worker.stop_at:
                self._stop(worker)
        for place in self.places:
            if place.restart_at is not None and now >= place.restart_at:
                self.restarts += 1
                self._spawn(place)

    def due(self) -> float | None:
        """The next restart, end of a drain or kill of an aborted worker, when `tend` must run at
        the latest."""
        times = [place.restart_at for place in self.places if place.restart_at is not None]
        for worker in self.workers():
            when = worker.drain_until if worker.stopped else worker.stop_at
            if when is not None:
                times.append(when)
            if worker.kill_at is not None:
                times.append(worker.kill_at)
        return min(times, default=None)

    def report(self) -> metrics.ListenerReport:
        """Its counts as of now, its exited workers' and its running ones'. Called from the
        metrics thread."""
        up = self.up()
        with self.counting:
            totals = counters.Totals.zero(self.settings.bucket_count)
            totals.add(self.retired)
            for worker in self.workers():
                totals.add(worker.counters.read())
            cpu, resident = self._usage()
            return metrics.ListenerReport(
                self.listener, self.bound.address, totals, self.restarts, up, self.generations(), cpu, resident
            )

    def up(self) -> bool:
        """Whether a whole generation accepts, each of its workers ready and its heartbeat moving:
        the current one, or, while a reload's new one starts, the one it replaces (which accepts
        until then, see renew). Called from the metrics thread."""
        now = time.monotonic()

        def accepting(workers: list[Worker | None]) -> bool:
            return bool(workers) and all(
                worker is not None and worker.ready and worker.beating(now) for worker in workers
            )

        with self.counting:
            current = [place.worker for place in self.places]
            # A replaced worker that exited leaves `draining` when reaped, and its generation is short.
            replaced = [worker if worker in self.draining else None for worker in self.replacing]
        return accepting(current) or accepting(replaced)

    def _usage(self) -> tuple[float, int]:
        """CPU seconds its workers used, exited ones included, and the memory its live ones hold;
        with `counting` held."""
        cpu, resident = self.retired_cpu, 0
        for worker in self.workers():
            seen = worker.process.cpu_seconds()
            if seen is not None:  # else it has just exited, and not yet been waited for
                worker.cpu_seen = max(worker.cpu_seen, seen)
            cpu += worker.cpu_seen
            resident += worker.process.resident_bytes()
        return cpu, resident

    # -- one worker

    def _spawn(self, place: Place) -> Worker | None:
        """A worker in `place`; or, if none can be started, a restart after the place's backoff,
        as for a worker that died at once."""
        place.restart_at = None
        try:
            worker = self._fork()
        except (OSError, ForkServerError) as exc:
            log.error("cannot start a worker", listener=self.listener.name, error=str(exc))
            self._back_off(place, lived=0.0)
            return None
        place.worker = worker
        self.selector.register(worker.channel, selectors.EVENT_READ, functools.partial(self._hear, worker))
        log.info("worker started", listener=self.listener.name, pid=worker.process.pid)
        return worker

    def _fork(self) -> Worker:
        """A worker process, from the fork server; on failure, no descriptor or mapping left."""
        bucket_count = self.settings.bucket_count
        spec = self.settings.spec(self.listener, self.state).model_dump_json(exclude_unset=True).encode()
        with contextlib.ExitStack() as undo:
            ours, theirs = socket.socketpair()
            undo.callback(ours.close)
            with theirs:  # the worker has its copy
                # Ours kept with the mapping: an upgrade hands it on (see sockd.upgrade).
                shared = counters.Shared(counters.create(bucket_count), bucket_count)
                undo.callback(shared.close)
                process = self.spawner.spawn(spec, [self.bound.sock.fileno(), theirs.fileno(), shared.fd])
            undo.pop_all()
        return Worker(process, ours, shared, self.generation)

    def _hear(self, worker: Worker) -> bool:
        """Read what a worker said on its channel: True when it has just said it serves."""
        try:
            data = worker.channel.recv(4096)
        except OSError:
            data = b""
        if not data:  # the worker is gone or going: the next reap will tell how it ended
            self._hang_up(worker)
            return False
        if b"ready\n" in data and not worker.ready:
            worker.ready = True
            worker.beat_at = time.monotonic()
            if self.replacing and all(place.worker is not None and place.worker.ready for place in self.places):
                replaced = self._replaced()  # the new generation serves: the old one may go
                log.info("replaced", listener=self.listener.name, retired=[w.process.pid for w in replaced])
                self._retire(replaced)
            return True
        return False

    def _replaced(self) -> list[Worker]:
        """The generation a reload replaced, handed over for retiring; its socket, if the new one
        has another, closed."""
        replaced, self.replacing = self.replacing, []
        for bound in self.replaced_bounds:
            bound.close()
        self.replaced_bounds = []
        return replaced

    def _retire(self, workers: list[Worker]) -> None:
        """They accept no more and serve their sessions on: until their clients end them, or,
        under a reload_drain_timeout, until it passes (then `tend` stops them)."""
        timeout = self.settings.reload_drain_timeout
        stop_at = None if timeout is None else time.monotonic() + timeout
        for worker in workers:
            worker.stop_at = stop_at
            worker.tell(b"retire")

    def _vacate(self, replacing: bool = False) -> list[Worker]:
        """Move the current generation's workers out of their places, none to be restarted; with
        `replacing`, into the generation that accepts on until a new one serves (see renew)."""
        vacated = []
        with self.counting:  # a scrape must see each worker in one place or the other, always
            for place in self.places:
                place.restart_at = None
                if place.worker is not None:
                    vacated.append(place.worker)
                    self.draining.add(place.worker)
                    place.worker = None
            if replacing:  # in the same step: /healthz must never see the generation in neither
                self.replacing += vacated
        return vacated

    def _stop(self, worker: Worker) -> None:
        """Close its channel: it accepts no more, ends its connections as a drain does and exits;
        killed if it still runs shutdown_timeout later."""
        if not worker.stopped:
            worker.drain_until = time.monotonic() + self.settings.shutdown_timeout
        self._hang_up(worker)

    def _bound_generations(self) -> None:
        """Past MAX_SERVING old generations serving open connections, stop the oldest; past
        MAX_ALIVE alive at all, kill it. (One whose clients have all gone is on its way out.)"""
        serving = sorted({worker.generation for worker in self.draining if not worker.stopped and worker.serving()})
        for worker in self._of_generations(serving[: max(0, len(serving) - MAX_SERVING)]):
            name, pid = self.listener.name, worker.process.pid
            log.warning("too many old generations; stopping the oldest", listener=name, pid=pid)
            self._stop(worker)
        alive = sorted({worker.generation for worker in self.draining})
        for worker in self._of_generations(alive[: max(0, len(alive) - MAX_ALIVE)]):
            self._kill(worker, "too many old generations")

    def _of_generations(self, generations: list[int]) -> list[Worker]:
        return [worker for worker in self.draining if worker.generation in generations]

    def _hang_up(self, worker: Worker) -> None:
        if worker.channel.fileno() >= 0:
            self.selector.unregister(worker.channel)
            worker.channel.close()

    def _kill(self, worker: Worker, why: str) -> None:
        if worker.process.poll() is None:
            log.warning("killing worker", listener=self.listener.name, pid=worker.process.pid, why=why)
            worker.process.kill()
            worker.process.wait()  # the next turn of the loop reaps it

    def _abort(self, worker: Worker, now: float, why: str) -> None:
        """A hung worker: SIGABRT, on which it writes every thread's stack to stderr (faulthandler,
        see sockd.worker) and dies, so that the log says where it hung; SIGKILLed by `tend` if it
        still runs ABORT_GRACE later (SIGSTOPped, or stuck in the kernel). The loop does not wait."""
        if worker.kill_at is None and worker.process.poll() is None:
            log.warning("killing worker", listener=self.listener.name, pid=worker.process.pid, why=why)
            worker.process.kill(signal.SIGABRT)
            worker.kill_at = now + ABORT_GRACE

    def _check_heartbeats(self, now: float) -> None:
        timeout = self.settings.worker_timeout
        for worker in list(self.workers()):
            if not worker.ready:
                if now - worker.started > max(timeout, BOOT_TIMEOUT):
                    self._abort(worker, now, "never became ready")
                continue  # still starting: its heartbeat begins once it serves
            beat = worker.counters.heartbeat()
            if beat != worker.heartbeat:
                worker.heartbeat, worker.beat_at = beat, now
            elif now - worker.beat_at > timeout:
                self._abort(worker, now, f"no heartbeat for {timeout:g} s")

    def _reap(self) -> None:
        for worker in list(self.workers()):
            if worker.process.poll() is None:
                continue
            self._hang_up(worker)
            final = worker.counters.read()
            final.closed = final.connections  # a dead worker holds no connection open
            place = next((place for place in self.places if place.worker is worker), None)
            with self.counting:
                self.retired.add(final)
                self.retired_cpu += max(worker.cpu_seen, worker.process.exit_cpu_seconds or 0.0)
                self.draining.discard(worker)
                if place is not None:
                    place.worker = None
            worker.counters.close()
            self._exited(worker, place)

    def _exited(self, worker: Worker, place: Place | None) -> None:
        name, pid, code = self.listener.name, worker.process.pid, worker.process.returncode
        if place is None:  # retired: this is the end it was asked for
            log.info("worker exited", listener=name, pid=pid, **exit_status(code))
            return
        self._back_off(place, lived=time.monotonic() - worker.started)
        log.warning(
            "worker died; restarting", listener=name, pid=pid, **exit_status(code), restart_in=round(place.backoff, 3)
        )

    def _back_off(self, place: Place, lived: float) -> None:
        """Start the place's worker again later: soon after a stable one, ever later for one that
        keeps failing."""
        doubled = min(max(place.backoff * 2, FIRST_BACKOFF), MAX_BACKOFF)
        place.backoff = FIRST_BACKOFF if lived >= STABLE_AFTER else doubled
        place.restart_at = time.monotonic() + place.backoff
