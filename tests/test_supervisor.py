"""The supervisor: graceful stop, restarting dead workers, and workers that never outlive it."""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from support import (
    MODELS,
    PUBLISHED_WITHIN,
    TIMEOUT,
    WAITING_FOR_CONNECTIONS,
    Daemon,
    Launcher,
    Session,
    alive,
    config_text,
    connect,
    cpu_seconds,
    eventually,
    held_port,
    inet,
    live_workers,
    read_to_eof,
    request,
    require,
    rss_bytes,
    samples,
    scrape,
    squatting,
    tcp_owner,
    value,
)
from support import listener as entry


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


class InFlight:
    """A request sent to a delayed listener, whose reply (or lack of one) is collected."""

    def __init__(self, address: str) -> None:
        self.sock = connect(address, timeout=30)
        self.sock.sendall(b"hello world")
        self.reply: bytes | None = None
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        try:
            self.reply = read_to_eof(self.sock)
        except OSError:
            self.reply = b""
        finally:
            self.sock.close()

    def result(self) -> bytes | None:
        self.thread.join(30)
        return self.reply


def _accepted(daemon: Daemon, name: str) -> None:
    """Wait until the listener's worker holds one open connection. A stop answers a connection its
    worker has accepted; one still in the backlog goes with the listening socket, so a test of
    the drain must not signal before it is accepted (however long a busy machine takes)."""
    _becomes(lambda: _active(daemon, name), 1, f"a connection of {name} accepted")


@pytest.mark.parametrize("model", MODELS)
def test_sigterm_lets_a_delayed_request_finish_then_exits_0(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("slow", "tcp", "timestamp", model, delay=1.0)])
    pending = InFlight(daemon.address("slow"))
    _accepted(daemon, "slow")
    assert daemon.stop(signal.SIGTERM) == 0
    reply = pending.result()
    assert reply, "the in-flight request lost its reply"
    assert reply.startswith(b"20")


@pytest.mark.parametrize("model", MODELS)
def test_sigterm_ends_idle_echo_connections_instead_of_waiting_for_them(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", model)], shutdown_timeout=60)
    with connect(daemon.address("echo"), timeout=30) as idle:
        idle.sendall(b"ping")
        assert idle.recv(16) == b"ping"
        daemon.process.send_signal(signal.SIGTERM)
        assert read_to_eof(idle) == b""  # the drain closes the connection; it does not hang
    assert daemon.process.wait(30) == 0
    assert not [e for e in daemon.events if e.get("event") == "killing worker"]


def test_a_second_sigterm_ends_the_drain_at_once(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("slow", "tcp", "timestamp", "threaded", delay=20)], shutdown_timeout=60)
    pending = InFlight(daemon.address("slow"))
    _accepted(daemon, "slow")
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for("stopping")
    assert daemon.stop(signal.SIGTERM, timeout=10) == 0
    assert pending.result() == b""
    assert daemon.wait_for("killing worker", why="second stop signal")


def test_shutdown_timeout_bounds_the_drain(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("slow", "tcp", "timestamp", "asyncio", delay=20)], shutdown_timeout=0.5)
    pending = InFlight(daemon.address("slow"))
    _accepted(daemon, "slow")
    assert daemon.stop(signal.SIGTERM, timeout=10) == 0
    assert pending.result() == b""
    assert daemon.wait_for("killing worker", why="shutdown_timeout passed")


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


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("a", "tcp", "echo", "selector"), entry("b", "tcp", "echo", "iterative")])
    workers = [daemon.worker_pid("a"), daemon.worker_pid("b")]
    fork_server = int(daemon.wait_for("fork server started")["pid"])
    daemon.process.kill()
    daemon.process.wait(10)
    assert all(_gone(pid) for pid in workers), "a worker outlived its supervisor"
    assert _gone(fork_server), "the fork server outlived its supervisor"


@pytest.mark.parametrize("model", MODELS)
def test_an_orphaned_worker_waiting_for_a_first_request_leaves_the_port_to_a_new_sockd(
    start_sockd: Launcher, model: str
) -> None:
    first = start_sockd([entry("echo", "tcp", "echo", model)], shutdown_timeout=60)
    host, port = inet(first.address("echo"))
    orphan = first.worker_pid("echo")
    with connect(first.address("echo")) as silent:  # connected, not a byte sent: its drain waits for one
        _becomes(lambda: _active(first, "echo"), 1, "the silent client accepted")
        first.process.kill()
        first.process.wait(10)
        # The orphan stops at once (its channel closed) and lets go of the listening socket,
        # though it still holds the silent client: a restart binds the port and serves.
        second = start_sockd([entry("echo", "tcp", "echo", model, host, port=port)])
        assert request(second.address("echo"), b"again") == b"again"
        assert alive(orphan)
        assert silent.fileno() >= 0
    assert _gone(orphan, timeout=30)


def test_sigint_from_a_terminal_stops_gracefully(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("slow", "tcp", "timestamp", "threaded", delay=0.5)])
    pending = InFlight(daemon.address("slow"))
    _accepted(daemon, "slow")
    # A terminal's Ctrl-C signals the whole process group (the daemon leads its own here): the
    # workers leave it to the supervisor, which drains them.
    os.killpg(daemon.process.pid, signal.SIGINT)
    assert daemon.process.wait(30) == 0
    assert pending.result()


