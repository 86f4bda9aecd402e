"""The Prometheus endpoint: /metrics and /healthz, served by the supervisor from its own thread.

The numbers come from the workers' shared counters (see counters.py), read at scrape time
through prometheus_client's custom-collector API; nothing here is on a request's path.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import selectors
import signal
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from sockd import __version__, logging
from sockd.build import compiled
from sockd.config import Listener, MetricsConfig
from sockd.counters import (
    ERROR_KINDS,
    EXEC_RESULTS,
    HANDSHAKE_BOUNDS,
    HANDSHAKE_RESULTS,
    REJECT_REASONS,
    TLS_VERSIONS,
    Totals,
)
from sockd.logging import Throttled
from sockd.sockets import OUT_OF_RESOURCES, RESOURCE_PAUSE, BindError, inet_address, reason
from sockd.tls.material import Expiry

# Signals a thread raises on itself for a fault it made: never blocked.
FAULTS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS})
MAX_SCRAPES = 16  # scrapes rendered and sent at once, a thread each (Prometheus sends one at a time)
MAX_CONNECTIONS = 24  # connections held at once: requests being read, and scrapes waiting or being served
REQUEST_TIMEOUT = 5.0  # seconds a request's head may take to come whole, and its answer to be taken
MAX_HEAD = 8192  # bytes of a request head
BACKLOG = 128  # the listen backlog: where scrapes past the cap wait
# At the cap, a connection whose head has not come whole after this long is closed for a new one.
EVICTABLE_AFTER = 1.0

_failed = Throttled("a scrape failed")
_too_slow = Throttled("a scrape's request did not come whole in time; closed it")
_too_large = Throttled("a scrape's request head is too large; closed it")
_evicted = Throttled("too many connections to the metrics endpoint; closed the one waiting longest for its request")
_out_of_resources = Throttled("metrics endpoint cannot accept: out of resources; pausing")


@dataclass(frozen=True)
class ListenerReport:
    """What the supervisor knows of one listener at a scrape."""

    listener: Listener
    address: str
    totals: Totals  # everything its workers counted, the dead ones' included
    restarts: int
    up: bool  # every worker place serving, each heartbeat moving (see Worker.beating)
    generations: int  # with a worker alive: the current one, and those a reload replaced still serving
    cpu_seconds: float  # user and system time of its workers, the exited ones' included
    resident_bytes: int  # the resident memory of its live workers

    def plus(self, other: ListenerReport) -> ListenerReport:
        """This report with the counts of `other` added: a listener of the same name that a
        reload removed, and whose counts go on under the name (a counter never goes back)."""
        totals = Totals.zero(len(self.totals.buckets))
        totals.add(self.totals)
        totals.add(other.totals)
        return dataclasses.replace(
            self,
            totals=totals,
            restarts=self.restarts + other.restarts,
            generations=self.generations + other.generations,
            cpu_seconds=self.cpu_seconds + other.cpu_seconds,
            resident_bytes=self.resident_bytes + other.resident_bytes,
        )


@dataclass(frozen=True)
class Reloads:
    """How the config reloads went (SIGHUP)."""

    succeeded: int = 0
    failed: int = 0
    last_successful: bool = True
    last_success_time: float = 0.0  # Unix time; the start counts as the first success


@dataclass(frozen=True)
class Upgrades:
    """How the upgrades in place went (SIGUSR2, see sockd.upgrade), counted across them."""

    ok: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Snapshot:
    listeners: list[ListenerReport]
    reloads: Reloads
    # Listeners a reload removed whose old workers still serve open connections: counted, not checked.
    leaving: list[ListenerReport]
    certificates: Sequence[Expiry] = ()  # those the config in force presents
    draining: bool = False  # a stop signal came (see Ledger.draining)
    upgrades: Upgrades = Upgrades()


class SockdCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot], buckets: Iterable[float]) -> None:
        self.snapshot = snapshot
        self.bounds = [_le(bound) for bound in buckets]

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot()
        reports = snapshot.listeners
        label = ["listener"]
        connections = CounterMetricFamily("sockd_connections", "Stream connections accepted.", labels=label)
        active = GaugeMetricFamily("sockd_connections_active", "Stream connections open now.", labels=label)
        requests = CounterMetricFamily(
            "sockd_requests",
            "Requests answered: each chunk on a stream, each datagram; a relay: each connection once it ends, "
            "each reply a UDP relay passes back.",
            labels=label,
        )
        duration = HistogramMetricFamily(
            "sockd_request_duration_seconds",
            "From reading a request to writing its reply, any delay included; a relayed connection: its life.",
            labels=label,
            unit="",
        )
        received = CounterMetricFamily("sockd_received_bytes", "Bytes read from clients.", labels=label)
        sent = CounterMetricFamily("sockd_sent_bytes", "Bytes written to clients.", labels=label)
        errors = CounterMetricFamily(
            "sockd_errors",
            f"Errors by kind: {', '.join(ERROR_KINDS)}.",
            labels=[*label, "kind"],
        )
        rejected = CounterMetricFamily(
            "sockd_connections_rejected",
            "Connections closed at once and datagrams dropped by a limit or an access rule.",
            labels=[*label, "reason"],
        )
        restarts = CounterMetricFamily(
            "sockd_worker_restarts", "Workers started again after an unexpected exit.", labels=label
        )
        generations = GaugeMetricFamily(
            "sockd_worker_generations",
            "Worker generations alive: 1, and one more for each that a reload replaced and still serves connections.",
            labels=label,
        )
        cpu = CounterMetricFamily(
            "sockd_worker_cpu_seconds",
            "User and system CPU time of the listener's workers, the exited ones' included.",
            labels=label,
        )
        memory = GaugeMetricFamily(
            "sockd_worker_resident_memory_bytes", "Resident memory of the listener's live workers.", labels=label
        )
        # What /healthz says per listener, for an alert to name the listener (see ListenerReport.up).
        up = GaugeMetricFamily(
            "sockd_listener_up",
            "1 while every worker place of the listener serves with its heartbeat moving, 0 while one is down.",
            labels=label,
        )
        info = GaugeMetricFamily(
            "sockd_listener_info",
            "What each listener is (always 1).",
            labels=[*label, "protocol", "concurrency", "handler", "address"],
        )
        for report in reports:  # a listener a reload removed is not checked (see Snapshot.leaving)
            up.add_metric([report.listener.name], int(report.up))
        for report in [*reports, *snapshot.leaving]:
            name, totals = report.listener.name, report.totals
            connections.add_metric([name], totals.connections)
            active.add_metric([name], totals.connections - totals.closed)
            requests.add_metric([name], totals.requests)
            received.add_metric([name], totals.received)
            sent.add_metric([name], totals.sent)
            for kind, count in zip(ERROR_KINDS, totals.errors, strict=True):
                errors.add_metric([name, kind], count)
            for why, count in zip(REJECT_REASONS, totals.rejected, strict=True):
                rejected.add_metric([name, why], count)
            restarts.add_metric([name], report.restarts)
            generations.add_metric([name], report.generations)
            cpu.add_metric([name], report.cpu_seconds)
            memory.add_metric([name], report.resident_bytes)
            cumulative, running = [], 0
            for bound, count in zip([*self.bounds, "+Inf"], totals.buckets, strict=True):
                running += count
                cumulative.append((bound, running))
            duration.add_metric([name], cumulative, totals.duration_ns / 1e9)
            listener = report.listener
            info.add_metric([name, listener.protocol, listener.concurrency, listener.handler, report.address], 1)
        yield from (connections, active, requests, duration, received, sent, errors, rejected, restarts)
        yield from (generations, cpu, memory, up, info)
        yield from _tls_metrics([report for report in [*reports, *snapshot.leaving] if report.listener.tls is not None])
        yield _exec_metrics([report for report in [*reports, *snapshot.leaving] if report.listener.handler == "exec"])
        yield from _reload_metrics(snapshot.reloads)
        yield from _instance_metrics(snapshot)
        yield _expiries(snapshot.certificates)


def _instance_metrics(snapshot: Snapshot) -> Iterator[Metric]:
    """What is one per sockd rather than per listener."""
    # The supervisor's own (this process's), then every worker's, the exited ones' included.
    dropped = logging.dropped + sum(report.totals.log_dropped for report in [*snapshot.listeners, *snapshot.leaving])
    yield CounterMetricFamily(
        "sockd_log_lines_dropped", "Log lines dropped because stderr could not take them.", value=dropped
    )
    build = GaugeMetricFamily(
        "sockd_build_info",
        "The running sockd (always 1): its version, and whether its hot path is compiled with mypyc.",
        labels=["version", "compiled"],
    )
    build.add_metric([__version__, str(compiled()).lower()], 1)
    yield build
    yield GaugeMetricFamily(
        "sockd_draining",
        "1 once a stop signal came: /healthz answers 503 draining while the listeners serve on for drain_delay, "
        "then stop.",
        value=int(snapshot.draining),
    )
    upgrades = CounterMetricFamily(
        "sockd_upgrades", "Upgrades in place (SIGUSR2) by result: ok, failed.", labels=["result"]
    )
    upgrades.add_metric(["ok"], snapshot.upgrades.ok)
    upgrades.add_metric(["failed"], snapshot.upgrades.failed)
    yield upgrades


def _expiries(certificates: Sequence[Expiry]) -> Metric:
    expiry = GaugeMetricFamily(
        "sockd_tls_certificate_expiry_timestamp_seconds",
        "When each certificate sockd presents expires (Unix time): a TLS listener's, by the server name it is "
        'served for, and a relay\'s client certificate for its tls:// upstream (server_name="upstream").',
        labels=["listener", "server_name"],
    )
    for certificate in certificates:
        expiry.add_metric([certificate.listener, certificate.server_name], certificate.not_after)
    return expiry


def _exec_metrics(reports: list[ListenerReport]) -> Metric:
    """The exec listeners' children, by how they ended (their run time is the request duration)."""
    exits = CounterMetricFamily(
        "sockd_exec_exits",
        f"An exec listener's children by how they ended: {', '.join(EXEC_RESULTS)}.",
        labels=["listener", "result"],
    )
    for report in reports:
        for result, count in zip(EXEC_RESULTS, report.totals.exits, strict=True):
            exits.add_metric([report.listener.name, result], count)
    return exits


