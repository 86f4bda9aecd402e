"""Generations across reloads (sockd.group): a restarted, rebound or removed listener's old
generation serves its sessions on until their clients close them, the generations gauge counts
the ones that do, a stop ends them all, and a storm of reloads is bounded. The real daemon."""

from __future__ import annotations

import collections
import contextlib
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_handlers import rfc864_lines

from support import (
    MODELS,
    TIMEOUT,
    Daemon,
    Launcher,
    Load,
    Session,
    active_connections,
    alive,
    becomes,
    connect,
    eventually,
    free_port,
    inet,
    live_workers,
    read_to_eof,
    request,
    rss_bytes,
    samples,
    tcp_owner,
)
from support import listener as entry

# =============================================================================================
# Sessions across a reload (HAProxy's and nginx's semantics). A listener that is restarted,
# rebound or removed stops accepting at once, but its old generation goes on serving the
# connections it has (reading, answering, relaying) until their clients close them (or
# reload_drain_timeout passes, if set); a stop ends them (what is pending is answered, then EOF). At most
# KEPT_GENERATIONS old generations of a listener keep serving: a reload past that ends the oldest
# as a stop does; and past ALIVE_GENERATIONS old ones alive, the oldest is killed.

KEPT_GENERATIONS = 4


ALIVE_GENERATIONS = 8


SESSIONS_TIMEOUT = 120  # shutdown_timeout here: longer than any test, so no stopped generation's drain ends early


SIZES = (1, 16, 200, 1500, 9000, 32768)  # payload sizes (at least the payload's unique head)


class SessionLoop:
    """A Session in a closed loop in its own thread (request, whole reply, next request), noting
    in which reload turn each exchange completed. Bounded: until stopped, `limit` exchanges or
    `seconds`, or its first failure (an EOF, a reset, a reply that differs)."""

    def __init__(
        self, address: str, name: str, turn: Callable[[], int], limit: int = 1_000_000, seconds: float = 120
    ) -> None:
        self.session = Session(address, name)
        self.name = name
        self.turn = turn
        self.opened_in = turn()
        self.turns: collections.Counter[int] = collections.Counter()  # exchanges completed per turn
        self.failure: str | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(limit, time.monotonic() + seconds))
        self.thread.start()

    def _run(self, limit: int, deadline: float) -> None:
        sizes = random.Random(self.name)
        for _ in range(limit):
            if self.done.is_set() or time.monotonic() > deadline:
                return
            try:
                self.session.exchange(sizes.choice(SIZES))
            except (AssertionError, OSError) as exc:
                self.failure = f"{self.name} in turn {self.turn()}: {exc!r}"
                return
            self.turns[self.turn()] += 1

    def stop(self) -> None:
        self.done.set()
        self.thread.join(30)
        self.session.close()


def _served_in(loops: list[SessionLoop], turn: int, load: Load, answered_before: int) -> None:
    """Wait until, since this turn's reload, every session did at least two exchanges (one whole
    exchange after the reload) and the connection-per-request clients got two more answers, or
    until anything failed (reported by the caller)."""

    def progressed() -> bool:
        if load.failures or any(loop.failure for loop in loops):
            return True
        return all(loop.turns[turn] >= 2 for loop in loops) and load.answered >= answered_before + 2

    eventually(progressed, f"every session and the per-request clients served in turn {turn}", timeout=TIMEOUT)


def _reload_under_sessions(
    daemon: Daemon,
    config: Callable[[int], list[dict[str, object]]],
    turns: int,
    *,
    loops: list[SessionLoop],
    load: Load,
    turn: list[int],
    each_turn: Callable[[int], None] = lambda _: None,
) -> None:
    """`turns` reloads, each restarting the config's one listener, with every session and the
    per-request clients served after each (stopping early at a failure); then they stop."""
    try:
        _served_in(loops, 0, load, 0)
        for number in range(1, turns + 1):
            answered = load.answered
            plan = daemon.reload(config(number), shutdown_timeout=SESSIONS_TIMEOUT)
            assert plan["restarted"] == [config(number)[0]["name"]], plan
            turn[0] = number
            each_turn(number)
            _served_in(loops, number, load, answered)
            if load.failures or any(loop.failure for loop in loops):
                break
    finally:
        load.stop()
        for loop in loops:
            loop.stop()