def test_port_zero_is_logged_with_the_real_port(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    host, port = daemon.address("echo").rsplit(":", 1)
    assert host == "127.0.0.1"
    assert int(port) > 0
    with socket.create_connection((host, int(port)), timeout=5):
        pass


# ---------------------------------------------------------------------------------------------
# A port held by a client's TIME-WAIT: what `make test` leaves on the example config's ports

WAITING = "address in use by connections, not a server: waiting for them to end"
EXAMPLE_PORTS = range(50000, 50003)  # config/sockd.yaml's: never taken here


def _held_by_a_client_time_wait() -> int:
    """A loopback port held by the TIME-WAIT of a client connection that closed first, as a test's
    client leaves one: a server's bind() cannot take it for a minute, SO_REUSEADDR or not."""
    for _ in range(5):  # bounded: the kernel may pick one of the example's ports for the client
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            client = socket.create_connection(server.getsockname(), timeout=TIMEOUT)
            port = int(client.getsockname()[1])
            accepted, _ = server.accept()
            with client, accepted:
                client.shutdown(socket.SHUT_WR)
                assert accepted.recv(1) == b""
                accepted.close()
                assert client.recv(1) == b""
        if port not in EXAMPLE_PORTS:
            break
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError, match="Address already in use"):
            probe.bind(("127.0.0.1", port))
    return port


def _end_time_wait(port: int) -> None:
    """Destroy the TIME-WAIT on `port` now (SOCK_DESTROY, as root) rather than wait a minute."""
    ss = require("ss")
    subprocess.run([ss, "-K", "-tn", "state", "time-wait", f"sport = :{port}"], check=True, capture_output=True)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            pytest.skip("this kernel cannot destroy a TIME-WAIT socket (CONFIG_INET_DIAG_DESTROY)")


def test_a_port_held_by_a_clients_time_wait_is_bound_once_it_ends(start_sockd: Launcher) -> None:
    port = _held_by_a_client_time_wait()
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio", port=port)], wait=False)
    waiting = daemon.wait_for(WAITING, listener="echo", address=f"127.0.0.1:{port}")
    assert "TIME-WAIT" in waiting["held_by"], waiting
    _end_time_wait(port)
    daemon.wait_for("ready", timeout=30)
    assert request(daemon.address("echo"), b"served") == b"served"


def test_the_metrics_port_held_by_a_clients_time_wait_is_waited_for_as_a_listeners_is(start_sockd: Launcher) -> None:
    port = _held_by_a_client_time_wait()
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")], metrics={"port": port}, wait=False)
    waiting = daemon.wait_for(WAITING, endpoint="metrics", address=f"127.0.0.1:{port}")
    assert "TIME-WAIT" in waiting["held_by"], waiting
    _end_time_wait(port)
    daemon.wait_for("ready", timeout=30)
    assert daemon.wait_for("metrics")["address"] == f"127.0.0.1:{port}"
    assert "sockd_build_info" in scrape(daemon)


def test_a_stop_ends_the_wait_for_a_port_with_the_bind_error(start_sockd: Launcher) -> None:
    port = _held_by_a_client_time_wait()
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio", port=port)], wait=False)
    daemon.wait_for(WAITING, listener="echo")
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(TIMEOUT) == 71  # within TIMEOUT, not after the minute
    bind_error = f"sockd: cannot bind listener 'echo' to tcp 127.0.0.1:{port}: address already in use"
    eventually(lambda: any(line.startswith(bind_error) for line in daemon.other_lines), "the bind error")


class Load:
    """Clients hammering listeners from threads, one connection per request, counting failures.
    Bounded: it stops when told, or after `limit` seconds."""

    def __init__(self, addresses: list[str], limit: float = 120) -> None:
        self.addresses = addresses
        self.deadline = time.monotonic() + limit
        self.done = threading.Event()
        self.answered = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(a,)) for a in addresses for _ in range(2)]
        for thread in self.threads:
            thread.start()

    def _run(self, address: str) -> None:
        number = 0
        while not self.done.is_set() and time.monotonic() < self.deadline:
            payload = f"{address} {number}".encode()
            try:
                reply = request(address, payload)
            except OSError as exc:
                self.failures.append(f"{address}: {exc!r}")
            else:
                if reply == payload:
                    self.answered += 1
                else:
                    self.failures.append(f"{address}: sent {payload!r}, got {reply!r}")
            number += 1

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(30)


def _refused(address: str) -> bool:
    try:
        with connect(address, timeout=5) as sock:
            sock.sendall(b"x")
            return sock.recv(1) == b""
    except (ConnectionRefusedError, FileNotFoundError, ConnectionResetError):
        return True


def test_twenty_reloads_under_load_lose_no_request_on_the_listeners_that_stay(
    start_sockd: Launcher, sockdir: Path
) -> None:
    stable = [
        entry("stable-tcp", "tcp", "echo", "asyncio"),
        entry("stable-unix", "unix", "echo", "selector", sockdir / "s.sock"),
    ]

    def changing(turn: int) -> list[dict[str, object]]:
        return [
            # Options change on the same socket: a new generation of workers, the old one drains.
            entry("changing", "tcp", "echo", MODELS[turn % len(MODELS)]),
            # The address changes: a new socket is bound first.
            entry("moving", "unix", "echo", "asyncio", sockdir / f"m{turn % 2}.sock"),
            # One listener added and one removed at every turn.
            entry(f"extra-{turn}", "tcp", "echo", "selector"),
        ]

    daemon = start_sockd([*stable, *changing(0)], shutdown_timeout=5)
    addresses = [daemon.address("stable-tcp"), daemon.address("stable-unix"), daemon.address("changing")]
    load = Load(addresses)
    try:
        for turn in range(1, 21):
            mark = len(daemon.events)
            plan = daemon.reload([*stable, *changing(turn)], shutdown_timeout=5)
            assert plan["kept"] == ["stable-tcp", "stable-unix"], plan
            assert plan["restarted"] == ["changing"], plan
            assert plan["rebound"] == ["moving"], plan
            assert plan["added"] == [f"extra-{turn}"], plan
            assert plan["removed"] == [f"extra-{turn - 1}"], plan
            added = daemon.wait_for("listening", listener=f"extra-{turn}", after=mark)["address"]
            assert request(str(added), b"new") == b"new"
            assert request(str(sockdir / f"m{turn % 2}.sock"), b"moved") == b"moved"
            gone = daemon.wait_for("listening", listener=f"extra-{turn - 1}")["address"]
            assert _refused(str(gone))
            old_file = sockdir / f"m{(turn + 1) % 2}.sock"
            _becomes(old_file.exists, False, "the moved listener's old file removed once its new worker serves")
    finally:
        load.stop()
    names = dict(zip(addresses, ["stable-tcp", "stable-unix", "changing"], strict=True))
    assert load.failures == [], (names, load.failures)
    assert load.answered > 100
    assert daemon.address("changing") == addresses[2]  # the same socket all along


