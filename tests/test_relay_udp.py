"""handler: relay over UDP: a session per client, its table's bounds, and the datagrams a relay
must not take from anybody (its own ports, its upstream's)."""

from __future__ import annotations

import contextlib
import errno
import itertools
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from test_relay import DRIVERS

from sockd.config import InetListener
from sockd.counters import Recorder
from sockd.handlers import Relay
from sockd.lifecycle import Service
from sockd.limits import RELAY_SESSIONS, WORKER_RESERVED_DESCRIPTORS
from sockd.relay import MAX_SESSIONS_PER_SOURCE, Sessions

from support import (
    RELAY_MODELS,
    TIMEOUT,
    Launcher,
    eventually,
    forge_datagram,
    inet,
    rejected,
    samples,
    value,
)
from support import listener as entry


def _udp_bound(address: tuple[str, int]) -> bool:
    """Whether a UDP socket holds this address (it cannot be bound again)."""
    with socket.socket(type=socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(address)
        except OSError:
            return True
    return False


@pytest.mark.parametrize("model", RELAY_MODELS)
def test_udp_relay_keeps_a_session_per_client(start_sockd: Launcher, model: str) -> None:
    with socket.socket(type=socket.SOCK_DGRAM) as far:
        far.bind(("127.0.0.1", 0))
        far.settimeout(TIMEOUT)
        daemon = start_sockd(
            [entry("u", "udp", "relay", model, upstream=f"udp://127.0.0.1:{far.getsockname()[1]}", idle_timeout=0.5)]
        )
        relay_address = inet(daemon.address("u"))
        seen_from: dict[bytes, tuple[str, int]] = {}
        with socket.socket(type=socket.SOCK_DGRAM) as one, socket.socket(type=socket.SOCK_DGRAM) as two:
            for client, name in ((one, b"one"), (two, b"two"), (one, b"one")):
                client.settimeout(TIMEOUT)
                client.sendto(name, relay_address)
                data, sender = far.recvfrom(100)
                assert data == name
                assert seen_from.setdefault(name, sender) == sender  # the same session each time
                far.sendto(b"re: " + data, sender)
                assert client.recvfrom(100) == (b"re: " + name, relay_address)
            assert seen_from[b"one"] != seen_from[b"two"]  # a session, an upstream socket, per client

            # Quiet past idle_timeout: the session is forgotten, and its upstream socket closed.
            eventually(lambda: not _udp_bound(seen_from[b"one"]), "the quiet session forgotten")
            one.sendto(b"one", relay_address)
            data, sender = far.recvfrom(100)
            assert (data, sender != seen_from[b"one"]) == (b"one", True)  # a new upstream socket


@pytest.mark.parametrize("model", RELAY_MODELS)
def test_a_datagram_forged_from_the_udp_relay_itself_is_not_relayed(start_sockd: Launcher, model: str) -> None:
    """Relayed, the upstream's answer would go back to the relay as a client's datagram, to be
    relayed again, for as long as the daemon runs (CVE-1999-0103)."""
    got: list[bytes] = []
    done = threading.Event()

    def echo(far: socket.socket) -> None:
        far.settimeout(0.1)
        deadline = time.monotonic() + 3 * TIMEOUT
        while not done.is_set() and len(got) < 10_000 and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                data, sender = far.recvfrom(100)
                got.append(data)
                far.sendto(data, sender)

    with socket.socket(type=socket.SOCK_DGRAM) as far:
        far.bind(("127.0.0.1", 0))
        upstream = threading.Thread(target=echo, args=(far,), daemon=True)
        upstream.start()
        try:
            daemon = start_sockd(
                [entry("u", "udp", "relay", model, upstream=f"udp://127.0.0.1:{far.getsockname()[1]}")]
            )
            relay = inet(daemon.address("u"))
            forge_datagram(relay, relay, b"loop")
            with socket.socket(type=socket.SOCK_DGRAM) as client:
                client.settimeout(TIMEOUT)
                client.sendto(b"hello", relay)
                assert client.recvfrom(100) == (b"hello", relay)  # an ordinary client is relayed
            time.sleep(1.0)  # an exchange, had one begun, would have run up thousands of datagrams by now
            assert got == [b"hello"]
            eventually(lambda: rejected(daemon, "u", "reflection") == 1, "the forged datagram counted")
        finally:
            done.set()
            upstream.join()


def echo_datagrams(sock: socket.socket, stop: threading.Event, heard: list[bytes] | None = None) -> None:
    """A UDP upstream, not sockd: every datagram back to its sender (and noted in `heard`), until
    `stop` (or TIMEOUT * 6)."""
    sock.settimeout(0.1)
    deadline = time.monotonic() + TIMEOUT * 6
    while not stop.is_set() and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            data, sender = sock.recvfrom(100)
            if heard is not None:
                heard.append(data)
            sock.sendto(data, sender)


@contextlib.contextmanager
def echo_upstream(heard: list[bytes] | None = None) -> Iterator[tuple[str, int]]:
    """The address of an echo_datagrams upstream on 127.0.0.1, for as long as the block lasts."""
    stop = threading.Event()
    with socket.socket(type=socket.SOCK_DGRAM) as far:
        far.bind(("127.0.0.1", 0))
        echo = threading.Thread(target=echo_datagrams, args=(far, stop, heard), daemon=True)
        echo.start()
        try:
            yield far.getsockname()
        finally:
            stop.set()
            echo.join(TIMEOUT)


FLOOD_PORTS = 4200  # more than the 4,096 sessions a worker holds
FLOOD_BATCH = 100  # datagrams in flight at once: well within the listener's receive buffer


def flows(sources: list[str], ports_each: int) -> Iterator[socket.socket]:
    """A UDP socket bound to each of `ports_each` ports of each address of `sources`, one after
    the other: ports outside the ephemeral range, so each is used once (one in use by someone
    else is passed over)."""
    for host in sources:
        ports = iter(range(20000, 30000))
        made = 0
        while made < ports_each:
            sock = socket.socket(type=socket.SOCK_DGRAM)
            try:
                sock.bind((host, next(ports)))
            except OSError:
                sock.close()
                continue
            made += 1
            yield sock


def flood(relay_address: tuple[str, int], clients: Iterator[socket.socket]) -> int:
    """One datagram from each of `clients`, a batch at a time, each batch's echoes awaited: how
    many came back."""
    answered = 0
    while True:
        with contextlib.ExitStack() as batch, selectors.DefaultSelector() as waiting:
            for sock in itertools.islice(clients, FLOOD_BATCH):
                batch.enter_context(sock)
                sock.sendto(b"flood", relay_address)
                waiting.register(sock, selectors.EVENT_READ)
            if not waiting.get_map():
                return answered
            deadline = time.monotonic() + TIMEOUT
            while waiting.get_map() and time.monotonic() < deadline:
                for key, _ in waiting.select(0.1):
                    assert key.fileobj.recv(100) == b"flood"  # type: ignore[union-attr]
                    waiting.unregister(key.fileobj)
                    answered += 1
            if waiting.get_map():  # the relay took no more: flooding on is moot
                return answered


@pytest.mark.parametrize("model", DRIVERS)
def test_a_host_flooding_from_many_ports_cannot_lock_others_out_of_a_udp_relay(
    start_sockd: Launcher, model: str
) -> None:
    with echo_upstream() as upstream:
        daemon = start_sockd([entry("u", "udp", "relay", model, upstream=f"udp://127.0.0.1:{upstream[1]}")])
        relay_address = inet(daemon.address("u"))
        answered = flood(relay_address, flows(["127.0.0.1"], FLOOD_PORTS))
        with socket.socket(type=socket.SOCK_DGRAM) as other:
            other.bind(("127.0.0.2", 0))
            other.settimeout(TIMEOUT)
            other.sendto(b"me too", relay_address)
            assert other.recvfrom(100) == (b"me too", relay_address)  # a new host, served at once
    assert answered == FLOOD_PORTS  # each of the flood's new flows served too, in turn
    # The flood kept 256 sessions: each of its flows past them closed its own least recent one.
    evicted = FLOOD_PORTS - MAX_SESSIONS_PER_SOURCE
    eventually(
        lambda: (
            value(samples(daemon), "sockd_connections_rejected_total", listener="u", reason="relay_sessions") == evicted
        ),
        "the closed sessions counted",
    )
    daemon.wait_for("relay sessions full: closed the least recent to make room", source="127.0.0.1")


class Flow:
    """A session as the table sees it, in-process: it only has to be closed."""

    def __init__(self) -> None:
        self.last_seen = 0.0
        self.asked = 0.0
        self.closed = False

    def close(self) -> None:
        self.closed = True


def session_table() -> tuple[Sessions[Flow], Recorder]:
    """A UDP relay's session table, in-process, on a clock that ticks at each reading."""
    listener = InetListener.model_validate(
        {"name": "u", "protocol": "udp", "host": "127.0.0.1", "port": 0, "handler": "relay"}
        | {"concurrency": "selector", "upstream": "udp://127.0.0.1:9"}
    )
    relay_handler = Relay(listener)
    recorder = Recorder([1.0])
    ticks = itertools.count()
    service = Service(listener, relay_handler, later=lambda *_: None, udp_ports=frozenset())
    return Sessions(relay_handler, service, recorder, lambda: float(next(ticks))), recorder


def test_a_full_session_table_closes_its_least_recently_seen_session() -> None:
    """Past its capacity (MAX_SESSIONS, or fewer if descriptors are fewer) from many hosts (no one
    at its own cap): the session closed for a new client is the one quiet the longest, a reply
    counting as much as a datagram from the client."""
    sessions, recorder = session_table()
    clients = [(f"10.0.{i // 256}.{i % 256}", 5000) for i in range(sessions.capacity)]
    flows = [sessions.open(client, Flow) for client in clients]
    sessions.open(clients[0], Flow)  # the oldest two heard from again, one each way
    sessions.replied(clients[1], 0)
    newcomer = sessions.open(("192.0.2.1", 5000), Flow)
    assert [flow.closed for flow in flows[:3]] == [False, False, True]  # the third: quiet the longest
    assert len(sessions.table) == sessions.capacity
    assert sessions.table[("192.0.2.1", 5000)] is newcomer
    assert recorder.rejected[RELAY_SESSIONS] == 1


@pytest.mark.parametrize("model", DRIVERS)
def test_a_datagram_forged_from_a_relays_upstream_starts_no_exchange(start_sockd: Launcher, model: str) -> None:
    """The upstream (an echo service, not sockd) answers whatever it is sent. A datagram forged
    from it to the relay, relayed, would come back to the relay as its reply, be passed on to the
    upstream as one, and echoed to the relay as the next client datagram, for as long as both run;
    forged to another UDP listener of the same daemon, that listener and the upstream would
    answer each other so. So neither takes a datagram from the upstream's port."""
    heard: list[bytes] = []
    with echo_upstream(heard) as upstream:
        daemon = start_sockd(
            [
                entry("u", "udp", "relay", model, upstream=f"udp://127.0.0.1:{upstream[1]}"),
                entry("e", "udp", "echo", model),
            ]
        )
        relay, echoing = inet(daemon.address("u")), inet(daemon.address("e"))
        forge_datagram(upstream, relay, b"loop")
        forge_datagram(upstream, echoing, b"loop")
        with socket.socket(type=socket.SOCK_DGRAM) as client:
            client.settimeout(TIMEOUT)
            for listener in (echoing, relay):  # both still serve an ordinary client
                client.sendto(b"hello", listener)
                assert client.recvfrom(100) == (b"hello", listener)
        eventually(
            lambda: rejected(daemon, "u", "reflection") >= 1 and rejected(daemon, "e", "reflection") >= 1,
            "the forged datagrams counted",
        )
        # An exchange, had one begun, would have run up thousands of datagrams by now.
        assert heard == [b"hello"]


NOFILE = 1024
SOURCES = [f"127.0.0.{host}" for host in range(2, 7)]
PORTS_EACH = 250  # under MAX_SESSIONS_PER_SOURCE: no source recycles its own sessions


@pytest.mark.parametrize("model", DRIVERS)
def test_a_udp_relay_holds_no_more_sessions_than_its_descriptors_allow(start_sockd: Launcher, model: str) -> None:
    """Under `nofile 1024`, sessions from several hosts (each under its own cap) would take
    every descriptor of the worker, and a new client could get no socket for as long as they
    last (idle_timeout). The table is bounded by the descriptors instead: each new client past
    that closes the least recent session, and is served at once."""
    with echo_upstream() as upstream:
        daemon = start_sockd(
            [entry("u", "udp", "relay", model, upstream=f"udp://127.0.0.1:{upstream[1]}", idle_timeout=300)],
            prefix=("prlimit", f"--nofile={NOFILE}"),
        )
        relay_address = inet(daemon.address("u"))
        answered = flood(relay_address, flows(SOURCES, PORTS_EACH))
        with socket.socket(type=socket.SOCK_DGRAM) as newcomer:
            newcomer.bind(("127.0.0.7", 0))
            newcomer.settimeout(TIMEOUT)
            newcomer.sendto(b"me too", relay_address)
            assert newcomer.recvfrom(100) == (b"me too", relay_address)  # served at once
    assert answered == len(SOURCES) * PORTS_EACH
    capacity = NOFILE - WORKER_RESERVED_DESCRIPTORS
    evicted = len(SOURCES) * PORTS_EACH + 1 - capacity
    eventually(
        lambda: (
            value(samples(daemon), "sockd_connections_rejected_total", listener="u", reason="relay_sessions") == evicted
        ),
        "the closed sessions counted",
    )


def test_a_session_that_finds_no_descriptor_closes_the_least_recent_for_its_socket() -> None:
    """Descriptors can run out under the table's bound all the same (the system's, or taken by
    what else the worker holds): the new session's socket closes the least recent session for
    it, once (a second failure is the new session's own)."""
    sessions, recorder = session_table()
    flows = [sessions.open((f"10.0.0.{i}", 5000), Flow) for i in range(3)]
    newcomer = ("192.0.2.1", 5000)
    sessions.open(newcomer, Flow)
    failures = [OSError(errno.EMFILE, "Too many open files")]

    def make() -> socket.socket:
        if failures:
            raise failures.pop()
        return socket.socket(type=socket.SOCK_DGRAM)

    with sessions.socket_for(newcomer, make):
        pass
    assert [flow.closed for flow in flows] == [True, False, False]
    assert recorder.rejected[RELAY_SESSIONS] == 1
    failures += [OSError(errno.EMFILE, "Too many open files")] * 2
    with pytest.raises(OSError, match="Too many open files"):
        sessions.socket_for(newcomer, make)
    assert [flow.closed for flow in flows] == [True, True, False]
    assert recorder.rejected[RELAY_SESSIONS] == 2
