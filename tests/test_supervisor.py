"""The supervisor: graceful stop, restarting dead workers, and workers that never outlive it."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from support import (
    MODELS,
    Daemon,
    Launcher,
    config_text,
    connect,
    cpu_seconds,
    inet,
    read_to_eof,
    request,
    require,
    scrape,
    squatting,
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


@pytest.mark.parametrize("model", MODELS)
def test_sigterm_lets_a_delayed_request_finish_then_exits_0(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("slow", "tcp", "timestamp", model, delay=1.0)])
    pending = InFlight(daemon.address("slow"))
    daemon.wait_for("worker started", listener="slow")
    time.sleep(0.3)  # let the worker read the request: it is now in its delay
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
    time.sleep(0.3)
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for("stopping")
    assert daemon.stop(signal.SIGTERM, timeout=10) == 0
    assert pending.result() == b""
    assert daemon.wait_for("killing worker", why="second stop signal")


def test_shutdown_timeout_bounds_the_drain(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("slow", "tcp", "timestamp", "asyncio", delay=20)], shutdown_timeout=0.5)
    pending = InFlight(daemon.address("slow"))
    time.sleep(0.3)
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


def test_sigint_from_a_terminal_stops_gracefully(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("slow", "tcp", "timestamp", "threaded", delay=0.5)])
    pending = InFlight(daemon.address("slow"))
    time.sleep(0.2)
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
            assert not (sockdir / f"m{(turn + 1) % 2}.sock").exists()
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
            deadline = time.monotonic() + 5  # back well within this, however loaded the machine
            while _requests(daemon) <= answered[-1] and time.monotonic() < deadline:
                time.sleep(0.05)
            answered.append(_requests(daemon))
    finally:
        load.stop()
    # A client whose request the killed worker held loses that connection (reset): nothing
    # can save it. What must not happen is a refused connection: the socket stayed open.
    assert not [f for f in load.failures if "ConnectionRefused" in f], load.failures
    assert answered == sorted(answered)
    assert len(set(answered)) == len(answered), "a restarted worker served nothing within 5 s"


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
    # Three iterative workers answer three delayed clients at once.
    finished: list[float] = []

    def client() -> None:
        request(daemon.address("echo"), b"x")
        finished.append(time.monotonic())

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(30)
    assert len(finished) == 3
    # One wave, not three: served one after another, they would finish 0.5 s apart.
    times = sorted(finished)
    assert all(b - a < 0.25 for a, b in itertools.pairwise(times)), times


def _requests(daemon: Daemon) -> float:
    line = next(line for line in scrape(daemon).splitlines() if line.startswith("sockd_requests_total{"))
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.parametrize("model", ["asyncio", "selector", "iterative"])
def test_a_draining_worker_waits_without_spinning(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", model)], shutdown_timeout=30)
    pid = daemon.worker_pid("echo")
    with connect(daemon.address("echo")):  # connected, silent: the drain waits for its request
        time.sleep(0.2)
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
    assert daemon.wait_for("socket file is gone; its new mode cannot be applied")


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
        time.sleep(0.2)
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