def test_an_invalid_file_on_sighup_keeps_the_running_config(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    daemon.config_path.write_text("listeners:\n  - name: [broken\n")
    mark = len(daemon.events)
    daemon.process.send_signal(signal.SIGHUP)
    problem = daemon.wait_for("config error", after=mark)["problem"]
    assert str(problem).startswith(f"{daemon.config_path}:")
    assert request(daemon.address("echo"), b"still") == b"still"
    exposition = scrape(daemon)
    assert 'sockd_config_reloads_total{result="failure"} 1.0' in exposition
    assert "sockd_config_last_reload_successful 0.0" in exposition


def test_a_bind_failure_during_reload_changes_nothing(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio"), entry("old", "tcp", "echo", "selector")])
    workers = {name: daemon.worker_pid(name) for name in ("echo", "old")}
    with squatting("tcp") as taken:
        host, port = taken.rsplit(":", 1)
        daemon.write_config(
            [
                entry("echo", "tcp", "echo", "threaded"),  # would restart
                entry("new", "tcp", "echo", "asyncio", host, port=int(port)),  # cannot bind
            ],
        )
        mark = len(daemon.events)
        daemon.process.send_signal(signal.SIGHUP)
        error = daemon.wait_for("reload rolled back", after=mark)["error"]
    assert "'new'" in str(error)
    assert "address already in use" in str(error)
    for name in ("echo", "old"):
        assert request(daemon.address(name), b"same") == b"same"
        assert daemon.worker_pid(name) == workers[name]
    assert not [e for e in daemon.events[mark:] if e.get("event") in ("worker started", "listening")]
    assert 'sockd_config_reloads_total{result="failure"} 1.0' in scrape(daemon)


def test_a_good_reload_is_counted(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    assert daemon.reload([entry("echo", "tcp", "echo", "asyncio", delay=0.01)])["restarted"] == ["echo"]
    exposition = scrape(daemon)
    assert 'sockd_config_reloads_total{result="success"} 1.0' in exposition
    assert "sockd_config_last_reload_successful 1.0" in exposition


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
        _becomes(lambda: sorted(tcp_owner(sock, pids) or 0 for sock in clients), sorted(pids), "who holds each")
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


@pytest.mark.parametrize("model", ["asyncio", "selector", "iterative"])
def test_a_draining_worker_waits_without_spinning(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", model)], shutdown_timeout=30)
    pid = daemon.worker_pid("echo")
    with connect(daemon.address("echo")):  # connected, silent: the drain waits for its request
        _accepted(daemon, "echo")
        daemon.process.send_signal(signal.SIGTERM)
        daemon.wait_for("stopping")
        before = cpu_seconds(pid)
        time.sleep(1)
        assert cpu_seconds(pid) - before < 0.5  # a spinning worker burns the whole second
    assert daemon.process.wait(30) == 0


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
    # (the launcher fails the test on any traceback the daemon printed)


def test_a_reload_survives_a_socket_file_removed_behind_its_back(start_sockd: Launcher, sockdir: Path) -> None:
    path = sockdir / "u.sock"
    daemon = start_sockd([entry("u", "unix", "echo", "selector", path)])
    path.unlink()
    assert daemon.reload([entry("u", "unix", "echo", "selector", path, mode="0600")])["restarted"] == ["u"]
    warning = daemon.wait_for("cannot apply the socket file's new mode")
    assert warning["error"] == "no such file or directory"


@pytest.mark.parametrize("model", ["selector", "threaded", "asyncio"])
def test_running_out_of_descriptors_pauses_accepting_and_recovers(start_sockd: Launcher, model: str) -> None:
    prlimit = require("prlimit")
    # The limit is inherited by the workers: with 64 descriptors, 80 clients cannot all be had.
    daemon = start_sockd([entry("echo", "tcp", "echo", model)], prefix=(prlimit, "--nofile=64:64", "--"))
    address, held = daemon.address("echo"), []
    try:
        for _ in range(80):
            sock = socket.create_connection(inet(address), timeout=10)
            held.append(sock)
        if model != "asyncio":  # asyncio pauses accepting by itself, without a word
            daemon.wait_for("cannot accept: out of resources; pausing", listener="echo")
    finally:
        for sock in held:
            sock.close()
    # Recovered by itself once descriptors are free again. (uvloop sheds the connections it
    # cannot accept while out of descriptors: one arriving as it frees them may still be reset.)
    answers: list[bytes] = []
    deadline = time.monotonic() + 10
    while answers[-1:] != [b"recovered"] and time.monotonic() < deadline:
        try:
            answers.append(request(address, b"recovered"))
        except ConnectionResetError:
            time.sleep(0.1)
    assert answers[-1:] == [b"recovered"]
    assert not [e for e in daemon.events if e.get("event") == "worker died; restarting"]


def test_an_orphaned_worker_still_ends_its_drain_in_time(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "iterative")], shutdown_timeout=1)
    worker = daemon.worker_pid("echo")
    with connect(daemon.address("echo")):  # a silent client keeps the drain waiting
        _accepted(daemon, "echo")
        daemon.process.kill()  # no supervisor left to end the drain
        daemon.process.wait(10)
        assert _gone(worker, timeout=15)


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


def test_nothing_is_imported_from_the_working_directory(tmp_path: Path, sockdir: Path) -> None:
    # As `cd /tmp; sockd -c /etc/sockd.yaml` with a `sockd/` package planted in /tmp: the console
    # script puts its own directory first on sys.path, and the workers must not put the cwd there.
    planted = tmp_path / "cwd"
    marker = tmp_path / "imported"
    (planted / "sockd").mkdir(parents=True)
    (planted / "sockd" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n")
    config = tmp_path / "sockd.yaml"
    listeners = [entry("t", "tcp", "echo", "asyncio"), entry("u", "unix", "echo", "selector", sockdir / "u.sock")]
    config.write_text(config_text(listeners))
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "sockd"), "-c", str(config)],
        cwd=planted,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    daemon = Daemon(process, config)
    daemon.start_reading()
    try:
        daemon.wait_for("ready", timeout=30)
        for name in ("t", "u"):
            assert request(daemon.address(name), b"ping") == b"ping"
    finally:
        assert daemon.stop() == 0
    assert not marker.exists()


# =============================================================================================
# Sessions across a reload (HAProxy's and nginx's semantics). A listener that is restarted,
# rebound or removed stops accepting at once, but its old generation goes on serving the
# connections it has (reading, answering, relaying) until their clients close them or
# shutdown_timeout passes; a stop ends them (what is pending is answered, then EOF). At most
# KEPT_GENERATIONS old generations of a listener keep serving: a reload past that ends the oldest
# as a stop does; and past ALIVE_GENERATIONS old ones alive, the oldest is killed.

KEPT_GENERATIONS = 4
ALIVE_GENERATIONS = 8
SESSIONS_TIMEOUT = 120  # shutdown_timeout here: longer than any test, so it never ends a session
SIZES = (1, 16, 200, 1500, 9000, 32768)  # payload sizes (at least the payload's unique head)


class SessionLoop:
    """A Session in a closed loop in its own thread (request, whole reply, next request), noting
    in which reload turn each exchange completed. Bounded: until stopped, `limit` exchanges or
    `seconds`, or its first failure (an EOF, a reset, a reply that differs)."""

    def __init__(
        self, address: str, name: str, turn: Callable[[], int], limit: int = 1_000_000, seconds: float = 120
    ) -> None:
        self.session = Session(address, name)
        self.name = name
        self.turn = turn
        self.opened_in = turn()
        self.turns: collections.Counter[int] = collections.Counter()  # exchanges completed per turn
        self.failure: str | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(limit, time.monotonic() + seconds))
        self.thread.start()

    def _run(self, limit: int, deadline: float) -> None:
        sizes = random.Random(self.name)
        for _ in range(limit):
            if self.done.is_set() or time.monotonic() > deadline:
                return
            try:
                self.session.exchange(sizes.choice(SIZES))
            except (AssertionError, OSError) as exc:
                self.failure = f"{self.name} in turn {self.turn()}: {exc!r}"
                return
            self.turns[self.turn()] += 1

    def stop(self) -> None:
        self.done.set()
        self.thread.join(30)
        self.session.close()


