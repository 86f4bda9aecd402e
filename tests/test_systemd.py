"""sockd under systemd's protocols, with real peers: sd_notify datagrams received on a real
$NOTIFY_SOCKET (a path and the abstract namespace), the watchdog, and sockets passed by
systemd-socket-activate (socket activation: LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from support import (
    SYSTEMD_VARIABLES,
    TIMEOUT,
    Launcher,
    config_text,
    connect,
    listen_backlog,
    listener,
    read_to_eof,
    request,
    require,
    scrape,
    sockd_command,
)

# Passed on to sockd through systemd-socket-activate, which otherwise gives its child only
# TERM, PATH, USER and HOME.
PASSED_ON = ("PYTHONPATH", "VIRTUAL_ENV", "COVERAGE_PROCESS_START")
STATES = ("READY", "RELOADING", "STOPPING")  # the messages that move systemd's idea of the service
WATCHDOG_USEC = 200_000  # 0.2 s: sockd pings every 0.1 s


class Notifications:
    """A bound AF_UNIX datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, variable: str) -> None:
        self.sock = sock
        self.variable = variable  # the value of $NOTIFY_SOCKET that reaches it
        self.messages: list[dict[str, str]] = []
        self.stored: list[tuple[str, int]] = []  # (FDNAME, descriptor) of each FDSTORE=1, in order

    def receive(self, timeout: float) -> dict[str, str] | None:
        """The next message as KEY -> VALUE, or None if none comes within `timeout` seconds."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, 16)
        except TimeoutError:
            return None
        message = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.messages.append(message)
        if message.get("FDSTORE") == "1":
            self.stored += [(message["FDNAME"], fd) for fd in fds]
        else:
            for fd in fds:
                os.close(fd)
        return message

    def close(self) -> None:
        self.sock.close()
        for _, fd in self.stored:
            os.close(fd)

    def expect(self, key: str, value: str = "1", timeout: float = TIMEOUT) -> dict[str, str]:
        """The next message that sets `key` to `value`, skipping the others (they stay in `messages`)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.receive(remaining)
            if message is not None and message.get(key) == value:
                return message
        raise AssertionError(f"no {key}={value} within {timeout} s; received {self.messages}")

    def collect(self, seconds: float) -> list[dict[str, str]]:
        """Every message that arrives in the next `seconds`."""
        deadline = time.monotonic() + seconds
        found = []
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.receive(remaining)
            if message is not None:
                found.append(message)
        return found

    def states(self) -> list[str]:
        """READY, RELOADING and STOPPING in the order they came; STATUS-only messages left out."""
        return [key for message in self.messages for key in STATES if message.get(key) == "1"]


@pytest.fixture
def notify_path() -> Iterator[Notifications]:
    directory = tempfile.mkdtemp(prefix="sn", dir="/tmp")  # short: a socket path fits in 107 bytes
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notifications = Notifications(sock, path)
    try:
        sock.bind(path)
        yield notifications
    finally:
        notifications.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def notify_abstract() -> Iterator[Notifications]:
    name = f"sockd-test-{uuid.uuid4().hex}"
    notifications = Notifications(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), "@" + name)
    try:
        notifications.sock.bind("\0" + name)
        yield notifications
    finally:
        notifications.close()


@pytest.fixture(params=["path", "abstract"])
def notify(request: pytest.FixtureRequest) -> Notifications:
    fixture: Notifications = request.getfixturevalue(f"notify_{request.param}")
    return fixture


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def echo(address: str) -> None:
    payload = f"through {address}".encode()
    assert request(address, payload) == payload


# -- sd_notify


def test_ready_reload_and_stop_are_notified_in_order(start_sockd: Launcher, notify: Notifications) -> None:
    daemon = start_sockd([listener("tcp-echo", "tcp", "echo", "asyncio")], env={"NOTIFY_SOCKET": notify.variable})
    ready = notify.expect("READY")
    assert ready["STATUS"] == "serving 1 listeners"

    # The reload adds a listener: it must serve once READY=1 says the reload is done.
    daemon.config_path.write_text(
        config_text([listener("tcp-echo", "tcp", "echo", "asyncio"), listener("tcp-more", "tcp", "echo", "selector")])
    )
    daemon.process.send_signal(signal.SIGHUP)
    reloading = notify.expect("RELOADING")
    received_at = monotonic_usec()
    stamp = int(reloading["MONOTONIC_USEC"])  # an integer, or this raises
    assert received_at - 60_000_000 <= stamp <= received_at
    reloaded = notify.expect("READY")
    assert reloaded["STATUS"].startswith("reloaded: "), reloaded
    assert "added 1" in reloaded["STATUS"], reloaded
    echo(daemon.address("tcp-more"))
    echo(daemon.address("tcp-echo"))

    assert daemon.stop() == 0, daemon.other_lines
    stopping = notify.expect("STOPPING")
    assert stopping["STATUS"].startswith("stopping")
    assert notify.states() == ["READY", "RELOADING", "READY", "STOPPING"], notify.messages