def _tls_metrics(reports: list[ListenerReport]) -> Iterator[Metric]:
    """The TLS listeners' handshakes: by result, by the version agreed, and how long they took."""
    label = ["listener"]
    handshakes = CounterMetricFamily(
        "sockd_tls_handshakes", f"TLS handshakes by result: {', '.join(HANDSHAKE_RESULTS)}.", labels=[*label, "result"]
    )
    sessions = CounterMetricFamily(
        "sockd_tls_sessions", "TLS sessions established, by protocol version.", labels=[*label, "version"]
    )
    duration = HistogramMetricFamily(
        "sockd_tls_handshake_duration_seconds", "From a TLS connection's opening to its handshake's end.", labels=label
    )
    bounds = [*map(_le, HANDSHAKE_BOUNDS), "+Inf"]
    for report in reports:
        name, totals = report.listener.name, report.totals
        for result, count in zip(HANDSHAKE_RESULTS, totals.handshakes, strict=True):
            handshakes.add_metric([name, result], count)
        for version, count in zip(TLS_VERSIONS, totals.versions, strict=True):
            sessions.add_metric([name, version], count)
        duration.add_metric(
            [name],
            list(zip(bounds, itertools.accumulate(totals.handshake_buckets), strict=True)),
            totals.handshake_ns / 1e9,
        )
    yield from (handshakes, sessions, duration)


