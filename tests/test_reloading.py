"""A reload (SIGHUP, sockd.reloading) end to end: applied under load without a lost request,
counted, or refused with nothing changed (a bad file, a bind failure, new workers that cannot
start); HUPs that queue up become one reload, and one sent as sockd starts is a reload once it
serves. The real daemon, real signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from sockd.config import Listener
from sockd.forkserver import Spawner
from sockd.reloading import Prepared, Refused, prepare
from sockd.sockets import Bound, bind
from sockd.tls.material import Loaded, load_config

from support import (
    MODELS,
    WAITING_FOR_CONNECTIONS,
    Launcher,
    Load,
    alive,
    becomes,
    check,
    config_text,
    connect,
    held_port,
    request,
    samples,
    scrape,
    squatting,
    value,
)
from support import listener as entry


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
            becomes(old_file.exists, False, "the moved listener's old file removed once its new worker serves")
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

    # (the launcher fails the test on any traceback the daemon printed)


def test_a_reload_survives_a_socket_file_removed_behind_its_back(start_sockd: Launcher, sockdir: Path) -> None:
    path = sockdir / "u.sock"
    daemon = start_sockd([entry("u", "unix", "echo", "selector", path)])
    path.unlink()
    assert daemon.reload([entry("u", "unix", "echo", "selector", path, mode="0600")])["restarted"] == ["u"]
    warning = daemon.wait_for("cannot apply the socket file's new mode")
    assert warning["error"] == "no such file or directory"


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
    becomes(lambda: generations()[-1]["concurrency"], latest, "the latest file applied", timeout=60)
    # A reload whose new workers could not all start (a loaded machine) still started them.
    outcomes = ("reloaded", "reload failed in part: new workers could not be started")

    def unfinished() -> int:  # reloads begun and not yet done (30 listeners each take a while)
        begun = [e for e in daemon.events if e.get("event") == "reloading"]
        return len(begun) - len([e for e in daemon.events if e.get("event") in outcomes])

    becomes(unfinished, 0, "every reload begun is done", timeout=60)
    reloads = [e for e in daemon.events if e.get("event") in outcomes]
    assert generations()[-1]["concurrency"] == latest
    assert len(reloads) < sent / 2, len(reloads)  # queued HUPs coalesced
    restarts = [reload for reload in reloads if "l0" in reload.get("restarted", [])]
    assert len(generations()) == 1 + len(restarts), [e for e in daemon.events if "reload" in str(e.get("event"))]
    assert request(daemon.address("l0"), b"x") == b"x"


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


# ---------------------------------------------------------------------------------------------
# In process: `prepare`, on real files and real sockets. What it refuses leaves nothing behind.


def prepared_from(path: Path, running: Loaded, bound: list[Bound]) -> Prepared:
    """`prepare` as the supervisor calls it, its groups serving `running`'s listeners; `bound`
    collects every socket it binds (with sockd's own bind)."""

    def binding(listener: Listener) -> Bound:
        bound.append(bind(listener))
        return bound[-1]

    # Not started: no fork server, so sockd's files cannot have changed under one.
    return prepare(path, running, list(running.config.listeners), Spawner(), binding)


def loaded(directory: Path, listeners: list[dict[str, Any]], name: str, **settings: Any) -> tuple[Path, Loaded]:
    path = directory / name
    path.write_text(config_text(listeners, **settings))
    return path, load_config(path)


def test_a_file_that_does_not_load_is_refused_with_its_problems(tmp_path: Path) -> None:
    _, running = loaded(tmp_path, [entry("a", "tcp", "echo", "asyncio")], "running.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("listeners: [\n")
    bound: list[Bound] = []
    with pytest.raises(Refused) as refused:
        prepared_from(broken, running, bound)
    assert refused.value.problems == check(broken)[1]
    assert str(refused.value) == refused.value.problems[0]
    assert bound == []


def test_a_bind_that_fails_closes_every_socket_the_reload_had_bound(tmp_path: Path) -> None:
    _, running = loaded(tmp_path, [entry("a", "tcp", "echo", "asyncio")], "running.yaml")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        added = [
            entry("a", "tcp", "echo", "asyncio"),
            entry("b", "tcp", "echo", "asyncio"),
            entry("c", "udp", "echo", "selector"),
            entry("d", "tcp", "echo", "asyncio", port=port),
        ]
        path, _ = loaded(tmp_path, added, "new.yaml")
        bound: list[Bound] = []
        with pytest.raises(Refused, match="address already in use"):
            prepared_from(path, running, bound)
    assert [b.listener.name for b in bound] == ["b", "c"]  # bound before d failed
    assert [b.sock.fileno() for b in bound] == [-1, -1]


def test_only_the_listeners_that_need_a_socket_get_one_and_the_metrics_settings_stay(tmp_path: Path) -> None:
    old = [entry("kept", "tcp", "echo", "asyncio"), entry("changed", "tcp", "echo", "asyncio")]
    _, running = loaded(tmp_path, old, "running.yaml")
    new = [
        entry("kept", "tcp", "echo", "asyncio"),
        entry("changed", "tcp", "echo", "selector"),
        entry("added", "udp", "echo", "selector"),
    ]
    path, _ = loaded(tmp_path, new, "new.yaml", metrics={"port": 0, "host": "127.0.0.2"})
    bound: list[Bound] = []
    prepared = prepared_from(path, running, bound)
    try:
        assert {step.name: step.action for step in prepared.steps} == {
            "kept": "kept",
            "changed": "restarted",
            "added": "added",
        }
        assert list(prepared.fresh) == ["added"]
        assert prepared.fresh["added"] is bound[0]
        # The endpoint's socket and buckets are fixed for the process's life.
        assert prepared.loaded.config.metrics == running.config.metrics
    finally:
        for each in bound:
            each.close()
