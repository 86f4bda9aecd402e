"""Reload planning: what a new config's listeners mean for the running ones, decided by name from
the two lists alone, without a socket or a process (the supervisor carries the plan out).

A listener is kept when nothing about it changed, restarted (a new generation of workers on the
socket it has) when only its options changed, or the contents of the TLS files it names (its
material: new handshakes get the new certificates at once, established sessions go on in the
old workers), or when its workers are to run new code (sockd's files changed: `new_code`),
rebound (a new socket) when its address changed, added, or removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

from sockd.config import Listener, UnixListener
from sockd.tls.material import TLSMaterial

Action = Literal["kept", "restarted", "rebound", "added", "removed"]
ACTIONS: tuple[Action, ...] = get_args(Action)


@dataclass(frozen=True)
class Step:
    """What to do with one listener."""

    action: Action
    listener: Listener  # the new config's; for a removed listener, the running one
    # Restarted with a new reuse_port, ipv6_only or freebind: these wait for a new socket.
    bind_options_deferred: bool = False

    @property
    def name(self) -> str:
        return self.listener.name

    @property
    def binds(self) -> bool:
        """Whether it needs a new socket, bound before anything changes."""
        return self.action in ("rebound", "added")


NO_TLS: Mapping[str, TLSMaterial] = MappingProxyType({})


def plan(
    old: Sequence[Listener],
    new: Sequence[Listener],
    *,
    new_code: bool = False,
    old_tls: Mapping[str, TLSMaterial] = NO_TLS,
    new_tls: Mapping[str, TLSMaterial] = NO_TLS,
) -> list[Step]:
    """The steps from the running listeners to a new config's: the removed ones first, in their
    old order, then every new listener in the new order (the config file's, kept for the log and
    the metrics). With `new_code`, no listener is kept: every one gets new workers. `old_tls` and
    `new_tls`: the TLS material of each side, by listener name."""
    running = {listener.name: listener for listener in old}
    wanted = {listener.name for listener in new}
    removed = [Step("removed", listener) for listener in old if listener.name not in wanted]
    return removed + [
        _step(running.get(listener.name), listener, new_code, old_tls.get(listener.name) == new_tls.get(listener.name))
        for listener in new
    ]


def summary(steps: Iterable[Step]) -> dict[str, list[str]]:
    """The listeners' names by action, in the order of ACTIONS, without the actions nothing took:
    the fields of the "reloaded" log line."""
    names: dict[str, list[str]] = {action: [] for action in ACTIONS}
    for step in steps:
        names[step.action].append(step.name)
    return {action: found for action, found in names.items() if found}


def _step(old: Listener | None, new: Listener, new_code: bool, same_tls: bool) -> Step:
    if old is None:
        return Step("added", new)
    if new == old and same_tls:
        # Same workers, same socket, open connections untouched; unless the workers run old code.
        return Step("restarted" if new_code else "kept", new)
    if _endpoint(new) != _endpoint(old):
        return Step("rebound", new)
    return Step("restarted", new, bind_options_deferred=_bind_options(new) != _bind_options(old))


def _endpoint(listener: Listener) -> tuple[str, str]:
    """What a listener's socket is bound to: a change of it needs a new socket."""
    return listener.protocol, listener.address


def _bind_options(listener: Listener) -> tuple[object, ...]:
    """What only a new socket can change (and a new socket on the same address cannot be bound
    while the old one serves): these apply at the next start or change of address."""
    if isinstance(listener, UnixListener):
        return ()
    return listener.reuse_port, listener.ipv6_only, listener.freebind
