"""What the three blocking models share: waiting for work without spinning, and serving a client
with plain blocking calls. The models differ only in which thread runs these loops."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import structlog

from sockd.config import Listener
from sockd.counters import RESET, SEND, Recorder, Stats
from sockd.handlers import Handler
from sockd.models import BUFSIZE, RESOURCE_PAUSE, Address, Stop, accept_failed, shutdown_read

log = structlog.get_logger()

T = TypeVar("T")


def accepted(sock: socket.socket, stop: Stop) -> Iterator[socket.socket]:
    """Accepted connections until `stop` is set; blocks in poll() while there are none."""
    for conn in _until_stopped(sock, stop, sock.accept):
        yield conn[0]


def received(sock: socket.socket, stop: Stop) -> Iterator[tuple[bytes, Address]]:
    """Datagrams and their senders until `stop` is set; blocks in poll() while there are none."""
    yield from _until_stopped(sock, stop, lambda: sock.recvfrom(BUFSIZE))


def _until_stopped(sock: socket.socket, stop: Stop, take: Callable[[], T]) -> Iterator[T]:
    # Try first and wait only when there is nothing: under load this costs no poll() per item.
    waiter = select.poll()
    waiter.register(sock, select.POLLIN)
    waiter.register(stop, select.POLLIN)
    pause = select.poll()
    pause.register(stop, select.POLLIN)
    while not stop.is_set:
        try:
            yield take()
        except BlockingIOError:
            waiter.poll()
        except ConnectionAbortedError:
            continue  # the client gave up while queued: nothing to serve
        except OSError as exc:
            accept_failed(exc)
            pause.poll(RESOURCE_PAUSE * 1000)


class OpenConnections:
    """The connections being served, so a stop can end their input and let them drain."""

    def __init__(self, stop: Stop) -> None:
        self._answered: set[socket.socket] = set()  # see shutdown_read: only these end at once
        stop.on_set(self.drain)

    def drain(self) -> None:
        for conn in list(self._answered):
            shutdown_read(conn.fileno())

    def serve(self, conn: socket.socket, handler: Handler, delay: float, stop: Stop, recorder: Recorder) -> None:
        """Serve one connection to its end with blocking calls, then close it."""
        recorder.connections += 1
        session = handler.session()
        answered = False
        try:
            with conn:
                greeting = session.greeting()
                if greeting is not None:  # it says all it has at connect, then closes
                    started = time.monotonic()
                    conn.sendall(greeting)
                    recorder.request(0, len(greeting), started)
                    return
                while True:
                    data = conn.recv(BUFSIZE)
                    if not data:
                        conn.sendall(session.eof())
                        return
                    # One clock read for both the histogram and the heartbeat (see Stats.publish),
                    # which must tell time even when metrics are off.
                    started = recorder.busy_since = time.monotonic()
                    reply = session.feed(data)
                    if delay:
                        time.sleep(delay)
                    conn.sendall(reply)
                    recorder.request(len(data), len(reply), started)
                    recorder.busy_since = 0.0
                    if session.closing:
                        return
                    if not answered:
                        answered = True
                        self._answered.add(conn)
                        if stop.is_set:  # the drain passed it by while it had no answer yet
                            shutdown_read(conn.fileno())
        except OSError as exc:  # reset, broken pipe: the client is gone, and so is its request
            recorder.errors[RESET] += 1
            log.debug("connection lost", error=str(exc))
        finally:
            recorder.closed += 1
            recorder.busy_since = 0.0
            self._answered.discard(conn)


def answer(
    sock: socket.socket,
    handler: Handler,
    delay: float,
    data: bytes,
    sender: Address,
    *,
    recorder: Recorder,
    started: float,
) -> None:
    """Answer one datagram; `started` is the time.monotonic() of its arrival."""
    recorder.busy_since = started
    try:
        reply = handler.datagram(data)
        if reply is None:
            return
        if delay:
            time.sleep(delay)
        sock.sendto(reply, sender)
    except OSError as exc:  # e.g. a full send buffer
        recorder.errors[SEND] += 1
        log.debug("datagram reply failed", error=str(exc))
        return
    finally:
        recorder.busy_since = 0.0
    recorder.request(len(data), len(reply), started)


class BlockingModel:
    """What a blocking model is built from; `serve` says which threads run the loops above."""

    def __init__(self, listener: Listener, handler: Handler, stats: Stats) -> None:
        self.handler = handler
        self.delay = listener.delay
        self.stats = stats


class Threads:
    """Threads started for one model, joined when it stops."""

    def __init__(self) -> None:
        self._running: set[threading.Thread] = set()

    def start(self, target: Callable[..., object], *args: object) -> None:
        thread = threading.Thread(target=self._run, args=(target, args), daemon=True)
        self._running.add(thread)
        thread.start()

    def _run(self, target: Callable[..., object], args: tuple[object, ...]) -> None:
        try:
            target(*args)
        finally:
            self._running.discard(threading.current_thread())

    def join(self) -> None:
        while self._running:
            next(iter(set(self._running))).join()