@pytest.mark.parametrize(
    ("added", "reason"),
    [
        pytest.param(listener("tcp-echo", "tcp", "echo", "threaded", port=70000), "port", id="port"),
        # Once accepted, then a ValueError from bind(): RELOADING=1 with no READY=1 after it.
        pytest.param(listener("uds", "unix", "echo", "selector", "/tmp/a\0b"), "NUL", id="nul-in-path"),
    ],
)
def test_an_invalid_file_on_sighup_is_notified_and_the_old_config_keeps_serving(
    start_sockd: Launcher, notify_path: Notifications, added: dict[str, object], reason: str
) -> None:
    notify = notify_path
    daemon = start_sockd([listener("tcp-echo", "tcp", "echo", "threaded")], env={"NOTIFY_SOCKET": notify.variable})
    notify.expect("READY")

    kept = [] if added["name"] == "tcp-echo" else [listener("tcp-echo", "tcp", "echo", "threaded")]
    daemon.config_path.write_text(config_text([*kept, added]))
    daemon.process.send_signal(signal.SIGHUP)
    notify.expect("RELOADING")
    ready = notify.expect("READY")
    prefix = "reload failed, still serving the previous config: "
    assert ready["STATUS"].startswith(prefix), ready
    assert reason in ready["STATUS"], ready
    assert 'sockd_config_reloads_total{result="failure"} 1.0' in scrape(daemon)
    # The same STATUS was sent on its own before READY=1 (STATUS-only messages sit in between).
    assert any(set(m) == {"STATUS"} and m["STATUS"].startswith(prefix) for m in notify.messages), notify.messages
    daemon.wait_for("config error")

    echo(daemon.address("tcp-echo"))
    assert daemon.stop() == 0, daemon.other_lines
    notify.expect("STOPPING")
    assert notify.states() == ["READY", "RELOADING", "READY", "STOPPING"], notify.messages


def test_a_drain_delay_is_notified_as_stopping_at_once_while_it_serves_on(
    start_sockd: Launcher, notify_path: Notifications
) -> None:
    notify = notify_path
    daemon = start_sockd(
        [listener("tcp-echo", "tcp", "echo", "asyncio")], env={"NOTIFY_SOCKET": notify.variable}, drain_delay=60
    )
    notify.expect("READY")
    daemon.process.send_signal(signal.SIGTERM)
    draining = notify.expect("STOPPING")
    assert draining["STATUS"].startswith("draining: serving on for 60 s"), draining
    echo(daemon.address("tcp-echo"))  # systemd has heard it stops; the listener still serves
    assert daemon.stop() == 0, daemon.other_lines  # the second signal: the stop itself
    stopping = notify.expect("STOPPING")
    assert stopping["STATUS"].startswith("stopping"), stopping


# -- the watchdog


# `exec` keeps the shell's pid, so WATCHDOG_PID=$$ names sockd's own supervisor, as systemd would.
OWN_PID = ("/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh")


@pytest.mark.parametrize(
    ("env", "prefix"),
    [
        pytest.param({"WATCHDOG_USEC": str(WATCHDOG_USEC)}, (), id="WATCHDOG_USEC"),
        pytest.param({"WATCHDOG_USEC": str(WATCHDOG_USEC)}, OWN_PID, id="WATCHDOG_PID-is-sockd"),
    ],
)
def test_the_watchdog_is_pinged_every_half_period(
    start_sockd: Launcher, notify_path: Notifications, env: dict[str, str], prefix: tuple[str, ...]
) -> None:
    start_sockd(
        [listener("tcp-echo", "tcp", "echo", "asyncio")],
        env={"NOTIFY_SOCKET": notify_path.variable, **env},
        prefix=prefix,
        wait=False,
    )
    notify_path.expect("WATCHDOG", timeout=30)  # the first, once it runs: however long a busy machine takes to start it
    deadline = time.monotonic() + 3  # then three more, thirty periods' worth of time
    pings = 0
    while pings < 3 and (remaining := deadline - time.monotonic()) > 0:
        message = notify_path.receive(remaining)
        pings += message is not None and message.get("WATCHDOG") == "1"
    assert pings >= 3, notify_path.messages


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({}, id="no-WATCHDOG_USEC"),
        # The pytest process: a pid that exists and is not sockd's.
        pytest.param({"WATCHDOG_USEC": str(WATCHDOG_USEC), "WATCHDOG_PID": str(os.getpid())}, id="WATCHDOG_PID-other"),
    ],
)
def test_no_watchdog_ping_unless_meant_for_sockd(
    start_sockd: Launcher, notify_path: Notifications, env: dict[str, str]
) -> None:
    start_sockd([listener("tcp-echo", "tcp", "echo", "asyncio")], env={"NOTIFY_SOCKET": notify_path.variable, **env})
    notify_path.expect("READY")
    notify_path.collect(1.0)
    assert not any("WATCHDOG" in message for message in notify_path.messages), notify_path.messages


