"""The supervisor's ledger of listeners, for the metrics endpoint: the groups serving, those a
reload removed whose workers still serve, the counts of those gone, how the reloads and
upgrades went, and whether the instance drains (a stop signal came: see sockd.supervisor).

The supervisor's loop changes it; the metrics thread reads it (`snapshot`, `unwell`). A group
moves between serving, leaving and departed under one lock, so that a scrape sees its counts
once, never twice or not at all. What it says of the instance as a whole (`state`: up, drain or
maint) is what the supervisor tells the agent listeners' workers, and /healthz says the same."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

from sockd import metrics
from sockd.group import Group
from sockd.spec import InstanceState
from sockd.tls.material import Expiry


class Ledger:
    def __init__(self) -> None:
        # By listener name, in the config file's order. Once the metrics thread reads it, it is
        # replaced whole, never changed in place.
        self.groups: dict[str, Group] = {}
        self.leaving: list[Group] = []  # removed by a reload; their workers still serve
        # The last counts of removed listeners whose workers have all exited, by name: one added
        # back under the name counts on from them.
        self._departed: dict[str, metrics.ListenerReport] = {}
        self._lock = threading.Lock()
        self.reloads = metrics.Reloads(last_success_time=time.time())
        self.upgrades = metrics.Upgrades()
        # The certificates the config in force presents: replaced whole at the start and by a reload.
        self.certificates: list[Expiry] = []
        # Set by the first stop signal, for good: the instance is on its way out, whether its
        # listeners still accept (drain_delay) or the stop has begun.
        self.draining = False

    def all(self) -> Iterator[Group]:
        """Every group with workers to tend: those serving, and those leaving."""
        yield from self.groups.values()
        yield from self.leaving

    def replace(self, groups: dict[str, Group], removed: Iterable[Group]) -> None:
        """The groups a reload leaves serving, and those it removed (each leaves once its workers
        have exited: see depart)."""
        with self._lock:
            self.groups = groups
            self.leaving = [*self.leaving, *removed]

    def depart(self) -> None:
        """Let go of the removed listeners whose workers have all exited, keeping their counts."""
        if all(any(group.workers()) for group in self.leaving):
            return
        with self._lock:
            departed = dict(self._departed)
            for group in self.leaving:
                if not any(group.workers()):
                    _add(departed, group.report())
            self._departed = departed
            self.leaving = [group for group in self.leaving if any(group.workers())]

    def count_reload(self, success: bool) -> None:
        last = self.reloads
        self.reloads = metrics.Reloads(
            succeeded=last.succeeded + success,
            failed=last.failed + (not success),
            last_successful=success,
            last_success_time=time.time() if success else last.last_success_time,
        )

    def count_upgrade(self, ok: bool) -> None:
        last = self.upgrades
        self.upgrades = metrics.Upgrades(ok=last.ok + ok, failed=last.failed + (not ok))

    def down(self) -> list[str]:
        """The listeners none of whose generations accepts whole (see Group.up)."""
        return [name for name, group in self.groups.items() if not group.up()]

    def unwell(self) -> str | None:
        """Why /healthz answers 503: `draining` from the first stop signal on, else the listeners
        down; None while all is well. Called from the metrics thread."""
        if self.draining:
            return "draining"
        down = self.down()
        return f"down: {', '.join(down)}" if down else None

    def state(self) -> InstanceState:
        """The instance as a balancer's agent is told it: draining, a listener down (maint), or up."""
        if self.draining:
            return "drain"
        return "maint" if self.down() else "up"

    def snapshot(self) -> metrics.Snapshot:
        """Each listener's counts as of now, and how the reloads went. A listener removed and
        added back under its name is one listener to Prometheus, its counts summed. Called from
        the metrics thread."""
        with self._lock:
            current = {name: group.report() for name, group in self.groups.items()}
            leaving_reports = [group.report() for group in self.leaving]
            departed = self._departed
        leaving: dict[str, metrics.ListenerReport] = {}
        for report in leaving_reports:
            _add(current if report.listener.name in current else leaving, report)
        for name, report in departed.items():
            if name in current or name in leaving:
                _add(current if name in current else leaving, report)
        return metrics.Snapshot(
            list(current.values()),
            self.reloads,
            list(leaving.values()),
            self.certificates,
            self.draining,
            self.upgrades,
        )


def _add(reports: dict[str, metrics.ListenerReport], report: metrics.ListenerReport) -> None:
    name = report.listener.name
    reports[name] = reports[name].plus(report) if name in reports else report
