"""A hung worker: the supervisor aborts it (SIGABRT) so that its stacks reach the log, then kills
it if it is still there, and a new worker serves.

The hang is real: a `sitecustomize` on PYTHONPATH (which reaches the fork server, and so every
worker, see README "Processes and signals") makes the echo handler spin forever on one payload,
in the thread that serves the connection, without sockd holding any code for tests."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from support import TIMEOUT, Daemon, Launcher, connect, eventually, request
from support import listener as entry

HANG = b"hang forever"
HANGING = re.compile(r'File ".*/sitecustomize\.py", line \d+ in hang_forever')

SITECUSTOMIZE = f"""
import resource

from sockd import handlers

# The aborted worker's core file, where the system would write one, is not this test's business.
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

echo = handlers.Echo.feed


def hang_forever():
    while True:
        pass


def feed(self, data):
    if data == {HANG!r}:
        hang_forever()
    return echo(self, data)


handlers.Echo.feed = feed
"""


def start_hanging(start_sockd: Launcher, directory: Path, model: str) -> Daemon:
    """sockd on an echo listener that hangs on HANG, with a short worker_timeout."""
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))
    return start_sockd([entry("echo", "tcp", "echo", model)], worker_timeout=2, env={"PYTHONPATH": path})


def dumped(daemon: Daemon) -> str:
    return "".join(daemon.other_lines)


# An event loop stuck in a handler stops beating at once; a blocking model's thread busy with
# one request stops the beat once it has been busy for half of worker_timeout.
@pytest.mark.parametrize("model", ["selector", "asyncio", "threaded"])
def test_a_hung_worker_writes_where_it_hangs_to_the_log_and_is_replaced(
    start_sockd: Launcher, tmp_path: Path, model: str
) -> None:
    daemon = start_hanging(start_sockd, tmp_path, model)
    address = daemon.address("echo")
    assert request(address, b"not yet") == b"not yet"
    hung = daemon.worker_pid("echo")
    mark = len(daemon.events)
    with connect(address) as client:
        client.sendall(HANG)
        killed = daemon.wait_for("killing worker", listener="echo", after=mark, timeout=20)
        assert killed["pid"] == hung
        assert str(killed["why"]).startswith("no heartbeat")
    # SIGABRT: faulthandler writes every thread's stack, the hanging function in it, and the
    # worker dies of the signal, well within the second it has before SIGKILL.
    eventually(lambda: bool(HANGING.search(dumped(daemon))), "the worker's stack in the log", timeout=TIMEOUT)
    assert "Fatal Python error: Aborted" in dumped(daemon)
    died = daemon.wait_for("worker died; restarting", listener="echo", pid=hung, after=mark)
    assert died["signal"] == "SIGABRT"
    assert request(address, b"back") == b"back"
    assert daemon.worker_pid("echo", after=mark) != hung


def test_a_hung_worker_that_does_not_die_of_sigabrt_is_killed_a_second_later(start_sockd: Launcher) -> None:
    # A SIGSTOPped worker holds SIGABRT pending and writes nothing: SIGKILL, which the
    # supervisor's loop sends on a later turn, ends it.
    daemon = start_sockd([entry("echo", "tcp", "echo", "selector")], worker_timeout=1)
    hung = daemon.worker_pid("echo")
    mark = len(daemon.events)
    os.kill(hung, signal.SIGSTOP)
    aborted = daemon.wait_for("killing worker", listener="echo", after=mark, timeout=20)
    assert aborted["pid"] == hung
    assert str(aborted["why"]).startswith("no heartbeat")
    killed = daemon.wait_for("killing worker", listener="echo", why="still running 1 s after SIGABRT", after=mark)
    assert killed["pid"] == hung
    died = daemon.wait_for("worker died; restarting", listener="echo", pid=hung, after=mark)
    assert died["signal"] == "SIGKILL"
    assert daemon.worker_pid("echo", after=mark) != hung
    assert request(daemon.address("echo"), b"back") == b"back"
