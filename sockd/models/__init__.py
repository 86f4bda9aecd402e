"""Concurrency models: one small interface, one module each.

A model serves one listening socket with one handler until `stop` is set, then stops accepting,
finishes what is in flight and returns. It owns every thread, timer and connection it creates;
the worker process only builds it and calls `serve`. Whatever the model, the listening socket is
treated as non-blocking: its O_NONBLOCK flag lives on the open file description, which every
worker sharing the socket sees, so no model may rely on a blocking accept() or recvfrom().
"""

from __future__ import annotations

import errno
import importlib
import os
import socket
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from sockd.config import Listener, ModelName
from sockd.counters import RESOURCES, TOO_LARGE, Recorder, Stats
from sockd.handlers import Handler, TooLarge
from sockd.limits import Throttled

log = structlog.get_logger()

# Where a datagram came from, as recvfrom() says: (host, port[, ...]) or a Unix path.
Address = tuple[Any, ...] | str

# accept() failing for want of descriptors or memory: pause accepting this long and retry, while
# the connections already open go on being served (rather than spinning, or dying).
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RESOURCE_PAUSE = 0.1

# Stop reading from a peer whose counterpart has this many bytes waiting for it, until they are
# taken: a client that sends but never reads gets back-pressure, not a server that grows without bound.
HIGH_WATER = 1 << 20


def accept_failed(exc: OSError, recorder: Recorder) -> None:
    """Re-raise what accept() failed with, unless it is running out of resources: then count it
    and say so; the caller pauses accepting for RESOURCE_PAUSE in its own idiom."""
    if exc.errno not in OUT_OF_RESOURCES:
        raise exc
    recorder.errors[RESOURCES] += 1
    _out_of_resources(error=exc.strerror, pause=RESOURCE_PAUSE)


_out_of_resources = Throttled("cannot accept: out of resources; pausing")


def datagram_reply(handler: Handler, data: bytes, recorder: Recorder) -> bytes | None:
    """The handler's reply to a datagram: None for none, and for a datagram over
    max_message_size (counted), which is dropped."""
    try:
        return handler.datagram(data)
    except TooLarge:
        recorder.errors[TOO_LARGE] += 1
        return None


class Stop:
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


class Model(Protocol):
    def serve(self, sock: socket.socket, stop: Stop) -> None:
        """Serve `sock` until `stop` is set, then finish the requests in flight and return."""


ModelFactory = Callable[[Listener, Handler, Stats], Model]

_MODULES: dict[ModelName, str] = {
    "iterative": "sockd.models.iterative",
    "threaded": "sockd.models.threaded",
    "thread_pool": "sockd.models.thread_pool",
    "busy_poll": "sockd.models.busy_poll",
    "selector": "sockd.models.selector",
    "asyncio": "sockd.models.aio",
}


def factory(name: ModelName) -> ModelFactory:
    """The model called `name`, imported only when used (so uvloop loads only where asked for)."""
    model: ModelFactory = importlib.import_module(_MODULES[name]).Model
    return model


def shutdown_read(fd: int) -> None:
    """End a connection's input, so the model sees EOF once what the client already sent is read.

    This is how every model drains: a blocked recv() wakes up, the handler answers what it has,
    and the connection closes the way it does when the client hangs up first. Only a connection
    that has had at least one answer is ended at once: a client that has just connected is
    answered first, as its request may still be on its way (ending it then would reset it). It
    works on the bare descriptor because uvloop's transport sockets refuse shutdown(), and without
    dup(), which fails when descriptors have run out (when a drain matters most)."""
    try:
        sock = socket.socket(fileno=fd)
    except (OSError, ValueError):  # already closed (its fileno() is -1 then)
        return
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:  # reset: nothing is left to drain
        pass
    finally:
        sock.detach()  # the descriptor stays its owner's
