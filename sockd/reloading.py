"""A reload (SIGHUP) as one transaction. `prepare` reads the file (and the TLS files it names),
plans, binds every new socket and renews the fork server if sockd's files changed: if any of it
fails, nothing has changed (Refused says why). `apply` then carries the plan out on the
supervisor's groups."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from sockd.config import ConfigError, Listener
from sockd.descriptors import DescriptorLimit, make_room
from sockd.forkserver import ForkServerError, Spawner
from sockd.group import Group
from sockd.ledger import Ledger
from sockd.plan import Step, plan
from sockd.sockets import BindError, Bound, udp_ports
from sockd.spec import WorkerSettings
from sockd.tls.material import Loaded, load_config

log = structlog.get_logger()


class Refused(Exception):
    """A reload that changed nothing; the message, one line, says why, and `problems` are those
    of the config file, if that is why."""

    def __init__(self, reason: str, problems: Sequence[str] = ()) -> None:
        super().__init__(reason)
        self.problems = problems

    def log(self) -> None:
        """Said once the reload's outcome is known everywhere (systemd, `sockd reload`, /metrics)."""
        if self.problems:
            for problem in self.problems:
                log.error("config error", problem=problem)
        else:
            log.error("reload rolled back", error=str(self))


@dataclass(frozen=True)
class Prepared:
    """A reload ready to carry out: the new config and its TLS material, its steps, and the
    sockets bound for them."""

    loaded: Loaded
    steps: list[Step]
    fresh: dict[str, Bound]  # by listener name


def prepare(
    path: str | os.PathLike[str],
    running: Loaded,
    serving: list[Listener],
    spawner: Spawner,
    bind: Callable[[Listener], Bound],
) -> Prepared:
    """Everything a reload of the file at `path` needs before it changes anything (Refused if
    something is missing): the config in force and its material are `running`, its groups serve
    `serving`."""
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        raise Refused(exc.problems[0], exc.problems) from None
    new = loaded.config
    if new.metrics != running.config.metrics:
        # The endpoint's socket and the histogram's buckets are fixed for the process's life.
        log.warning("metrics settings change at the next restart, not on reload")
        new = new.model_copy(update={"metrics": running.config.metrics})
        loaded = dataclasses.replace(loaded, config=new)
    try:
        make_room(new)
        # New workers from sockd's old files would not run the new ones: all of them are renewed.
        new_code = spawner.code_changed()
        steps = plan(serving, new.listeners, new_code=new_code, old_tls=running.material, new_tls=loaded.material)
        fresh = _bind_new(steps, bind)
        if new_code:
            _renew_spawner(spawner, fresh)
    except (DescriptorLimit, BindError, ForkServerError) as exc:
        raise Refused(str(exc)) from None
    return Prepared(loaded, steps, fresh)


def _bind_new(steps: list[Step], bind: Callable[[Listener], Bound]) -> dict[str, Bound]:
    """A new socket for each listener whose steps need one, by name; or, if one cannot be
    bound, none at all (BindError), so that the running config stays untouched."""
    fresh: dict[str, Bound] = {}
    try:
        for step in steps:
            if step.binds:
                fresh[step.name] = bind(step.listener)
    except BaseException:
        for bound in fresh.values():
            bound.close()
        raise
    return fresh


def _renew_spawner(spawner: Spawner, fresh: dict[str, Bound]) -> None:
    """A fork server on sockd's files as they are now; if it does not start, the sockets
    bound for the reload are closed again (ForkServerError) and nothing has changed."""
    try:
        spawner.renew()
    except ForkServerError:
        for bound in fresh.values():
            bound.close()
        raise
    log.info("sockd's files changed: new workers run the new code")


def apply(
    prepared: Prepared, ledger: Ledger, new_group: Callable[[Listener, Bound, WorkerSettings], Group]
) -> list[str]:
    """Carry out a prepared reload's steps on the ledger's groups: the listeners whose new
    workers could not all be started (tried again after a backoff)."""
    running = ledger.groups
    settings = _settings(prepared, running)
    # From now on every worker starts with the new settings (a kept listener's restarted ones
    # too), and every drain that begins and every heartbeat is timed by them.
    for group in ledger.all():
        group.settings = settings
    groups = {
        step.name: _group_for(step, running, prepared.fresh, settings, new_group)
        for step in prepared.steps
        if step.action != "removed"
    }
    ledger.replace(groups, [running[step.name] for step in prepared.steps if step.action == "removed"])
    everyone = {**running, **groups}  # each removed listener's group, and each staying one
    fresh = prepared.fresh
    return [step.name for step in prepared.steps if not _carry_out(step, everyone[step.name], fresh.get(step.name))]


def _settings(prepared: Prepared, running: dict[str, Group]) -> WorkerSettings:
    """The workers' settings under the new config, with the UDP ports of its sockets."""
    staying = [step.name for step in prepared.steps if step.action != "removed"]
    ports = udp_ports(prepared.fresh.get(name) or running[name].bound for name in staying)
    return WorkerSettings.of(prepared.loaded.config, prepared.loaded.material, ports)


def _group_for(
    step: Step,
    running: dict[str, Group],
    fresh: dict[str, Bound],
    settings: WorkerSettings,
    new_group: Callable[[Listener, Bound, WorkerSettings], Group],
) -> Group:
    """The group a staying listener has after the reload: a new one for an added listener."""
    return new_group(step.listener, fresh[step.name], settings) if step.action == "added" else running[step.name]


def _carry_out(step: Step, group: Group, fresh: Bound | None) -> bool:
    """One step, on its listener's group: whether the workers it starts (if any) all started."""
    match step.action:
        case "removed":
            group.close()
        case "added":
            return group.start()
        case "restarted" | "rebound":
            if step.bind_options_deferred:
                log.warning("reuse_port, ipv6_only and freebind apply when a socket is bound", listener=step.name)
            return group.renew(step.listener, fresh)
        case "kept":
            pass  # same workers, same socket, open connections untouched
    return True
