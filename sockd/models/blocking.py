"""What the three blocking models share: waiting for work without spinning, and serving a client
or a datagram with plain blocking calls. The models differ only in which thread runs these."""

from __future__ import annotations

import functools
import math
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from sockd.config import BUFSIZE, Listener
from sockd.counters import Recorder, Stats
from sockd.handlers import Handler
from sockd.lifecycle import Address, Datagrams, LoggedStream, Service, Staging, Stream, stream
from sockd.limits import Ticket
from sockd.models.shared import accept_failed, stop_listening
from sockd.sockets import RESOURCE_PAUSE
from sockd.stopping import Stop
from sockd.transports import Accepter, BlockingTransport, admit

T = TypeVar("T")


def accepted(sock: socket.socket, stop: Stop, recorder: Recorder) -> Iterator[tuple[socket.socket, Address]]:
    """Accepted connections and their addresses until `stop` is set; blocks in poll() while there
    are none."""
    return _until_stopped(sock, stop, Accepter(sock), recorder)


def received(sock: socket.socket, stop: Stop, recorder: Recorder) -> Iterator[tuple[bytes, Address]]:
    """Datagrams and their senders until `stop` is set; blocks in poll() while there are none."""
    return _until_stopped(sock, stop, functools.partial(sock.recvfrom, BUFSIZE), recorder)


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


class BlockingModel:
    """What the blocking models share: serving one connection or one datagram with blocking calls.
    Each model's `serve` says which threads run these."""

    def __init__(
        self,
        listener: Listener,
        handler: Handler,
        stats: Stats,
        udp_ports: frozenset[int],
        stage: Staging | None = None,
    ) -> None:
        self.stats = stats
        # Each thread's next turn of a flowing session (see later): a thread serves one
        # connection at a time, so the turn due is its own.
        self.turns = threading.local()
        self.service = Service(listener, handler, later=self.later, udp_ports=udp_ports, stage=stage)
        # A socket timeout on each recv() and send() is the whole of first_byte_timeout and
        # idle_timeout. A stage (a PROXY header, a TLS handshake) is bounded as a whole, as in
        # the event-loop models: each of its reads waits at most what is left of it (see
        # _through_stage).
        timeouts = self.service.timeouts
        self.staged = stage is not None
        self.first_timeout = timeouts.first_byte if timeouts.first_byte < math.inf else None
        self.idle_timeout = listener.idle_timeout

    def later(self, delay: float, callback: Callable[..., object], *args: object) -> None:
        """A blocking model's timer: its thread does nothing else meanwhile (the seed's
        time.sleep). No delay is a flowing session's next turn (lifecycle.Stream.flow): kept as
        this thread's, for _flowing to call once it has looked at the connection's input; called
        from here, each turn would run inside the last, without end."""
        if delay:
            time.sleep(delay)
            callback(*args)
        else:
            self.turns.due = functools.partial(callback, *args)

    def stopping_on(self, stop: Stop, sock: socket.socket) -> None:
        """Let go of the listening socket as soon as `stop` is set, from whichever thread sets it:
        a thread busy with a session may not come back to it for long (see stop_listening). A
        thread that was about to accept finds it closed, and ends its loop (see _until_stopped)."""
        stop.on_set(lambda: stop_listening(sock))
        stop.ending.on_set(self.service.drain)

    def datagrams(self, sock: socket.socket, recorder: Recorder) -> Datagrams:
        """Datagrams answered through `sock`."""
        return Datagrams(self.service, recorder, sock.sendto)

    def answerer(self, datagrams: Datagrams) -> Callable[[bytes, Address], None]:
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
        ticket = admit(conn, address, self.service.admission, recorder)
        if ticket is not None:
            self.serve_admitted(conn, ticket, recorder)

    def serve_admitted(self, conn: socket.socket, ticket: Ticket, recorder: Recorder) -> None:
        entry = stream(self.service, ticket, recorder)
        connection = entry if isinstance(entry, Stream) else entry.stream
        transport = BlockingTransport(conn, recorder, entry)
        failure = None
        try:
            # As `with conn:` (closed before the handlers below run), without socket.py's
            # __enter__ and __exit__: two calls of Python a connection.
            try:
                if self.first_timeout is not None:
                    conn.settimeout(self.first_timeout)
                entry.connection_made(transport)
                if self.staged:
                    _through_stage(transport, entry, connection)
                    conn.settimeout(self.first_timeout)
                _until_answered(transport, connection)
                if transport.reading:
                    if self.idle_timeout != self.first_timeout:
                        conn.settimeout(self.idle_timeout)
                    if connection.session.flowing:
                        self._flowing(transport)
                    else:
                        transport.read_to_end()
            finally:
                conn.close()
        except TimeoutError:
            connection.timed_out()
        except OSError as exc:  # reset, broken pipe: the client is gone, and so is its request
            failure = exc
        finally:
            recorder.busy_since = 0.0
            transport.protocol.connection_lost(failure)  # through a stage, if the connection is in one

    def _flowing(self, transport: BlockingTransport) -> None:
        """A flowing session's turns (chargen), until its connection closes. Between turns, what
        the client sent, if anything, is fed without waiting for it: input (dropped by the
        session), or its EOF or a drain's (end_input), which closes the connection
        (lifecycle.Stream.eof_received), so the turn due writes nothing and asks for none. A
        client that closes resets the next send. Each send blocks until the client takes it:
        nothing is buffered for a client that does not read, and the socket's timeout
        (idle_timeout) ends it."""
        turns, sock = self.turns, transport.sock
        readable = select.poll()
        readable.register(sock, select.POLLIN)
        while (turn := turns.__dict__.pop("due", None)) is not None:
            if readable.poll(0):
                transport.feed(sock.recv(BUFSIZE))
            turn()


def _through_stage(transport: BlockingTransport, entry: Stream | LoggedStream, connection: Stream) -> None:
    """Read and feed a connection's stage until it is done (see lifecycle.Stream.staged: the
    transport drives `entry` again, or a layer that stays, TLS, is `entry`'s transport) or has
    closed the connection: each read waits at most until the connection's deadline (Timeouts:
    a stage always has one, moved on by each step of a chain), so a client that trickles its
    part of the stage is ended all the same."""
    sock = transport.sock
    while transport.reading and transport.protocol is not entry and entry.transport is transport:
        remaining = connection.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        transport.feed(sock.recv(BUFSIZE))


def _until_answered(transport: BlockingTransport, connection: Stream) -> None:
    """Read and feed requests until the connection has its first answer (or closes). What the
    transport drives is looked up at each read: a stage (see lifecycle.Stream.staged) hands the
    connection back to its stream before the handler answers anything."""
    while transport.reading and not connection.answered:
        transport.feed(transport.sock.recv(BUFSIZE))


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
