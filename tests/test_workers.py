"""A listener's workers (sockd.group, through the running daemon): several share one socket, and one
that is killed, crashes or hangs is replaced (a crashing one after a backoff) while the others
serve on. The real daemon, real processes."""

from __future__ import annotations

import os
import signal
import socket
import struct
import time

import pytest

from support import (
    Daemon,
    InFlight,
    Launcher,
    Load,
    becomes,
    connect,
    eventually,
    read_to_eof,
    request,
    scrape,
    tcp_owner,
)
from support import listener as entry


@pytest.mark.parametrize("model", ["iterative", "asyncio"])
def test_a_killed_worker_is_restarted_and_clients_in_the_gap_are_served(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", model), entry("other", "udp", "echo", model)])
    address = daemon.address("echo")
    old = daemon.worker_pid("echo")
    mark = len(daemon.events)
    os.kill(old, signal.SIGKILL)
    # Connect at once: the supervisor still holds the listening socket, so this waits in the
    # backlog until the new worker accepts it, and is not refused.
    assert request(address, b"anyone there?") == b"anyone there?"
    died = daemon.wait_for("worker died; restarting", listener="echo", after=mark)
    assert died["pid"] == old
    assert daemon.worker_pid("echo", after=mark) != old
    assert not [e for e in daemon.events[mark:] if e.get("event") == "worker started" and e["listener"] == "other"]


def test_a_killed_worker_under_load_is_back_without_a_refused_connection(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    load = Load([daemon.address("echo")])
    pid = daemon.worker_pid("echo")
    answered = [_requests(daemon)]
    try:
        for _ in range(3):
            mark = len(daemon.events)
            os.kill(pid, signal.SIGKILL)
            daemon.wait_for("worker died; restarting", listener="echo", after=mark)
            pid = daemon.worker_pid("echo", after=mark)
            eventually(lambda: _requests(daemon) > answered[-1], "the restarted worker serves")
            answered.append(_requests(daemon))
    finally:
        load.stop()
    # A client whose request the killed worker held loses that connection (reset): nothing
    # can save it. What must not happen is a refused connection: the socket stayed open.
    assert not [f for f in load.failures if "ConnectionRefused" in f], load.failures
    assert answered == sorted(answered)


def test_a_crashing_worker_backs_off_and_leaves_the_others_alone(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("crashy", "tcp", "echo", "selector"), entry("calm", "tcp", "echo", "selector")])
    calm = daemon.worker_pid("calm")
    pid, delays = daemon.worker_pid("crashy"), []
    for _ in range(4):
        mark = len(daemon.events)
        os.kill(pid, signal.SIGKILL)
        delays.append(daemon.wait_for("worker died; restarting", listener="crashy", after=mark)["restart_in"])
        pid = daemon.worker_pid("crashy", after=mark)
    assert delays == [0.1, 0.2, 0.4, 0.8]
    assert daemon.worker_pid("calm") == calm
    assert not [e for e in daemon.events if e.get("event") == "worker started" and e["listener"] == "calm"][1:]
    assert request(daemon.address("calm"), b"fine") == b"fine"
    assert 'sockd_worker_restarts_total{listener="crashy"} 4.0' in scrape(daemon)


# The event-loop models beat from their loops, the blocking ones from their publisher thread.
@pytest.mark.parametrize("model", ["selector", "asyncio", "busy_poll", "thread_pool"])
def test_a_hung_worker_is_killed_and_replaced_after_worker_timeout(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", model)], worker_timeout=1.5)
    hung = daemon.worker_pid("echo")
    mark = len(daemon.events)
    os.kill(hung, signal.SIGSTOP)  # alive, but making no progress
    killed = daemon.wait_for("killing worker", listener="echo", after=mark, timeout=20)
    assert killed["pid"] == hung
    assert str(killed["why"]).startswith("no heartbeat")
    assert daemon.worker_pid("echo", after=mark) != hung
    assert request(daemon.address("echo"), b"back") == b"back"


def test_several_workers_share_one_socket(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "iterative", workers=3, delay=0.5)])
    pids = daemon.wait_for("listening", listener="echo")["pids"]
    assert isinstance(pids, list)
    assert len(set(pids)) == 3
    # Three iterative workers serve three clients at once: each accepts one from the shared
    # socket (and, serving it, no other), whereas one worker alone would leave two in the backlog.
    clients = [connect(daemon.address("echo")) for _ in range(3)]
    try:
        becomes(lambda: sorted(tcp_owner(sock, pids) or 0 for sock in clients), sorted(pids), "who holds each")
        for sock in clients:
            sock.sendall(b"x")
            sock.shutdown(socket.SHUT_WR)
        assert [read_to_eof(sock) for sock in clients] == [b"x"] * 3
    finally:
        for sock in clients:
            sock.close()


def _requests(daemon: Daemon) -> float:
    line = next(line for line in scrape(daemon).splitlines() if line.startswith("sockd_requests_total{"))
    return float(line.rsplit(" ", 1)[1])


def test_a_delayed_reply_to_a_client_that_reset_is_dropped_quietly(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("slow", "tcp", "echo", "asyncio", delay=0.3)])
    sock = connect(daemon.address("slow"))
    sock.sendall(b"never mind")
    time.sleep(0.05)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset, while the reply waits out its delay
    time.sleep(0.6)
    assert request(daemon.address("slow"), b"next") == b"next"
    deadline = time.monotonic() + 10
    while _requests(daemon) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _requests(daemon) == 1  # only the answered one


def test_a_blocking_worker_stuck_in_one_request_is_replaced(start_sockd: Launcher) -> None:
    # A thread that stays busy with one request (here: a delay far beyond worker_timeout) is
    # how a stuck blocking worker looks from outside, as with gunicorn's sync workers.
    daemon = start_sockd([entry("slow", "tcp", "timestamp", "threaded", delay=30)], worker_timeout=1)
    stuck = daemon.worker_pid("slow")
    mark = len(daemon.events)
    pending = InFlight(daemon.address("slow"))
    killed = daemon.wait_for("killing worker", listener="slow", after=mark, timeout=20)
    assert killed["pid"] == stuck
    assert pending.result() == b""  # its client loses the request, as it would have anyway
    assert daemon.worker_pid("slow", after=mark) != stuck


def test_a_blocking_worker_waiting_on_a_quiet_client_is_not_stuck(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "thread_pool", threads=1)], worker_timeout=1)
    with connect(daemon.address("echo")) as quiet:
        quiet.sendall(b"hello")
        assert quiet.recv(5) == b"hello"
        time.sleep(3)  # the only thread waits in recv() on this client, for three timeouts
        quiet.sendall(b"still here")
        assert quiet.recv(10) == b"still here"
    assert not [e for e in daemon.events if e.get("event") == "killing worker"]