def _served_in(loops: list[SessionLoop], turn: int, load: Load, answered_before: int) -> None:
    """Wait until, since this turn's reload, every session did at least two exchanges (one whole
    exchange after the reload) and the connection-per-request clients got two more answers, or
    until anything failed (reported by the caller)."""

    def progressed() -> bool:
        if load.failures or any(loop.failure for loop in loops):
            return True
        return all(loop.turns[turn] >= 2 for loop in loops) and load.answered >= answered_before + 2

    eventually(progressed, f"every session and the per-request clients served in turn {turn}", timeout=TIMEOUT)


def _reload_under_sessions(
    daemon: Daemon,
    config: Callable[[int], list[dict[str, object]]],
    turns: int,
    *,
    loops: list[SessionLoop],
    load: Load,
    turn: list[int],
    each_turn: Callable[[int], None] = lambda _: None,
) -> None:
    """`turns` reloads, each restarting the config's one listener, with every session and the
    per-request clients served after each (stopping early at a failure); then they stop."""
    try:
        _served_in(loops, 0, load, 0)
        for number in range(1, turns + 1):
            answered = load.answered
            plan = daemon.reload(config(number), shutdown_timeout=SESSIONS_TIMEOUT)
            assert plan["restarted"] == [config(number)[0]["name"]], plan
            turn[0] = number
            each_turn(number)
            _served_in(loops, number, load, answered)
            if load.failures or any(loop.failure for loop in loops):
                break
    finally:
        load.stop()
        for loop in loops:
            loop.stop()


def _assert_served_throughout(loops: list[SessionLoop], load: Load, last_turn: int) -> None:
    assert [loop.failure for loop in loops if loop.failure] == []  # no EOF, reset or wrong byte
    assert load.failures == []
    for loop in loops:
        # Exchanges before the first reload it saw, and in every turn since: its old generation
        # (each reload after it opened made one) kept answering it.
        missed = [turn for turn in range(loop.opened_in, last_turn + 1) if loop.turns[turn] < 2]
        assert missed == [], (loop.name, loop.opened_in, dict(loop.turns))


