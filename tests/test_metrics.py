"""The Prometheus endpoint: exact counts through every model, across worker deaths, read by real
Prometheus tools."""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from sockd import __version__, build
from sockd.counters import ERROR_KINDS
from sockd.metrics import MAX_CONNECTIONS, MAX_SCRAPES, REQUEST_TIMEOUT, Reloads, Snapshot, SockdCollector

from support import (
    MODELS,
    ROOT,
    TIMEOUT,
    Daemon,
    Launcher,
    _proc_net_address,
    connect,
    cpu_seconds,
    datagram,
    eventually,
    health,
    inet,
    read_to_eof,
    request,
    require,
    rss_bytes,
    run_sockd,
    samples,
    scrape,
    squatting,
    stopped,
    value,
)
from support import listener as entry
from support.prometheus import prometheus


def exchange(daemon: Daemon, name: str, protocol: str, payload: bytes) -> bytes:
    """One request on its own connection (stream) or as one datagram."""
    if protocol == "udp":
        return datagram(daemon.address(name), payload)
    with connect(daemon.address(name)) as sock:
        sock.sendall(payload)
        reply = sock.recv(65536)
        sock.shutdown(socket.SHUT_WR)
        return reply + read_to_eof(sock)


@pytest.mark.parametrize("model", MODELS)
def test_counts_are_exact_and_survive_a_killed_worker(start_sockd: Launcher, sockdir: Path, model: str) -> None:
    daemon = start_sockd(
        [
            entry("tcp", "tcp", "echo", model),
            entry("udp", "udp", "echo", model),
            entry("unix", "unix", "echo", model, sockdir / "m.sock"),
        ]
    )
    sent: dict[str, int] = {}
    history: list[dict[tuple[str, frozenset[tuple[str, str]]], float]] = []

    def serve(rounds: int) -> None:
        for name in ("tcp", "udp", "unix"):
            for number in range(rounds):
                payload = f"{name} request {number} ".encode() * (number + 1)
                assert exchange(daemon, name, name, payload) == payload
                sent[name] = sent.get(name, 0) + len(payload)

    def published(name: str, requests: int) -> bool:
        history.append(samples(daemon))
        return value(history[-1], "sockd_requests_total", listener=name) == requests

    serve(7)
    for name in ("tcp", "udp", "unix"):
        eventually(functools.partial(published, name, 7), f"{name}: 7 requests")
    now = history[-1]
    for name in ("tcp", "udp", "unix"):
        assert value(now, "sockd_request_duration_seconds_count", listener=name) == 7
        assert value(now, "sockd_request_duration_seconds_bucket", listener=name, le="+Inf") == 7
        assert value(now, "sockd_received_bytes_total", listener=name) == sent[name]
        assert value(now, "sockd_sent_bytes_total", listener=name) == sent[name]
    assert value(now, "sockd_connections_total", listener="tcp") == 7
    assert value(now, "sockd_connections_total", listener="udp") == 0

    # A worker killed outright: what it counted stays; the new worker's counts add on top.
    mark = len(daemon.events)
    os.kill(daemon.worker_pid("tcp"), signal.SIGKILL)
    daemon.wait_for("worker started", listener="tcp", after=mark)
    serve(5)
    for name in ("tcp", "udp", "unix"):
        eventually(functools.partial(published, name, 12), f"{name}: 12 requests")
    now = history[-1]
    for name in ("tcp", "udp", "unix"):
        assert value(now, "sockd_request_duration_seconds_count", listener=name) == 12
        assert value(now, "sockd_received_bytes_total", listener=name) == sent[name]
        assert value(now, "sockd_sent_bytes_total", listener=name) == sent[name]
        assert value(now, "sockd_connections_active", listener=name) == 0
    assert value(now, "sockd_connections_total", listener="tcp") == 12
    assert value(now, "sockd_worker_restarts_total", listener="tcp") == 1
    assert value(now, "sockd_worker_restarts_total", listener="udp") == 0

    # Monotonic across every scrape taken, the worker's death included.
    counters = [key for key in now if key[0].endswith(("_total", "_count", "_bucket", "_sum"))]
    for key in counters:
        seen = [scraped[key] for scraped in history if key in scraped]
        assert seen == sorted(seen), key


