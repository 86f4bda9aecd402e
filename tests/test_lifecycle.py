"""The connection lifecycle in-process: events in, actions out, no socket anywhere.

A connection here is driven the way a model drives it (opened, data_received, eof_received,
connection_lost, a stop, a sweep) and its transport records what the lifecycle asked of it. The
same lifecycle serves every model, so what is pinned here holds for all of them; the end-to-end
tests (test_models.py and the others) show the models carry the actions out."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import structlog

from sockd import handlers
from sockd.config import InetListener, UnixListener
from sockd.counters import RESET, SEND, TIMEOUT, TOO_LARGE, Recorder
from sockd.interfaces import Receiver, StreamTransport
from sockd.lifecycle import (
    DATAGRAMS_HELD,
    DUE_COST,
    Address,
    Connection,
    Datagrams,
    LoggedStream,
    Service,
    Staged,
    Staging,
    Stream,
    chain,
    stream,
)
from sockd.limits import ACL, FREE, MAX_CONNECTIONS, MOVED, REFLECTION, Ticket, Unlimited
from sockd.transports import HIGH_WATER

BOUNDS = [0.001, 1.0]


def inet(**options: Any) -> InetListener:
    settings = {"name": "t", "protocol": "tcp", "host": "127.0.0.1", "port": 0, "handler": "echo"}
    return InetListener.model_validate(settings | {"concurrency": "selector"} | options)


class Timers:
    """The model's timer, run by hand."""

    def __init__(self) -> None:
        self.due: list[tuple[float, Callable[..., object], tuple[object, ...]]] = []

    def __call__(self, delay: float, callback: Callable[..., object], *args: object) -> None:
        self.due.append((delay, callback, args))

    def fire(self) -> None:
        due, self.due = self.due, []
        for _, callback, args in due:
            callback(*args)


class Recording:
    """A transport that records the actions it is asked for. Its socket (for the stop's
    end_input, which is the transports' own) is one end of a real socket pair, made when asked
    for: an input it ended reads as the action "end_input"."""

    def __init__(self, protocol: Any = None) -> None:
        self.recorded: list[tuple[str, bytes] | str] = []
        self.protocol = protocol
        self.pair: tuple[socket.socket, socket.socket] | None = None

    def write(self, data: bytes) -> None:
        self.recorded.append(("write", data))

    def close(self) -> None:
        self.recorded.append("close")

    def abort(self) -> None:
        self.recorded.append("abort")

    def pause_reading(self) -> None:
        self.recorded.append("pause_reading")

    def resume_reading(self) -> None:
        self.recorded.append("resume_reading")

    def is_closing(self) -> bool:
        return "close" in self.recorded or "abort" in self.recorded or "lost" in self.recorded

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name != "socket":
            return default
        if self.pair is None:
            self.pair = socket.socketpair()
            PAIRS.append(self.pair)
        return self.pair[0]

    def get_write_buffer_size(self) -> int:
        return 0

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    @property
    def actions(self) -> list[tuple[str, bytes] | str]:
        ended = self.pair is not None and _input_ended(self.pair[0])
        return [*self.recorded, "end_input"] if ended else self.recorded


PAIRS: list[tuple[socket.socket, socket.socket]] = []


@pytest.fixture(autouse=True)
def _close_pairs() -> Iterator[None]:
    yield
    while PAIRS:
        for sock in PAIRS.pop():
            sock.close()


