"""One listener's workers (sockd.group), in process: a real `Group` on a real loopback socket, its
workers real processes from a real fork server, driven by turns of a loop as the supervisor drives
it (select on the workers' channels, then `tend`). What it decides is read from the group itself:
restarts and their backoff, the abort of a worker whose heartbeat stopped, and the bound on old
generations that still serve their sessions."""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from sockd.config import Config, InetListener
from sockd.forkserver import Spawner
from sockd.group import ABORT_GRACE, FIRST_BACKOFF, MAX_SERVING, Group, Worker
from sockd.sockets import bind
from sockd.spec import WorkerSettings

from support import TIMEOUT, Session, alive, request, tcp_owner

PR_SET_CHILD_SUBREAPER = 36  # prctl(2)
SESSIONS_TIMEOUT = 120.0  # shutdown_timeout here: longer than any test, so no stopped worker's drain ends early


@dataclass
class Loop:
    """The supervisor's loop, one turn at a time: what the workers say on their channels is heard,
    then the group tends them."""

    group: Group
    selector: selectors.BaseSelector

    def turn(self) -> None:
        for key, _ in self.selector.select(0.05):
            key.data()
        self.group.tend(time.monotonic())

    def until(self, check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s: {what}")
            self.turn()

    def serving(self) -> list[Worker]:
        """The current generation's workers, once every one is in its place and has said it serves."""
        places = self.group.places
        self.until(lambda: all(p.worker is not None and p.worker.ready for p in places), "every worker ready")
        return [place.worker for place in places if place.worker is not None]


def listener(workers: int = 1) -> InetListener:
    return InetListener(
        name="echo", protocol="tcp", host="127.0.0.1", port=0, handler="echo", concurrency="selector", workers=workers
    )


def settings(shutdown_timeout: float = SESSIONS_TIMEOUT, worker_timeout: float = 30.0) -> WorkerSettings:
    config = Config(listeners=[listener()], shutdown_timeout=shutdown_timeout, worker_timeout=worker_timeout)
    return WorkerSettings.of(config, {}, frozenset())


@pytest.fixture
def spawner() -> Iterator[Spawner]:
    """A real fork server, its workers our children as they are the supervisor's (it makes this
    process a subreaper, as sockd's supervisor is). Afterwards this process is no subreaper again:
    the next test's orphans are not ours."""
    spawner = Spawner()
    spawner.start()
    try:
        yield spawner
    finally:
        spawner.close()
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(0), 0, 0, 0)


@contextlib.contextmanager
def running(spawner: Spawner, worker_settings: WorkerSettings, workers: int = 1) -> Iterator[Loop]:
    """A started group of `workers` on a fresh loopback socket; stopped, every worker waited for,
    and its socket closed at the end."""
    selector = selectors.DefaultSelector()
    group = Group(listener(workers), bind(listener(workers)), worker_settings, selector, spawner)
    loop = Loop(group, selector)
    try:
        assert group.start()
        yield loop
    finally:
        group.stop()  # none of its places is started again
        group.kill("the test is over")
        loop.until(lambda: not list(group.workers()), "every worker reaped")
        group.bound.close()
        selector.close()


def test_a_group_starts_its_workers_on_its_socket_and_they_serve(spawner: Spawner) -> None:
    with running(spawner, settings(), workers=2) as loop:
        workers = loop.serving()
        assert len({worker.process.pid for worker in workers}) == 2
        assert loop.group.up()
        assert loop.group.generations() == 1
        assert request(loop.group.bound.address, b"hello") == b"hello"


def killed_and_restarted(loop: Loop) -> float:
    """Kill the group's one worker and wait until it is started again: the backoff it waited."""
    [worker] = loop.serving()
    place, restarts = loop.group.places[0], loop.group.restarts
    os.kill(worker.process.pid, signal.SIGKILL)
    loop.until(lambda: place.restart_at is not None, "the dead worker reaped")
    backoff = place.backoff
    loop.until(lambda: loop.group.restarts == restarts + 1, "the worker started again")
    return backoff


def test_a_worker_that_dies_is_restarted_after_a_backoff_that_doubles_while_it_keeps_dying(spawner: Spawner) -> None:
    with running(spawner, settings()) as loop:
        backoffs = [killed_and_restarted(loop) for _ in range(3)]
        # Each died at once: it is started again ever later, never in a tight loop.
        assert backoffs == [FIRST_BACKOFF, 2 * FIRST_BACKOFF, 4 * FIRST_BACKOFF]
        loop.serving()
        assert request(loop.group.bound.address, b"back") == b"back"


def test_a_worker_whose_heartbeat_stops_is_aborted_then_killed_and_replaced(spawner: Spawner) -> None:
    with running(spawner, settings(worker_timeout=1.0)) as loop:
        [hung] = loop.serving()
        loop.until(lambda: hung.heartbeat != 0, "the first heartbeat seen")
        os.kill(hung.process.pid, signal.SIGSTOP)  # it beats no more, and a SIGABRT cannot end it
        loop.until(lambda: hung.kill_at is not None, "the hung worker aborted")
        assert alive(hung.process.pid)  # stopped: the abort waits for it to run again
        loop.until(lambda: hung.process.returncode is not None, "the hung worker killed", timeout=TIMEOUT + ABORT_GRACE)
        assert hung.process.returncode == -signal.SIGKILL
        loop.until(lambda: loop.group.places[0].worker is not hung, "the killed worker reaped")
        loop.serving()  # its place's new worker
        assert request(loop.group.bound.address, b"alive") == b"alive"


def session_on(worker: Worker, address: str, name: str) -> Session:
    """A session `worker` serves. The generation before it accepts until its retirement reaches
    it (the supervisor does not wait for that): a session it took is closed, and made again."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        session = Session(address, name)
        session.exchange()  # accepted, by one worker or the other
        if tcp_owner(session.sock, [worker.process.pid]) is not None:
            return session
        session.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"no session of {worker.process.pid}'s within {TIMEOUT} s")


def test_past_the_bound_the_oldest_generation_that_serves_sessions_is_stopped(spawner: Spawner) -> None:
    with running(spawner, settings()) as loop:
        group = loop.group
        sessions: list[Session] = []
        olds: list[Worker] = []  # each generation a reload replaced, oldest first
        try:
            for generation in range(MAX_SERVING + 1):
                [worker] = loop.serving()
                sessions.append(session_on(worker, group.bound.address, f"generation {generation}"))
                loop.until(worker.serving, "the session counted by its worker")
                olds.append(worker)
                assert group.renew(group.listener, None)
                loop.serving()  # the new generation serves: the one it replaced is retired
                # The bound holds from the reload on: only one past it is the oldest stopped.
                assert [old.stopped for old in olds] == [len(olds) > MAX_SERVING] + [False] * (len(olds) - 1)
            for session in sessions[1:]:
                session.exchange()  # the old generations within the bound serve on
            loop.until(lambda: olds[0].process.returncode == 0, "the stopped generation's worker exited")
            assert group.generations() == MAX_SERVING + 1  # the current one, and those within the bound
        finally:
            for session in sessions:
                session.close()