def _assert_served_throughout(loops: list[SessionLoop], load: Load, last_turn: int) -> None:
    assert [loop.failure for loop in loops if loop.failure] == []  # no EOF, reset or wrong byte
    assert load.failures == []
    for loop in loops:
        # Exchanges before the first reload it saw, and in every turn since: its old generation
        # (each reload after it opened made one) kept answering it.
        missed = [turn for turn in range(loop.opened_in, last_turn + 1) if loop.turns[turn] < 2]
        assert missed == [], (loop.name, loop.opened_in, dict(loop.turns))


@pytest.mark.parametrize("protocol", ["tcp", "unix"])
def test_sessions_are_served_by_their_old_generation_across_twenty_reloads(
    start_sockd: Launcher, sockdir: Path, protocol: str
) -> None:
    where = sockdir / "e.sock" if protocol == "unix" else "127.0.0.1"

    def config(turn: int) -> list[dict[str, object]]:
        # Threaded first: it serves the first sessions at once (iterative would serve one).
        return [entry("echo", protocol, "echo", MODELS[(turn + 1) % len(MODELS)], where)]

    # Under the descriptor limit a service gets by default (systemd's soft 1,024).
    daemon = start_sockd(config(0), prefix=("prlimit", "--nofile=1024"), shutdown_timeout=SESSIONS_TIMEOUT)
    address = daemon.address("echo")
    turn = [0]
    loops = [SessionLoop(address, f"{protocol}-{n}", lambda: turn[0]) for n in range(5)]

    def five_more_on_the_tenth(number: int) -> None:  # generation 10 (asyncio): two old ones hold sessions
        if number == 10:
            loops.extend(SessionLoop(address, f"{protocol}-{n}", lambda: turn[0]) for n in range(5, 10))

    load = Load([address])  # two threads, a connection per request
    _reload_under_sessions(daemon, config, 20, loops=loops, load=load, turn=turn, each_turn=five_more_on_the_tenth)
    _assert_served_throughout(loops, load, 20)
    assert load.answered > 40


class EchoUpstream:
    """A TCP echo server run by the test, as a relay's upstream: a thread per connection, echoing
    until the relay ends its side. Bounded: a connection quiet for `timeout` is closed."""

    def __init__(self, timeout: float = 60) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.timeout = timeout
        self.errors: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(self.timeout)
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError as exc:
                self.errors.append(repr(exc))

    def close(self) -> None:
        self.sock.close()