# -- socket activation


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A loopback port nobody uses right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def activator(port: int, name: str, *options: str) -> tuple[str, ...]:
    """The systemd-socket-activate prefix that listens on 127.0.0.1:port for the fd `name`."""
    program = require("systemd-socket-activate")
    passed = [arg for variable in PASSED_ON if variable in os.environ for arg in ("-E", variable)]
    return (program, f"--listen=127.0.0.1:{port}", f"--fdname={name}", *options, *passed)


def wait_for_line(lines: list[str] | Path, text: str, process: subprocess.Popen[str]) -> None:
    """Wait until a line containing `text` is in `lines` (a Daemon's other lines, or a file)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        current = lines.read_text().splitlines() if isinstance(lines, Path) else list(lines)
        if any(text in line for line in current):
            return
        assert process.poll() is None, f"exited with {process.returncode} before {text!r}: {current}"
        time.sleep(0.02)
    raise AssertionError(f"no {text!r} within {TIMEOUT} s")


def test_socket_activation_serves_on_the_passed_socket(start_sockd: Launcher, notify_path: Notifications) -> None:
    port = free_port()
    listeners = [
        listener("tcp-echo", "tcp", "echo", "asyncio", port=port),
        listener("tcp-bound", "tcp", "echo", "threaded"),  # not passed: sockd binds it
    ]
    prefix = activator(port, "tcp-echo", "-E", f"NOTIFY_SOCKET={notify_path.variable}")
    daemon = start_sockd(listeners, prefix=prefix, wait=False)
    # systemd-socket-activate listens, and execs sockd at the first connection.
    wait_for_line(daemon.other_lines, "Listening on", daemon.process)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"the first connection")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b"the first connection"
    daemon.wait_for("ready")
    assert daemon.address("tcp-echo") == f"127.0.0.1:{port}"
    assert notify_path.expect("READY")["STATUS"] == "serving 2 listeners"
    echo(daemon.address("tcp-echo"))
    echo(daemon.address("tcp-bound"))


@pytest.mark.parametrize("model", ["asyncio", "selector"])
def test_a_passed_socket_gets_the_listeners_backlog(start_sockd: Launcher, model: str) -> None:
    """As a reload gives it to a socket kept: one rule whoever made the socket, and an event
    loop's server listen()ing again on it does not replace it with the loop's default."""
    port = free_port()
    daemon = start_sockd(
        [listener("tcp-echo", "tcp", "echo", model, port=port, backlog=1234)],
        prefix=activator(port, "tcp-echo"),
        wait=False,
    )
    wait_for_line(daemon.other_lines, "Listening on", daemon.process)
    address = f"127.0.0.1:{port}"
    assert request(address, b"wake up") == b"wake up"
    daemon.wait_for("ready")
    assert listen_backlog(address) == 1234


def test_socket_activation_of_a_udp_listener(start_sockd: Launcher) -> None:
    port = free_port(socket.SOCK_DGRAM)
    listeners = [listener("udp-echo", "udp", "echo", "selector", port=port)]
    daemon = start_sockd(listeners, prefix=activator(port, "udp-echo", "--datagram"), wait=False)
    wait_for_line(daemon.other_lines, "Listening on", daemon.process)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        # The datagram that starts sockd waits in the passed socket, and is answered.
        sock.sendto(b"wake up", ("127.0.0.1", port))
        reply, sender = sock.recvfrom(65536)
        assert (reply, sender) == (b"wake up", ("127.0.0.1", port))
    daemon.wait_for("ready")
    assert daemon.address("udp-echo") == f"127.0.0.1:{port}"


def _activated(
    tmp_path: Path, config: Path, activating: Sequence[str], wake: Callable[[], None]
) -> tuple[int, list[str], list[str]]:
    """sockd run by systemd-socket-activate (`activating`), woken by `wake` (which makes it exec
    sockd), to its exit: its exit code, every line of stderr, and the lines sockd printed."""
    stderr = tmp_path / "stderr"
    environment = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    with stderr.open("w") as output:
        process = subprocess.Popen(
            [*activating, *sockd_command("-c", str(config))],
            stderr=output,
            stdout=subprocess.DEVNULL,
            text=True,
            env=environment,
            start_new_session=True,
        )
    try:
        wait_for_line(stderr, "Listening on", process)
        wake()
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = stderr.read_text().splitlines()
    execing = [i for i, line in enumerate(lines) if line.startswith("Execing")]
    assert execing, lines
    return code, lines, lines[execing[0] + 1 :]  # after systemd-socket-activate's own lines


def test_a_passed_socket_of_the_wrong_kind_is_a_bind_error(tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    config = tmp_path / "sockd.yaml"
    config.write_text(
        config_text(
            [
                listener("tcp-bound", "tcp", "echo", "threaded"),
                listener("tcp-echo", "tcp", "echo", "asyncio", port=port),
            ]
        )
    )

    def wake() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"wake up", ("127.0.0.1", port))

    code, lines, ours = _activated(tmp_path, config, activator(port, "tcp-echo", "--datagram"), wake)
    assert code == 71, lines
    assert len(ours) == 1, lines
    assert ours[0].startswith("sockd: cannot bind listener 'tcp-echo'"), ours
    assert f"AF_INET SOCK_DGRAM 127.0.0.1:{port}" in ours[0], ours  # what was passed
    assert ours[0].endswith("not a tcp socket"), ours


def test_a_passed_socket_no_listener_is_named_after_is_named_and_so_is_it_in_the_bind_error(tmp_path: Path) -> None:
    # A slip in FileDescriptorName=: sockd binds the port itself, which systemd holds, and fails.
    port = free_port()
    config = tmp_path / "sockd.yaml"
    config.write_text(config_text([listener("tcp-echo", "tcp", "echo", "asyncio", port=port)]))

    def wake() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT):
            pass

    code, lines, (warning, error) = _activated(tmp_path, config, activator(port, "tcp-ech0"), wake)
    assert code == 71, lines
    assert json.loads(warning)["event"] == "systemd passed a socket that no listener is named after", warning
    assert json.loads(warning)["name"] == "tcp-ech0", warning
    assert error.startswith(
        f"sockd: cannot bind listener 'tcp-echo' to tcp 127.0.0.1:{port}: address already in use"
    ), error
    assert error.endswith("; systemd passed sockets named 'tcp-ech0', none named 'tcp-echo'"), error


def test_listen_fds_meant_for_another_process_are_left_alone(start_sockd: Launcher) -> None:
    # As sd_listen_fds does: LISTEN_PID is not sockd's pid, so sockd binds its listener itself.
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "tcp-echo"}
    daemon = start_sockd([listener("tcp-echo", "tcp", "echo", "asyncio")], env=env)
    echo(daemon.address("tcp-echo"))


def test_a_newline_in_a_path_adds_no_line_to_a_status(
    start_sockd: Launcher, notify_path: Notifications, sockdir: Path
) -> None:
    """A reload that fails to bind a path names it in STATUS=: a newline in the path must not
    give systemd a line of its own, here one that would trigger the watchdog."""
    daemon = start_sockd([listener("tcp-echo", "tcp", "echo", "selector")], env={"NOTIFY_SOCKET": notify_path.variable})
    notify_path.expect("READY")
    forged = sockdir / "e\nWATCHDOG=trigger"
    forged.touch()  # not a socket: binding it fails, and the error names it
    daemon.write_config([listener("uds", "unix", "echo", "selector", forged)])
    daemon.process.send_signal(signal.SIGHUP)
    failed = notify_path.expect("READY")
    assert set(failed) == {"READY", "STATUS"}, notify_path.messages
    assert failed["STATUS"].startswith("reload failed, still serving the previous config: cannot bind")
    assert "e\\nWATCHDOG=trigger" in failed["STATUS"]
    assert all("WATCHDOG" not in message for message in notify_path.messages)


@pytest.mark.parametrize("passed", ["a regular file", "a FIFO"])
def test_a_passed_descriptor_that_is_not_a_socket_is_one_line_and_exit_71(tmp_path: Path, passed: str) -> None:
    # What a socket unit's ListenFIFO= or ListenSpecial= would pass; systemd-socket-activate passes
    # only sockets, so a shell sets up what systemd would: fd 3, and LISTEN_PID its own pid (kept
    # by exec).
    config = tmp_path / "sockd.yaml"
    config.write_text(config_text([listener("tcp-echo", "tcp", "echo", "asyncio")]))
    descriptor = tmp_path / "passed"
    if passed == "a FIFO":
        os.mkfifo(descriptor)
    else:
        descriptor.write_text("not a socket\n")
    environment = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    shell = 'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=tcp-echo; exec "$@" 3<>"$0"'
    done = subprocess.run(
        ["sh", "-c", shell, str(descriptor), *sockd_command("-c", str(config))],
        capture_output=True,
        text=True,
        env=environment,
        timeout=30,
        check=False,
    )
    assert done.returncode == 71, done.stderr
    assert done.stderr.splitlines() == [f"sockd: systemd passed descriptor 3 ('tcp-echo'), {passed}, not a socket"], (
        done.stderr
    )


# -- the file descriptor store

# What systemd does to start a service with stored descriptors: each at 3, 4, ... in the order
# stored, LISTEN_FDNAMES their names, LISTEN_PID the pid that execs sockd.
PASS_STORED = """
import fcntl, os, sys
fds = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) for fd in sys.argv[1].split(",")]
for index, fd in enumerate(fds):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.argv[3], sys.argv[3:])
"""


def test_a_restart_keeps_the_listening_sockets_in_systemds_store(
    start_sockd: Launcher, notify_path: Notifications, sockdir: Path
) -> None:
    """`systemctl restart` with FileDescriptorStoreMax=, as systemd carries it out: it keeps the
    sockets sockd stored (FDSTORE=1 with their names) while no sockd runs, and passes them by
    name to the next. A client that connects in between waits in the backlog and is served by
    the next sockd, not refused; a listener gone meanwhile has its socket dropped from the store."""
    notify, path = notify_path, sockdir / "echo.sock"
    listeners = [
        listener("tcp-echo", "tcp", "echo", "asyncio"),
        listener("uds-echo", "unix", "echo", "threaded", path),
        listener("gone", "tcp", "echo", "selector"),
    ]
    env = {"NOTIFY_SOCKET": notify.variable, "FDSTORE": "8"}
    first = start_sockd(listeners, env=env)
    notify.expect("READY")
    assert sorted(name for name, _ in notify.stored) == ["+metrics", "gone", "tcp-echo", "uds-echo"]
    tcp = first.address("tcp-echo")
    assert first.stop() == 0, first.other_lines

    # No sockd runs: the sockets listen still, held by the store alone.
    waiting = []
    for address in (tcp, str(path)):
        client = connect(address)
        client.sendall(b"waited in the backlog")
        client.shutdown(socket.SHUT_WR)
        waiting.append(client)

    fds = ",".join(str(fd) for _, fd in notify.stored)
    names = ":".join(name for name, _ in notify.stored)
    prefix = (sys.executable, "-c", PASS_STORED, fds, names)
    fds_passed = tuple(fd for _, fd in notify.stored)
    second = start_sockd(listeners[:2], env=env, prefix=prefix, pass_fds=fds_passed)
    for client in waiting:
        with client:
            assert read_to_eof(client) == b"waited in the backlog"
    assert second.address("tcp-echo") == tcp  # the port the kernel chose for the first
    notify.expect("FDSTOREREMOVE")
    assert notify.messages[-1]["FDNAME"] == "gone", notify.messages
    second.wait_for("systemd passed a socket that no listener is named after", name="gone")

    # A reload that moves a listener: its old socket leaves the store, and its new one goes in.
    notify.expect("READY")
    mark = len(notify.messages)
    second.reload([listener("tcp-echo", "tcp", "echo", "asyncio", "127.0.0.2"), listeners[1]])
    notify.expect("READY")
    changes = [(m.get("FDSTORE") or m.get("FDSTOREREMOVE"), m.get("FDNAME")) for m in notify.messages[mark:]]
    assert [change for change in changes if change[1]] == [("1", "tcp-echo")] * 2, notify.messages[mark:]
    assert next(m for m in notify.messages[mark:] if m.get("FDNAME")).get("FDSTOREREMOVE") == "1"
    assert notify.stored[-1][0] == "tcp-echo"
    with socket.socket(fileno=os.dup(notify.stored[-1][1])) as moved:
        assert moved.getsockname()[0] == "127.0.0.2"
