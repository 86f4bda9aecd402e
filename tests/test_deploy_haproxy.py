"""deploy/haproxy/, run as shipped: three sockd instances (deploy/haproxy/sockd.yaml) behind one
real HAProxy (deploy/haproxy/haproxy.cfg), the files' ports and the stats socket's path replaced
by the test's own and nothing else changed. A rolling restart under load fails no request, and
the client's own address crosses the balancer to sockd's access rules."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import (
    ROOT,
    Daemon,
    HAProxy,
    Launcher,
    becomes,
    connect,
    eventually,
    free_port,
    haproxy,
    read_to_eof,
    recv_exactly,
    rejected,
    requests,
)

DEPLOY = ROOT / "deploy" / "haproxy"
# What the example files say, and what each becomes here: the example's fixed ports are the
# test's free ones, and the runtime API's socket is in the test's directory.
FRONTEND = "20007"
INSTANCES = {"s1": ("20101", "9465"), "s2": ("20102", "9466"), "s3": ("20103", "9467")}  # listener, metrics
STATS_SOCKET = "/run/haproxy/sockd.sock"

LISTENER = "echo"  # the example's listener
CLIENT_TIMEOUT = 30.0  # a request without an answer this long is a failure
LOAD_LIMIT = 600.0  # seconds the load may run, whatever happens to the test
STOPPED_WITHIN = 60.0  # drain_delay, then the stop (shutdown_timeout at most), on a busy machine
SEEN_WITHIN = 30.0  # HAProxy's checks: a few seconds, on a busy machine many more
PAYLOAD = 64  # bytes a request


def instantiate(path: Path, replacements: dict[str, str]) -> str:
    """The example file with each value in `replacements` replaced, all at once (a free port may
    hold another example port's digits), and only where it stands alone: the only change made."""
    text = path.read_text()
    for example in replacements:
        assert example in text, f"{path.name} no longer says {example}"
    pattern = "|".join(re.escape(example) for example in replacements)
    return re.sub(rf"(?<![\w/])(?:{pattern})(?![\w/])", lambda found: replacements[found[0]], text)


@dataclass
class Instance:
    """One sockd of the example: its config (the example's, with its ports) and the daemon now
    running it."""

    server: str  # HAProxy's name for it
    config: dict[str, Any]
    daemon: Daemon

    @classmethod
    def started(cls, server: str, config: dict[str, Any], launcher: Launcher) -> Instance:
        settings = dict(config)
        return cls(server, config, launcher(settings.pop("listeners"), **settings))

    def again(self, launcher: Launcher) -> Instance:
        return Instance.started(self.server, self.config, launcher)


@dataclass
class Balanced:
    """The three instances and the HAProxy in front of them."""

    instances: list[Instance]
    frontend: str  # host:port
    haproxy: HAProxy

    def restart(self, place: int, launcher: Launcher) -> None:
        """Stop an instance (SIGTERM) and start it again: HAProxy sees it down as it drains, and up
        again once it serves."""
        old = self.instances[place]
        mark = len(old.daemon.events)
        old.daemon.process.send_signal(signal.SIGTERM)
        old.daemon.wait_for("draining", after=mark)
        self.wait_until(old.server, "DOWN")
        stopping = [event for event in old.daemon.events[mark:] if event.get("event") == "stopping"]
        assert not stopping, f"HAProxy took {old.server} out only once it had stopped accepting"
        assert old.daemon.stop(timeout=STOPPED_WITHIN) == 0, old.daemon.other_lines
        new = self.instances[place] = old.again(launcher)
        self.wait_until(new.server, "UP")
        eventually(lambda: requests(new.daemon, LISTENER) > 0, f"{new.server} serving again through HAProxy")

    def wait_until(self, server: str, status: str) -> None:
        """Until HAProxy's view of the server is `status`: its `show stat` status (UP, DOWN, "UP 1/2"
        going down...)."""
        try:
            becomes(lambda: self.haproxy.status(f"sockd/{server}"), status, f"HAProxy's {server}", SEEN_WITHIN)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; HAProxy's log:\n{self.haproxy.output()}") from None


@pytest.fixture
def balanced(start_sockd: Launcher, sockdir: Path, tmp_path: Path) -> Iterator[Balanced]:
    """The example running: the three instances, then HAProxy, once it sees all three up."""
    ports = {server: (str(free_port()), str(free_port())) for server in INSTANCES}
    instances = []
    for server, ours in ports.items():
        text = instantiate(DEPLOY / "sockd.yaml", dict(zip(INSTANCES["s1"], ours, strict=True)))
        instances.append(Instance.started(server, yaml.safe_load(text), start_sockd))
    frontend, stats = free_port(), sockdir / "haproxy.sock"
    replacements = {FRONTEND: str(frontend), STATS_SOCKET: str(stats)}
    for server, example in INSTANCES.items():
        replacements.update(zip(example, ports[server], strict=True))
    with haproxy(tmp_path, instantiate(DEPLOY / "haproxy.cfg", replacements), stats=stats) as running:
        ready = Balanced(instances, f"127.0.0.1:{frontend}", running)
        for server in INSTANCES:
            ready.wait_until(server, "UP")
        yield ready


class Traffic:
    """The load through HAProxy, from threads, until stopped or LOAD_LIMIT has passed:
    `per_request` clients each making a connection per request (connect, send, read the echo,
    close), and `persistent` clients each holding a connection, a request at a time.

    A persistent session that the server ends between requests is a clean end: EOF where the next
    answer's first byte would be, after at least one answer. A drain ends a session so, once its
    last request is answered, and a request that crossed the EOF was never read (the test checks
    that sockd answered every byte it read): the client reconnects and sends it again. Anything
    else is a failure: a refused or reset connection, a request without an answer within
    CLIENT_TIMEOUT, a short or wrong answer, a session ended before its first answer."""

    def __init__(self, address: str, per_request: int, persistent: int) -> None:
        self.address = address
        self.deadline = time.monotonic() + LOAD_LIMIT
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.answered = {"request": 0, "session": 0}  # requests answered in full, by kind of client
        self.reconnections = 0  # persistent sessions ended cleanly by the server, and opened again
        self.failures = 0
        self.failed: list[str] = []  # the first few, said
        self.threads = [threading.Thread(target=self._per_request, args=(n,)) for n in range(per_request)]
        self.threads += [threading.Thread(target=self._persistent, args=(n,)) for n in range(persistent)]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(CLIENT_TIMEOUT * 2)

    def __str__(self) -> str:
        answered = self.answered
        return (
            f"{self.requests} requests ({answered['request']} a connection each, {answered['session']} in sessions), "
            f"{self.failures} failures, {self.reconnections} reconnections"
        )

    @property
    def requests(self) -> int:
        return sum(self.answered.values())

    def _going(self) -> bool:
        return not self.done.is_set() and time.monotonic() < self.deadline

    def _connect(self) -> socket.socket:
        return connect(self.address, timeout=CLIENT_TIMEOUT)

    def _per_request(self, client: int) -> None:
        number = 0
        while self._going():
            payload = f"request {client}#{number}|".encode().ljust(PAYLOAD, b".")
            try:
                with self._connect() as sock:
                    sock.sendall(payload)
                    reply = recv_exactly(sock, len(payload))
            except OSError as exc:
                self._failed(f"request {client}#{number}: {exc!r}")
            else:
                self._answered("request", payload, reply)
            number += 1

    def _persistent(self, client: int) -> None:
        sock: socket.socket | None = None
        answers = number = 0  # answers on this connection; requests answered on any
        try:
            while self._going():
                payload = f"session {client}#{number}|".encode().ljust(PAYLOAD, b".")
                try:
                    if sock is None:
                        sock, answers = self._connect(), 0
                    sock.sendall(payload)
                    reply = recv_exactly(sock, len(payload))
                except OSError as exc:
                    reply = f"{exc!r}".encode()
                if reply == b"" and answers:  # ended between requests: send it again on a new one
                    with self.lock:
                        self.reconnections += 1
                elif self._answered("session", payload, reply):
                    answers, number = answers + 1, number + 1
                    continue
                if sock is not None:
                    sock.close()
                sock = None
        finally:
            if sock is not None:
                sock.close()

    def _answered(self, kind: str, payload: bytes, reply: bytes) -> bool:
        if reply != payload:
            self._failed(f"sent {payload[:24]!r}…, got {reply[:40]!r}")
            return False
        with self.lock:
            self.answered[kind] += 1
        return True

    def _failed(self, what: str) -> None:
        with self.lock:
            self.failures += 1
            if len(self.failed) < 20:
                self.failed.append(what)


def closed(daemons: list[Daemon]) -> list[dict[str, Any]]:
    """The connections the daemons logged as they ended (`log_connections`)."""
    return [event for daemon in daemons for event in list(daemon.events) if event.get("event") == "connection closed"]


def test_a_rolling_restart_behind_haproxy_fails_no_request(balanced: Balanced, start_sockd: Launcher) -> None:
    """Each instance in turn stopped (SIGTERM) and started again under a load through HAProxy:
    HAProxy takes it out while it drains, and puts it back once it serves."""
    traffic = Traffic(balanced.frontend, per_request=4, persistent=6)
    try:
        eventually(lambda: traffic.requests >= 200, f"the load going through HAProxy ({traffic})", timeout=60)
        for place in range(len(balanced.instances)):
            balanced.restart(place, start_sockd)
    finally:
        traffic.stop()
    print(f"rolling restart behind HAProxy: {traffic}")
    assert traffic.failures == 0, f"{traffic}: {traffic.failed}"
    # Each session that ended between requests was ended by a drain, and the request that crossed
    # its EOF was never read: every byte any instance read, it echoed.
    connections = closed(start_sockd.started)
    drained = sum(event["ended"] == "drained" for event in connections)
    print(f"{len(connections)} connections logged, {drained} ended by a drain")
    assert drained >= traffic.reconnections > 0, f"{drained} drained, {traffic}"
    assert [event for event in connections if event["bytes_in"] != event["bytes_out"]] == []


def exchange_from(source: str, address: str, payload: bytes) -> bytes:
    """Send `payload` from `source` (a loopback address), half-close, and read until the end: b""
    if the connection was closed without an answer."""
    with connect(address, timeout=CLIENT_TIMEOUT, source=source) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        try:
            return read_to_eof(sock)
        except ConnectionResetError:  # closed at once, the payload unread
            return b""


def test_the_client_address_crosses_haproxy_to_sockd(balanced: Balanced) -> None:
    """The example's `deny: [127.0.0.2/32]` is applied to the address in HAProxy's PROXY header:
    a client from 127.0.0.2 is refused, one from 127.0.0.3 served, each named in sockd's log."""
    daemons = [instance.daemon for instance in balanced.instances]
    assert exchange_from("127.0.0.2", balanced.frontend, b"denied") == b""
    assert exchange_from("127.0.0.3", balanced.frontend, b"served") == b"served"
    eventually(lambda: sum(rejected(d, LISTENER, "acl") for d in daemons) == 1, "one connection refused by the acl")

    def logged(event: str, **fields: str) -> bool:
        return any(
            e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
            for d in daemons
            for e in list(d.events)
        )

    eventually(lambda: logged("rejected", reason="acl", source="127.0.0.2"), "the refusal of 127.0.0.2 logged")
    eventually(lambda: logged("connection closed", source="127.0.0.3"), "the connection from 127.0.0.3 logged")
