"""What a worker that is gone leaves running (sockd.orphans): its exec children are ended by the
supervisor, reaped (no process left, no zombie) and counted, and a new worker serves."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
from test_exec import exec_listener, exits, script

from support import Launcher, children, connect, eventually, read_to_eof


def gone(pid: int) -> bool:
    """Neither running nor a zombie: reaped."""
    return not os.path.exists(f"/proc/{pid}")


def read_line(sock: socket.socket) -> bytes:
    got = b""
    while not got.endswith(b"\n"):
        data = sock.recv(4096)
        if not data:
            break
        got += data
    return got


def test_a_killed_workers_child_and_what_it_started_are_ended_reaped_and_counted(start_sockd: Launcher) -> None:
    # The shell leads the child's session; its sleep (in its process group) goes with it.
    daemon = start_sockd([exec_listener(["/bin/sh", "-c", "sleep 3600 & echo up; wait"])])
    worker = daemon.worker_pid("x")
    mark = len(daemon.events)
    with connect(daemon.address("x")) as sock:
        assert read_line(sock) == b"up\n"
        (child,) = children(worker)
        eventually(lambda: len(children(child)) == 1, "the sleep started")
        (grandchild,) = children(child)
        os.kill(worker, signal.SIGKILL)
        ended = daemon.wait_for("ending what a gone worker left running", worker=worker, after=mark)
        assert (ended["listener"], ended["pids"], ended["signal"]) == ("x", [child], "SIGTERM")
        eventually(lambda: gone(child) and gone(grandchild), "the child and its sleep ended and reaped")
        assert read_to_eof(sock) == b""  # the client sees the end of its session
    reaped = daemon.wait_for("reaped what a gone worker left", pid=child, after=mark)
    assert reaped["signal"] == "SIGTERM"
    eventually(lambda: exits(daemon, "signal") == 1, "its end counted")
    daemon.wait_for("worker died; restarting", listener="x", pid=worker, after=mark)
    assert daemon.worker_pid("x", after=mark) != worker
    with connect(daemon.address("x")) as sock:
        assert read_line(sock) == b"up\n"  # a new worker serves


@pytest.mark.parametrize("hung", [False, True], ids=["serving", "hung"])
def test_a_stop_past_shutdown_timeout_ends_a_child_that_ignores_sigterm(
    start_sockd: Launcher, tmp_path: Path, hung: bool
) -> None:
    """The worker ends its children as its drain nears shutdown_timeout (sockd.exec); a hung one
    cannot, so the supervisor kills it then, and its child at once: their time is up."""
    body = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\n"
    body += "time.sleep(3600)\n"
    daemon = start_sockd([exec_listener([script(tmp_path, body)])], shutdown_timeout=1.0)
    worker = daemon.worker_pid("x")
    mark = len(daemon.events)
    with connect(daemon.address("x")) as sock:
        assert read_line(sock) == b"up\n"
        (child,) = children(worker)
        if hung:
            os.kill(worker, signal.SIGSTOP)
        assert daemon.stop() == 0
        assert read_to_eof(sock) == b""
    assert gone(child)  # ended and reaped before the supervisor exited
    if hung:
        daemon.wait_for("killing worker", pid=worker, why="shutdown_timeout passed", after=mark)
        ended = daemon.wait_for("ending what a gone worker left running", worker=worker, after=mark)
        assert (ended["pids"], ended["signal"]) == ([child], "SIGKILL")
