"""What the three blocking models share: waiting for work without spinning, and serving a client
or a datagram with plain blocking calls. The models differ only in which thread runs these."""

from __future__ import annotations

import functools
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from sockd.config import BUFSIZE, Listener
from sockd.counters import Recorder, Stats
from sockd.handlers import Handler
from sockd.lifecycle import Address, Service, Stream, logged
from sockd.limits import Ticket
from sockd.models.shared import (
    RESOURCE_PAUSE,
    SocketDatagrams,
    accept_failed,
    admit,
    peer_of,
    shutdown_read,
    stop_listening,
)
from sockd.stopping import Stop

T = TypeVar("T")


def accepted(sock: socket.socket, stop: Stop, recorder: Recorder) -> Iterator[tuple[socket.socket, Address]]:
    """Accepted connections and their addresses until `stop` is set; blocks in poll() while there
    are none."""
    yield from _until_stopped(sock, stop, sock.accept, recorder)


def received(sock: socket.socket, stop: Stop, recorder: Recorder) -> Iterator[tuple[bytes, Address]]:
    """Datagrams and their senders until `stop` is set; blocks in poll() while there are none."""
    yield from _until_stopped(sock, stop, functools.partial(sock.recvfrom, BUFSIZE), recorder)


def _until_stopped(sock: socket.socket, stop: Stop, take: Callable[[], T], recorder: Recorder) -> Iterator[T]:
    # Try first and wait only when there is nothing: under load this costs no poll() per item.
    waiter = select.poll()
    try:
        waiter.register(sock, select.POLLIN)
    except ValueError:  # closed already: the stop came first (see BlockingModel.stopping_on)
        return
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
            if stop.is_set:  # the stop closed the socket under us (see BlockingModel.stopping_on)
                return
            accept_failed(exc, recorder)
            pause.poll(RESOURCE_PAUSE * 1000)


def sleep_then_call(delay: float, callback: Callable[..., object], *args: object) -> None:
    """A blocking model's timer: its thread does nothing else meanwhile (the seed's time.sleep)."""
    time.sleep(delay)
    callback(*args)


class Blocking:
    """The lifecycle's transport over a blocking socket: a write returns once the client has
    taken it all (a timeout or a reset raises out of it), and closing ends the loop that serves
    the connection."""

    __slots__ = ("closed", "reading", "recorder", "send")

    def __init__(self, sock: socket.socket, recorder: Recorder) -> None:
        self.send = sock.send
        self.recorder = recorder
        self.reading = True
        self.closed = False

    def write(self, data: bytes) -> None:
        """Send all of `data`. A thread blocked here waits for the client to read, which is not
        being busy (see Stats.publish): a client that reads nothing must not stop the heartbeat.
        The socket's timeout bounds each send() rather than the whole (as sendall() would): a
        client is timed out once it has taken no byte for idle_timeout, as in the event-loop
        models, where each byte sent moves the deadline."""
        recorder = self.recorder
        busy = recorder.busy_since
        recorder.busy_since = 0.0
        send = self.send
        sent = send(data)
        if sent < len(data):
            with memoryview(data) as view:
                while sent < len(data):
                    sent += send(view[sent:])
        if busy:  # back at its work: busy from now (the clock tells time even with metrics off)
            recorder.busy_since = time.monotonic()

    def close(self) -> None:
        self.reading, self.closed = False, True

    abort = close

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed


class BlockingStream(Stream):
    __slots__ = ("sock",)

    transport: Blocking

    def __init__(self, service: Service, ticket: Ticket, recorder: Recorder, sock: socket.socket) -> None:
        super().__init__(service, ticket, recorder)
        self.sock = sock
        self.transport = Blocking(sock, recorder)

    def end_input(self) -> None:
        shutdown_read(self.sock.fileno())

    def peer(self) -> dict[str, object]:
        return peer_of(self.sock)


