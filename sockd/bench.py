"""`sockd bench`: a closed-loop load generator for one's own sockd, as redis-benchmark is for Redis.

Client processes (one per core unless told) each run their share of the connections in one
selector loop: a connection sends its request, waits for the whole reply, records the round trip
and sends the next one. Each process returns its counts and a latency histogram; the parent
merges them. `--models` starts sockd once per concurrency model and runs the same load on each.

Targets are loopback addresses and Unix socket paths only: this measures a deployment on this
machine, and cannot be turned on somebody else's.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import errno
import ipaddress
import itertools
import json
import multiprocessing
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal, TextIO, cast, get_args

from sockd.stdout import emit

Protocol = Literal["tcp", "udp", "unix"]
Mode = Literal["echo", "connect"]
HandlerName = Literal["echo", "timestamp"]

MAX_FAILURES = 100  # consecutive failures after which a connection is no longer reopened
UDP_MAX = 65507  # the largest payload of an IPv4 UDP datagram
UNIX_PATH_MAX = 107  # sun_path's 108 bytes, less the terminating NUL
START_TIMEOUT = 30.0  # seconds client processes, or a sockd, get to start, and to finish after the run
POLL = 0.05  # seconds between looks at a starting sockd's log
PROGRESS_NS = 500_000_000  # how often a client process reports its count to the parent
SWEEP_NS = 50_000_000  # how often UDP requests are checked for a lost datagram
RECV_SIZE = 65536
BUSY = 0.9  # the share of their time the client processes may compute before they are the bottleneck
BITS = 10  # the latency histogram's precision: 1/2**BITS of a value
PERCENTILES = {"p50": 500, "p90": 900, "p99": 990, "p99_9": 999}  # JSON key: permille
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it

BOTH = selectors.EVENT_READ | selectors.EVENT_WRITE


class BenchError(Exception):
    """A run that cannot go on (a client process or a sockd that failed); the message is one line."""


@dataclasses.dataclass(frozen=True)
class Target:
    protocol: Protocol
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


class Histogram:
    """Latencies in nanoseconds, each kept to within 1/1024 of its value (HdrHistogram's idea): a
    few thousand counters at most however many requests, so a client process's result stays small."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def record(self, ns: int) -> None:
        # Below 2**BITS ns every value has its own bucket; above, the top BITS bits of the value pick
        # one of 2**(BITS-1) buckets per power of two, none wider than 1/2**(BITS-1) of its values.
        if ns < 1 << BITS:
            index = ns
        else:
            shift = ns.bit_length() - BITS
            index = (shift << (BITS - 1)) + (ns >> shift)
        self.counts[index] = self.counts.get(index, 0) + 1

    def merge(self, other: Histogram) -> None:
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count

    def percentiles_us(self) -> dict[str, float | None]:
        """PERCENTILES in microseconds (None without a single sample); the nearest-rank method,
        so a higher percentile is never below a lower one."""
        indices = sorted(self.counts)
        cumulative = list(itertools.accumulate(self.counts[index] for index in indices))
        total = cumulative[-1] if cumulative else 0
        shown: dict[str, float | None] = {}
        for key, permille in PERCENTILES.items():
            rank = -(-total * permille // 1000)  # ceiling, in integers: no rounding at 99.9
            found = indices[bisect.bisect_left(cumulative, max(rank, 1))] if total else None
            shown[key] = None if found is None else round(_midpoint(found) / 1000, 1)
        return shown


def _midpoint(index: int) -> float:
    if index < 1 << BITS:
        return float(index)
    shift = (index >> (BITS - 1)) - 1
    low = (index - (shift << (BITS - 1))) << shift
    return low + ((1 << shift) - 1) / 2


@dataclasses.dataclass
class Tally:
    """What client processes measured; tallies of several processes add up."""

    requests: int = 0
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    latencies: Histogram = dataclasses.field(default_factory=Histogram)
    cpu: float = 0.0  # CPU seconds the processes used while the load ran
    wall: float = 0.0  # the sum of their run times
    elapsed: float = 0.0  # the longest run

    def merge(self, other: Tally) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.latencies.merge(other.latencies)
        self.cpu += other.cpu
        self.wall += other.wall
        self.elapsed = max(self.elapsed, other.elapsed)


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

    __slots__ = ("connecting", "events", "failures", "payload", "received", "sent", "sock", "started", "view")

    def __init__(self, ident: int, size: int) -> None:
        # Fixed per connection and different between connections: a reply that came back altered,
        # or to the wrong connection, does not match.
        self.payload = random.Random(ident).randbytes(size)
        self.view = memoryview(self.payload)
        self.sock: socket.socket | None = None
        self.connecting = False
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
        self.tally = Tally()
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
                self.channel.send(("progress", self.tally.requests))
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
    """The live line on a terminal: elapsed time, requests so far, and the rate since the last update."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.elapsed = 0.0
        self.requests = 0

    def show(self, elapsed: float, requests: int) -> None:
        rate = (requests - self.requests) / (elapsed - self.elapsed)
        self.elapsed, self.requests = elapsed, requests
        self.stream.write(f"\r{self.label}{elapsed:6.1f} s {requests:>14,} requests {rate:>12,.0f} req/s\x1b[K")
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
            processes.append(process)
        _await_ready(channels)
        for channel in channels:
            channel.send("go")
        return _collect(channels, load.duration, progress)
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


def _collect(channels: list[Connection], duration: float, progress: Progress | None) -> Tally:
    total = Tally()
    counts = dict.fromkeys(channels, 0)
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
                pending.discard(channel)
        now = time.monotonic()
        if progress is not None and now >= show_at:
            progress.show(now - started, sum(counts.values()))
            show_at = now + 1
    return total


def _measure(load: Load, label: str = "") -> Tally:
    progress = Progress(sys.stderr, label) if sys.stderr.isatty() else None
    try:
        return run_load(load, progress)
    finally:
        if progress is not None:
            progress.clear()


def summary(load: Load, tally: Tally) -> dict[str, Any]:
    """The result as `--json` prints it."""
    return {
        "target": load.target.url,
        "mode": load.mode,
        "connections": load.connections,
        "size": load.size,
        "duration": round(tally.elapsed, 3),
        "processes": min(load.processes, load.connections),
        "requests": tally.requests,
        "requests_per_second": round(tally.requests / tally.elapsed, 1) if tally.elapsed else 0.0,
        "latency_us": tally.latencies.percentiles_us(),
        "errors": sum(tally.errors.values()),
    }


def _verdict(tally: Tally, label: str = "") -> int:
    """Warnings on stderr, one line each; the exit status: 1 when not one request succeeded."""
    errors = sum(tally.errors.values())
    kinds = ", ".join(f"{why}: {count}" for why, count in tally.errors.most_common())
    if tally.requests == 0:
        if errors:
            _warn(f"{label}no request succeeded: {errors} errors ({kinds})")
        else:
            _warn(f"{label}no request completed within {tally.elapsed:g} s")
        return 1
    if errors:
        _warn(f"{label}{errors} errors ({kinds})")
    if tally.wall and tally.cpu >= BUSY * tally.wall:
        _warn(
            f"{label}the client processes were on a CPU {tally.cpu / tally.wall:.0%} of the run: the client is "
            "probably the bottleneck, not the server (more --processes may help if cores are idle)"
        )
    return 0


def _warn(text: str) -> None:
    print(f"sockd bench: {text}", file=sys.stderr, flush=True)


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _table(report: dict[str, Any]) -> str:
    rows: list[tuple[str, object]] = [
        ("target", report["target"]),
        ("mode", report["mode"]),
        ("connections", report["connections"]),
        ("size", f"{report['size']} bytes"),
        ("duration", f"{report['duration']:.2f} s"),
        ("processes", report["processes"]),
        ("requests", f"{report['requests']:,}"),
        ("requests/s", f"{report['requests_per_second']:,.1f}"),
    ]
    rows += [
        (key.replace("_", "."), _us(value) + " µs" * (value is not None)) for key, value in report["latency_us"].items()
    ]
    rows.append(("errors", report["errors"]))
    return "\n".join(f"{name:<12} {value}" for name, value in rows)


def _models_table(caption: str, reports: list[dict[str, Any]]) -> str:
    lines = [caption, f"{'model':<12} {'requests/s':>12} {'p50 (µs)':>12} {'p99 (µs)':>12} {'errors':>8}"]
    for report in reports:
        latency = report["latency_us"]
        lines.append(
            f"{report['model']:<12} {report['requests_per_second']:>12,.1f} "
            f"{_us(latency['p50']):>12} {_us(latency['p99']):>12} {report['errors']:>8}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --models: a sockd per concurrency model


@contextlib.contextmanager
def _serving(model: str, protocol: Protocol, handler: HandlerName, delay: float, directory: Path) -> Iterator[Target]:
    """sockd serving one listener under `model`, on a port the kernel picks or a new Unix path;
    stopped with SIGTERM afterwards."""
    where: dict[str, object] = (
        {"path": str(directory / f"{model}.sock")} if protocol == "unix" else {"host": "127.0.0.1", "port": 0}
    )
    config = {
        "logging": {"level": "info", "format": "json"},
        "metrics": {"enabled": True, "port": 0},
        "shutdown_timeout": delay + 1,
        # A blocking model's heartbeat pauses while a thread sleeps through `delay`: room for it.
        "worker_timeout": max(30.0, 4 * delay),
        "listeners": [
            {"name": "bench", "protocol": protocol, "handler": handler, "concurrency": model, "delay": delay, **where}
        ],
    }
    path = directory / f"{model}.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    log_path = directory / f"{model}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sockd", "-c", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,  # a file, not a pipe: sockd never blocks on a log line nobody reads
            start_new_session=True,  # Ctrl-C is ours to handle: sockd gets its SIGTERM below
        )
    try:
        address = _await_listening(process, log_path, model)
        yield parse_target(f"{protocol}://{address}")
    finally:
        _stop(process, model, delay + 1 + START_TIMEOUT)


def _await_listening(process: subprocess.Popen[bytes], log_path: Path, model: str) -> str:
    """The address sockd logs for its listener, once it has logged that it is ready."""
    for _ in range(round(START_TIMEOUT / POLL)):
        lines = log_path.read_text(errors="replace").splitlines()
        address = None
        for event in map(_json_object, lines):
            if event.get("event") == "listening":
                address = event.get("address")
            elif event.get("event") == "ready" and address is not None:
                return str(address)
        if process.poll() is not None:
            said = "; ".join(line for line in lines[-3:] if line.strip()) or "nothing"
            raise BenchError(f"sockd ({model}) exited with code {process.returncode} before it was ready: {said}")
        time.sleep(POLL)
    raise BenchError(f"sockd ({model}) was not ready within {START_TIMEOUT:g} s (its log: {log_path})")


def _json_object(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _stop(process: subprocess.Popen[bytes], model: str, timeout: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()  # its workers exit by themselves when their supervisor is gone
        code = process.wait(timeout)
    if code != 0:
        _warn(f"sockd ({model}) exited with code {code} when stopped")


def _run_models(args: argparse.Namespace) -> int:
    # The config's own list of models; imported here so that client processes, which import this
    # module, need not load pydantic.
    from sockd.config import ModelName  # noqa: PLC0415

    protocol: Protocol = args.protocol or "tcp"
    handler: HandlerName = args.handler or "echo"
    delay: float = args.delay or 0.0
    # A timestamp server answers once and closes: a request per connection, except over UDP.
    mode: Mode = "connect" if handler == "timestamp" and protocol != "udp" else "echo"
    reports: list[dict[str, Any]] = []
    status = 0
    with tempfile.TemporaryDirectory(prefix="sockd-models-") as directory:
        for model in get_args(ModelName):
            with _serving(model, protocol, handler, delay, Path(directory)) as target:
                load = Load(
                    target,
                    mode,
                    args.connections,
                    args.size,
                    args.duration,
                    args.processes,
                    args.timeout or (1.0 + delay),
                    check_echo=handler == "echo",
                )
                tally = _measure(load, f"{model}: ")
            reports.append({"model": model, **summary(load, tally)})
            status = max(status, _verdict(tally, f"{model}: "))
    if args.json:
        emit(json.dumps(reports))
    else:
        caption = (
            f"{protocol} {handler} (mode {mode}), delay {delay:g} s: {args.connections} connections, "
            f"{args.size} bytes, {args.duration:g} s per model, {min(args.processes, args.connections)} processes"
        )
        emit(_models_table(caption, reports))
    return status


# ---------------------------------------------------------------------------------------------
# The command line


def _count(high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not 1 <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from 1 to {high}")
        return value

    return convert


def _seconds(high: float, zero: bool = False) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not (value >= 0 if zero else value > 0) or value > high:  # also rejects nan
            raise argparse.ArgumentTypeError(f"must be {'at least 0' if zero else 'above 0'} and at most {high:g}")
        return value

    return convert


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sockd bench",
        description="Measure a sockd on this machine: closed-loop requests over many connections, "
        "from one client process per core; requests per second and latency percentiles.",
        epilog="Exit status: 0, 1 when not one request succeeded, 2 for a usage error.",
    )
    parser.add_argument("target", nargs="?", help="tcp://HOST:PORT, tcp://[::1]:PORT, udp://HOST:PORT or unix:///PATH")
    parser.add_argument(
        "--mode",
        choices=get_args(Mode),
        help="echo (default): each connection sends SIZE bytes, waits for them to come back, again; "
        "connect: a connection per request (connect, send, half-close, read to EOF), tcp and unix only",
    )
    parser.add_argument("--connections", type=_count(100_000), default=50, metavar="N", help="(default 50)")
    parser.add_argument("--size", type=_count(1 << 24), default=64, metavar="BYTES", help="(default 64)")
    parser.add_argument("--duration", type=_seconds(86400), default=10.0, metavar="SECONDS", help="(default 10)")
    parser.add_argument(
        "--processes",
        type=_count(1024),
        default=os.cpu_count() or 1,
        metavar="N",
        help="client processes (default: one per core)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds(3600),
        metavar="SECONDS",
        help="UDP: a reply not back by then is lost: an error, and the request is sent again "
        "(default 1, plus --delay with --models)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (a list with --models)")
    models = parser.add_argument_group("--models: start sockd once per concurrency model and compare them")
    models.add_argument("--models", action="store_true", help="instead of a target")
    models.add_argument("--protocol", choices=get_args(Protocol), help="(default tcp)")
    models.add_argument(
        "--handler", choices=get_args(HandlerName), help="echo (default; mode echo) or timestamp (mode connect)"
    )
    models.add_argument(
        "--delay", type=_seconds(3600, zero=True), metavar="SECONDS", help="the listener's simulated work (default 0)"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """`sockd bench ARGV`; returns the exit status (argparse exits 2 by itself on a usage error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.models:
            _check_models_usage(parser, args)
            return _run_models(args)
        return _run_one(args, _check_usage(parser, args))
    except BenchError as exc:
        _warn(str(exc))
        return 1
    except KeyboardInterrupt:
        return INTERRUPTED


def _check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Target:
    given = [f"--{name}" for name in ("protocol", "handler", "delay") if getattr(args, name) is not None]
    if given:
        parser.error(f"{', '.join(given)}: only with --models")
    if args.target is None:
        parser.error("a target is required (tcp://HOST:PORT, udp://HOST:PORT, unix:///PATH), or --models")
    try:
        target = parse_target(args.target)
    except ValueError as exc:
        parser.error(str(exc))
    if args.mode == "connect" and target.protocol == "udp":
        parser.error("--mode connect needs a stream (tcp or unix): UDP has no connection to open; use --mode echo")
    _check_size(parser, target.protocol, args.size)
    return target


def _check_models_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.target is not None:
        parser.error("--models starts its own sockd: give no target")
    if args.mode is not None:
        parser.error("--models takes the mode from --handler: echo for echo, connect for timestamp")
    _check_size(parser, args.protocol or "tcp", args.size)


def _check_size(parser: argparse.ArgumentParser, protocol: str, size: int) -> None:
    if protocol == "udp" and size > UDP_MAX:
        parser.error(f"--size: at most {UDP_MAX} bytes over UDP (one datagram)")


def _run_one(args: argparse.Namespace, target: Target) -> int:
    load = Load(
        target,
        args.mode or "echo",
        args.connections,
        args.size,
        args.duration,
        args.processes,
        args.timeout or 1.0,
        check_echo=True,
    )
    tally = _measure(load)
    report = summary(load, tally)
    emit(json.dumps(report) if args.json else _table(report))
    return _verdict(tally)
