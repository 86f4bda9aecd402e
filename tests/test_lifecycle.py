"""The connection lifecycle in-process: events in, actions out, no socket anywhere.

A connection here is driven the way a model drives it (opened, data_received, eof_received,
connection_lost, a stop, a sweep) and its transport records what the lifecycle asked of it. The
same lifecycle serves every model, so what is pinned here holds for all of them; the end-to-end
tests (test_models.py and the others) show the models carry the actions out."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from sockd import handlers
from sockd.config import InetListener, UnixListener
from sockd.counters import RESET, SEND, TIMEOUT, TOO_LARGE, Recorder
from sockd.lifecycle import Address, Datagrams, Service, Stream
from sockd.limits import ACL, FREE, MAX_CONNECTIONS, MOVED, REFLECTION, Ticket, Unlimited

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
    """A transport that records the actions it is asked for."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, bytes] | str] = []

    def write(self, data: bytes) -> None:
        self.actions.append(("write", data))

    def close(self) -> None:
        self.actions.append("close")

    def abort(self) -> None:
        self.actions.append("abort")

    def pause_reading(self) -> None:
        self.actions.append("pause_reading")

    def is_closing(self) -> bool:
        return "close" in self.actions or "abort" in self.actions or "lost" in self.actions


class Connection(Stream):
    __slots__ = ()

    transport: Recording

    def __init__(self, service: Service, ticket: Ticket = FREE) -> None:
        super().__init__(service, ticket, Recorder(BOUNDS))
        self.transport = Recording()

    def end_input(self) -> None:
        self.transport.actions.append("end_input")

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport.actions.append("lost")
        super().connection_lost(exc)

    @property
    def actions(self) -> list[tuple[str, bytes] | str]:
        return self.transport.actions


def service(timers: Timers | None = None, udp_ports: frozenset[int] = frozenset(), **options: Any) -> Service:
    listener = inet(**options)
    return Service(listener, handlers.build(listener), later=timers or Timers(), udp_ports=udp_ports)


def test_an_echo_request_is_answered_counted_and_marks_the_connection_answered() -> None:
    conn = Connection(service())
    conn.opened()
    assert conn.actions == []
    conn.data_received(b"ping")
    conn.data_received(b"pong")
    assert conn.actions == [("write", b"ping"), ("write", b"pong")]
    assert conn.answered
    assert (conn.recorder.connections, sum(conn.recorder.buckets), conn.recorder.received) == (1, 2, 8)


def test_the_clients_eof_brings_the_handlers_last_word_then_close() -> None:
    conn = Connection(service())
    conn.opened()
    assert conn.eof_received() is True  # asyncio must leave the closing to the lifecycle
    assert conn.actions == ["close"]


def test_a_greeting_is_said_at_once_and_the_connection_closes() -> None:
    conn = Connection(service(handler="time"))
    conn.opened()
    (kind, said), closed = conn.actions
    assert (kind, len(said), closed) == ("write", 4, "close")  # RFC 868: four bytes


def test_a_request_that_closes_stops_reading_before_it_is_answered() -> None:
    conn = Connection(service(handler="timestamp"))
    conn.opened()
    conn.data_received(b"what time is it?")
    assert conn.actions[0] == "pause_reading"
    assert conn.actions[1][0] == "write"
    assert conn.actions[2] == "close"


def test_a_delayed_reply_is_written_when_its_timer_fires_and_holds_back_the_close() -> None:
    timers = Timers()
    conn = Connection(service(timers, delay=0.5))
    conn.opened()
    conn.data_received(b"one")
    conn.eof_received()
    assert conn.actions == []  # neither the reply nor the close yet
    assert [delay for delay, _, _ in timers.due] == [0.5, 0.5]  # the reply, then the close after it
    assert conn.delayed == 2
    timers.fire()
    assert conn.actions == [("write", b"one"), "close"]
    assert conn.delayed == 0


def test_a_delayed_reply_to_a_client_that_reset_meanwhile_is_dropped() -> None:
    timers = Timers()
    conn = Connection(service(timers, delay=0.5))
    conn.opened()
    conn.data_received(b"one")
    conn.connection_lost(ConnectionResetError())
    timers.fire()
    assert conn.actions == ["lost"]
    assert conn.recorder.errors[RESET] == 1
    assert sum(conn.recorder.buckets) == 0


def test_a_request_over_max_message_size_aborts_and_counts() -> None:
    conn = Connection(service(handler="timestamp", max_message_size=10))
    conn.opened()
    conn.data_received(b"x" * 11)
    assert conn.actions == ["abort"]
    assert conn.recorder.errors[TOO_LARGE] == 1


def test_a_stop_ends_the_input_of_answered_connections_now_and_of_the_others_after_their_first_answer() -> None:
    shared = service()
    answered, waiting = Connection(shared), Connection(shared)
    for conn in (answered, waiting):
        conn.opened()
    answered.data_received(b"ping")
    shared.stop()
    assert answered.actions == [("write", b"ping"), "end_input"]
    assert waiting.actions == []  # its request may still be on its way
    waiting.data_received(b"late")
    assert waiting.actions == [("write", b"late"), "end_input"]


def test_a_closed_connection_is_counted_released_and_forgotten() -> None:
    shared = service(max_connections=1)
    recorder = Recorder(BOUNDS)
    ticket = shared.admission.admit(("10.0.0.1", 1), None, recorder)
    assert ticket is not None
    assert shared.admission.admit(("10.0.0.2", 1), None, recorder) is None
    assert recorder.rejected[MAX_CONNECTIONS] == 1
    conn = Connection(shared, ticket)
    conn.opened()
    assert shared.open == {conn}
    conn.connection_lost(None)
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
    quiet, active, delayed = Connection(shared), Connection(shared), Connection(shared)
    for conn in (quiet, active, delayed):
        conn.opened()
    delayed.data_received(b"waits for the server")
    time.sleep(0.1)
    active.deadline = MOVED
    shared.sweep()
    assert quiet.actions == ["abort"]
    assert quiet.recorder.errors[TIMEOUT] == 1
    assert active.actions == []
    assert delayed.actions == []


class SentDatagrams(Datagrams):
    def __init__(self, service: Service, fail: bool = False) -> None:
        super().__init__(service, Recorder(BOUNDS))
        self.fail = fail
        self.sent: list[tuple[bytes, Address]] = []

    def send(self, reply: bytes, address: Address) -> bool:
        if self.fail:
            self.send_failed(OSError("no buffer space"))
            return False
        self.sent.append((reply, address))
        return True


def test_a_datagram_is_answered_to_its_sender_and_counted() -> None:
    datagrams = SentDatagrams(service(protocol="udp"))
    datagrams.datagram_received(b"", ("10.0.0.1", 5))
    datagrams.datagram_received(b"ping", ("10.0.0.1", 5))
    assert datagrams.sent == [(b"", ("10.0.0.1", 5)), (b"ping", ("10.0.0.1", 5))]
    assert sum(datagrams.recorder.buckets) == 2


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
    assert sum(datagrams.recorder.buckets) == 0


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
    assert sum(datagrams.recorder.buckets) == 0


def test_a_delayed_datagram_reply_is_pending_until_its_timer_fires() -> None:
    timers = Timers()
    datagrams = SentDatagrams(service(timers, protocol="udp", delay=1.0))
    datagrams.datagram_received(b"ping", ("10.0.0.1", 5))
    assert (datagrams.sent, datagrams.pending) == ([], 1)
    timers.fire()
    assert (datagrams.sent, datagrams.pending) == ([(b"ping", ("10.0.0.1", 5))], 0)
