"""The client processes of `sockd bench`: what generates the load, and nothing of what is shown.

Client processes (one per core unless told) each run their share of the connections in one
selector loop: a connection sends its request, waits for the whole reply, records the round trip
and sends the next one. Each process returns its Tally (report.py); the parent merges them.

Targets are loopback addresses and Unix socket paths only: this measures a deployment on this
machine, and cannot be turned on somebody else's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import multiprocessing
import os
import random
import selectors
import signal
import socket
import sys
import time
import urllib.parse
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Literal, TextIO, cast

from sockd_bench.report import Tally

if TYPE_CHECKING:
    # For the annotations only: client processes import this module, and need not load pydantic.
    from sockd.config import ProtocolName

Mode = Literal["echo", "connect"]

MAX_FAILURES = 100  # consecutive failures after which a connection is no longer reopened
UDP_MAX = 65507  # the largest payload of an IPv4 UDP datagram
UNIX_PATH_MAX = 107  # sun_path's 108 bytes, less the terminating NUL
START_TIMEOUT = 30.0  # seconds client processes, or a sockd, get to start, and to finish after the run
PROGRESS_NS = 500_000_000  # how often a client process reports its count to the parent
SWEEP_NS = 50_000_000  # how often UDP requests are checked for a lost datagram
RECV_SIZE = 65536

BOTH = selectors.EVENT_READ | selectors.EVENT_WRITE


class BenchError(Exception):
    """A run that cannot go on (a client process or a sockd that failed); the message is one line."""


@dataclasses.dataclass(frozen=True)
class Target:
    protocol: ProtocolName
    family: socket.AddressFamily
    address: tuple[str, int] | str
    url: str


def parse_target(text: str) -> Target:
    """tcp://HOST:PORT, udp://HOST:PORT (HOST a loopback address or a name for one; [::1] for
    IPv6) or unix:///PATH; ValueError with a one-line reason otherwise."""
    usage = f"{text!r}: a target is tcp://HOST:PORT, udp://HOST:PORT or unix:///PATH"
    parts = urllib.parse.urlsplit(text)
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError(f"{usage} (an absolute path: three slashes)")
        if len(os.fsencode(parts.path)) > UNIX_PATH_MAX:
            raise ValueError(f"{text!r}: a Unix socket path has at most {UNIX_PATH_MAX} bytes")
        return Target("unix", socket.AF_UNIX, parts.path, text)
    if parts.scheme not in ("tcp", "udp"):
        raise ValueError(usage)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535") from None
    if not parts.hostname or not port or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(usage)
    kind = socket.SOCK_STREAM if parts.scheme == "tcp" else socket.SOCK_DGRAM
    try:
        family, _, _, _, address = socket.getaddrinfo(parts.hostname, port, type=kind)[0]
    except socket.gaierror as exc:
        raise ValueError(f"{text!r}: cannot resolve {parts.hostname!r}: {exc.strerror}") from None
    host = str(address[0])
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{text!r}: {host} is not a loopback address; sockd bench only loads this machine")
    return Target("tcp" if parts.scheme == "tcp" else "udp", family, (host, port), text)


@dataclasses.dataclass(frozen=True)
class Load:
    target: Target
    mode: Mode
    connections: int
    size: int
    duration: float
    processes: int
    timeout: float  # UDP: a reply not back within this many seconds is a lost datagram
    check_echo: bool  # UDP: a reply must equal its request (False against a timestamp server)


# ---------------------------------------------------------------------------------------------
# A client process


@dataclasses.dataclass(frozen=True)
class Share:
    """One client process's part of a load: the ids of its connections."""

    load: Load
    ids: tuple[int, ...]


class _Connection:
    """One closed-loop connection: its socket (None between a failure and its reopening), its
    payload and how far its current request has gone."""

    __slots__ = (
        "answered",
        "connecting",
        "events",
        "failures",
        "payload",
        "received",
        "sent",
        "sock",
        "started",
        "view",
    )

    def __init__(self, ident: int, size: int) -> None:
        # Fixed per connection and different between connections: a reply that came back altered,
        # or to the wrong connection, does not match.
        self.payload = random.Random(ident).randbytes(size)
        self.view = memoryview(self.payload)
        self.sock: socket.socket | None = None
        self.connecting = False
        self.answered = False
        self.events = 0
        self.sent = self.received = self.started = self.failures = 0