@pytest.mark.parametrize("protocol", ["tcp", "unix"])
def test_sessions_are_served_by_their_old_generation_across_twenty_reloads(
    start_sockd: Launcher, sockdir: Path, protocol: str
) -> None:
    where = sockdir / "e.sock" if protocol == "unix" else "127.0.0.1"

    def config(turn: int) -> list[dict[str, object]]:
        # Threaded first: it serves the first sessions at once (iterative would serve one).
        return [entry("echo", protocol, "echo", MODELS[(turn + 1) % len(MODELS)], where)]

    # Under the descriptor limit a service gets by default (systemd's soft 1,024).
    daemon = start_sockd(config(0), prefix=("prlimit", "--nofile=1024"), shutdown_timeout=SESSIONS_TIMEOUT)
    address = daemon.address("echo")
    turn = [0]
    loops = [SessionLoop(address, f"{protocol}-{n}", lambda: turn[0]) for n in range(5)]

    def five_more_on_the_tenth(number: int) -> None:  # generation 10 (asyncio): two old ones hold sessions
        if number == 10:
            loops.extend(SessionLoop(address, f"{protocol}-{n}", lambda: turn[0]) for n in range(5, 10))

    load = Load([address])  # two threads, a connection per request
    _reload_under_sessions(daemon, config, 20, loops=loops, load=load, turn=turn, each_turn=five_more_on_the_tenth)
    _assert_served_throughout(loops, load, 20)
    assert load.answered > 40


class EchoUpstream:
    """A TCP echo server run by the test, as a relay's upstream: a thread per connection, echoing
    until the relay ends its side. Bounded: a connection quiet for `timeout` is closed."""

    def __init__(self, timeout: float = 60) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.timeout = timeout
        self.errors: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(self.timeout)
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError as exc:
                self.errors.append(repr(exc))

    def close(self) -> None:
        self.sock.close()


