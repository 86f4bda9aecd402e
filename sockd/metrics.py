"""The Prometheus endpoint: /metrics and /healthz, served by the supervisor from its own thread.

The numbers come from the workers' shared counters (see counters.py), read at scrape time
through prometheus_client's custom-collector API; nothing here is on a request's path.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from sockd import __version__, logging
from sockd.config import Listener, MetricsConfig
from sockd.counters import ERROR_KINDS, REJECT_REASONS, Totals
from sockd.logging import Throttled
from sockd.sockets import OUT_OF_RESOURCES, inet_address

MAX_SCRAPES = 16  # scrapes served at once (Prometheus sends one at a time)
SCRAPE_TIMEOUT = 5.0
RESOURCE_PAUSE = 0.1  # seconds between accepts while descriptors have run out

_too_many = Throttled("too many scrapes at once; closed one")
_failed = Throttled("a scrape failed")
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
class Snapshot:
    listeners: list[ListenerReport]
    reloads: Reloads
    # Listeners a reload removed whose old workers still serve open connections: counted, not checked.
    leaving: list[ListenerReport]


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
        info = GaugeMetricFamily(
            "sockd_listener_info",
            "What each listener is (always 1).",
            labels=[*label, "protocol", "concurrency", "handler", "address"],
        )
        for report in [*reports, *snapshot.leaving]:
            name, totals = report.listener.name, report.totals
            connections.add_metric([name], totals.connections)
            active.add_metric([name], totals.connections - totals.closed)
            requests.add_metric([name], totals.requests)
            received.add_metric([name], totals.received)
            sent.add_metric([name], totals.sent)
            for kind, count in zip(ERROR_KINDS, totals.errors, strict=True):
                errors.add_metric([name, kind], count)
            for reason, count in zip(REJECT_REASONS, totals.rejected, strict=True):
                rejected.add_metric([name, reason], count)
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
        # The supervisor's own (this process's), then every worker's, the exited ones' included.
        dropped = logging.dropped + sum(report.totals.log_dropped for report in [*reports, *snapshot.leaving])
        log_dropped = CounterMetricFamily(
            "sockd_log_lines_dropped", "Log lines dropped because stderr could not take them.", value=dropped
        )
        build = GaugeMetricFamily("sockd_build_info", "The running sockd (always 1).", labels=["version"])
        build.add_metric([__version__], 1)
        yield from (connections, active, requests, duration, received, sent, errors, rejected, restarts)
        yield from (generations, cpu, memory, info, build, log_dropped)
        yield from _reload_metrics(snapshot.reloads)


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
    """Binds the endpoint at construction (so a busy port fails the start) and serves it from a
    daemon thread once started."""

    def __init__(self, settings: MetricsConfig, snapshot: Callable[[], Snapshot]) -> None:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(SockdCollector(snapshot, settings.buckets))
        ProcessCollector(registry=registry)
        self.snapshot = snapshot
        self._metrics = make_wsgi_app(registry)
        family = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)[0][0]
        server: type[_Server] = type("Server", (_Server,), {"address_family": family})
        self.server = make_server(settings.host, settings.port, self._app, server, _QuietHandler)
        host, port = self.server.socket.getsockname()[:2]
        self.address = inet_address(family, host, port)

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            down = [report.listener.name for report in self.snapshot().listeners if not report.up]
            status, body = ("503 Service Unavailable", f"down: {', '.join(down)}\n") if down else ("200 OK", "ok\n")
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [body.encode()]
        response: Iterable[bytes] = self._metrics(environ, start_response)
        return response


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per scrape, for at most MAX_SCRAPES at once: a connection past that is closed at
    once, one that sends nothing for SCRAPE_TIMEOUT is dropped (see _QuietHandler), so idle or
    half-sent requests cannot take the supervisor's descriptors or threads."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: socketserver's 5 drops a burst of scrapes

    def server_activate(self) -> None:
        self.slots = threading.BoundedSemaphore(MAX_SCRAPES)
        super().server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES:  # else serve_forever retries at once, spinning
                _out_of_resources(error=exc.strerror)
                time.sleep(RESOURCE_PAUSE)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            _too_many(limit=MAX_SCRAPES)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread: its slot is not taken after all
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scrape that failed (a client gone mid-request): one throttled line, no traceback."""
        _failed(error=repr(sys.exc_info()[1]))


class _QuietHandler(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT  # seconds a read or a write of one scrape may wait

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not news: one per second would drown the daemon's own log."""