class _Client:
    """A client process's connections, run in one non-blocking selector loop until the deadline."""

    def __init__(self, share: Share, channel: Connection) -> None:
        load = share.load
        self.load = load
        self.target = load.target
        self.kind = socket.SOCK_DGRAM if load.target.protocol == "udp" else socket.SOCK_STREAM
        self.udp = load.target.protocol == "udp"
        self.per_request = load.mode == "connect"
        self.size = load.size
        self.timeout_ns = round(load.timeout * 1e9)
        self.conns = [_Connection(ident, load.size) for ident in share.ids]
        self.channel = channel
        self.selector = selectors.DefaultSelector()
        self.selector.register(channel, selectors.EVENT_READ)  # data None: the parent
        # A connection the server never answers is no error (it may be queued behind others, as
        # at an iterative server): counted down at each first answer, what is left is reported.
        self.tally = Tally(unanswered=len(self.conns))
        self.reopen: list[_Connection] = []
        self.alive = len(self.conns)
        self.deadline = 0
        self.on_data = self._on_datagram if self.udp else self._on_reply if self.per_request else self._on_echo

    def run(self) -> Tally:
        cpu = time.process_time()
        start = now = time.perf_counter_ns()
        self.deadline = start + round(self.load.duration * 1e9)
        self.reopen = list(self.conns)
        report_at = start + PROGRESS_NS
        sweep_at = start + SWEEP_NS if self.udp else self.deadline  # only a datagram gets lost
        while self.alive and now < self.deadline:
            # Reopened here rather than where they failed: a refused connection is not retried
            # from inside its own failure, over and over, before anything else runs.
            pending, self.reopen = self.reopen, []
            for conn in pending:
                self._open(conn)
            wait_ns = 0 if self.reopen else min(self.deadline, report_at, sweep_at) - now
            for key, mask in self.selector.select(max(wait_ns, 0) / 1e9):
                conn = key.data
                if conn is None:  # the parent closed its end: Ctrl-C, or it is gone
                    self.deadline = 0
                elif key.fileobj is conn.sock:  # not closed, perhaps replaced, earlier in this batch
                    self._ready(conn, cast(socket.socket, key.fileobj), mask)
            now = time.perf_counter_ns()
            if now >= report_at:
                self.channel.send(("progress", (self.tally.requests, self.tally.unanswered)))
                report_at = now + PROGRESS_NS
            if self.udp and now >= sweep_at:
                self._sweep(now)
                sweep_at = now + SWEEP_NS
        self.tally.wall = self.tally.elapsed = (time.perf_counter_ns() - start) / 1e9
        self.tally.cpu = time.process_time() - cpu
        for conn in self.conns:
            if conn.sock is not None:
                self._close(conn, conn.sock)
        return self.tally

    def _open(self, conn: _Connection) -> None:
        try:
            sock = socket.socket(self.target.family, self.kind)
        except OSError as exc:  # EMFILE: more connections than the descriptor limit allows
            self._failed(conn, _reason(exc))
            return
        sock.setblocking(False)
        if self.target.protocol == "tcp":
            # Nagle's algorithm would hold a small request back until the previous reply is acked.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock = sock
        conn.started = time.perf_counter_ns()  # in connect mode, the connect is part of the request
        code = sock.connect_ex(self.target.address)
        conn.connecting = code == errno.EINPROGRESS
        conn.events = selectors.EVENT_WRITE if conn.connecting else selectors.EVENT_READ
        self.selector.register(sock, conn.events, conn)
        if code == errno.EAGAIN:  # what a Unix socket says instead of queueing the SYN
            self._failed(conn, "listen backlog full")
        elif code and not conn.connecting:
            self._failed(conn, _describe(code))
        elif not conn.connecting:
            self._begin(conn, sock)

    def _ready(self, conn: _Connection, sock: socket.socket, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            if conn.connecting:
                self._connected(conn, sock)
            else:
                self._send(conn, sock)
        if mask & selectors.EVENT_READ and conn.sock is sock:
            self._receive(conn, sock)

    def _connected(self, conn: _Connection, sock: socket.socket) -> None:
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._failed(conn, _describe(code))
            return
        conn.connecting = False
        self._begin(conn, sock)

    def _begin(self, conn: _Connection, sock: socket.socket) -> None:
        if not self.per_request:  # echo mode times the round trip on an open connection
            conn.started = time.perf_counter_ns()
        conn.sent = conn.received = 0
        self._send(conn, sock)

    def _send(self, conn: _Connection, sock: socket.socket) -> None:
        try:
            conn.sent += sock.send(conn.view[conn.sent :])
            finished = conn.sent == self.size
            if finished and self.per_request:
                sock.shutdown(socket.SHUT_WR)  # the end of the request, as the seed's clients say it
        except BlockingIOError:
            finished = False
        except OSError as exc:
            self._failed(conn, _reason(exc))
            return
        # Reading while still sending: an echo server blocks on a reply nobody reads.
        self._want(conn, sock, selectors.EVENT_READ if finished else BOTH)

    def _receive(self, conn: _Connection, sock: socket.socket) -> None:
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._failed(conn, _reason(exc))
            return
        self.on_data(conn, sock, data)

    def _on_datagram(self, conn: _Connection, sock: socket.socket, data: bytes) -> None:
        if self.load.check_echo and data != conn.payload:
            self._failed(conn, "wrong echo")
        else:
            self._done(conn, sock)

    def _on_reply(self, conn: _Connection, sock: socket.socket, data: bytes) -> None:
        if data:
            conn.received += len(data)
        elif conn.received:
            self._done(conn, sock)
        else:
            self._failed(conn, "closed without a reply")

    def _on_echo(self, conn: _Connection, sock: socket.socket, data: bytes) -> None:
        if not data:
            self._failed(conn, "closed by the server")
            return
        end = conn.received + len(data)
        if conn.view[conn.received : end] != data:  # shorter than data too: more came back than was sent
            self._failed(conn, "wrong echo")
        elif end == self.size:
            self._done(conn, sock)
        else:
            conn.received = end

    def _done(self, conn: _Connection, sock: socket.socket) -> None:
        now = time.perf_counter_ns()
        self.tally.requests += 1
        self.tally.latencies.record(now - conn.started)
        conn.failures = 0
        if not conn.answered:
            conn.answered = True
            self.tally.unanswered -= 1
        if self.per_request:
            self._close(conn, sock)
            if now < self.deadline:
                self._open(conn)
        elif now < self.deadline:
            self._begin(conn, sock)

    def _sweep(self, now: int) -> None:
        for conn in self.conns:
            if conn.sock is not None and now - conn.started > self.timeout_ns:
                # A new socket (a new port) for the next request: the late reply, if it ever comes,
                # is not taken for the next one's.
                self._failed(conn, f"no reply within {self.load.timeout:g} s")

    def _failed(self, conn: _Connection, why: str) -> None:
        self.tally.errors[why] += 1
        if conn.sock is not None:
            self._close(conn, conn.sock)
        conn.failures += 1
        if conn.failures < MAX_FAILURES:
            self.reopen.append(conn)
        else:
            self.alive -= 1

    def _close(self, conn: _Connection, sock: socket.socket) -> None:
        self.selector.unregister(sock)
        sock.close()
        conn.sock = None

    def _want(self, conn: _Connection, sock: socket.socket, events: int) -> None:
        if conn.events != events:  # each change is a system call: only when it changes
            self.selector.modify(sock, events, conn)
            conn.events = events


def _client_main(share: Share, channel: Connection) -> None:
    """A client process: says it is ready, runs its share on "go", sends back its Tally."""
    # Ctrl-C reaches the whole process group; the parent decides and closes the channel.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    client = _Client(share, channel)
    channel.send("ready")
    with contextlib.suppress(EOFError, BrokenPipeError):  # the parent gave up: nobody to tell
        if channel.poll(START_TIMEOUT) and channel.recv() == "go":
            channel.send(("done", client.run()))


def _describe(code: int) -> str:
    text = os.strerror(code)
    return text[:1].lower() + text[1:]


def _reason(exc: OSError) -> str:
    return _describe(exc.errno) if exc.errno else str(exc)


# ---------------------------------------------------------------------------------------------
# The parent


class Progress:
    """The live line on a terminal: elapsed time, requests so far, the rate since the last update,
    and the connections that have not had an answer yet. The last line, the run's totals, stays."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.elapsed = 0.0
        self.requests = 0

    def show(self, elapsed: float, requests: int, unanswered: int) -> None:
        rate = (requests - self.requests) / (elapsed - self.elapsed)
        self.elapsed, self.requests = elapsed, requests
        self._write(elapsed, requests, rate, unanswered)

    def finish(self, tally: Tally) -> None:
        """The totals, from the same tally as the report: the line and the report agree."""
        rate = tally.requests / tally.elapsed if tally.elapsed else 0.0
        self._write(tally.elapsed, tally.requests, rate, tally.unanswered, "\n")

    def _write(self, elapsed: float, requests: int, rate: float, unanswered: int, end: str = "") -> None:
        self.stream.write(
            f"\r{self.label}{elapsed:6.1f} s {requests:>14,} requests {rate:>12,.0f} req/s "
            f"{unanswered:>8,} unanswered\x1b[K{end}"
        )
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()


def run_load(load: Load, progress: Progress | None = None) -> Tally:
    """Run `load` in its client processes ("spawn": the parent may have threads) and merge what
    they measured; `progress` is shown about once a second."""
    count = min(load.processes, load.connections)
    context = multiprocessing.get_context("spawn")
    channels: list[Connection] = []
    sizes: list[int] = []  # each process's connections: all unanswered until it reports
    processes: list[BaseProcess] = []
    try:
        for index in range(count):
            ours, theirs = context.Pipe()
            share = Share(load, tuple(range(index, load.connections, count)))
            process = context.Process(target=_client_main, args=(share, theirs), name=f"sockd-bench-{index}")
            process.daemon = True
            process.start()
            theirs.close()
            channels.append(ours)
            sizes.append(len(share.ids))
            processes.append(process)
        _await_ready(channels)
        for channel in channels:
            channel.send("go")
        return _collect(channels, sizes, load.duration, progress)
    finally:
        for channel in channels:
            channel.close()  # a client process still running sees EOF and stops
        for child in processes:
            child.join(START_TIMEOUT)
            if child.is_alive():
                child.kill()
                child.join(START_TIMEOUT)


def _await_ready(channels: list[Connection]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    waiting = set(channels)
    while waiting:
        ready = cast(list[Connection], wait(list(waiting), timeout=max(deadline - time.monotonic(), 0)))
        if not ready:
            raise BenchError(f"{len(waiting)} client processes did not start within {START_TIMEOUT:g} s")
        for channel in ready:
            try:
                channel.recv()
            except EOFError:
                raise BenchError("a client process exited as it started") from None
            waiting.discard(channel)


def _collect(channels: list[Connection], sizes: list[int], duration: float, progress: Progress | None) -> Tally:
    total = Tally()
    counts = {channel: (0, size) for channel, size in zip(channels, sizes, strict=True)}  # requests, unanswered
    pending = set(channels)
    started = time.monotonic()
    deadline = started + duration + START_TIMEOUT
    show_at = started + 1
    while pending:
        now = time.monotonic()
        if now >= deadline:
            raise BenchError(f"{len(pending)} client processes did not finish in time")
        for channel in cast(list[Connection], wait(list(pending), timeout=min(deadline - now, 0.1))):
            try:
                kind, value = channel.recv()
            except EOFError:
                raise BenchError("a client process exited during the run") from None
            if kind == "progress":
                counts[channel] = value
            else:
                total.merge(value)
                counts[channel] = (value.requests, value.unanswered)
                pending.discard(channel)
        now = time.monotonic()
        if progress is not None and now >= show_at:
            requests = sum(done for done, _ in counts.values())
            progress.show(now - started, requests, sum(unanswered for _, unanswered in counts.values()))
            show_at = now + 1
    return total


def measure(load: Load, label: str = "") -> Tally:
    """`run_load`, with its progress line on stderr when stderr is a terminal."""
    progress = Progress(sys.stderr, label) if sys.stderr.isatty() else None
    try:
        tally = run_load(load, progress)
    finally:
        if progress is not None:
            progress.clear()
    if progress is not None:
        progress.finish(tally)
    return tally