class BlockingModel:
    """What the blocking models share: serving one connection or one datagram with blocking calls.
    Each model's `serve` says which threads run these."""

    def __init__(self, listener: Listener, handler: Handler, stats: Stats, udp_ports: frozenset[int]) -> None:
        self.stats = stats
        self.service = Service(listener, handler, later=sleep_then_call, udp_ports=udp_ports)
        # A socket timeout on each recv() and send() is the whole of first_byte_timeout and idle_timeout.
        self.first_timeout = listener.first_byte_timeout or listener.idle_timeout
        self.idle_timeout = listener.idle_timeout
        self.stream = logged(listener, BlockingStream)

    def stopping_on(self, stop: Stop, sock: socket.socket) -> None:
        """Let go of the listening socket as soon as `stop` is set, from whichever thread sets it:
        a thread busy with a session may not come back to it for long (see stop_listening). A
        thread that was about to accept finds it closed, and ends its loop (see _until_stopped)."""
        stop.on_set(lambda: stop_listening(sock))
        stop.ending.on_set(self.service.stop)

    def answerer(self, datagrams: SocketDatagrams) -> Callable[[bytes, Address], None]:
        """What answers each datagram: with `delay`, the thread sleeps in it, and is marked busy
        meanwhile (see Stats.publish); without, a handler answers at once, and nothing is marked."""
        if not self.service.delay:
            return datagrams.datagram_received
        recorder = datagrams.recorder

        def answer(data: bytes, sender: Address) -> None:
            recorder.busy_since = time.monotonic()
            try:
                datagrams.datagram_received(data, sender)
            finally:
                recorder.busy_since = 0.0

        return answer

    def serve_connection(self, conn: socket.socket, address: Address, recorder: Recorder) -> None:
        """Admit one connection and serve it to its end with blocking calls, then close it."""
        ticket = admit(conn, address, self.service, recorder)
        if ticket is not None:
            self.serve_admitted(conn, ticket, recorder)

    def serve_admitted(self, conn: socket.socket, ticket: Ticket, recorder: Recorder) -> None:
        stream = self.stream(self.service, ticket, recorder, conn)
        failure = None
        try:
            with conn:
                if self.first_timeout is not None:
                    conn.settimeout(self.first_timeout)
                stream.opened()
                _requests(stream, recorder, until_answered=True)
                if stream.transport.reading:
                    if self.idle_timeout != self.first_timeout:
                        conn.settimeout(self.idle_timeout)
                    _requests(stream, recorder)
        except TimeoutError:
            stream.timed_out()
        except OSError as exc:  # reset, broken pipe: the client is gone, and so is its request
            failure = exc
        finally:
            recorder.busy_since = 0.0
            stream.connection_lost(failure)


def _requests(stream: BlockingStream, recorder: Recorder, until_answered: bool = False) -> None:
    """Read and feed requests until the connection closes (or, first, until it has an answer).
    Threads serving many clients take turns on the GIL between these calls, so the loop keeps
    its lookups in locals."""
    recv, transport, received, clock = stream.sock.recv, stream.transport, stream.data_received, time.monotonic
    while transport.reading:
        data = recv(BUFSIZE)
        # The heartbeat's clock (see Stats.publish), which must tell time even when metrics are off.
        recorder.busy_since = clock()
        if data:
            received(data)
        else:
            stream.eof_received()
        recorder.busy_since = 0.0
        if until_answered and stream.answered:
            return


class Threads:
    """Threads started for one model, joined when it stops."""

    def __init__(self) -> None:
        self._running: set[threading.Thread] = set()

    def start(self, target: Callable[..., object], *args: object) -> None:
        thread = threading.Thread(target=self._run, args=(target, args), daemon=True)
        self._running.add(thread)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: none to join either
            self._running.discard(thread)
            raise

    def _run(self, target: Callable[..., object], args: tuple[object, ...]) -> None:
        try:
            target(*args)
        finally:
            self._running.discard(threading.current_thread())

    def join(self) -> None:
        while self._running:
            next(iter(set(self._running))).join()
