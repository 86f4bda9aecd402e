"""A bounded soak test: the real daemon under mixed TCP, UDP and Unix load for a while, with
reloads and worker kills every few seconds. Every request must get exactly its reply, and the
daemon's memory and descriptors must not grow from the first to the last part of the run.

SOCKD_SOAK_SECONDS sets how long the load runs (default 60, the version `make test` and CI run).
The issue's 10-minute soak is opt-in:

    SOCKD_SOAK_SECONDS=600 .venv/bin/pytest -m soak -s tests/test_soak.py

The test is marked `soak`: `pytest -m soak` selects it, `pytest -m "not soak"` leaves it out.

What it does:

- four listeners, each an echo: TCP (asyncio), TCP (selector), UDP (iterative), Unix (threaded);
- a few client threads per listener, each sending random payloads one request at a time and
  checking every reply byte for byte; stream clients reconnect every RECONNECT_EVERY requests;
- every DISTURB_EVERY seconds, alternately, a reload that changes one listener (its `delay`, or the
  selector listener's model between selector and busy_poll; the others must be kept) and a SIGTERM
  to another listener's worker (it drains, exits 0, and the supervisor starts a new one);
- the RSS and open descriptors of the supervisor, its fork server and its workers, summed,
  sampled while no disturbance is in progress, compared between the first and the last 10% of
  the run.

A request may be sent again only when a disturbance ended its connection (the drain's EOF, a
reset or EPIPE) or, over UDP, after a timeout; never more than a few times, and a late duplicate
reply to a resent datagram must still be byte-for-byte a reply to one this client sent.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from support import Daemon, Launcher, config_text, connect, inet, listener

SECONDS = float(os.environ.get("SOCKD_SOAK_SECONDS", "60"))
DISTURB_EVERY = 5.0  # seconds between disturbances, alternately a reload and a worker kill
WINDOW = 0.1  # the fraction of the run at each end whose resource samples are compared
SAMPLE_EVERY = 0.5  # seconds between resource samples
SHUTDOWN_TIMEOUT = 20.0  # generous: a drain that needs it is a bug, caught as "killing worker"

STREAM_CLIENTS = 3  # client threads per stream listener
UDP_CLIENTS = 3
RECONNECT_EVERY = 50  # requests per stream connection
STREAM_SIZES = (1, 8192)
DATAGRAM_SIZES = (1, 1400)
STREAM_ATTEMPTS = 5  # sends of one request at most, when disturbances end its connections
UDP_ATTEMPTS = 15  # sends of one datagram at most, each waiting UDP_TIMEOUT for the reply
UDP_TIMEOUT = 1.0
IO_TIMEOUT = 15.0  # no single send or receive may take longer: a hang is a lost request
OWED_KEPT = 256  # resent datagrams whose late duplicate replies a UDP client still accepts
GRACE = 5.0  # seconds after a disturbance ends within which a client may still notice it

FD_SLACK = 8
RSS_FACTOR, RSS_SLACK_KIB = 1.25, 8 * 1024

# name, protocol, concurrency, the option a reload toggles, and its two values
LISTENERS: list[tuple[str, str, str, str, tuple[Any, Any]]] = [
    ("tcp-asyncio", "tcp", "asyncio", "delay", (0, 0.0001)),
    ("tcp-selector", "tcp", "selector", "concurrency", ("selector", "busy_poll")),
    ("udp-iterative", "udp", "iterative", "delay", (0, 0.0001)),
    ("unix-threaded", "unix", "threaded", "delay", (0, 0.0001)),
]
NAMES = [name for name, *_ in LISTENERS]

pytestmark = pytest.mark.soak


class Interrupted(Exception):
    """A stream ended before the whole reply came: the drain of a retired or killed worker."""


class Corrupted(Exception):
    """A reply that is not what was sent."""


@dataclass
class Tally:
    """What one client thread did; only that thread writes it, the test reads it once joined."""

    listener: str
    stream: bool
    requests: int = 0  # answered, each exactly
    payload_bytes: int = 0
    connections: int = 0
    interrupted: int = 0  # stream: sent again after a disturbance ended its connection
    retries: int = 0  # udp: sent again after UDP_TIMEOUT without its reply
    stale: int = 0  # udp: late duplicate replies to resent datagrams, checked and dropped
    refused: int = 0  # connect() refused or the socket file missing: never expected
    noticed: list[float] = field(default_factory=list)  # monotonic times of interruptions (stream)
    failures: list[str] = field(default_factory=list)  # lost or corrupted: the test fails


@dataclass
class Disturbance:
    kind: str  # "reload" or "kill"
    listener: str
    started: float
    settled: float = float("inf")  # once the old worker has exited and the new one serves
    old_pid: int = 0
    new_pid: int = 0


@dataclass
class Sample:
    at: float  # seconds since the load started
    rss_kib: int  # the supervisor's and its workers', summed
    fds: int
    supervisor_rss_kib: int  # the supervisor's alone (it lives for the whole run; workers do not)
    supervisor_fds: int


class Soak:
    """The daemon, its listeners' current settings and worker pids, and the run's shared state."""

    def __init__(self, start_sockd: Launcher, sockdir: os.PathLike[str]) -> None:
        self.choice = dict.fromkeys(NAMES, 0)  # which of its two values each toggled option has
        self.unix_path = os.path.join(sockdir, "echo.sock")
        self.daemon: Daemon = start_sockd(self.listeners(), shutdown_timeout=SHUTDOWN_TIMEOUT)
        self.addresses = {name: self.daemon.address(name) for name in NAMES}
        self.pids = {name: self.daemon.worker_pid(name) for name in NAMES}
        self.pids_lock = threading.Lock()
        self.stop = threading.Event()
        self.steady = threading.Event()  # no disturbance in progress
        self.steady.set()
        self.started = time.monotonic()
        self.disturbances: list[Disturbance] = []
        self.samples: list[Sample] = []
        self.errors: list[str] = []  # the disturber's and the sampler's own failures

    def listeners(self) -> list[dict[str, Any]]:
        entries = []
        for name, protocol, concurrency, option, values in LISTENERS:
            where = self.unix_path if protocol == "unix" else "127.0.0.1"
            value = values[self.choice[name]]
            if option == "concurrency":
                entries.append(listener(name, protocol, "echo", value, where))
            else:
                entries.append(listener(name, protocol, "echo", concurrency, where, **{option: value}))
        return entries

    # -- disturbances

    def disturb(self) -> None:
        """Every DISTURB_EVERY seconds until the load stops: reload one listener, then kill
        another's worker, each waited for until the new worker serves and the old one is gone."""
        try:
            for number in range(int(SECONDS // DISTURB_EVERY) + 1):
                due = self.started + DISTURB_EVERY * (number + 1)
                if due >= self.started + SECONDS or self.stop.wait(max(0.0, due - time.monotonic())):
                    return
                turn = number // 2
                if number % 2 == 0:
                    self.reload(NAMES[turn % len(NAMES)])
                else:
                    self.kill(NAMES[(turn + 2) % len(NAMES)])
        except Exception as exc:  # reported by the test, which then fails
            self.errors.append(f"disturbance failed: {exc!r}")
            self.stop.set()

    def reload(self, name: str) -> None:
        daemon = self.daemon
        self.choice[name] ^= 1
        text = config_text(self.listeners(), shutdown_timeout=SHUTDOWN_TIMEOUT)
        staged = daemon.config_path.with_suffix(".new")
        staged.write_text(text)
        os.replace(staged, daemon.config_path)
        self.steady.clear()
        mark = len(daemon.events)
        disturbance = Disturbance("reload", name, time.monotonic(), old_pid=self.pids[name])
        self.disturbances.append(disturbance)
        daemon.process.send_signal(signal.SIGHUP)
        plan = daemon.wait_for("reloaded", after=mark, timeout=30)
        assert plan.get("restarted") == [name], plan
        assert plan.get("kept") == [other for other in NAMES if other != name], plan
        self.replaced(
            disturbance,
            mark,
            daemon.wait_for("worker exited", after=mark, pid=disturbance.old_pid, timeout=SHUTDOWN_TIMEOUT + 10),
        )

    def kill(self, name: str) -> None:
        daemon = self.daemon
        self.steady.clear()
        mark = len(daemon.events)
        disturbance = Disturbance("kill", name, time.monotonic(), old_pid=self.pids[name])
        self.disturbances.append(disturbance)
        os.kill(disturbance.old_pid, signal.SIGTERM)
        died = daemon.wait_for(
            "worker died; restarting", after=mark, pid=disturbance.old_pid, timeout=SHUTDOWN_TIMEOUT + 10
        )
        self.replaced(disturbance, mark, died)

    def replaced(self, disturbance: Disturbance, mark: int, ended: dict[str, Any]) -> None:
        """The old worker has ended (`ended`, its log event); wait for its successor to serve."""
        assert ended.get("code") == 0, f"the old worker did not drain and exit 0: {ended}"
        new_pid = self.daemon.worker_pid(disturbance.listener, after=mark)
        self.daemon.wait_for("serving", pid=new_pid, after=mark, timeout=30)
        disturbance.new_pid = new_pid
        disturbance.settled = time.monotonic()
        with self.pids_lock:
            self.pids[disturbance.listener] = new_pid
        self.steady.set()

    # -- resources

    def sample(self) -> None:
        """RSS and open descriptors of the supervisor, its fork server and its workers, while nothing
        is changing."""
        try:
            for _ in range(int(SECONDS / SAMPLE_EVERY) * 2 + 10):  # until the stop, bounded
                if self.stop.wait(SAMPLE_EVERY):
                    return
                if not self.steady.is_set():
                    continue
                with self.pids_lock:
                    workers = set(self.pids.values())
                supervisor = self.daemon.process.pid
                fork_server = int(self.daemon.wait_for("fork server started")["pid"])
                if set(children(supervisor)) != {fork_server, *workers}:  # one starting or ending: not steady
                    continue
                found = [usage(pid) for pid in [supervisor, fork_server, *sorted(workers)]]
                if self.steady.is_set() and all(found):
                    rss = sum(entry[0] for entry in found if entry)
                    fds = sum(entry[1] for entry in found if entry)
                    own = found[0] or (0, 0)
                    self.samples.append(Sample(time.monotonic() - self.started, rss, fds, *own))
        except Exception as exc:
            self.errors.append(f"sampling failed: {exc!r}")
            self.stop.set()

    # -- after the run

    def windows(self) -> tuple[list[Sample], list[Sample]]:
        """The resource samples of the first and of the last WINDOW of the run."""
        first = [sample for sample in self.samples if sample.at <= SECONDS * WINDOW]
        last = [sample for sample in self.samples if sample.at >= SECONDS * (1 - WINDOW)]
        return first, last

    def explained(self, name: str, at: float) -> bool:
        """Whether a disturbance of this listener was under way (or just over) at `at`."""
        return any(d.listener == name and d.started <= at <= d.settled + GRACE for d in list(self.disturbances))


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def usage(pid: int) -> tuple[int, int] | None:
    """(VmRSS in KiB, open descriptors) of a process, or None if it has gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return None


# -- clients


class StreamClient:
    """Request after request on one connection, a new connection every RECONNECT_EVERY."""

    def __init__(self, address: str, tally: Tally, stop: threading.Event, seed: int) -> None:
        self.address = address
        self.tally = tally
        self.stop = stop
        self.rng = random.Random(seed)
        self.conn: socket.socket | None = None
        self.on_this = 0  # requests answered on this connection

    def run(self) -> None:
        tally = self.tally
        try:
            while not self.stop.is_set():
                if self.conn is not None and self.on_this >= RECONNECT_EVERY:
                    close_cleanly(self.conn)
                    self.conn = None
                payload = self.rng.randbytes(self.rng.randint(*STREAM_SIZES))
                if not any(self.exchange(payload) for _ in range(STREAM_ATTEMPTS)):
                    tally.failures.append(
                        f"lost: no whole reply to a {len(payload)}-byte request in {STREAM_ATTEMPTS} sends"
                    )
                    return
                self.on_this += 1
                tally.requests += 1
                tally.payload_bytes += len(payload)
        except Corrupted as exc:
            tally.failures.append(f"corrupted: {exc}")
        except TimeoutError:
            tally.failures.append(f"lost: no reply within {IO_TIMEOUT} s")
        except OSError as exc:
            tally.failures.append(f"unexpected error: {exc!r}")
        finally:
            if self.conn is not None:
                self.conn.close()
            if tally.failures:
                self.stop.set()  # the test fails: no need to run to the end

    def exchange(self, payload: bytes) -> bool:
        """Send `payload` and read its reply: False if a disturbance ended the connection first
        (it is closed then, and the next try connects again)."""
        try:
            if self.conn is None:
                self.conn = connect(self.address, timeout=IO_TIMEOUT)
                self.tally.connections += 1
                self.on_this = 0
            self.conn.sendall(payload)
            read_reply(self.conn, payload)
            return True
        except (Interrupted, ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            self.tally.interrupted += 1
            self.tally.noticed.append(time.monotonic())
        except (ConnectionRefusedError, FileNotFoundError):
            self.tally.refused += 1
            time.sleep(0.05)
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        return False


def stream_client(address: str, tally: Tally, stop: threading.Event, seed: int) -> None:
    StreamClient(address, tally, stop, seed).run()


def read_reply(conn: socket.socket, payload: bytes) -> None:
    """Read len(payload) bytes, each checked as it comes: Corrupted on the first wrong one,
    Interrupted if the stream ends first."""
    expected = memoryview(payload)
    got = 0
    while got < len(payload):
        chunk = conn.recv(len(payload) - got)
        if not chunk:
            raise Interrupted
        if expected[got : got + len(chunk)] != chunk:
            raise Corrupted(
                f"{len(payload)}-byte request: wrong bytes in the reply at offset {got}..{got + len(chunk)}"
            )
        got += len(chunk)


def close_cleanly(conn: socket.socket) -> None:
    """Half-close and read to EOF: after its replies, the server must send nothing more."""
    with conn:
        try:
            conn.shutdown(socket.SHUT_WR)
            extra = conn.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return  # ended by a drain meanwhile: nothing was pending
        if extra:
            raise Corrupted(f"{len(extra)} bytes after every reply had been read")


def udp_client(address: str, tally: Tally, stop: threading.Event, seed: int) -> None:
    """One datagram at a time, sent again after UDP_TIMEOUT; every reply must be to a datagram
    this client sent (the current one, or a late duplicate of one it resent)."""
    rng = random.Random(seed)
    server = inet(address)
    owed: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # resent: replies still due
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(UDP_TIMEOUT)
        try:
            while not stop.is_set():
                payload = rng.randbytes(rng.randint(*DATAGRAM_SIZES))
                sends = 0
                while True:
                    if sends == UDP_ATTEMPTS:
                        tally.failures.append(f"lost: no reply to a {len(payload)}-byte datagram in {sends} sends")
                        return
                    sock.sendto(payload, server)
                    sends += 1
                    if sends > 1:
                        tally.retries += 1
                    if await_reply(sock, server, payload, owed, tally):
                        break
                if sends > 1:
                    owed[payload] = owed.get(payload, 0) + sends - 1
                    while len(owed) > OWED_KEPT:
                        owed.popitem(last=False)
                tally.requests += 1
                tally.payload_bytes += len(payload)
        except Corrupted as exc:
            tally.failures.append(f"corrupted: {exc}")
        except OSError as exc:
            tally.failures.append(f"unexpected error: {exc!r}")
        finally:
            if tally.failures:
                stop.set()


def await_reply(
    sock: socket.socket, server: tuple[str, int], payload: bytes, owed: dict[bytes, int], tally: Tally
) -> bool:
    """Whether `payload`'s reply came within UDP_TIMEOUT; late duplicates are checked and dropped."""
    deadline = time.monotonic() + UDP_TIMEOUT
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            reply, sender = sock.recvfrom(65536)
        except TimeoutError:
            return False
        if sender[:2] != server:
            raise Corrupted(f"a datagram from {sender}, not the server")
        if reply == payload:
            return True
        if owed.get(reply, 0) > 0:
            owed[reply] -= 1
            tally.stale += 1
            continue
        raise Corrupted(f"a {len(reply)}-byte reply to no datagram sent, awaiting a {len(payload)}-byte one")
    return False


def run_threads(targets: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, args=args, daemon=True) for target, args in targets]
    for thread in threads:
        thread.start()
    return threads


def test_soak_mixed_load_with_reloads_and_worker_kills(start_sockd: Launcher, sockdir: os.PathLike[str]) -> None:
    assert 1 <= SECONDS <= 3600, f"SOCKD_SOAK_SECONDS={SECONDS}: between 1 and 3600, please"
    soak = Soak(start_sockd, sockdir)
    seed = random.randrange(1 << 32)
    tallies: list[Tally] = []
    clients: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
    for name, protocol, *_ in LISTENERS:
        count, client = (UDP_CLIENTS, udp_client) if protocol == "udp" else (STREAM_CLIENTS, stream_client)
        for _ in range(count):
            tally = Tally(name, stream=protocol != "udp")
            tallies.append(tally)
            clients.append((client, (soak.addresses[name], tally, soak.stop, seed + len(tallies))))
    soak.started = time.monotonic()
    client_threads = run_threads(clients)
    helpers = run_threads([(soak.disturb, ()), (soak.sample, ())])

    soak.stop.wait(SECONDS)
    soak.stop.set()
    for thread in [*client_threads, *helpers]:
        thread.join(IO_TIMEOUT * 2 + SHUTDOWN_TIMEOUT)
    still = [thread.name for thread in [*client_threads, *helpers] if thread.is_alive()]
    elapsed = time.monotonic() - soak.started
    daemon = soak.daemon
    code = daemon.stop()

    report(soak, tallies, seed, elapsed)
    assert not still, f"threads that did not stop: {still}"
    assert code == 0, daemon.other_lines
    assert not soak.errors, soak.errors
    check_requests(soak, tallies)
    check_workers(soak)
    check_resources(soak)


def check_requests(soak: Soak, tallies: list[Tally]) -> None:
    """No request lost or corrupted, and none sent again without a reason."""
    failures = [f"{tally.listener}: {failure}" for tally in tallies for failure in tally.failures]
    assert not failures, failures
    # Every listener served, and every disturbance was seen through.
    for name in NAMES:
        assert sum(t.requests for t in tallies if t.listener == name) > 0, f"{name} answered nothing"
    expected = int((SECONDS - 1e-9) // DISTURB_EVERY)
    assert len(soak.disturbances) == expected, soak.disturbances
    assert all(d.settled < float("inf") for d in soak.disturbances), soak.disturbances

    # A stream request was sent again only because a disturbance of its listener ended its
    # connection, at most twice per client and disturbance; no connection was refused.
    assert sum(t.refused for t in tallies) == 0, "a connection was refused while the supervisor held the socket"
    for name in NAMES:
        mine = [t for t in tallies if t.listener == name and t.stream]
        disturbed = sum(d.listener == name for d in soak.disturbances)
        interrupted = sum(t.interrupted for t in mine)
        assert interrupted <= 2 * len(mine) * disturbed, (
            f"{name}: {interrupted} interruptions, {disturbed} disturbances"
        )
    unexplained = [
        (tally.listener, round(at - soak.started, 3))
        for tally in tallies
        for at in tally.noticed
        if not soak.explained(tally.listener, at)
    ]
    assert not unexplained, f"requests sent again with no disturbance under way: {unexplained}"
    # Loopback UDP does not drop: a datagram is sent again (a retry) only when its reply is late.
    udp = [t for t in tallies if not t.stream]
    udp_requests, udp_retries = sum(t.requests for t in udp), sum(t.retries for t in udp)
    assert udp_retries <= udp_requests / 1000, f"{udp_retries} UDP retries for {udp_requests} datagrams"


def check_workers(soak: Soak) -> None:
    """Only the workers the test stopped ended, each with a drain (exit 0), none killed."""
    events = list(soak.daemon.events)
    died = {e["pid"] for e in events if e.get("event") == "worker died; restarting"}
    assert died == {d.old_pid for d in soak.disturbances if d.kind == "kill"}, died
    assert not [e for e in events if e.get("event") == "killing worker"]
    assert all(e.get("code") == 0 for e in events if e.get("event") in ("worker exited", "worker died; restarting"))


def check_resources(soak: Soak) -> None:
    """Memory and descriptors flat from the first to the last part of the run."""
    first, last = soak.windows()
    assert first, "no resource sample in the first part of the run"
    assert last, "no resource sample in the last part of the run"
    fds_first, fds_last = statistics.median(s.fds for s in first), statistics.median(s.fds for s in last)
    rss_first, rss_last = statistics.median(s.rss_kib for s in first), statistics.median(s.rss_kib for s in last)
    assert fds_last <= fds_first + FD_SLACK, f"open descriptors grew: {fds_first} -> {fds_last}"
    assert rss_last <= rss_first * RSS_FACTOR + RSS_SLACK_KIB, f"RSS grew: {rss_first} KiB -> {rss_last} KiB"


def report(soak: Soak, tallies: list[Tally], seed: int, elapsed: float) -> None:
    """What the run did, for `pytest -s` and for the failure output."""
    print(f"\nsoak: {elapsed:.1f} s of load (SOCKD_SOAK_SECONDS={SECONDS:g}), seed {seed}")
    for name in NAMES:
        mine = [t for t in tallies if t.listener == name]
        print(
            f"  {name:14} requests {sum(t.requests for t in mine):>8}"
            f"  MiB {sum(t.payload_bytes for t in mine) / 2**20:>8.1f}"
            f"  connections {sum(t.connections for t in mine):>6}"
            f"  interrupted {sum(t.interrupted for t in mine):>4}"
            f"  retries {sum(t.retries for t in mine):>4}"
            f"  stale {sum(t.stale for t in mine):>4}"
            f"  refused {sum(t.refused for t in mine):>3}"
            f"  failures {sum(len(t.failures) for t in mine)}"
        )
    for d in soak.disturbances:
        took = d.settled - d.started
        print(
            f"  {d.started - soak.started:6.1f} s  {d.kind:6} {d.listener:14} {d.old_pid} -> {d.new_pid}  {took:.2f} s"
        )
    first, last = soak.windows()
    for label, window in (("first", first), ("last", last)):
        if window:
            print(
                f"  {label:5} {SECONDS * WINDOW:g} s: {len(window)} samples,"
                f" fds median {statistics.median(s.fds for s in window):g} (max {max(s.fds for s in window)}),"
                f" RSS median {statistics.median(s.rss_kib for s in window) / 1024:.1f} MiB"
                f" (max {max(s.rss_kib for s in window) / 1024:.1f});"
                f" the supervisor alone: fds {statistics.median(s.supervisor_fds for s in window):g},"
                f" RSS {statistics.median(s.supervisor_rss_kib for s in window) / 1024:.1f} MiB"
            )
    if soak.errors:
        print(f"  errors: {soak.errors}")