def _input_ended(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""  # nothing was sent to it: only SHUT_RD says EOF
    except BlockingIOError:
        return False


def connection(service: Service, ticket: Ticket = FREE) -> Stream:
    """A stream connection its transport (a Recording) has just been made for, not opened yet."""
    conn = Stream(service, ticket, Recorder(BOUNDS))
    conn.transport = Recording(conn)
    return conn


def actions(conn: Stream) -> list[tuple[str, bytes] | str]:
    return cast(Recording, conn.transport).actions


def lose(conn: Stream, exc: BaseException | None) -> None:
    """The connection is closed under it, as its transport tells it."""
    cast(Recording, conn.transport).recorded.append("lost")
    conn.connection_lost(exc)


def service(
    timers: Timers | None = None, udp_ports: frozenset[int] = frozenset(), stage: Staging | None = None, **options: Any
) -> Service:
    listener = inet(**options)
    return Service(listener, handlers.build(listener), later=timers or Timers(), udp_ports=udp_ports, stage=stage)


def test_an_echo_request_is_answered_counted_and_marks_the_connection_answered() -> None:
    conn = connection(service())
    conn.opened()
    assert actions(conn) == []
    conn.data_received(b"ping")
    conn.data_received(b"pong")
    assert actions(conn) == [("write", b"ping"), ("write", b"pong")]
    assert conn.answered
    assert (conn.recorder.connections, conn.recorder.totals().requests, conn.recorder.received) == (1, 2, 8)


def test_the_clients_eof_brings_the_handlers_last_word_then_close() -> None:
    conn = connection(service())
    conn.opened()
    assert conn.eof_received() is True  # asyncio must leave the closing to the lifecycle
    assert actions(conn) == ["close"]


def test_a_greeting_is_said_at_once_and_the_connection_closes() -> None:
    conn = connection(service(handler="time"))
    conn.opened()
    written, closed = actions(conn)
    assert isinstance(written, tuple)
    kind, said = written
    assert (kind, len(said), closed) == ("write", 4, "close")  # RFC 868: four bytes


def test_a_request_that_closes_stops_reading_before_it_is_answered() -> None:
    conn = connection(service(handler="timestamp"))
    conn.opened()
    conn.data_received(b"what time is it?")
    assert actions(conn)[0] == "pause_reading"
    assert actions(conn)[1][0] == "write"
    assert actions(conn)[2] == "close"


def test_a_delayed_reply_is_written_when_its_timer_fires_and_holds_back_the_close() -> None:
    timers = Timers()
    conn = connection(service(timers, delay=0.5))
    conn.opened()
    conn.data_received(b"one")
    conn.eof_received()
    assert actions(conn) == []  # neither the reply nor the close yet
    assert [delay for delay, _, _ in timers.due] == [0.5, 0.5]  # the reply, then the close after it
    assert conn.delayed == len(b"one") + 2 * DUE_COST
    timers.fire()
    assert actions(conn) == [("write", b"one"), "close"]
    assert conn.delayed == 0


def test_a_delayed_reply_to_a_client_that_reset_meanwhile_is_dropped() -> None:
    timers = Timers()
    conn = connection(service(timers, delay=0.5))
    conn.opened()
    conn.data_received(b"one")
    lose(conn, ConnectionResetError())
    timers.fire()
    assert actions(conn) == ["lost"]
    assert conn.recorder.errors[RESET] == 1
    assert conn.recorder.totals().requests == 0


# A fast client's reads, and how many of them hold HIGH_WATER once their replies wait for `delay`.
CHUNK = bytes(65536)
TO_HIGH_WATER = -(-HIGH_WATER // (len(CHUNK) + DUE_COST))


def paused_by_held_replies(timers: Timers, **options: Any) -> Stream:
    """An echo connection whose replies, waiting for their delay, hold HIGH_WATER."""
    conn = connection(service(timers, delay=0.5, **options))
    conn.opened()
    for _ in range(TO_HIGH_WATER):
        conn.data_received(CHUNK)
    return conn


def test_replies_waiting_for_their_delay_pause_reading_at_high_water_and_resume_below_it() -> None:
    timers = Timers()
    conn = connection(service(timers, delay=0.5))
    conn.opened()
    for _ in range(TO_HIGH_WATER - 1):
        conn.data_received(CHUNK)
    assert actions(conn) == []
    conn.data_received(CHUNK)
    assert actions(conn) == ["pause_reading"]
    timers.fire()
    # Once, right after the reply that took what is held below the mark.
    rest = [("write", CHUNK)] * (TO_HIGH_WATER - 1)
    assert actions(conn) == ["pause_reading", ("write", CHUNK), "resume_reading", *rest]
    assert conn.delayed == 0


def test_many_tiny_delayed_replies_pause_reading_as_surely_as_a_few_large_ones() -> None:
    conn = connection(service(Timers(), delay=0.5))
    conn.opened()
    reads = 0
    while not actions(conn) and reads < HIGH_WATER:
        conn.data_received(b"x")
        reads += 1
    assert actions(conn) == ["pause_reading"]
    assert reads <= HIGH_WATER // DUE_COST  # each counts its timer, not only its byte


def test_a_connection_paused_by_held_replies_is_not_resumed_once_the_client_has_gone() -> None:
    timers = Timers()
    conn = paused_by_held_replies(timers)
    lose(conn, ConnectionResetError())
    timers.fire()
    assert actions(conn) == ["pause_reading", "lost"]


def test_a_models_resume_does_not_undo_the_pause_of_held_replies() -> None:
    timers = Timers()
    conn = paused_by_held_replies(timers)
    conn.resume_writing()  # as the asyncio model does when its write buffer drains
    assert actions(conn) == ["pause_reading"]


def test_a_closing_session_is_never_resumed() -> None:
    timers = Timers()
    conn = connection(service(timers, handler="timestamp", delay=0.5))
    conn.opened()
    conn.data_received(b"what time is it?")
    conn.resume_writing()  # its reply, due later, closes the connection: nothing more is read
    timers.fire()
    kinds = [action if isinstance(action, str) else action[0] for action in actions(conn)]
    assert kinds == ["pause_reading", "write", "close"]


@pytest.mark.parametrize("held_first", [True, False])
def test_the_asyncio_model_resumes_reading_once_neither_a_full_write_buffer_nor_held_replies_pause_it(
    held_first: bool,
) -> None:
    # The asyncio model's loop drives the Stream itself, as here: pause_writing and
    # resume_writing are its transport's calls.
    timers = Timers()
    conn = connection(service(timers, concurrency="asyncio", delay=0.5))
    transport = cast(Recording, conn.transport)
    conn.opened()
    for _ in range(TO_HIGH_WATER):
        conn.data_received(CHUNK)
    conn.pause_writing()  # the replies' first writes filled the buffer of a client that does not read
    if held_first:
        timers.fire()  # what is held falls below the mark: the full buffer still pauses reading
        assert "resume_reading" not in transport.actions
        conn.resume_writing()
    else:
        conn.resume_writing()  # the buffer drained: what is held still pauses reading
        assert "resume_reading" not in transport.actions
        timers.fire()
    assert transport.actions.count("resume_reading") == 1  # once both are gone
    assert conn.paused == 0


class FirstLine:
    """A trivial stage, where a PROXY header's would be: it takes the connection's first line,
    tells the connection's log what it said, then hands the connection to the handler with
    what came after it."""

    bounds = (3.0,)  # as a PROXY header's stage: its time to take its line

    def __init__(self, connection: Connection, entry: Receiver, transport: StreamTransport, staged: Staged) -> None:
        self.connection = connection
        self.entry = entry
        self.staged = staged
        self.taken = b""

    def data_received(self, data: bytes) -> None:
        line, found, rest = (self.taken + data).partition(b"\n")
        if not found:
            self.taken = line
            return
        if self.connection.observer is not None:
            self.connection.observer.note(first_line=line.decode())
        self.staged(rest, None)

    def eof_received(self) -> bool | None:
        return self.entry.eof_received()

    def pause_writing(self) -> None:
        self.entry.pause_writing()

    def resume_writing(self) -> None:
        self.entry.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.entry.connection_lost(exc)

    def connection_made(self, transport: Any) -> None:
        raise AssertionError("a stage begins once the connection has opened")


def test_a_stage_takes_the_input_before_the_handler_then_hands_the_transport_back_to_the_connection() -> None:
    conn = connection(service(stage=FirstLine))
    transport = cast(Recording, conn.transport)
    conn.opened()
    stage = transport.get_protocol()
    assert isinstance(stage, FirstLine)
    stage.data_received(b"PROXY TCP4 192.0.2.1 ")
    stage.data_received(b"192.0.2.2 1 2\r\nhel")
    assert actions(conn) == [("write", b"hel")]  # the handler saw only what came after the line
    # Done: the transport drives the connection itself again, so a request costs what it costs
    # without a stage.
    assert transport.get_protocol() is conn
    conn.data_received(b"lo")
    assert actions(conn) == [("write", b"hel"), ("write", b"lo")]
    assert (conn.answered, conn.recorder.totals().requests) == (True, 2)


def test_a_stage_holds_back_a_greeting_until_it_is_done() -> None:
    conn = connection(service(handler="time", stage=FirstLine))
    conn.opened()
    assert actions(conn) == []
    cast(Recording, conn.transport).get_protocol().data_received(b"line\n")
    written, closed = actions(conn)
    assert isinstance(written, tuple)
    kind, said = written
    assert (kind, len(said), closed) == ("write", 4, "close")


class SecondLine(FirstLine):
    """FirstLine again, with a longer time of its own: the step after another in a chain."""

    bounds = (60.0,)


def test_chained_stages_take_their_parts_in_turn_each_in_its_own_time() -> None:
    conn = connection(service(stage=chain(None, FirstLine, SecondLine)))
    transport = cast(Recording, conn.transport)
    conn.opened()
    first = transport.get_protocol()
    assert isinstance(first, FirstLine)
    assert conn.deadline < time.monotonic() + 4  # the first step's 3 s
    first.data_received(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\nClient")
    second = transport.get_protocol()
    assert isinstance(second, SecondLine)  # made once the first was done, and fed what came after it
    assert second.taken == b"Client"
    assert conn.deadline > time.monotonic() + 30  # its own 60 s, from its start
    second.data_received(b"Hello\nhel")
    assert actions(conn) == [("write", b"hel")]  # the handler's turn, with what came after both
    assert transport.get_protocol() is conn


def test_a_chain_of_one_stage_is_that_stage_and_of_none_is_none() -> None:
    assert chain(None, FirstLine) is FirstLine
    assert chain(None, None) is None


def made(shared: Service) -> tuple[Stream | LoggedStream, Recording]:
    """A connection as a model makes it: its entry points, driven by its transport."""
    entry = stream(shared, FREE, Recorder(BOUNDS))
    transport = Recording(entry)
    entry.connection_made(transport)
    return entry, transport


def test_a_listener_without_log_connections_has_its_transport_drive_the_bare_stream() -> None:
    entry, transport = made(service())
    assert type(entry) is Stream  # nothing between the transport and the handler's path
    assert entry.observer is None
    entry.data_received(b"ping")
    assert transport.actions == [("write", b"ping")]


def test_a_logged_connection_is_counted_by_its_hook_and_said_in_one_line_with_what_its_stage_learnt() -> None:
    entry, transport = made(service(log_connections=True, stage=FirstLine))
    assert isinstance(entry, LoggedStream)
    transport.get_protocol().data_received(b"from 192.0.2.1\nping")
    assert transport.get_protocol() is entry  # handed back to the counting entry points
    entry.data_received(b"pong!")
    with structlog.testing.capture_logs() as captured:
        entry.eof_received()
        entry.connection_lost(None)
    (line,) = [event for event in captured if event["event"] == "connection closed"]
    assert line["first_line"] == "from 192.0.2.1"
    # What the handler was given and answered: the stage's line is the stage's.
    assert (line["bytes_in"], line["bytes_out"], line["requests"], line["ended"]) == (9, 9, 2, "client closed")


def test_a_request_over_max_message_size_aborts_and_counts() -> None:
    conn = connection(service(handler="timestamp", max_message_size=10))
    conn.opened()
    conn.data_received(b"x" * 11)
    assert actions(conn) == ["abort"]
    assert conn.recorder.errors[TOO_LARGE] == 1


def test_a_stop_ends_the_input_of_answered_connections_now_and_of_the_others_after_their_first_answer() -> None:
    shared = service()
    answered, waiting = connection(shared), connection(shared)
    for conn in (answered, waiting):
        conn.opened()
    answered.data_received(b"ping")
    shared.drain()
    assert actions(answered) == [("write", b"ping"), "end_input"]
    assert actions(waiting) == []  # its request may still be on its way
    waiting.data_received(b"late")
    assert actions(waiting) == [("write", b"late"), "end_input"]


def test_a_closed_connection_is_counted_released_and_forgotten() -> None:
    shared = service(max_connections=1)
    recorder = Recorder(BOUNDS)
    ticket = shared.admission.admit(("10.0.0.1", 1), None, recorder)
    assert ticket is not None
    assert shared.admission.admit(("10.0.0.2", 1), None, recorder) is None
    assert recorder.rejected[MAX_CONNECTIONS] == 1
    conn = connection(shared, ticket)
    conn.opened()
    assert shared.open == {conn}
    lose(conn, None)
    assert shared.open == set()
    assert (conn.recorder.connections, conn.recorder.closed, conn.recorder.errors[RESET]) == (1, 1, 0)
    assert shared.admission.admit(("10.0.0.2", 1), None, recorder) is not None


def test_a_ticket_is_given_back_once_however_often_it_is_released() -> None:
    shared = service(max_connections=1)
    recorder = Recorder(BOUNDS)
    ticket = shared.admission.admit(("10.0.0.1", 1), None, recorder)
    assert ticket is not None
    ticket.release()
    ticket.release()
    assert [shared.admission.admit(("10.0.0.1", 1), None, recorder) is not None for _ in range(2)] == [True, False]


def test_a_listener_without_limits_hands_every_connection_the_same_free_ticket() -> None:
    shared = service()
    assert isinstance(shared.admission, Unlimited)
    recorder = Recorder(BOUNDS)
    assert shared.admission.admit(("10.0.0.1", 1), None, recorder) is FREE
    assert shared.admission.admit("", None, recorder) is FREE


def test_unix_peers_are_admitted_by_their_credentials() -> None:
    listener = UnixListener.model_validate(
        {"name": "u", "protocol": "unix", "path": "/tmp/x.sock", "handler": "echo", "concurrency": "selector"}
        | {"allow_uids": [1000]}
    )
    shared = Service(listener, handlers.build(listener), later=Timers(), udp_ports=frozenset())
    recorder = Recorder(BOUNDS)
    assert shared.admission.wants_credentials
    assert shared.admission.admit("", (1, 1000, 1000), recorder) is not None
    assert shared.admission.admit("", (1, 0, 0), recorder) is None
    assert recorder.rejected[ACL] == 1


def test_the_sweep_aborts_the_quiet_and_spares_the_active_and_the_delayed() -> None:
    shared = service(delay=5.0, idle_timeout=0.05)
    quiet, active, delayed = connection(shared), connection(shared), connection(shared)
    for conn in (quiet, active, delayed):
        conn.opened()
    delayed.data_received(b"waits for the server")
    time.sleep(0.1)
    active.deadline = MOVED
    shared.sweep()
    assert actions(quiet) == ["abort"]
    assert quiet.recorder.errors[TIMEOUT] == 1
    assert actions(active) == []
    assert actions(delayed) == []


class SentDatagrams:
    """A listener's Datagrams whose replies are kept in `sent` (or fail, if `fail`)."""

    def __init__(self, service: Service, fail: bool = False) -> None:
        self.datagrams = Datagrams(service, Recorder(BOUNDS), self.send)
        self.recorder = self.datagrams.recorder
        self.datagram_received = self.datagrams.datagram_received
        self.fail = fail
        self.sent: list[tuple[bytes, Address]] = []

    def send(self, reply: bytes, address: Address) -> None:
        if self.fail:
            raise OSError("no buffer space")
        self.sent.append((reply, address))

    @property
    def pending(self) -> int:
        return self.datagrams.pending


def test_a_datagram_is_answered_to_its_sender_and_counted() -> None:
    datagrams = SentDatagrams(service(protocol="udp"))
    datagrams.datagram_received(b"", ("10.0.0.1", 5))
    datagrams.datagram_received(b"ping", ("10.0.0.1", 5))
    assert datagrams.sent == [(b"", ("10.0.0.1", 5)), (b"ping", ("10.0.0.1", 5))]
    assert datagrams.recorder.totals().requests == 2


@pytest.mark.parametrize(
    ("options", "counter", "index"),
    [
        ({"deny": ["10.0.0.0/8"]}, "rejected", ACL),
        ({"max_message_size": 2}, "errors", TOO_LARGE),
    ],
)
def test_a_refused_datagram_is_dropped_and_counted(options: dict[str, Any], counter: str, index: int) -> None:
    datagrams = SentDatagrams(service(protocol="udp", **options))
    datagrams.datagram_received(b"ping", ("10.0.0.1", 5))
    assert datagrams.sent == []
    assert getattr(datagrams.recorder, counter)[index] == 1


@pytest.mark.parametrize("port", [0, 7, 13, 19, 37, 5300])
def test_a_datagram_from_a_reflecting_port_is_dropped_and_counted(port: int) -> None:
    # 0 reaches nobody; echo, daytime, chargen and time answer anything; 5300 is one of the
    # daemon's own UDP listeners. Answering any of them could start an endless exchange.
    datagrams = SentDatagrams(service(protocol="udp", udp_ports=frozenset({5300})))
    datagrams.datagram_received(b"ping", ("127.0.0.1", port))
    datagrams.datagram_received(b"ping", ("::1", port, 0, 0))
    assert datagrams.sent == []
    assert datagrams.recorder.rejected[REFLECTION] == 2
    assert datagrams.recorder.totals().requests == 0


def test_a_datagram_from_any_other_port_is_answered() -> None:
    datagrams = SentDatagrams(service(protocol="udp", udp_ports=frozenset({5300})))
    for port in (1, 8, 5299, 5301, 65535):
        datagrams.datagram_received(b"ping", ("127.0.0.1", port))
    assert [address[1] for _, address in datagrams.sent] == [1, 8, 5299, 5301, 65535]
    assert datagrams.recorder.rejected[REFLECTION] == 0


def test_a_datagram_reply_that_cannot_be_sent_is_counted_as_such_and_not_as_a_request() -> None:
    datagrams = SentDatagrams(service(protocol="udp"), fail=True)
    datagrams.datagram_received(b"ping", ("10.0.0.1", 5))
    assert datagrams.recorder.errors[SEND] == 1
    assert datagrams.recorder.totals().requests == 0


def test_a_delayed_datagram_reply_is_pending_until_its_timer_fires() -> None:
    timers = Timers()
    datagrams = SentDatagrams(service(timers, protocol="udp", delay=1.0))
    datagrams.datagram_received(b"ping", ("10.0.0.1", 5))
    assert (datagrams.sent, datagrams.pending) == ([], len(b"ping") + DUE_COST)
    timers.fire()
    assert (datagrams.sent, datagrams.pending) == ([(b"ping", ("10.0.0.1", 5))], 0)


def test_delayed_datagram_replies_hold_at_most_their_bound_and_the_rest_are_dropped_and_counted() -> None:
    timers = Timers()
    datagrams = SentDatagrams(service(timers, protocol="udp", delay=1.0))
    payload = bytes(60000)
    fits = DATAGRAMS_HELD // (len(payload) + DUE_COST)
    for _ in range(fits + 10):
        datagrams.datagram_received(payload, ("10.0.0.1", 5))
    assert datagrams.pending <= DATAGRAMS_HELD
    assert datagrams.recorder.errors[SEND] == 10
    timers.fire()
    assert (len(datagrams.sent), datagrams.pending) == (fits, 0)
    assert datagrams.recorder.totals().requests == fits
