"""What a worker that is gone leaves behind: its `exec` children (sockd.exec), ended and reaped by
the supervisor.

A worker reaps every child it started before it exits (sockd.exec.Children). One that dies
first (crashed, aborted as hung, killed at shutdown_timeout or for too many old generations)
cannot: its children, each leading a session of its own (setsid), would run on with no timeout,
no count and no bound. The supervisor is a child subreaper (sockd.forkserver), so the kernel
makes them its children, and it does so before it tells the supervisor that the worker died:
once the supervisor has reaped a worker, every process the worker left is already a child of
the supervisor. The supervisor's own children are its workers and its fork servers (it starts
nothing else that outlives a call), so any other child it has is such a leftover, and is ended:

- with SIGKILL at once when the worker's time was up (killed at shutdown_timeout, or by a second
  stop signal): so were the sessions';
- else with SIGTERM, then SIGKILL KILL_AFTER later (as an exec_timeout ends a child), or at the
  stopped worker's shutdown_timeout, if that comes first.

Each is signalled as its process group too (an exec child leads its own), so what it started
goes with it; what it started in a group of its own becomes the supervisor's child as it dies,
and is ended the same way. Each is reaped by its pid, and counted in its listener's
sockd_exec_exits_total by how it ended (`signal`, mostly), as its worker would have counted it;
what those started is reaped, not counted (a worker never counted it either). Why not a process
group or a cgroup per worker: an exec child leaves the worker's group when it calls setsid (it
must: a timeout's signal reaches what it started through its own group), and a cgroup needs a
delegated hierarchy that sockd cannot count on (a container, a plain root shell). Why not the
worker telling the supervisor each child's pid: a message per connection on the channel, and a
pid that may be reused before the supervisor acts; the kernel's reparenting is exact and free.

Not covered: what a leftover starts once the supervisor has reaped all it was ending (taken on
as they become the supervisor's until then); and the processes that outlive a child whose worker
lives on (the worker is no subreaper: they become the supervisor's too, and are ended the next
time a worker is reaped, or reaped as strays when they exit, see sockd.forkserver._reap_strays).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Collection
from dataclasses import dataclass

import structlog

from sockd.counters import EXEC_ERROR, EXEC_OK, EXEC_SIGNAL
from sockd.logging import exit_status

log = structlog.get_logger()

KILL_AFTER = 5.0  # seconds between a leftover's SIGTERM and its SIGKILL, as for a timed-out child

Count = Callable[[int], None]  # adds one to a listener's sockd_exec_exits_total{result}


@dataclass(eq=False)
class Leftover:
    pid: int
    listener: str
    count: Count | None  # None: something a leftover started, reaped but not counted
    kill_at: float  # SIGKILL then if it still runs
    killed: bool = False


def adopted() -> set[int]:
    """This process's children, as the kernel lists them (zombies too): every thread's, since an
    orphan goes to any live thread of its subreaper."""
    found: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as listing:
                found.update(int(pid) for pid in listing.read().split())
        except FileNotFoundError:  # the thread has exited
            continue
    return found


def _signal(pid: int, signum: int) -> None:
    """Signal `pid` and its process group: both ours to signal while it is our unreaped child (its
    pid, and so the group's id, cannot be reused until then)."""
    with contextlib.suppress(ProcessLookupError):  # it leads no group (or the group is empty)
        os.killpg(pid, signum)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


class Orphans:
    """The leftovers being ended, by pid."""

    def __init__(self) -> None:
        self.ending: dict[int, Leftover] = {}

    def __bool__(self) -> bool:
        return bool(self.ending)

    def pids(self) -> set[int]:
        return set(self.ending)

    def adopt(
        self, listener: str, worker: int, known: Collection[int], *, kill_at: float, now: float, count: Count | None
    ) -> None:
        """A worker of `listener` (its pid `worker`) is gone and reaped: end whatever it left, our
        children now that are neither `known` (the workers, the fork servers) nor already ending."""
        pids = sorted(adopted() - set(known) - self.ending.keys())
        if pids:
            at_once = kill_at <= now
            log.warning(
                "ending what a gone worker left running",
                listener=listener,
                worker=worker,
                pids=pids,
                signal="SIGKILL" if at_once else "SIGTERM",
            )
        for pid in pids:
            self._end(Leftover(pid, listener, count, kill_at), now)

    def tend(self, known: Collection[int], now: float) -> None:
        """Reap the leftovers that exited, take on what they started (ours once they die), and kill
        those whose time is up."""
        if not self.ending:
            return
        for leftover in list(self.ending.values()):
            try:
                pid, status = os.waitpid(leftover.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: nothing to count
                pid, status = leftover.pid, -1
            if pid:
                del self.ending[leftover.pid]
                self._ended(leftover, status)
        if self.ending:
            first = next(iter(self.ending.values()))
            for pid in sorted(adopted() - set(known) - self.ending.keys()):
                self._end(Leftover(pid, first.listener, None, min(o.kill_at for o in self.ending.values())), now)
        for leftover in self.ending.values():
            if not leftover.killed and now >= leftover.kill_at:
                leftover.killed = True
                _signal(leftover.pid, signal.SIGKILL)

    def due(self) -> float | None:
        """When `tend` must run next at the latest: a SIGKILL due, or soon for a reap."""
        pending = [leftover.kill_at for leftover in self.ending.values() if not leftover.killed]
        return min(pending, default=None)

    def _end(self, leftover: Leftover, now: float) -> None:
        self.ending[leftover.pid] = leftover
        leftover.killed = now >= leftover.kill_at
        _signal(leftover.pid, signal.SIGKILL if leftover.killed else signal.SIGTERM)

    def _ended(self, leftover: Leftover, status: int) -> None:
        if status < 0:
            return
        code = os.waitstatus_to_exitcode(status)
        log.info("reaped what a gone worker left", listener=leftover.listener, pid=leftover.pid, **exit_status(code))
        if leftover.count is not None:
            leftover.count(EXEC_SIGNAL if code < 0 else EXEC_OK if code == 0 else EXEC_ERROR)
