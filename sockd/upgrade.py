"""Upgrading in place (SIGUSR2): the supervisor re-executes the sockd now on disk with its own pid,
as HAProxy's master re-executes itself and nginx its binary, so that systemd sees no restart, no
listening socket closes (a client connecting meanwhile waits in the backlog) and no session is cut.

First the new program checks the config (`sockd --check`, within CHECK_TIMEOUT): if it refuses
it or fails to run (a broken install), or the exec itself fails, nothing has changed and the old
supervisor serves on. Then everything its successor needs goes into one JSON document
(`Handoff`) in a memfd, whose descriptor and the pid it is meant for are in $SOCKD_UPGRADE: the
listening sockets by listener name with the endpoint each serves, the metrics endpoint's, and
every worker with its channel and shared counters, all made inheritable for the exec.

The workers stay the supervisor's children (the pid is the same, and it is a child subreaper,
which execve keeps; the fork server sets it again all the same), so the new supervisor waits for
them as the old one did. It adopts them (`Adoption`) as an old generation of their listener
(Group.adopt) that accepts until the first generation of its own, forked by a new fork server
from the new code, serves, and then serves its sessions on as a reload's old generation does.
A listener the new config no longer has is retired with its socket closed; one whose address
changed is bound anew. The old fork server exits as its socket closes with the exec, and is
reaped by the new supervisor. Counts go on: the workers' shared counters are read as before,
unless the new version lays them out otherwise (`counters.LAYOUT`), and then they are adopted
without their counts, which the log says.

Signals the supervisor takes are blocked from just before the exec until the new supervisor has
its handlers (see Supervisor.run): a stop or a reload sent meanwhile waits in the kernel for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, Literal, NoReturn

import structlog
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from sockd import __version__, counters
from sockd.config import Listener, MetricsConfig, UnixListener
from sockd.forkserver import Process
from sockd.group import Group, Worker
from sockd.sockets import Bound, reason, retune, set_file
from sockd.spec import WorkerSettings

log = structlog.get_logger()

VARIABLE = "SOCKD_UPGRADE"  # "PID:FD": the handoff's descriptor, for the process of that pid alone
NAME = "sockd-upgrade"
# Seconds the new program's `--check` may take on a loaded machine; the supervisor's loop waits
# meanwhile, well under half of the unit's WatchdogSec (30 s), as for a fork server's start.
CHECK_TIMEOUT = 10.0
MAX_BYTES = 64 << 20  # a handoff names a few hundred bytes per worker


class _State(BaseModel):
    # extra="ignore": one version of sockd writes it, another reads it.
    model_config = ConfigDict(frozen=True, extra="ignore")


class SocketState(_State):
    fd: int
    address: str  # as its listener's log line gives it: the kernel's port for port 0
    file_id: tuple[int, int] | None = None  # the Unix socket file sockd made (see Bound)
    activated: bool = False  # systemd passed it


class WorkerState(_State):
    pid: int
    channel: int | None  # None once stopped: its channel is closed
    counters: int
    buckets: int  # the histogram's buckets in its counters
    generation: int
    accepting: bool  # in a place of its group, or of a generation a reload is replacing
    ready: bool
    # time.monotonic(): CLOCK_MONOTONIC is the system's, the same on both sides of the exec.
    started: float
    stop_at: float | None
    drain_until: float | None
    kill_at: float | None
    cpu_seen: float


class GroupState(_State):
    listener: dict[str, Any]  # as the old config said it (unset fields left out)
    name: str
    endpoint: tuple[str, str]  # protocol and address, as sockd.plan compares them
    address: str
    socket: SocketState | None  # None: a listener a reload removed, whose workers serve on
    replaced: list[SocketState]  # sockets a reload is moving its listener away from
    generation: int
    retired: list[int]  # what its exited workers counted, as counters.Totals.words()
    retired_cpu: float
    restarts: int
    workers: list[WorkerState]


class Handoff(_State):
    format: Literal[1] = 1
    version: str  # the sockd that wrote it
    layout: str  # its counters.LAYOUT
    upgrades: tuple[int, int]  # (ok, failed) so far
    reloads: tuple[int, int, bool, float]  # metrics.Reloads, field by field
    metrics: SocketState | None
    metrics_endpoint: tuple[str, int]  # the metrics settings' host and port
    fork_server: int | None
    groups: list[GroupState]

    def descriptors(self) -> Iterator[int]:
        sockets = [self.metrics, *(s for group in self.groups for s in (group.socket, *group.replaced))]
        yield from (state.fd for state in sockets if state is not None)
        for group in self.groups:
            for worker in group.workers:
                yield worker.counters
                if worker.channel is not None:
                    yield worker.channel


# -- the old supervisor's side


def program() -> list[str]:
    """The command that runs the sockd now on disk where this one was started from: the console
    script that started it (the `sockd` a unit's ExecStart= names, where a reinstall or a new
    link puts the new version), else this interpreter with `-m sockd`, which imports the sockd
    now on its path (`python -m sockd` gives sys.argv[0] as the package's __main__.py)."""
    script = sys.argv[0]
    if os.path.basename(script) != "__main__.py" and os.path.isfile(script) and os.access(script, os.X_OK):
        return [os.path.abspath(script)]
    return [sys.executable, *(["-P"] if sys.flags.safe_path else []), "-m", "sockd"]


def check(command: list[str], path: str) -> str | None:
    """Why the sockd `command` runs cannot take over with the config at `path` (its `--check`
    failed, or did not run), in one line; None if it can."""
    try:
        done = subprocess.run(
            [*command, "--check", "-c", path],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=CHECK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"{command[0]} --check took more than {CHECK_TIMEOUT:g} s"
    except OSError as exc:
        return f"cannot run {command[0]}: {reason(exc)}"
    if done.returncode == 0:
        return None
    # The last line: a traceback's exception, or one of the config's problems.
    said = [line for line in done.stderr.splitlines() if line.strip()]
    return f"{command[0]} --check exited with {done.returncode}" + (f": {said[-1].strip()}" if said else "")


def describe(
    groups: Iterable[Group],
    *,
    leaving: Iterable[Group],
    metrics: socket.socket | None,
    metrics_settings: MetricsConfig,
    fork_server: int | None,
    upgrades: tuple[int, int],
    reloads: tuple[int, int, bool, float],
) -> Handoff:
    """What the supervisor hands its successor."""
    return Handoff(
        version=__version__,
        layout=counters.LAYOUT,
        upgrades=upgrades,
        reloads=reloads,
        metrics=SocketState(fd=metrics.fileno(), address="") if metrics is not None else None,
        metrics_endpoint=(metrics_settings.host, metrics_settings.port),
        fork_server=fork_server,
        groups=[_group_state(group, serving=True) for group in groups]
        + [_group_state(group, serving=False) for group in leaving],
    )


def _group_state(group: Group, serving: bool) -> GroupState:
    listener = group.listener
    accepting = {*(place.worker for place in group.places), *group.replacing}
    return GroupState(
        listener=listener.model_dump(mode="json", exclude_unset=True),
        name=listener.name,
        endpoint=(listener.protocol, listener.address),
        address=group.bound.address,
        socket=_socket_state(group.bound) if serving else None,
        replaced=[_socket_state(bound) for bound in group.replaced_bounds],
        generation=group.generation,
        retired=group.retired.words(),
        retired_cpu=group.retired_cpu,
        restarts=group.restarts,
        workers=[_worker_state(worker, worker in accepting) for worker in group.workers()],
    )


def _socket_state(bound: Bound) -> SocketState:
    return SocketState(fd=bound.sock.fileno(), address=bound.address, file_id=bound.file_id, activated=bound.activated)


def _worker_state(worker: Worker, accepting: bool) -> WorkerState:
    channel = worker.channel.fileno()
    return WorkerState(
        pid=worker.process.pid,
        channel=channel if channel >= 0 else None,
        counters=worker.counters.fd,
        buckets=worker.counters.bucket_count,
        generation=worker.generation,
        accepting=accepting,
        ready=worker.ready,
        started=worker.started,
        stop_at=worker.stop_at,
        drain_until=worker.drain_until,
        kill_at=worker.kill_at,
        cpu_seen=worker.cpu_seen,
    )


def execute(command: list[str], handoff: Handoff, caught: Collection[int], queued: list[int]) -> NoReturn:
    """Re-execute this process as `command`, handing it `handoff`; OSError if the exec failed,
    everything then as it was. `caught`: the signals the supervisor takes, blocked until the new
    supervisor takes them; `queued`: those it took and has not acted on yet, sent again to wait
    in the kernel with them."""
    fd = os.memfd_create(NAME, 0)  # inheritable: the one descriptor of its own the exec keeps open
    descriptors = [*handoff.descriptors()]
    try:
        document = memoryview(handoff.model_dump_json().encode())
        while document:
            document = document[os.write(fd, document) :]
        os.lseek(fd, 0, os.SEEK_SET)
        signal.pthread_sigmask(signal.SIG_BLOCK, caught)
        try:
            for signum in queued:
                os.kill(os.getpid(), signum)
            for descriptor in descriptors:
                os.set_inheritable(descriptor, True)
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(command[0], command, {**os.environ, VARIABLE: f"{os.getpid()}:{fd}"})
        except BaseException:
            for descriptor in descriptors:
                os.set_inheritable(descriptor, False)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, caught)  # the signals sent again come back
            raise
    finally:
        os.close(fd)


# -- the new supervisor's side


def received() -> Handoff | None:
    """The handoff of the supervisor this process was before an upgrade, if it is one; the
    variable is removed, so that no child takes it for its own."""
    value = os.environ.pop(VARIABLE, "")
    pid, _, fd = value.partition(":")
    if pid != str(os.getpid()):
        return None
    with os.fdopen(int(fd), "rb") as file:
        return Handoff.model_validate_json(file.read(MAX_BYTES))


_LISTENER: TypeAdapter[Listener] = TypeAdapter(Listener)


class Adoption:
    """What a supervisor re-executed by an upgrade takes over: each socket, handed to the
    listener of the same name if it serves the same endpoint (`inherit`), the workers, handed to
    their listener's group (`hand_over`), and the metrics endpoint's socket (`metrics`)."""

    def __init__(self, handoff: Handoff) -> None:
        self.handoff = handoff
        self.taken: set[str] = set()  # the listeners whose socket serves on

    def inherit(self, listener: Listener) -> Bound | None:
        """The socket its listener had, if it has the same endpoint: with the listener's options
        applied, as a reload applies them to a socket it keeps."""
        state = next((g for g in self.handoff.groups if g.name == listener.name and g.socket is not None), None)
        if state is None or state.socket is None or state.endpoint != (listener.protocol, listener.address):
            return None
        bound = _bound(listener, state.socket)
        retune(bound.sock, listener)
        if isinstance(listener, UnixListener) and not bound.activated:
            with contextlib.suppress(OSError):  # removed or replaced behind our back: it still serves
                set_file(bound, listener)
        self.taken.add(listener.name)
        return bound

    def moved(self) -> list[str]:
        """The listeners whose socket is closed here: gone from the config, or bound anew."""
        return [g.name for g in self.handoff.groups if g.socket is not None and g.name not in self.taken]

    def hand_over(
        self, groups: dict[str, Group], new_group: Callable[[Listener, Bound], Group], settings: WorkerSettings
    ) -> list[Group]:
        """Give every worker to its listener's group; a listener gone from the config (or gone
        before, its workers serving on) gets a group of its own, retired: returned, to leave."""
        leaving = []
        readable = self.handoff.layout == counters.LAYOUT
        blind = False
        for state in self.handoff.groups:
            current = state.socket is not None and state.name in groups
            try:
                old = _LISTENER.validate_python(state.listener)
            except ValidationError as exc:
                if not current:
                    _abandon(state, f"this sockd cannot read its listener: {exc.errors()[0]['msg']}")
                    continue
                old = groups[state.name].listener  # for the sockets it closes alone
            workers = [_worker(worker, self.handoff.layout, settings.bucket_count) for worker in state.workers]
            blind = blind or any(worker.counters.blind for worker in workers)
            group = groups[state.name] if current else new_group(old, _bound(old, state.socket, state.address))
            if readable and len(state.retired) == len(group.retired.words()):
                group.retired.add(counters.Totals.from_words(state.retired))
            group.retired_cpu += state.retired_cpu
            group.restarts += state.restarts
            replaced = [_bound(old, socket) for socket in state.replaced]
            if current and state.name not in self.taken and state.socket is not None:
                replaced.append(_bound(old, state.socket))  # its address changed: bound anew
            accepting = [worker for worker, was in zip(workers, state.workers, strict=True) if was.accepting]
            group.adopt(workers, accepting, replaced, state.generation)
            if not current:
                if state.socket is not None:
                    group.close()
                leaving.append(group)
        if blind:
            log.warning("the old workers' counts cannot be read: the old sockd lays them out otherwise")
        return leaving

    def metrics(self, settings: MetricsConfig) -> socket.socket | None:
        """The metrics endpoint's socket, if the endpoint is where it was; else it is closed."""
        state = self.handoff.metrics
        if state is None:
            return None
        sock = _socket(state.fd)
        if (settings.host, settings.port) == self.handoff.metrics_endpoint and settings.enabled:
            return sock
        sock.close()
        return None


def _socket(fd: int) -> socket.socket:
    os.set_inheritable(fd, False)  # handed on by the exec; our own again
    return socket.socket(fileno=fd)


def _bound(listener: Listener, state: SocketState | None, address: str = "") -> Bound:
    """The Bound of a socket handed on; with none (a listener removed before, whose socket was
    closed then), one whose socket is closed already, for the address its metrics report."""
    if state is None:
        closed = socket.socket()
        closed.close()
        return Bound(listener, closed, address)
    return Bound(listener, _socket(state.fd), state.address, state.file_id, state.activated)


def _worker(state: WorkerState, layout: str, buckets: int) -> Worker:
    os.set_inheritable(state.counters, False)
    if state.channel is not None:
        channel = _socket(state.channel)
    else:  # stopped: its channel was closed already
        channel = socket.socket()
        channel.close()
    shared = counters.Shared.adopt(state.counters, state.buckets, layout, buckets)
    now = time.monotonic()
    return Worker(
        Process(state.pid),
        channel,
        shared,
        state.generation,
        started=state.started,
        ready=state.ready,
        heartbeat=shared.heartbeat(),
        beat_at=now,
        stop_at=state.stop_at,
        drain_until=state.drain_until,
        kill_at=state.kill_at,
        cpu_seen=state.cpu_seen,
    )


def _abandon(state: GroupState, why: str) -> None:
    """Workers this sockd cannot take over: their channels closed, they drain as a stop does and
    exit, reaped as processes no worker is. Their sockets are closed."""
    log.warning("cannot adopt the workers of a listener; stopping them", listener=state.name, why=why)
    for worker in state.workers:
        for fd in (worker.channel, worker.counters):
            if fd is not None:
                os.close(fd)
    for socket_state in (state.socket, *state.replaced):
        if socket_state is not None:
            os.close(socket_state.fd)
