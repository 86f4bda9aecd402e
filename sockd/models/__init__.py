"""Concurrency models: one small interface, one module each, and the registry of their names.

A model serves one listening socket with one listener's handler until `stop` is set. What a
connection's life is (admission, the handler, delays, timeouts, the drain, counting) is decided
by sockd.lifecycle; a model only waits and moves bytes, and owns every thread, timer and
connection it creates. Its duties, whichever way it waits:

1. Take the listening socket as non-blocking: its O_NONBLOCK flag lives on the open file
   description, which every worker sharing the socket sees, so no model may rely on a blocking
   accept() or recvfrom(). Wait for work without spinning (busy_poll excepted: spinning is its
   point).
2. Accept through `shared.admit` (the listener's limits; a refused connection is closed at once,
   an EOF to its client: see shared.refuse),
   then drive a `lifecycle.Stream` per connection, giving it a transport; feed datagrams to a
   `lifecycle.Datagrams`. A relaying model joins each client to its upstream (sockd.relay).
3. When accept() fails for want of descriptors (`shared.accept_failed`), keep serving the open
   connections and accept again after RESOURCE_PAUSE.
4. Count on a Recorder from `stats.recorder()`, one per thread. Beat: an event loop calls
   `stats.beat()` at least every BEAT_INTERVAL; a blocking thread marks `recorder.busy_since`
   while it works on a request, so a stuck request stops the heartbeat.
5. Once `stop` is set, accept no more but go on serving the connections open; once
   `stop.ending` is set, call `Service.stop()` (the drain). Return when both are set, no
   connection is open and no delayed reply is due. (A datagram listener has no connection to
   keep: it may treat the first step as both.)

The registry below is the one list of models: config.py takes the names that can relay from it,
and a test checks it against the `ModelName` the config file accepts. Modules are imported only
when used (so uvloop loads only where asked for, and the supervisor loads none).
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sockd.config import Listener, ModelName
    from sockd.counters import Stats
    from sockd.handlers import Handler


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
    open. `end()`: end those too, as Service.stop() does. A stop takes both at once; a
    generation that a reload replaced takes the second once its clients are gone or
    shutdown_timeout has passed, so that a reload never cuts a session (HAProxy and nginx keep
    an old process's connections the same way)."""

    def __init__(self) -> None:
        super().__init__()
        self.ending = Switch()

    def end(self) -> None:
        self.set()
        self.ending.set()


class Model(Protocol):
    def __init__(self, listener: Listener, handler: Handler, stats: Stats, udp_ports: frozenset[int]) -> None:
        """`udp_ports`: the ports of the daemon's UDP listeners, for the Service (see
        lifecycle.REFLECTORS)."""

    def serve(self, sock: socket.socket, stop: Stop) -> None:
        """Serve `sock` until `stop` is set, its open connections until `stop.ending` is set or
        they close, then finish the requests in flight and return."""


@dataclass(frozen=True)
class Kind:
    """A model's entry in the registry: where it lives and what it can do."""

    module: str
    relays: bool = False  # can serve handler: relay (holds two sockets per client)


MODELS: dict[ModelName, Kind] = {
    "iterative": Kind("sockd.models.iterative"),
    "threaded": Kind("sockd.models.threaded"),
    "thread_pool": Kind("sockd.models.thread_pool"),
    "selector": Kind("sockd.models.selector", relays=True),
    "busy_poll": Kind("sockd.models.busy_poll", relays=True),  # the selector's loop, never waiting
    "asyncio": Kind("sockd.models.aio", relays=True),
}


def load(name: ModelName) -> type[Model]:
    """The model called `name`, its module imported now."""
    model: type[Model] = importlib.import_module(MODELS[name].module).Model
    return model