def test_relay_sessions_are_relayed_by_their_old_generation_across_ten_reloads(start_sockd: Launcher) -> None:
    upstream = EchoUpstream()

    def config(turn: int) -> list[dict[str, object]]:
        # Every turn changes one thing, the model and the connect_timeout in turn.
        model = ("selector", "asyncio")[(turn + 1) // 2 % 2]
        return [entry("r", "tcp", "relay", model, upstream=upstream.url, connect_timeout=5 + turn // 2 % 2)]

    try:
        daemon = start_sockd(config(0), shutdown_timeout=SESSIONS_TIMEOUT)
        address = daemon.address("r")
        turn = [0]
        loops = [SessionLoop(address, f"relayed-{n}", lambda: turn[0]) for n in range(3)]
        load = Load([address])
        _reload_under_sessions(daemon, config, 10, loops=loops, load=load, turn=turn)
        _assert_served_throughout(loops, load, 10)
    finally:
        upstream.close()
    assert upstream.errors == []


def _probe(address: str) -> str:
    """What a new client of this address meets: "refused", or what else (it must not hang)."""
    try:
        with connect(address, timeout=2) as sock:
            sock.sendall(b"?")
            try:
                reply = sock.recv(1)
            except TimeoutError:
                return "accepted by nobody: hangs"
            except ConnectionResetError:
                return "reset"
            return "answered" if reply else "accepted, then EOF"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "connect timed out"


def _becomes(get: Callable[[], object], expected: object, what: str, timeout: float = PUBLISHED_WITHIN) -> None:
    """Wait until get() == expected; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    while (seen := get()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {seen!r}, not {expected!r}, after {timeout} s")
        time.sleep(0.05)


@pytest.mark.parametrize("model", MODELS)
def test_a_removed_listener_refuses_new_clients_and_serves_its_sessions_until_they_close(
    start_sockd: Launcher, model: str
) -> None:
    kept = entry("kept", "tcp", "echo", "asyncio")
    daemon = start_sockd([kept, entry("gone", "tcp", "echo", model)], shutdown_timeout=SESSIONS_TIMEOUT)
    address, worker = daemon.address("gone"), daemon.worker_pid("gone")
    session = Session(address, "on-gone")
    try:
        session.exchange()
        plan = daemon.reload([kept], shutdown_timeout=SESSIONS_TIMEOUT)
        assert plan["removed"] == ["gone"], plan
        session.exchange()  # served on, after the reload
        _becomes(lambda: _probe(address), "refused", "a new client of the removed listener")
        for number in range(20):  # a while of request/response on the removed listener
            session.exchange(SIZES[number % len(SIZES)])
            time.sleep(0.02)
        assert _probe(address) == "refused"
        assert alive(worker)
        assert request(daemon.address("kept"), b"unaffected") == b"unaffected"
    finally:
        session.close()
    # Its client gone, the old worker has nothing left to serve.
    assert daemon.wait_for("worker exited", listener="gone", pid=worker)["code"] == 0
    assert not [e for e in daemon.events if e.get("event") == "killing worker"]


def _generations(daemon: Daemon, name: str) -> float | None:
    return samples(daemon).get(("sockd_worker_generations", frozenset({("listener", name)})))


def _active(daemon: Daemon, name: str) -> float:
    return value(samples(daemon), "sockd_connections_active", listener=name)


def _new_generation(daemon: Daemon, listeners: list[dict[str, object]], name: str, **settings: object) -> int:
    """Reload, and wait until the listener's new worker serves and its old one accepts no more:
    the new one's pid."""
    old = daemon.worker_pids(name)[-1]
    mark = len(daemon.events)
    assert daemon.reload(listeners, **settings)["restarted"] == [name]
    pid = daemon.worker_pid(name, after=mark)
    daemon.wait_for("serving", pid=pid, after=mark)
    daemon.wait_for("retired: serving the open connections on", pid=old, after=mark)
    return pid


def test_the_generations_gauge_counts_old_generations_that_hold_sessions(start_sockd: Launcher) -> None:
    other = entry("other", "tcp", "echo", "asyncio")
    daemon = start_sockd([other, entry("g", "tcp", "echo", "threaded")], shutdown_timeout=SESSIONS_TIMEOUT)
    address, first = daemon.address("g"), daemon.worker_pid("g")
    a1, a2 = Session(address, "a1"), Session(address, "a2")
    sessions = [a1, a2]
    try:
        for session in sessions:
            session.exchange()
        assert {tcp_owner(a1.sock, [first]), tcp_owner(a2.sock, [first])} == {first}
        second = _new_generation(daemon, [other, entry("g", "tcp", "echo", "selector")], "g")
        for session in sessions:
            session.exchange()  # the first generation serves on
        b = Session(address, "b")
        sessions.append(b)
        b.exchange()
        assert tcp_owner(b.sock, [first, second]) == second  # the first one stopped accepting
        third = _new_generation(daemon, [other, entry("g", "tcp", "echo", "asyncio")], "g")
        for session in sessions:
            session.exchange()
        assert alive(first)
        assert alive(second)
        # Two old generations hold sessions, beside the current one.
        _becomes(lambda: _generations(daemon, "g"), 3, 'sockd_worker_generations{listener="g"}')
        _becomes(lambda: _active(daemon, "g"), 3, 'sockd_connections_active{listener="g"}')
        assert _generations(daemon, "other") == 1
        a1.close()
        _becomes(lambda: _active(daemon, "g"), 2, "after a1 closed")
        assert alive(first)  # a2 still holds it
        assert _generations(daemon, "g") == 3
        a2.close()
        _becomes(lambda: _generations(daemon, "g"), 2, "after the first generation's last session closed")
        daemon.wait_for("worker exited", listener="g", pid=first)
        assert _active(daemon, "g") == 1
        b.exchange()
        b.close()
        _becomes(lambda: _generations(daemon, "g"), 1, "after every old session closed")
        daemon.wait_for("worker exited", listener="g", pid=second)
        _becomes(lambda: _active(daemon, "g"), 0, "no session left")
        assert alive(third)
        assert request(address, b"current") == b"current"
    finally:
        for session in sessions:
            session.close()


def test_a_stop_answers_sessions_on_old_and_current_generations_then_ends_them(start_sockd: Launcher) -> None:
    # delay: the last request of each session is still in flight when the stop comes.
    daemon = start_sockd([entry("s", "tcp", "echo", "threaded", delay=0.3)], shutdown_timeout=30)
    address = daemon.address("s")
    sessions = [Session(address, f"old-{n}") for n in range(3)]
    try:
        for session in sessions:
            session.exchange()
        _new_generation(daemon, [entry("s", "tcp", "echo", "selector", delay=0.3)], "s", shutdown_timeout=30)
        sessions += [Session(address, f"new-{n}") for n in range(2)]
        for session in sessions:
            session.exchange()  # the old generation's three too
        last = [session.payload(100) for session in sessions]
        for session, payload in zip(sessions, last, strict=True):
            session.sock.sendall(payload)
        time.sleep(0.1)  # the requests are in the workers' delay
        stopped_at = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        for session, payload in zip(sessions, last, strict=True):
            try:
                got = read_to_eof(session.sock)
            except OSError as exc:
                raise AssertionError(f"{session.name}: {exc!r} instead of its reply and EOF") from exc
            assert got == payload, (session.name, got[:40])  # the last reply, then EOF
        assert daemon.process.wait(15) == 0
        assert time.monotonic() - stopped_at < 15  # sessions that had answers did not hold the stop
    finally:
        for session in sessions:
            session.close()
    assert not [e for e in daemon.events if e.get("event") == "killing worker"]


class Watch:
    """Samples, every 20 ms in a thread, a listener's live workers and the RSS of the daemon and
    them: the highest of each. `runaway` is set past `runaway_at` workers (the test then stops
    making more). Bounded: stopped by the test, or after `seconds`."""

    def __init__(self, daemon: Daemon, name: str, runaway_at: int, seconds: float = 120) -> None:
        self.daemon, self.name, self.runaway_at = daemon, name, runaway_at
        self.most_workers = 0
        self.most_rss = 0
        self.runaway = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(time.monotonic() + seconds,))
        self.thread.start()

    def _run(self, deadline: float) -> None:
        while not self.done.is_set() and time.monotonic() < deadline:
            pids = live_workers(self.daemon, self.name)
            self.most_workers = max(self.most_workers, len(pids))
            if len(pids) > self.runaway_at:
                self.runaway.set()
            total = 0
            for pid in [self.daemon.process.pid, *pids]:
                with contextlib.suppress(OSError, AssertionError):  # exited meanwhile
                    total += rss_bytes(pid)
            self.most_rss = max(self.most_rss, total)
            time.sleep(0.02)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(30)


STORM_MODELS = ["threaded", "selector", "asyncio", "thread_pool"]  # each serves several clients; none spins


def test_a_reload_storm_keeps_four_old_generations_serving_and_bounds_the_rest(start_sockd: Launcher) -> None:
    def config(turn: int) -> list[dict[str, object]]:
        return [entry("storm", "tcp", "echo", STORM_MODELS[turn % len(STORM_MODELS)])]

    daemon = start_sockd(config(0), shutdown_timeout=SESSIONS_TIMEOUT)
    address = daemon.address("storm")
    sessions: list[Session] = []
    # Beside each session, a client that connects and never sends: a drain waits for its first
    # request (shutdown_timeout), so every ended generation lingers and the cap on live
    # generations (the oldest killed) is what bounds them.
    silent: list[socket.socket] = []
    most = 1 + ALIVE_GENERATIONS  # the cap holds before each new generation starts
    watch = Watch(daemon, "storm", runaway_at=3 * most)
    try:

        def another() -> None:
            session = Session(address, f"storm-{len(sessions)}")
            sessions.append(session)
            silent.append(connect(address))
            session.exchange()

        another()
        for number in range(1, 51):
            if watch.runaway.is_set():
                break
            _new_generation(daemon, config(number), "storm", shutdown_timeout=SESSIONS_TIMEOUT)
            another()
        for sock in silent:  # the ended generations have nothing left to wait for
            sock.close()
        _becomes(
            lambda: len(live_workers(daemon, "storm")) <= 1 + KEPT_GENERATIONS,
            True,
            "the storm's generations settle to the current one and the kept ones",
            timeout=30,
        )
        states = [session.state() for session in sessions]
        workers = live_workers(daemon, "storm")
        current = workers[-1]
        kept = [n for n, state in enumerate(states) if state == "open"]
        # The kept sessions are the newest ones, after every ended one (EOF after its reply).
        first = kept[0] if kept else len(states)
        assert states == ["eof"] * first + ["open"] * (len(states) - first), states
        assert len(kept) > KEPT_GENERATIONS, ("sessions still served", states)
        owners = {tcp_owner(sessions[n].sock, workers) for n in kept}
        assert None not in owners, (owners, workers)
        assert len(owners - {current}) == KEPT_GENERATIONS, (owners, workers, states)
        for n in kept:
            sessions[n].exchange(9000)
        for _ in range(5):  # settled: it stays there
            generations = _generations(daemon, "storm")
            assert generations is not None
            assert generations <= 1 + KEPT_GENERATIONS
        assert _generations(daemon, "storm") == 1 + len(owners - {current})
        assert not watch.runaway.is_set(), watch.most_workers
        assert request(address, b"after the storm") == b"after the storm"
        after = Session(address, "after")
        sessions.append(after)
        after.exchange()
    finally:
        watch.stop()
        for sock in silent:
            sock.close()
        for session in sessions:
            session.close()
    assert watch.most_workers <= most, watch.most_workers
    assert watch.most_rss < 600 * 2**20, watch.most_rss


def _unix_listening(path: Path) -> bool:
    """Whether any process still holds a listening Unix socket bound to `path` (/proc/net/unix)."""
    listening = "00010000"  # __SO_ACCEPTCON: the flags of a listening socket
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(path) and fields[3] == listening:
            return True
    return False


@pytest.mark.parametrize("model", MODELS)
def test_a_removed_unix_listener_is_let_go_by_its_old_worker_while_its_session_goes_on(
    start_sockd: Launcher, sockdir: Path, model: str
) -> None:
    # Once no process holds the socket, a client still queued on it is reset rather than left
    # waiting for shutdown_timeout: the old worker, which accepts no more, must not hold it.
    kept = entry("kept", "tcp", "echo", "asyncio")
    path = sockdir / "gone.sock"
    daemon = start_sockd([kept, entry("gone", "unix", "echo", model, path)], shutdown_timeout=SESSIONS_TIMEOUT)
    session = Session(str(path), "on-gone")
    try:
        session.exchange()
        assert _unix_listening(path)
        assert daemon.reload([kept], shutdown_timeout=SESSIONS_TIMEOUT)["removed"] == ["gone"]
        _becomes(lambda: _unix_listening(path), False, "the removed listener's socket closed everywhere")
        session.exchange()  # while its old worker serves the session on
    finally:
        session.close()


def test_hups_that_queue_up_during_a_reload_become_one_reload_of_the_latest_file(start_sockd: Launcher) -> None:
    # Thirty listeners restarted by every reload keep the supervisor busy long enough for the
    # HUPs sent meanwhile to queue up.
    def config(turn: int) -> list[dict[str, object]]:
        model = MODELS[turn % len(MODELS)]
        return [entry(f"l{n}", "tcp", "echo", model) for n in range(30)]

    daemon = start_sockd(config(0))
    sent = 20
    for turn in range(1, sent + 1):
        daemon.write_config(config(turn))
        os.kill(daemon.process.pid, signal.SIGHUP)
        time.sleep(0.01)

    def generations() -> list[dict[str, object]]:
        return [e for e in daemon.events if e.get("event") == "listening" and e["listener"] == "l0"]

    latest = MODELS[sent % len(MODELS)]
    _becomes(lambda: generations()[-1]["concurrency"], latest, "the latest file applied", timeout=60)
    # A reload whose new workers could not all start (a loaded machine) still started them.
    outcomes = ("reloaded", "reload failed in part: new workers could not be started")

    def unfinished() -> int:  # reloads begun and not yet done (30 listeners each take a while)
        begun = [e for e in daemon.events if e.get("event") == "reloading"]
        return len(begun) - len([e for e in daemon.events if e.get("event") in outcomes])

    _becomes(unfinished, 0, "every reload begun is done", timeout=60)
    reloads = [e for e in daemon.events if e.get("event") in outcomes]
    assert generations()[-1]["concurrency"] == latest
    assert len(reloads) < sent / 2, len(reloads)  # queued HUPs coalesced
    restarts = [reload for reload in reloads if "l0" in reload.get("restarted", [])]
    assert len(generations()) == 1 + len(restarts), [e for e in daemon.events if "reload" in str(e.get("event"))]
    assert request(daemon.address("l0"), b"x") == b"x"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_listener_moved_to_another_port_and_back_rebinds_its_first_one(start_sockd: Launcher) -> None:
    first, second = _free_port(), _free_port()

    def on(port: int) -> list[dict[str, object]]:
        return [entry("moving", "tcp", "echo", "asyncio", port=port)]

    daemon = start_sockd(on(first), shutdown_timeout=SESSIONS_TIMEOUT)
    session = Session(f"127.0.0.1:{first}", "on-first")
    try:
        session.exchange()
        assert daemon.reload(on(second), shutdown_timeout=SESSIONS_TIMEOUT)["rebound"] == ["moving"]
        # Once the new worker serves, not a backlog nobody accepts from.
        _becomes(lambda: _probe(f"127.0.0.1:{first}"), "refused", "the first port let go")
        assert request(f"127.0.0.1:{second}", b"moved") == b"moved"
        session.exchange()  # its old worker serves it on
        assert daemon.reload(on(first), shutdown_timeout=SESSIONS_TIMEOUT)["rebound"] == ["moving"]
        assert request(f"127.0.0.1:{first}", b"back") == b"back"
        session.exchange()
    finally:
        session.close()


def test_a_reload_whose_new_workers_cannot_start_keeps_the_old_ones_serving(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    supervisor, old = daemon.process.pid, daemon.worker_pid("echo")
    # The supervisor keeps the descriptors it needs (see test_a_reload_beyond_the_descriptor_limit_
    # changes_nothing); the fork server, left none to spare, cannot take a new worker's.
    server = int(daemon.wait_for("fork server started")["pid"])
    spare = len(os.listdir(f"/proc/{server}/fd"))
    subprocess.run(["prlimit", f"--pid={server}", f"--nofile={spare}:"], check=True)  # the soft limit
    mark = len(daemon.events)
    daemon.write_config([entry("echo", "tcp", "echo", "selector")])
    os.kill(supervisor, signal.SIGHUP)
    failed = daemon.wait_for("reload failed in part: new workers could not be started", after=mark)
    assert failed["listeners"] == ["echo"]
    assert request(daemon.address("echo"), b"still served") == b"still served"  # by the old worker
    assert alive(old)
    assert value(samples(daemon), "sockd_config_last_reload_successful") == 0
    subprocess.run(["prlimit", f"--pid={server}", "--nofile=1024:"], check=True)
    new = daemon.worker_pid("echo", after=mark)  # tried again after its backoff
    daemon.wait_for("worker exited", pid=old, after=mark, timeout=30)  # retired once the new one served
    assert request(daemon.address("echo"), b"new") == b"new"
    assert alive(new)


def test_a_reload_beyond_the_descriptor_limit_changes_nothing(start_sockd: Launcher) -> None:
    one = [entry("l0", "tcp", "echo", "asyncio")]
    daemon = start_sockd(one, prefix=("prlimit", "--nofile=100:100", "--"))
    worker = daemon.worker_pid("l0")
    mark = len(daemon.events)
    daemon.write_config([entry(f"l{i}", "tcp", "echo", "asyncio") for i in range(40)])
    daemon.process.send_signal(signal.SIGHUP)
    error = str(daemon.wait_for("reload rolled back", after=mark)["error"])
    assert error.startswith("the descriptor limit (100) is too low for 40 listeners: "), error
    assert not [e for e in daemon.events[mark:] if e.get("event") in ("listening", "worker started")]
    assert value(samples(daemon), "sockd_config_last_reload_successful") == 0
    assert request(daemon.address("l0"), b"as before") == b"as before"
    assert daemon.reload(one)["kept"] == ["l0"]
    assert daemon.worker_pid("l0") == worker


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_reloaded_udp_listener_takes_no_datagram_more_in_its_old_generation(start_sockd: Launcher, loop: str) -> None:
    def config(deny: list[str]) -> list[dict[str, object]]:
        return [entry("udp", "udp", "echo", "asyncio", delay=0.3, event_loop=loop, deny=deny)]

    daemon = start_sockd(config([]), shutdown_timeout=SESSIONS_TIMEOUT)
    address = inet(daemon.address("udp"))
    answers: list[float] = []
    done = threading.Event()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(0.05)

        def send_and_read() -> None:  # a datagram every 20 ms, so that a reply is always due
            deadline = time.monotonic() + 30
            while not done.is_set() and time.monotonic() < deadline:
                client.sendto(b"ping", address)
                with contextlib.suppress(TimeoutError):
                    if client.recv(64):
                        answers.append(time.monotonic())

        thread = threading.Thread(target=send_and_read)
        thread.start()
        try:
            eventually(lambda: len(answers) > 5, "answered before the reload")
            assert daemon.reload(config(["127.0.0.1/32"]), shutdown_timeout=SESSIONS_TIMEOUT)["restarted"] == ["udp"]
            # reload() returned once the old generation was told to retire: it takes no datagram
            # more as soon as it has read that, and its replies due go out within `delay`.
            settled = time.monotonic() + 1.5
            time.sleep(3)
        finally:
            done.set()
            thread.join(30)
    late = [when for when in answers if when > settled]
    assert late == [], f"{len(late)} answers to a denied source after the reload"


def test_a_sighup_the_moment_sockd_starts_is_a_reload_once_it_serves(start_sockd: Launcher) -> None:
    """A port held by a connection holds sockd in its start: its modules imported, nothing
    serving yet. A SIGHUP there used to end it (the signal's default action)."""
    with held_port() as port:
        daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio", port=port)], wait=False)
        daemon.wait_for(WAITING_FOR_CONNECTIONS)
        daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("listening")
    assert daemon.wait_for("reloaded", timeout=30)["kept"] == ["echo"]
    daemon.wait_for("ready")
    assert request(daemon.address("echo"), b"still here\n") == b"still here\n"
    assert daemon.stop() == 0, daemon.other_lines
