"""The blocking models (iterative, threaded, thread_pool) and a client that never reads, through
the running daemon."""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from support import TIMEOUT, Daemon, Launcher, Session, connect, eventually, inet, samples, value
from support import listener as entry

WORKER_TIMEOUT = 2.0
# Several worker timeouts: the heartbeat is watched over many of its periods while a thread waits
# on the client that does not read.
IDLE_TIMEOUT = 3 * WORKER_TIMEOUT
# Far more than the kernel's buffers on both sides hold (kept small), so the client's send stalls
# once the server has stopped reading it.
UNREAD = 6 << 20
BUFFERS = 1 << 16


def never_reading(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFERS)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFERS)
    sock.settimeout(IDLE_TIMEOUT + TIMEOUT)
    sock.connect(inet(address))
    return sock


def closed_by_the_server(sock: socket.socket) -> bool:
    """Send UNREAD bytes and read none: True once the server closes the connection on it (a reset
    or a broken pipe), False if it was all taken. A timeout (the server held it) raises."""
    try:
        sock.sendall(os.urandom(UNREAD))
    except ConnectionError:
        return True
    return False


@pytest.mark.parametrize("model", ["iterative", "threaded", "thread_pool"])
def test_a_client_that_never_reads_is_timed_out_and_never_gets_the_worker_killed(
    start_sockd: Launcher, model: str
) -> None:
    options: dict[str, Any] = {"idle_timeout": IDLE_TIMEOUT, "recv_buffer": BUFFERS, "send_buffer": BUFFERS}
    if model == "thread_pool":
        options["threads"] = 2
    daemon = start_sockd([entry("e", "tcp", "echo", model, **options)], worker_timeout=WORKER_TIMEOUT)
    address = daemon.address("e")
    with ThreadPoolExecutor(1) as pool, never_reading(address) as hog:
        if model == "iterative":
            # One connection at a time: the next client waits in the backlog until the one that
            # does not read is timed out, then is served by the same worker.
            unread: Future[bool] = pool.submit(closed_by_the_server, hog)
            with connect(address, timeout=IDLE_TIMEOUT + TIMEOUT) as waiting:
                waiting.sendall(b"next")
                assert waiting.recv(4) == b"next"
            assert unread.result(timeout=TIMEOUT)
        else:
            # Another client's session goes on throughout, and after the hog has been closed.
            session = Session(address, "steady")
            try:
                session.exchange()
                unread = pool.submit(closed_by_the_server, hog)
                deadline = time.monotonic() + IDLE_TIMEOUT + TIMEOUT
                while not unread.done() and time.monotonic() < deadline:
                    session.exchange()
                    time.sleep(0.05)
                assert unread.result(timeout=TIMEOUT)
                session.exchange()
            finally:
                session.close()
    assert not [e for e in daemon.events if e.get("event") == "killing worker"]
    assert value(samples(daemon), "sockd_worker_restarts_total", listener="e") == 0
    eventually(lambda: timeouts(daemon) == 1, "the client that did not read counted as timed out")


def timeouts(daemon: Daemon) -> float:
    return value(samples(daemon), "sockd_errors_total", listener="e", kind="timeout")