def test_an_open_connection_is_active_until_it_closes_or_its_worker_dies(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])

    def active() -> float:
        return value(samples(daemon), "sockd_connections_active", listener="echo")

    with connect(daemon.address("echo")) as first, connect(daemon.address("echo")) as second:
        for sock in (first, second):
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        eventually(lambda: active() == 2, "2 active connections")
        second.close()
        eventually(lambda: active() == 1, "1 active connection")
        os.kill(daemon.worker_pid("echo"), signal.SIGKILL)
        eventually(lambda: active() == 0, "no active connection once the worker died")


def test_the_histogram_places_a_delayed_request_in_its_bucket(start_sockd: Launcher) -> None:
    daemon = start_sockd(
        [entry("slow", "tcp", "timestamp", "selector", delay=0.3)], metrics={"port": 0, "buckets": [0.1, 0.2, 1, 5]}
    )
    assert request(daemon.address("slow"), b"x")
    eventually(lambda: value(samples(daemon), "sockd_request_duration_seconds_count", listener="slow") == 1, "1")
    found = samples(daemon)
    buckets = {
        le: value(found, "sockd_request_duration_seconds_bucket", listener="slow", le=le)
        for le in ("0.1", "0.2", "1.0", "5.0", "+Inf")
    }
    assert buckets == {"0.1": 0, "0.2": 0, "1.0": 1, "5.0": 1, "+Inf": 1}
    assert 0.3 <= value(found, "sockd_request_duration_seconds_sum", listener="slow") < 1


def test_listener_and_build_info(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "udp", "echo", "thread_pool", threads=2)])
    found = samples(daemon)
    info = {"listener": "echo", "protocol": "udp", "concurrency": "thread_pool", "handler": "echo"}
    assert value(found, "sockd_listener_info", address=daemon.address("echo"), **info) == 1
    assert value(found, "sockd_build_info", version=__version__, compiled=str(build.compiled()).lower()) == 1
    assert [key for key in found if key[0] == "process_resident_memory_bytes"]


