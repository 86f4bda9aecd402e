"""Workers forked from the fork server: whose children they are, their names, the fork server's
death, a failed start, and a reload after sockd's own files changed. The real daemon, real
processes."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from support import ROOT, Daemon, Launcher, eventually, request
from support import listener as entry

ECHO_FEED = "    def feed(self, data: bytes) -> bytes:\n        return data\n"  # in sockd/handlers.py's Echo


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def title(pid: int) -> str:
    """What `ps -o args` shows: the process's command line as setproctitle left it."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode()


def fork_server(daemon: Daemon, after: int = 0) -> int:
    return int(daemon.wait_for("fork server started", after=after, timeout=30)["pid"])


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A copy of the sockd package to run from (PYTHONPATH), to change behind the daemon's back."""
    copy = tmp_path / "lib"
    shutil.copytree(ROOT / "sockd", copy / "sockd", ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_workers_are_the_supervisors_children_and_every_process_is_named(start_sockd: Launcher) -> None:
    daemon = start_sockd(
        [entry("plain", "tcp", "echo", "asyncio"), entry("pair", "udp", "echo", "selector", workers=2)]
    )
    supervisor = daemon.process.pid
    server = fork_server(daemon)
    workers = {name: daemon.wait_for("listening", listener=name)["pids"] for name in ("plain", "pair")}
    assert len(workers["pair"]) == 2
    for name, pids in workers.items():
        for pid in pids:
            assert parent(pid) == supervisor
            assert title(pid) == f"sockd: worker {name}"
    assert parent(server) == supervisor
    assert title(server) == "sockd: fork server"
    assert title(supervisor) == f"sockd: supervisor -c {daemon.config_path}"
    shown = subprocess.run(["ps", "-o", "args=", "-p", str(server)], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "sockd: fork server"


def test_a_killed_fork_server_is_replaced_and_so_is_a_killed_worker(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "selector")])
    old = fork_server(daemon)
    mark = len(daemon.events)
    os.kill(old, signal.SIGKILL)
    died = daemon.wait_for("fork server died; starting a new one", after=mark)
    assert died["pid"] == old
    assert died["signal"] == "SIGKILL"  # by name, not as a negative code
    assert "code" not in died
    new = fork_server(daemon, after=mark)
    assert new != old
    assert not alive(old)  # reaped
    assert title(new) == "sockd: fork server"

    mark = len(daemon.events)
    os.kill(daemon.worker_pid("echo"), signal.SIGKILL)
    replacement = daemon.worker_pid("echo", after=mark)
    assert parent(replacement) == daemon.process.pid
    assert request(daemon.address("echo"), b"still served") == b"still served"


def test_a_killed_worker_is_reaped_with_its_exit_status(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    pid = daemon.worker_pid("echo")
    for signum in (signal.SIGKILL, signal.SIGUSR1):
        mark = len(daemon.events)
        os.kill(pid, signum)
        died = daemon.wait_for("worker died; restarting", listener="echo", after=mark)
        assert (died["pid"], died["signal"]) == (pid, signum.name)
        assert "code" not in died
        assert not alive(pid)  # waited for: no zombie left
        pid = daemon.worker_pid("echo", after=mark)


def test_a_worker_that_cannot_be_started_is_retried_with_the_backoff_and_nothing_leaks(
    start_sockd: Launcher, package: Path
) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "selector")], env={"PYTHONPATH": str(package)})
    supervisor = daemon.process.pid
    descriptors = len(os.listdir(f"/proc/{supervisor}/fd"))
    handlers = package / "sockd" / "handlers.py"
    source = handlers.read_text()
    handlers.write_text(source + "\nraise ImportError('broken on purpose')\n")  # no fork server can start now
    mark = len(daemon.events)
    os.kill(fork_server(daemon), signal.SIGKILL)
    daemon.wait_for("fork server failed", after=mark)
    os.kill(daemon.worker_pid("echo"), signal.SIGKILL)
    failed = [daemon.wait_for("cannot start a worker", listener="echo", after=mark, timeout=20)]
    failed.append(daemon.wait_for("cannot start a worker", listener="echo", after=daemon.events.index(failed[0]) + 1))
    assert not [e for e in daemon.events[mark:] if e.get("event") == "worker started"]
    handlers.write_text(source)
    daemon.worker_pid("echo", after=mark)  # back, once a fork server starts again
    assert request(daemon.address("echo"), b"back") == b"back"
    assert len(os.listdir(f"/proc/{supervisor}/fd")) == descriptors


