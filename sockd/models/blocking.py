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

from sockd.config import BUFSIZE, Listener
from sockd.counters import RESET, SEND, TIMEOUT, TOO_LARGE, Recorder, Stats
from sockd.handlers import Handler, TooLarge
from sockd.limits import Admission, admitted, datagram_allowed, released
from sockd.models import RESOURCE_PAUSE, Address, Stop, accept_failed, datagram_reply, shutdown_read

log = structlog.get_logger()

T = TypeVar("T")


def accepted(sock: socket.socket, stop: Stop, recorder: Recorder) -> Iterator[tuple[socket.socket, Address]]:
    """Accepted connections and their addresses until `stop` is set; blocks in poll() while there
    are none."""
    yield from _until_stopped(sock, stop, sock.accept, recorder)


def received(sock: socket.socket, stop: Stop, recorder: Recorder) -> Iterator[tuple[bytes, Address]]:
    """Datagrams and their senders until `stop` is set; blocks in poll() while there are none."""
    yield from _until_stopped(sock, stop, lambda: sock.recvfrom(BUFSIZE), recorder)


def _until_stopped(sock: socket.socket, stop: Stop, take: Callable[[], T], recorder: Recorder) -> Iterator[T]:
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
            accept_failed(exc, recorder)
            pause.poll(RESOURCE_PAUSE * 1000)


class BlockingModel:
    """What the blocking models share: serving one connection or one datagram with blocking calls.
    Each model's `serve` says which threads run these."""

    def __init__(self, listener: Listener, handler: Handler, stats: Stats) -> None:
        self.listener = listener
        self.handler = handler
        self.delay = listener.delay
        self.stats = stats
        self.admission = Admission.of(listener)
        # A socket timeout on each recv() and send() is the whole of first_byte_timeout and idle_timeout.
        self.first_timeout = listener.first_byte_timeout or listener.idle_timeout
        self.idle_timeout = listener.idle_timeout

    def answer(self, sock: socket.socket, data: bytes, sender: Address, recorder: Recorder, started: float) -> None:
        """Answer one datagram; `started` is the time.monotonic() of its arrival."""
        if not datagram_allowed(self.admission, self.listener, sender, recorder):
            return
        recorder.busy_since = started
        try:
            reply = datagram_reply(self.handler, data, recorder)
            if reply is None:
                return
            if self.delay:
                time.sleep(self.delay)
            sock.sendto(reply, sender)
        except OSError as exc:  # e.g. a full send buffer
            recorder.errors[SEND] += 1
            log.debug("datagram reply failed", error=str(exc))
            return
        finally:
            recorder.busy_since = 0.0
        recorder.request(len(data), len(reply), started)


class OpenConnections:
    """The connections being served, so a stop can end their input and let them drain."""

    def __init__(self, model: BlockingModel, stop: Stop) -> None:
        self.model = model
        self.stop = stop
        self._answered: set[socket.socket] = set()  # see shutdown_read: only these end at once
        stop.on_set(self.drain)

    def drain(self) -> None:
        for conn in list(self._answered):
            shutdown_read(conn.fileno())

    def serve(self, conn: socket.socket, address: Address, recorder: Recorder) -> None:
        """Admit one connection and serve it to its end with blocking calls, then close it."""
        source = self.admit(conn, address, recorder)
        if source is not None:
            self.serve_admitted(conn, source, recorder)

    def admit(self, conn: socket.socket, address: Address, recorder: Recorder) -> str | None:
        """See limits.admitted."""
        return admitted(self.model.admission, self.model.listener, conn, address, recorder)

    def serve_admitted(self, conn: socket.socket, source: str, recorder: Recorder) -> None:
        try:
            self._serve(conn, recorder)
        finally:
            released(self.model.admission, source)

    def _serve(self, conn: socket.socket, recorder: Recorder) -> None:
        recorder.connections += 1
        try:
            with conn:
                self._exchange(conn, recorder)
        except TooLarge:
            recorder.errors[TOO_LARGE] += 1
        except TimeoutError:
            recorder.errors[TIMEOUT] += 1
        except OSError as exc:  # reset, broken pipe: the client is gone, and so is its request
            recorder.errors[RESET] += 1
            log.debug("connection lost", error=str(exc))
        finally:
            recorder.closed += 1
            recorder.busy_since = 0.0
            self._answered.discard(conn)

    def _exchange(self, conn: socket.socket, recorder: Recorder) -> None:
        """Requests and replies until the client's EOF or the handler's last word."""
        model = self.model
        session = model.handler.session()
        greeting = session.greeting()
        if greeting is not None:  # it says all it has at connect, then closes
            started = time.monotonic()
            conn.sendall(greeting)
            recorder.request(0, len(greeting), started)
            return
        if model.first_timeout is not None:
            conn.settimeout(model.first_timeout)
        answered = False
        while True:
            data = conn.recv(BUFSIZE)
            if not data:
                conn.sendall(session.eof())
                return
            # One clock read for both the histogram and the heartbeat (see Stats.publish), which
            # must tell time even when metrics are off.
            started = recorder.busy_since = time.monotonic()
            reply = session.feed(data)
            if model.delay:
                time.sleep(model.delay)
            conn.sendall(reply)
            recorder.request(len(data), len(reply), started)
            recorder.busy_since = 0.0
            if session.closing:
                return
            if not answered:
                answered = True
                if model.idle_timeout != model.first_timeout:
                    conn.settimeout(model.idle_timeout)
                self._answered.add(conn)
                if self.stop.is_set:  # the drain passed it by while it had no answer yet
                    shutdown_read(conn.fileno())


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