def test_the_readme_lists_every_metric_and_the_errors_help_every_kind() -> None:
    families = list(SockdCollector(lambda: Snapshot([], Reloads(), []), [1.0]).collect())
    names = {family.name + ("_total" if family.type == "counter" else "") for family in families}
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(sockd_\w+)` \|", readme, re.MULTILINE))
    assert names == listed
    errors = next(family for family in families if family.name == "sockd_errors")
    assert all(kind in errors.documentation for kind in ERROR_KINDS), errors.documentation


def test_promtool_finds_nothing_to_criticise(start_sockd: Launcher) -> None:
    promtool = require("promtool")
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio"), entry("u", "udp", "timestamp", "selector")])
    request(daemon.address("echo"), b"x")
    exposition = scrape(daemon)
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == ""


def test_healthz_is_503_while_a_worker_is_down_and_200_again_after(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "iterative"), entry("other", "tcp", "echo", "selector")])
    assert health(daemon) == (200, "ok\n")
    mark = len(daemon.events)
    pid = daemon.worker_pid("echo")
    os.kill(pid, signal.SIGKILL)
    daemon.wait_for("worker died; restarting", listener="echo", after=mark)
    states: list[tuple[int, str]] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not states or states[-1] != (200, "ok\n")):
        states.append(health(daemon))
        time.sleep(0.01)
    assert (503, "down: echo\n") in states, states
    assert states[-1] == (200, "ok\n")


def test_a_busy_metrics_port_is_a_bind_error(tmp_path: Path) -> None:
    with squatting("tcp") as taken:
        host, port = taken.rsplit(":", 1)
        path = tmp_path / "c.yaml"
        config = {"metrics": {"host": host, "port": int(port)}, "listeners": [entry("echo", "tcp", "echo", "asyncio")]}
        path.write_text(yaml.safe_dump(config))
        done = run_sockd("-c", str(path))
    assert done.returncode == 71
    assert done.stderr == f"sockd: cannot bind the metrics endpoint to {taken}: address already in use\n"


def test_metrics_can_be_turned_off(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")], metrics={"enabled": False})
    assert request(daemon.address("echo"), b"x") == b"x"
    assert not [e for e in daemon.events if e.get("event") == "metrics"]


def test_nothing_accumulates_in_the_supervisor_as_workers_come_and_go(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "selector")])
    supervisor = daemon.process.pid

    def held() -> tuple[int, int]:
        maps = Path(f"/proc/{supervisor}/maps").read_text().count("sockd-counters")
        return len(os.listdir(f"/proc/{supervisor}/fd")), maps

    before = held()
    pid = daemon.worker_pid("echo")
    for _ in range(5):
        mark = len(daemon.events)
        os.kill(pid, signal.SIGKILL)
        pid = daemon.worker_pid("echo", after=mark)
    assert request(daemon.address("echo"), b"x") == b"x"
    assert held() == before


def test_a_real_prometheus_scrapes_sockd(start_sockd: Launcher, tmp_path: Path) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    for _ in range(3):
        request(daemon.address("echo"), b"counted")
    with prometheus(tmp_path, [daemon.wait_for("metrics")["address"]]) as server:

        def values(expression: str) -> list[str]:
            return [series["value"][1] for series in server.query(expression)]

        eventually(lambda: values('up{job="sockd"}') == ["1"], "up == 1", timeout=60)
        eventually(
            lambda: values('sockd_requests_total{listener="echo"}') == ["3"],
            "sockd_requests_total == 3 in Prometheus",
            timeout=60,
        )


@pytest.mark.parametrize("model", ["threaded", "asyncio"])
def test_healthz_reports_a_stopped_worker_down_long_before_worker_timeout_kills_it(
    start_sockd: Launcher, model: str
) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", model)], worker_timeout=120)
    pid = daemon.worker_pid("echo")

    def up() -> float:
        return value(samples(daemon), "sockd_listener_up", listener="echo")

    eventually(lambda: health(daemon)[0] == 200 and up() == 1, "healthy at first")
    with stopped(pid):
        # sockd_listener_up says what /healthz says, for an alert to name the listener.
        eventually(lambda: health(daemon)[0] == 503 and up() == 0, "down once its heartbeat stopped", timeout=20)
    eventually(lambda: health(daemon)[0] == 200 and up() == 1, "up again once it beats", timeout=20)
    assert request(daemon.address("echo"), b"x") == b"x"
    # worker_timeout, not the health check, decides when a worker is killed: this one never was.
    assert [e["pid"] for e in daemon.events if e.get("event") == "worker started"] == [pid]


def test_worker_cpu_and_memory_are_reported_and_cpu_never_goes_down(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio", workers=2), entry("idle", "udp", "echo", "selector")])
    pids = daemon.wait_for("listening", listener="echo")["pids"]

    def cpu() -> float:
        return value(samples(daemon), "sockd_worker_cpu_seconds_total", listener="echo")

    found = samples(daemon)
    resident = value(found, "sockd_worker_resident_memory_bytes", listener="echo")
    assert 0.8 < resident / sum(rss_bytes(pid) for pid in pids) < 1.25
    assert 5 << 20 < value(found, "sockd_worker_resident_memory_bytes", listener="idle") < 200 << 20
    before = cpu()
    used_before = sum(cpu_seconds(pid) for pid in pids)
    with connect(daemon.address("echo")) as sock:
        # Busy until the kernel's 10 ms ticks have seen the workers use 0.2 s, however long a busy
        # machine takes to give them that.
        deadline = time.monotonic() + 120
        while sum(cpu_seconds(pid) for pid in pids) < used_before + 0.2:
            assert time.monotonic() < deadline, "the workers were never given 0.2 s of CPU"
            for _ in range(100):
                sock.sendall(b"x" * 100)
                assert len(sock.recv(100)) > 0
    eventually(lambda: cpu() > before + 0.1, "the load's CPU time published")
    loaded = cpu()
    assert loaded <= sum(cpu_seconds(pid) for pid in pids) + 0.05  # what the kernel says they used

    mark = len(daemon.events)
    os.kill(pids[0], signal.SIGKILL)
    daemon.wait_for("worker started", listener="echo", after=mark)
    assert cpu() >= loaded  # the dead worker's time stays
    assert value(samples(daemon), "sockd_worker_resident_memory_bytes", listener="echo") > 0


def test_a_listener_removed_and_added_back_counts_on_and_never_goes_back(start_sockd: Launcher) -> None:
    kept, back = entry("kept", "tcp", "echo", "selector"), entry("back", "tcp", "echo", "asyncio")
    daemon = start_sockd([kept, back], shutdown_timeout=120)

    def requests() -> float:
        return value(samples(daemon), "sockd_requests_total", listener="back")

    seen: list[float] = []
    with connect(daemon.address("back")) as session:
        for number in range(5):  # one request each: the reply comes before the next is sent
            session.sendall(b"%d" % number)
            assert session.recv(16) == b"%d" % number
        eventually(lambda: requests() == 5, "5 requests")
        assert daemon.reload([kept])["removed"] == ["back"]
        seen.append(requests())  # its old worker still serves the session, and is counted
        mark = len(daemon.events)
        assert daemon.reload([kept, back])["added"] == ["back"]
        again = str(daemon.wait_for("listening", listener="back", after=mark)["address"])  # port 0: another
        assert request(again, b"new") == b"new"
        eventually(lambda: requests() == 6, "the new worker's request added to the old ones'")
        session.sendall(b"old")
        assert session.recv(16) == b"old"  # the removed generation still serves it
        eventually(lambda: requests() == 7, "7 requests")
        seen.append(requests())
    # The old worker exits once its session is closed: its counts stay under the name.
    eventually(lambda: value(samples(daemon), "sockd_worker_generations", listener="back") == 1, "old one gone")
    seen.append(requests())
    assert seen == [5, 7, 7]


def _half_requests(address: str, count: int) -> list[socket.socket]:
    """Connections to the metrics endpoint that each send part of a request line, and wait."""
    held = []
    for _ in range(count):
        try:
            sock = socket.create_connection(inet(address), timeout=5)
            sock.sendall(b"GET /metr")
        except OSError:  # timed out: the backlog is full while the endpoint holds its cap
            continue
        held.append(sock)
    return held


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_scrapes_cannot_take_the_supervisor_down(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    supervisor = daemon.process.pid
    # systemd's default soft limit is 1,024; this one is lower, so that the test needs fewer clients.
    subprocess.run(["prlimit", f"--pid={supervisor}", "--nofile=256:256"], check=True)
    before = _fds(supervisor)
    held = _half_requests(daemon.wait_for("metrics")["address"], 400)
    try:
        # Bounded: a descriptor for each of at most MAX_CONNECTIONS, the one that waited longest closed for a new one.
        assert _fds(supervisor) <= before + MAX_CONNECTIONS + 2, (before, _fds(supervisor))
        mark = len(daemon.events)
        os.kill(daemon.worker_pid("echo"), signal.SIGKILL)
        daemon.wait_for("worker started", listener="echo", after=mark)  # the supervisor still supervises
        eventually(lambda: request(daemon.address("echo"), b"x") == b"x", "served again", timeout=20)
        # A scrape gets through: the held ones are closed to make room for it, or time out.
        eventually(lambda: "sockd_requests_total" in _scrape_or_empty(daemon), "a scrape", timeout=30)
    finally:
        for sock in held:
            sock.close()


def _scrape_or_empty(daemon: Daemon) -> str:
    try:
        return scrape(daemon)
    except OSError:
        return ""


def test_clients_resetting_scrapes_cost_a_line_at_most_and_never_a_traceback(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    for sock in _half_requests(daemon.wait_for("metrics")["address"], 200):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, mid-request
    assert "sockd_requests_total" in scrape(daemon)
    assert daemon.stop() == 0
    assert daemon.other_lines == []  # no traceback: every line is JSON
    assert len([e for e in daemon.events if e.get("event") == "a scrape failed"]) <= 2


def _health(address: str) -> int:
    """The status of one GET /healthz at the endpoint's `address`; 0 if none came."""
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=TIMEOUT) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:  # refused, reset, closed without an answer, timed out
        return 0


def test_healthz_stays_200_through_reloads_that_start_new_generations(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "selector", workers=2)])
    endpoint, echo = daemon.wait_for("metrics")["address"], daemon.address("echo")
    answers: list[int] = []
    done = threading.Event()

    def sample() -> None:  # as fast as it can: the window of a reload is a few milliseconds
        while not done.is_set() and len(answers) < 100_000:
            answers.append(_health(endpoint))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for number in range(5):  # each a new generation on the same socket, the old one serving until it serves
            plan = daemon.reload([entry("echo", "tcp", "echo", "selector", workers=2, idle_timeout=10 + number)])
            assert plan["restarted"] == ["echo"]
            assert request(echo, b"x") == b"x"
    finally:
        done.set()
        sampler.join(TIMEOUT)
    assert answers, "no sample taken"
    assert collections.Counter(answers) == {200: len(answers)}


def _closed_by_the_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def test_slowloris_cannot_starve_healthz_and_is_closed_by_the_request_deadline(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "selector")])
    endpoint = daemon.wait_for("metrics")["address"]
    # More than there are scrape threads, each sending a byte of its request head far more often
    # than a timeout per read would notice.
    slow = [socket.create_connection(inet(endpoint), timeout=TIMEOUT) for _ in range(MAX_SCRAPES + 4)]
    answers: list[int] = []
    open_ = list(slow)
    try:
        deadline = time.monotonic() + REQUEST_TIMEOUT + TIMEOUT
        while open_ and time.monotonic() < deadline:
            open_ = [sock for sock in open_ if not _closed_by_the_server(sock)]
            for sock in open_:
                with contextlib.suppress(OSError):  # closed since
                    sock.send(b"X")
            answers.append(_health(endpoint))
            time.sleep(0.2)  # the attacker's pace
    finally:
        for sock in slow:
            sock.close()
    assert collections.Counter(answers) == {200: len(answers)}  # 0: no answer at all
    assert open_ == [], f"{len(open_)} of {len(slow)} slow requests still open after {REQUEST_TIMEOUT + TIMEOUT} s"
    assert daemon.wait_for("a scrape's request did not come whole in time; closed it")


def _backlog(address: str) -> int:
    """How many connections wait in the listen backlog of a loopback IPv4 TCP `address`."""
    host, port = inet(address)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == _proc_net_address(host, port) and fields[3] == "0A":  # LISTEN: rx_queue is its backlog
            return int(fields[4].partition(":")[2], 16)
    raise AssertionError(f"nothing listens on {address}")


def test_scrapes_past_every_cap_wait_in_the_backlog_and_are_all_answered(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "selector")])
    endpoint = daemon.wait_for("metrics")["address"]
    scrapes = []
    try:
        # All connected before any asks, all asking before any answer is read.
        for _ in range(MAX_CONNECTIONS + MAX_SCRAPES):
            scrapes.append(socket.create_connection(inet(endpoint), timeout=TIMEOUT))
        queued = len(scrapes) - MAX_CONNECTIONS
        eventually(lambda: _backlog(endpoint) <= queued, f"all but {queued} accepted", timeout=TIMEOUT)
        for sock in scrapes:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: sockd\r\n\r\n")
        answers = [read_to_eof(sock) for sock in scrapes]
    finally:
        for sock in scrapes:
            sock.close()
    assert [answer.split(b" ", 2)[1:2] for answer in answers] == [[b"200"]] * len(scrapes)
    assert all(b"sockd_build_info" in answer for answer in answers)