def test_a_reload_after_sockds_files_changed_starts_new_workers_on_the_new_code(
    start_sockd: Launcher, package: Path
) -> None:
    listeners = [entry("tcp", "tcp", "echo", "asyncio"), entry("udp", "udp", "echo", "thread_pool")]
    daemon = start_sockd(listeners, env={"PYTHONPATH": str(package)})
    started = daemon.wait_for("fork server started")
    assert started["package"] == str(package / "sockd")  # the copy is what workers run
    old_server = int(started["pid"])
    old_workers = {name: daemon.worker_pid(name) for name in ("tcp", "udp")}
    assert request(daemon.address("tcp"), b"hello") == b"hello"

    # Unchanged files: the same fork server, the same workers.
    plan = daemon.reload(listeners)
    assert (plan["kept"], "restarted" in plan) == (["tcp", "udp"], False)
    assert not [e for e in daemon.events if e.get("event") == "fork server started"][1:]

    handlers = package / "sockd" / "handlers.py"
    source = handlers.read_text()
    assert source.count(ECHO_FEED) == 1
    handlers.write_text(source.replace(ECHO_FEED, ECHO_FEED.replace("return data", "return data.upper()")))
    mark = len(daemon.events)
    plan = daemon.reload(listeners)
    assert plan["restarted"] == ["tcp", "udp"], plan
    assert daemon.wait_for("sockd's files changed: new workers run the new code", after=mark)
    new_server = fork_server(daemon, after=mark)
    assert new_server != old_server
    eventually(lambda: not alive(old_server), "the old fork server ended")
    for name in ("tcp", "udp"):
        assert daemon.worker_pid(name, after=mark) != old_workers[name]
    # The old worker accepts until the new one serves; then it goes, and only new code answers.
    daemon.wait_for("worker exited", pid=old_workers["tcp"], after=mark)
    assert request(daemon.address("tcp"), b"hello") == b"HELLO"


def test_new_code_that_does_not_start_fails_the_reload_and_changes_nothing(
    start_sockd: Launcher, package: Path
) -> None:
    listeners = [entry("echo", "tcp", "echo", "asyncio")]
    daemon = start_sockd(listeners, env={"PYTHONPATH": str(package)})
    server, worker = fork_server(daemon), daemon.worker_pid("echo")
    handlers = package / "sockd" / "handlers.py"
    handlers.write_text(handlers.read_text() + "\nthis is not Python\n")
    mark = len(daemon.events)
    daemon.write_config(listeners)
    daemon.process.send_signal(signal.SIGHUP)
    error = daemon.wait_for("reload rolled back", after=mark)["error"]
    assert "fork server did not start" in str(error)
    assert alive(server)
    assert daemon.worker_pid("echo") == worker
    assert not [e for e in daemon.events[mark:] if e.get("event") == "worker started"]
    assert request(daemon.address("echo"), b"old code") == b"old code"


# More networks than a spec in one message could hold: a SOCK_SEQPACKET message must fit in the
# socket's send buffer (net.core.wmem_default: 212,992 bytes, some 13,000 networks). Not the
# config's own limit (100,000 values): a file of those takes a minute to parse on a loaded machine.
MANY_NETWORKS = 30_000


def test_a_listener_allowing_more_networks_than_a_socket_buffer_holds_starts_and_serves(
    start_sockd: Launcher,
) -> None:
    allow = [f"10.{n >> 16}.{n >> 8 & 255}.{n & 255}/32" for n in range(MANY_NETWORKS)] + ["127.0.0.0/8"]
    assert len(str(allow)) > int(Path("/proc/sys/net/core/wmem_default").read_text())  # what makes this a test
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio", allow=allow)], wait=False)
    daemon.wait_for("ready", timeout=120)
    assert request(daemon.address("echo"), b"allowed") == b"allowed"
    assert not [
        e for e in daemon.events if e.get("event") in ("cannot start a worker", "fork server died; starting a new one")
    ]


def limit_leaving(pid: int, free: int) -> int:
    """The soft descriptor limit under which process `pid` has exactly `free` descriptor numbers
    left: the lowest free number first, whatever holes its descriptors leave."""
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    unused = (number for number in itertools.count() if number not in used)
    return next(itertools.islice(unused, free, None))


# 0: the worker's descriptors cannot be received; 3: they are, but the fork's pipe cannot be had.
@pytest.mark.parametrize("free", [0, 3])
def test_a_fork_server_out_of_descriptors_says_so_and_serves_on_once_it_has_some(
    start_sockd: Launcher, free: int
) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    server = fork_server(daemon)
    subprocess.run(["prlimit", f"--pid={server}", f"--nofile={limit_leaving(server, free)}:"], check=True)
    mark = len(daemon.events)
    os.kill(daemon.worker_pid("echo"), signal.SIGKILL)
    error = str(daemon.wait_for("cannot start a worker", listener="echo", after=mark)["error"])
    assert "the fork server is out of descriptors" in error, error
    subprocess.run(["prlimit", f"--pid={server}", "--nofile=1024:"], check=True)
    daemon.worker_pid("echo", after=mark)  # tried again after its backoff, by the same fork server
    assert request(daemon.address("echo"), b"back") == b"back"
    assert alive(server)
    assert not [e for e in daemon.events[mark:] if e.get("event") == "fork server died; starting a new one"]
