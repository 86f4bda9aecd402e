"""How a worker is told to stop: a `Switch` that select()/poll() and signal handlers can share,
and the two-step `Stop` the worker hands its model (see sockd.worker and sockd.models)."""

from __future__ import annotations

import os
from collections.abc import Callable


class Switch:
    """A one-way switch, set from a signal handler or any thread, and pollable as a descriptor."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.is_set = False
        self._callbacks: list[Callable[[], None]] = []

    def fileno(self) -> int:
        """Readable once the switch is set, so select()/poll() waiters wake up."""
        return self._read_fd

    def on_set(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the switch is set: it may run in a signal handler, so keep it short."""
        self._callbacks.append(callback)

    def set(self) -> None:
        if self.is_set:
            return
        self.is_set = True
        os.write(self._write_fd, b"\0")
        for callback in self._callbacks:
            callback()


class Stop(Switch):
    """How a worker stops, in two steps. Set: accept no more, but go on serving the connections
    open. `end()`: end those too (the models call Service.drain()). A stop takes both at once; a
    generation that a reload replaced takes the second only once its clients are gone, or once
    reload_drain_timeout has passed if the config sets one, so that a reload cuts no session
    before then (HAProxy and nginx keep an old process's connections the same way; their
    hard-stop-after and worker_shutdown_timeout are the bound)."""

    def __init__(self) -> None:
        super().__init__()
        self.ending = Switch()

    def end(self) -> None:
        self.set()
        self.ending.set()