def test_relay_sessions_are_relayed_by_their_old_generation_across_ten_reloads(start_sockd: Launcher) -> None:
    upstream = EchoUpstream()

    def config(turn: int) -> list[dict[str, object]]:
        # Every turn changes one thing, the model and the connect_timeout in turn.
        model = ("selector", "asyncio")[(turn + 1) // 2 % 2]
        return [entry("r", "tcp", "relay", model, upstream=upstream.url, connect_timeout=5 + turn // 2 % 2)]

    try:
        daemon = start_sockd(config(0), shutdown_timeout=SESSIONS_TIMEOUT)
        address = daemon.address("r")
        turn = [0]
        loops = [SessionLoop(address, f"relayed-{n}", lambda: turn[0]) for n in range(3)]
        load = Load([address])
        _reload_under_sessions(daemon, config, 10, loops=loops, load=load, turn=turn)
        _assert_served_throughout(loops, load, 10)
    finally:
        upstream.close()
    assert upstream.errors == []


def _probe(address: str) -> str:
    """What a new client of this address meets: "refused", or what else (it must not hang)."""
    try:
        with connect(address, timeout=2) as sock:
            sock.sendall(b"?")
            try:
                reply = sock.recv(1)
            except TimeoutError:
                return "accepted by nobody: hangs"
            except ConnectionResetError:
                return "reset"
            return "answered" if reply else "accepted, then EOF"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "connect timed out"


@pytest.mark.parametrize("model", MODELS)
def test_a_removed_listener_refuses_new_clients_and_serves_its_sessions_until_they_close(
    start_sockd: Launcher, model: str
) -> None:
    kept = entry("kept", "tcp", "echo", "asyncio")
    daemon = start_sockd([kept, entry("gone", "tcp", "echo", model)], shutdown_timeout=SESSIONS_TIMEOUT)
    address, worker = daemon.address("gone"), daemon.worker_pid("gone")
    session = Session(address, "on-gone")
    try:
        session.exchange()
        plan = daemon.reload([kept], shutdown_timeout=SESSIONS_TIMEOUT)
        assert plan["removed"] == ["gone"], plan
        session.exchange()  # served on, after the reload
        becomes(lambda: _probe(address), "refused", "a new client of the removed listener")
        for number in range(20):  # a while of request/response on the removed listener
            session.exchange(SIZES[number % len(SIZES)])
            time.sleep(0.02)
        assert _probe(address) == "refused"
        assert alive(worker)
        assert request(daemon.address("kept"), b"unaffected") == b"unaffected"
    finally:
        session.close()
    # Its client gone, the old worker has nothing left to serve.
    assert daemon.wait_for("worker exited", listener="gone", pid=worker)["code"] == 0
    assert not [e for e in daemon.events if e.get("event") == "killing worker"]


def _generations(daemon: Daemon, name: str) -> float | None:
    return samples(daemon).get(("sockd_worker_generations", frozenset({("listener", name)})))


def _new_generation(daemon: Daemon, listeners: list[dict[str, object]], name: str, **settings: object) -> int:
    """Reload, and wait until the listener's new worker serves and its old one accepts no more:
    the new one's pid."""
    old = daemon.worker_pids(name)[-1]
    mark = len(daemon.events)
    assert daemon.reload(listeners, **settings)["restarted"] == [name]
    pid = daemon.worker_pid(name, after=mark)
    daemon.wait_for("serving", pid=pid, after=mark)
    daemon.wait_for("retired: serving the open connections on", pid=old, after=mark)
    return pid


def test_the_generations_gauge_counts_old_generations_that_hold_sessions(start_sockd: Launcher) -> None:
    other = entry("other", "tcp", "echo", "asyncio")
    daemon = start_sockd([other, entry("g", "tcp", "echo", "threaded")], shutdown_timeout=SESSIONS_TIMEOUT)
    address, first = daemon.address("g"), daemon.worker_pid("g")
    a1, a2 = Session(address, "a1"), Session(address, "a2")
    sessions = [a1, a2]
    try:
        for session in sessions:
            session.exchange()
        assert {tcp_owner(a1.sock, [first]), tcp_owner(a2.sock, [first])} == {first}
        second = _new_generation(daemon, [other, entry("g", "tcp", "echo", "selector")], "g")
        for session in sessions:
            session.exchange()  # the first generation serves on
        b = Session(address, "b")
        sessions.append(b)
        b.exchange()
        assert tcp_owner(b.sock, [first, second]) == second  # the first one stopped accepting
        third = _new_generation(daemon, [other, entry("g", "tcp", "echo", "asyncio")], "g")
        for session in sessions:
            session.exchange()
        assert alive(first)
        assert alive(second)
        # Two old generations hold sessions, beside the current one.
        becomes(lambda: _generations(daemon, "g"), 3, 'sockd_worker_generations{listener="g"}')
        becomes(lambda: active_connections(daemon, "g"), 3, 'sockd_connections_active{listener="g"}')
        assert _generations(daemon, "other") == 1
        a1.close()
        becomes(lambda: active_connections(daemon, "g"), 2, "after a1 closed")
        assert alive(first)  # a2 still holds it
        assert _generations(daemon, "g") == 3
        a2.close()
        becomes(lambda: _generations(daemon, "g"), 2, "after the first generation's last session closed")
        daemon.wait_for("worker exited", listener="g", pid=first)
        assert active_connections(daemon, "g") == 1
        b.exchange()
        b.close()
        becomes(lambda: _generations(daemon, "g"), 1, "after every old session closed")
        daemon.wait_for("worker exited", listener="g", pid=second)
        becomes(lambda: active_connections(daemon, "g"), 0, "no session left")
        assert alive(third)
        assert request(address, b"current") == b"current"
    finally:
        for session in sessions:
            session.close()


def test_a_stop_answers_sessions_on_old_and_current_generations_then_ends_them(start_sockd: Launcher) -> None:
    # delay: the last request of each session is still in flight when the stop comes.
    daemon = start_sockd([entry("s", "tcp", "echo", "threaded", delay=0.3)], shutdown_timeout=30)
    address = daemon.address("s")
    sessions = [Session(address, f"old-{n}") for n in range(3)]
    try:
        for session in sessions:
            session.exchange()
        _new_generation(daemon, [entry("s", "tcp", "echo", "selector", delay=0.3)], "s", shutdown_timeout=30)
        sessions += [Session(address, f"new-{n}") for n in range(2)]
        for session in sessions:
            session.exchange()  # the old generation's three too
        last = [session.payload(100) for session in sessions]
        for session, payload in zip(sessions, last, strict=True):
            session.sock.sendall(payload)
        time.sleep(0.1)  # the requests are in the workers' delay
        stopped_at = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        for session, payload in zip(sessions, last, strict=True):
            try:
                got = read_to_eof(session.sock)
            except OSError as exc:
                raise AssertionError(f"{session.name}: {exc!r} instead of its reply and EOF") from exc
            assert got == payload, (session.name, got[:40])  # the last reply, then EOF
        assert daemon.process.wait(15) == 0
        assert time.monotonic() - stopped_at < 15  # sessions that had answers did not hold the stop
    finally:
        for session in sessions:
            session.close()
    assert not [e for e in daemon.events if e.get("event") == "killing worker"]


class Watch:
    """Samples, every 20 ms in a thread, a listener's live workers and the RSS of the daemon and
    them: the highest of each. `runaway` is set past `runaway_at` workers (the test then stops
    making more). Bounded: stopped by the test, or after `seconds`."""

    def __init__(self, daemon: Daemon, name: str, runaway_at: int, seconds: float = 120) -> None:
        self.daemon, self.name, self.runaway_at = daemon, name, runaway_at
        self.most_workers = 0
        self.most_rss = 0
        self.runaway = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(time.monotonic() + seconds,))
        self.thread.start()

    def _run(self, deadline: float) -> None:
        while not self.done.is_set() and time.monotonic() < deadline:
            pids = live_workers(self.daemon, self.name)
            self.most_workers = max(self.most_workers, len(pids))
            if len(pids) > self.runaway_at:
                self.runaway.set()
            total = 0
            for pid in [self.daemon.process.pid, *pids]:
                with contextlib.suppress(OSError, AssertionError):  # exited meanwhile
                    total += rss_bytes(pid)
            self.most_rss = max(self.most_rss, total)
            time.sleep(0.02)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(30)


STORM_MODELS = ["threaded", "selector", "asyncio", "thread_pool"]  # each serves several clients; none spins


def test_a_reload_storm_keeps_four_old_generations_serving_and_bounds_the_rest(start_sockd: Launcher) -> None:
    def config(turn: int) -> list[dict[str, object]]:
        return [entry("storm", "tcp", "echo", STORM_MODELS[turn % len(STORM_MODELS)])]

    daemon = start_sockd(config(0), shutdown_timeout=SESSIONS_TIMEOUT)
    address = daemon.address("storm")
    sessions: list[Session] = []
    # Beside each session, a client that connects and never sends: a drain waits for its first
    # request (shutdown_timeout), so every ended generation lingers and the cap on live
    # generations (the oldest killed) is what bounds them.
    silent: list[socket.socket] = []
    most = 1 + ALIVE_GENERATIONS  # the cap holds before each new generation starts
    watch = Watch(daemon, "storm", runaway_at=3 * most)
    try:

        def another() -> None:
            session = Session(address, f"storm-{len(sessions)}")
            sessions.append(session)
            silent.append(connect(address))
            session.exchange()

        another()
        for number in range(1, 51):
            if watch.runaway.is_set():
                break
            _new_generation(daemon, config(number), "storm", shutdown_timeout=SESSIONS_TIMEOUT)
            another()
        for sock in silent:  # the ended generations have nothing left to wait for
            sock.close()
        becomes(
            lambda: len(live_workers(daemon, "storm")) <= 1 + KEPT_GENERATIONS,
            True,
            "the storm's generations settle to the current one and the kept ones",
            timeout=30,
        )
        states = [session.state() for session in sessions]
        workers = live_workers(daemon, "storm")
        current = workers[-1]
        kept = [n for n, state in enumerate(states) if state == "open"]
        # The kept sessions are the newest ones, after every ended one (EOF after its reply).
        first = kept[0] if kept else len(states)
        assert states == ["eof"] * first + ["open"] * (len(states) - first), states
        assert len(kept) > KEPT_GENERATIONS, ("sessions still served", states)
        owners = {tcp_owner(sessions[n].sock, workers) for n in kept}
        assert None not in owners, (owners, workers)
        assert len(owners - {current}) == KEPT_GENERATIONS, (owners, workers, states)
        for n in kept:
            sessions[n].exchange(9000)
        for _ in range(5):  # settled: it stays there
            generations = _generations(daemon, "storm")
            assert generations is not None
            assert generations <= 1 + KEPT_GENERATIONS
        assert _generations(daemon, "storm") == 1 + len(owners - {current})
        assert not watch.runaway.is_set(), watch.most_workers
        assert request(address, b"after the storm") == b"after the storm"
        after = Session(address, "after")
        sessions.append(after)
        after.exchange()
    finally:
        watch.stop()
        for sock in silent:
            sock.close()
        for session in sessions:
            session.close()
    assert watch.most_workers <= most, watch.most_workers
    assert watch.most_rss < 600 * 2**20, watch.most_rss


def _unix_listening(path: Path) -> bool:
    """Whether any process still holds a listening Unix socket bound to `path` (/proc/net/unix)."""
    listening = "00010000"  # __SO_ACCEPTCON: the flags of a listening socket
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(path) and fields[3] == listening:
            return True
    return False


@pytest.mark.parametrize("model", MODELS)
def test_a_removed_unix_listener_is_let_go_by_its_old_worker_while_its_session_goes_on(
    start_sockd: Launcher, sockdir: Path, model: str
) -> None:
    # Once no process holds the socket, a client still queued on it is reset rather than left
    # waiting for shutdown_timeout: the old worker, which accepts no more, must not hold it.
    kept = entry("kept", "tcp", "echo", "asyncio")
    path = sockdir / "gone.sock"
    daemon = start_sockd([kept, entry("gone", "unix", "echo", model, path)], shutdown_timeout=SESSIONS_TIMEOUT)
    session = Session(str(path), "on-gone")
    try:
        session.exchange()
        assert _unix_listening(path)
        assert daemon.reload([kept], shutdown_timeout=SESSIONS_TIMEOUT)["removed"] == ["gone"]
        becomes(lambda: _unix_listening(path), False, "the removed listener's socket closed everywhere")
        session.exchange()  # while its old worker serves the session on
    finally:
        session.close()


def test_a_listener_moved_to_another_port_and_back_rebinds_its_first_one(start_sockd: Launcher) -> None:
    first, second = free_port(), free_port()

    def on(port: int) -> list[dict[str, object]]:
        return [entry("moving", "tcp", "echo", "asyncio", port=port)]

    daemon = start_sockd(on(first), shutdown_timeout=SESSIONS_TIMEOUT)
    session = Session(f"127.0.0.1:{first}", "on-first")
    try:
        session.exchange()
        assert daemon.reload(on(second), shutdown_timeout=SESSIONS_TIMEOUT)["rebound"] == ["moving"]
        # Once the new worker serves, not a backlog nobody accepts from.
        becomes(lambda: _probe(f"127.0.0.1:{first}"), "refused", "the first port let go")
        assert request(f"127.0.0.1:{second}", b"moved") == b"moved"
        session.exchange()  # its old worker serves it on
        assert daemon.reload(on(first), shutdown_timeout=SESSIONS_TIMEOUT)["rebound"] == ["moving"]
        assert request(f"127.0.0.1:{first}", b"back") == b"back"
        session.exchange()
    finally:
        session.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_reloaded_udp_listener_takes_no_datagram_more_in_its_old_generation(start_sockd: Launcher, loop: str) -> None:
    def config(deny: list[str]) -> list[dict[str, object]]:
        return [entry("udp", "udp", "echo", "asyncio", delay=0.3, event_loop=loop, deny=deny)]

    daemon = start_sockd(config([]), shutdown_timeout=SESSIONS_TIMEOUT)
    address = inet(daemon.address("udp"))
    answers: list[float] = []
    done = threading.Event()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(0.05)

        def send_and_read() -> None:  # a datagram every 20 ms, so that a reply is always due
            deadline = time.monotonic() + 30
            while not done.is_set() and time.monotonic() < deadline:
                client.sendto(b"ping", address)
                with contextlib.suppress(TimeoutError):
                    if client.recv(64):
                        answers.append(time.monotonic())

        thread = threading.Thread(target=send_and_read)
        thread.start()
        try:
            eventually(lambda: len(answers) > 5, "answered before the reload")
            assert daemon.reload(config(["127.0.0.1/32"]), shutdown_timeout=SESSIONS_TIMEOUT)["restarted"] == ["udp"]
            # reload() returned once the old generation was told to retire: it takes no datagram
            # more as soon as it has read that, and its replies due go out within `delay`.
            settled = time.monotonic() + 1.5
            time.sleep(3)
        finally:
            done.set()
            thread.join(30)
    late = [when for when in answers if when > settled]
    assert late == [], f"{len(late)} answers to a denied source after the reload"


# =============================================================================================
# reload_drain_timeout: how long an old generation may serve its sessions on, apart from
# shutdown_timeout (which bounds a stop alone). By default there is no limit.

RELOADED = [("echo", "threaded"), ("relay", "selector")]


def _reloaded_session(
    start_sockd: Launcher,
    upstream: EchoUpstream,
    handler: str,
    model: str,
    *,
    shutdown_timeout: float,
    reload_drain_timeout: float | None = None,
) -> tuple[Daemon, Session, int, float]:
    """A daemon on one listener of `handler` (a relay to `upstream`), a session on it, and a reload
    that restarts the listener: the daemon, the session, its old worker, and when the SIGHUP was sent."""

    def config(idle: int) -> list[dict[str, object]]:
        options = {"upstream": upstream.url} if handler == "relay" else {}
        return [entry("kept", "tcp", handler, model, idle_timeout=idle, **options)]

    daemon = start_sockd(config(300), shutdown_timeout=shutdown_timeout, reload_drain_timeout=reload_drain_timeout)
    old = daemon.worker_pid("kept")
    session = Session(daemon.address("kept"), f"{handler}-session")
    session.exchange()
    reloaded_at = time.monotonic()
    settings = {"shutdown_timeout": shutdown_timeout, "reload_drain_timeout": reload_drain_timeout}
    assert daemon.reload(config(301), **settings)["restarted"] == ["kept"]
    return daemon, session, old, reloaded_at


@pytest.mark.parametrize(("handler", "model"), RELOADED)
def test_sessions_outlive_shutdown_timeout_after_a_reload_without_a_reload_drain_timeout(
    start_sockd: Launcher, handler: str, model: str
) -> None:
    upstream = EchoUpstream()
    try:
        daemon, session, old, _ = _reloaded_session(start_sockd, upstream, handler, model, shutdown_timeout=1)
        try:
            session.exchange()
            time.sleep(3)  # well past shutdown_timeout, which no longer bounds a reload's drain
            for size in SIZES:
                session.exchange(size)
            assert tcp_owner(session.sock, [old]) == old  # served by the old generation all along
        finally:
            session.close()
        assert daemon.wait_for("worker exited", listener="kept", pid=old)["code"] == 0  # its client gone
    finally:
        upstream.close()
    assert not [event for event in daemon.events if event.get("event") == "killing worker"]
    assert upstream.errors == []


@pytest.mark.parametrize(("handler", "model"), RELOADED)
def test_a_reload_drain_timeout_ends_the_old_generations_sessions_once_it_passes(
    start_sockd: Launcher, handler: str, model: str
) -> None:
    upstream = EchoUpstream()
    try:
        daemon, session, old, reloaded_at = _reloaded_session(
            start_sockd, upstream, handler, model, shutdown_timeout=60, reload_drain_timeout=2
        )
        try:
            becomes(session.state, "eof", "the old generation's session ended", timeout=TIMEOUT + 2)
            assert time.monotonic() - reloaded_at >= 2  # not before the timeout passed
        finally:
            session.close()
        # Its drain took what a stop's takes, far less than shutdown_timeout: nothing was killed.
        assert daemon.wait_for("worker exited", listener="kept", pid=old)["code"] == 0
    finally:
        upstream.close()
    assert not [event for event in daemon.events if event.get("event") == "killing worker"]


@pytest.mark.parametrize("model", ["threaded", "selector"])
def test_a_chargen_stream_goes_on_through_a_reload_until_the_reload_drain_timeout(
    start_sockd: Launcher, model: str
) -> None:
    def config(idle: int) -> list[dict[str, object]]:
        return [entry("cg", "tcp", "chargen", model, idle_timeout=idle)]

    daemon = start_sockd(config(300), shutdown_timeout=60, reload_drain_timeout=2)
    old = daemon.worker_pid("cg")
    period = rfc864_lines(95)
    cycle = period * (2 + (1 << 16) // len(period))  # any read of up to 64 KiB, from any offset
    with connect(daemon.address("cg"), timeout=TIMEOUT) as sock:
        received = 0
        reloaded_at = time.monotonic()
        assert daemon.reload(config(301), shutdown_timeout=60, reload_drain_timeout=2)["restarted"] == ["cg"]
        assert tcp_owner(sock, [old]) == old
        while chunk := sock.recv(1 << 16):  # the old worker streams on, unbroken, until its drain's EOF
            offset = received % len(period)
            assert chunk == cycle[offset : offset + len(chunk)]
            received += len(chunk)
            time.sleep(0.01)  # a slow reader: the stream waits for it, and spares the CPU
        assert time.monotonic() - reloaded_at >= 2  # not before the timeout passed
    assert daemon.wait_for("worker exited", listener="cg", pid=old)["code"] == 0
    assert not [event for event in daemon.events if event.get("event") == "killing worker"]