def _reload_metrics(reloads: Reloads) -> Iterator[Metric]:
    total = CounterMetricFamily("sockd_config_reloads", "Config reloads (SIGHUP) by result.", labels=["result"])
    total.add_metric(["success"], reloads.succeeded)
    total.add_metric(["failure"], reloads.failed)
    yield total
    yield GaugeMetricFamily(
        "sockd_config_last_reload_successful",
        "1 if the last reload (or the start) succeeded, 0 if the running config is older than the file.",
        value=int(reloads.last_successful),
    )
    yield GaugeMetricFamily(
        "sockd_config_last_reload_success_timestamp_seconds",
        "When the running config was loaded (Unix time).",
        value=reloads.last_success_time,
    )


def _le(bound: float) -> str:
    return repr(float(bound))


class Exporter:
    """The endpoint, on a socket bound beforehand (see bind), served from a thread of its own once
    started, as HAProxy serves a frontend: one selector thread accepts up to MAX_CONNECTIONS at
    once and reads each request head, which must arrive whole within REQUEST_TIMEOUT and
    MAX_HEAD bytes. /healthz is answered there and then, its answer a few bytes sent without
    waiting (a balancer's health check never waits for a scrape); a complete /metrics request is
    rendered and sent on a thread, MAX_SCRAPES at once, the rest waiting their turn. At the cap,
    a connection still without its whole head after EVICTABLE_AFTER is closed to let a new one in
    (as nginx reuses idle connections); while there is none such, nothing is accepted: the next
    wait in the listen backlog, none is closed for being one too many. Every connection, thread,
    byte and second a client can make it spend is bounded."""

    def __init__(
        self,
        sock: socket.socket,
        buckets: Iterable[float],
        snapshot: Callable[[], Snapshot],
        unwell: Callable[[], str | None],
    ) -> None:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(SockdCollector(snapshot, buckets))
        ProcessCollector(registry=registry)
        self._metrics = make_wsgi_app(registry)
        self.unwell = unwell  # why /healthz fails (draining, the listeners down), None while all is well
        self.sock = sock
        sock.setblocking(False)
        host, port = sock.getsockname()[:2]
        self.address = inet_address(sock.family, host, port)
        self.selector = selectors.DefaultSelector()
        # Written by a scrape's thread once done, a byte each (far fewer than a pipe holds): the
        # selector thread alone counts what is held, and takes the next waiting scrape.
        self._done_read, self._done_write = socket.socketpair()
        self._done_read.setblocking(False)
        self.selector.register(self._done_read, selectors.EVENT_READ, self._finished)
        self.heads: dict[socket.socket, _Head] = {}  # oldest first: each accepted after the one before
        self.waiting: collections.deque[tuple[socket.socket, dict[str, Any]]] = collections.deque()
        self.held = 0  # connections open: heads being read, scrapes waiting and scrapes being answered
        self.scraping = 0
        self.accepting = False
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, name="metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stopping = True
        self._done_write.send(b"x")
        self.thread.join()
        for conn in [*self.heads, *(conn for conn, _ in self.waiting)]:
            conn.close()
        self.selector.close()
        self.sock.close()
        self._done_read.close()
        self._done_write.close()

    # -- the selector thread

    def _serve(self) -> None:
        # The supervisor's signals go to its main thread alone (this thread's scrapes inherit the
        # mask): those it blocks for an upgrade's exec must wait in the kernel (see sockd.upgrade),
        # not be taken here by a handler the exec then forgets.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - FAULTS)
        self._admit(time.monotonic())
        while not self.stopping:
            for key, _ in self.selector.select(self._timeout()):
                key.data()
            now = time.monotonic()
            for conn, head in list(self.heads.items()):
                if now < head.since + REQUEST_TIMEOUT:
                    break
                self._drop(conn)
                _too_slow(seconds=REQUEST_TIMEOUT)
            self._admit(now)

    def _timeout(self) -> float | None:
        """Until the oldest head is due, or, while none is accepted, may be closed for a new one."""
        first = next(iter(self.heads.values()), None)
        if first is None:
            return None
        due = first.since + (REQUEST_TIMEOUT if self.accepting else EVICTABLE_AFTER)
        return max(0.0, due - time.monotonic())

    def _evictable(self, now: float) -> bool:
        """Whether the oldest head has had long enough to come whole (see _accept)."""
        first = next(iter(self.heads.values()), None)
        return first is not None and now >= first.since + EVICTABLE_AFTER

    def _admit(self, now: float) -> None:
        """Accept while under the cap, or while a connection held may be closed to make room."""
        wanted = self.held < MAX_CONNECTIONS or self._evictable(now)
        if wanted != self.accepting:
            if wanted:
                self.selector.register(self.sock, selectors.EVENT_READ, self._accept)
            else:
                self.selector.unregister(self.sock)
            self.accepting = wanted

    def _accept(self) -> None:
        """Accept one connection; at the cap, close the one that has waited longest for its head
        to make room, if it has had EVICTABLE_AFTER (a client sends its request as soon as it
        connects): a burst of scrapes waits in the backlog, and a flood of clients that send
        nothing cannot keep a health check out for longer."""
        now = time.monotonic()
        if self.held >= MAX_CONNECTIONS:
            if not self._evictable(now):
                return  # an event before this one in the same select() took the room
            self._drop(next(iter(self.heads)))
            _evicted(limit=MAX_CONNECTIONS)
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES:  # else the next turn retries at once, spinning
                _out_of_resources(error=exc.strerror)
                time.sleep(RESOURCE_PAUSE)
            return  # one that was reset in the backlog, or the pause: the loop turns on
        conn.setblocking(False)
        self.held += 1
        self.heads[conn] = _Head(now)
        self.selector.register(conn, selectors.EVENT_READ, functools.partial(self._read, conn))
        self._read(conn)  # a client's request usually comes with its handshake

    def _read(self, conn: socket.socket) -> None:
        head = self.heads.get(conn)
        if head is None:  # closed to make room by an event before this one in the same select()
            return
        try:
            data = conn.recv(MAX_HEAD + 1 - len(head.data))
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop(conn)
            _failed(error=reason(exc))
            return
        if not data:  # gone before it asked anything
            self._drop(conn)
            return
        head.data += data
        if b"\r\n\r\n" not in head.data and b"\n\n" not in head.data:
            if len(head.data) > MAX_HEAD:
                self._drop(conn)
                _too_large(limit=MAX_HEAD)
            return
        self.selector.unregister(conn)
        del self.heads[conn]
        environ = _environ(bytes(head.data))
        if environ is None:
            _failed(error="not an HTTP request")
            self._answer(conn, _response("400 Bad Request", _TEXT, b"not an HTTP request\n"))
        elif environ["PATH_INFO"] == "/healthz":
            self._answer(conn, self._health())
        else:
            self.waiting.append((conn, environ))
            self._next_scrape()

    def _answer(self, conn: socket.socket, response: bytes) -> None:
        """Send a short answer without waiting: a client that cannot take a few hundred bytes at
        once has none."""
        try:
            conn.send(response)
        except OSError as exc:
            _failed(error=reason(exc))
        conn.close()
        self.held -= 1

    def _drop(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        del self.heads[conn]
        conn.close()
        self.held -= 1

    def _next_scrape(self) -> None:
        while self.waiting and self.scraping < MAX_SCRAPES:
            conn, environ = self.waiting.popleft()
            try:
                threading.Thread(target=self._scrape, args=(conn, environ), name="scrape", daemon=True).start()
            except RuntimeError as exc:  # no thread to be had (memory, a task limit): this one is not served
                _failed(error=str(exc))
                conn.close()
                self.held -= 1
                continue
            self.scraping += 1

    def _finished(self) -> None:
        if self.stopping:  # the byte of close(): the loop ends
            return
        done = len(self._done_read.recv(MAX_SCRAPES))
        self.scraping -= done
        self.held -= done
        self._next_scrape()

    def _health(self) -> bytes:
        unwell = self.unwell()
        if unwell is not None:
            return _response("503 Service Unavailable", _TEXT, f"{unwell}\n".encode())
        return _response("200 OK", _TEXT, b"ok\n")

    # -- a scrape's thread

    def _scrape(self, conn: socket.socket, environ: dict[str, Any]) -> None:
        try:
            answer: list[tuple[str, list[tuple[str, str]]]] = []
            body = b"".join(self._metrics(environ, lambda status, headers: answer.append((status, headers))))
            _send(conn, _response(*answer[0], body), time.monotonic() + REQUEST_TIMEOUT)
        except Exception as exc:  # a client gone or too slow to read: one throttled line, no traceback
            _failed(error=repr(exc))
        finally:
            conn.close()
            with contextlib.suppress(OSError):  # closed: the endpoint has stopped
                self._done_write.send(b"x")


@dataclass
class _Head:
    """A request head being read, and when its connection was accepted."""

    since: float
    data: bytearray = dataclasses.field(default_factory=bytearray)


_TEXT = [("Content-Type", "text/plain; charset=utf-8")]


def _environ(head: bytes) -> dict[str, Any] | None:
    """The WSGI environment prometheus_client's app reads from a request head; None if it is not
    an HTTP request."""
    lines = head.decode("latin-1").splitlines()
    parts = lines[0].split() if lines else []
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    method, target, _ = parts
    url = urllib.parse.urlsplit(target)
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return {
        "REQUEST_METHOD": method,
        "PATH_INFO": url.path,
        "QUERY_STRING": url.query,
        "HTTP_ACCEPT": headers.get("accept"),
        "HTTP_ACCEPT_ENCODING": headers.get("accept-encoding"),
    }


def _response(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers)]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def _send(conn: socket.socket, data: bytes, deadline: float) -> None:
    """Send all of `data` by `deadline` (TimeoutError if not): a client reading a byte at a time
    cannot hold a thread for longer."""
    view = memoryview(data)
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the client did not take its answer in time")
        conn.settimeout(remaining)
        view = view[conn.send(view) :]


def serves(settings: MetricsConfig, sock: socket.socket) -> bool:
    """Whether a socket systemd passed in (from its file descriptor store) is where `settings`
    put the endpoint (at any port for port 0)."""
    try:
        address = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    host, port = sock.getsockname()[:2]
    return bool(host == address[0][4][0] and settings.port in (0, port))


def bind(settings: MetricsConfig) -> socket.socket:
    """The endpoint's listening socket (BindError if it cannot be had), bound before anything
    serves so that a busy port fails the start."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise BindError("the metrics endpoint", f"{settings.host}:{settings.port}", reason(exc), exc.errno) from None
    return sock
