"""Draining a balancer can see (sockd.supervisor, sockd.ledger): a stop signal turns /healthz to
503 `draining` and `sockd_draining` to 1 at once, while the listeners serve on for `drain_delay`;
then the usual stop. A second signal cuts the delay short, a third kills. And /healthz answers
while a load saturates the listeners. The real daemon, real signals, a real load."""

from __future__ import annotations

import datetime
import signal
import subprocess
import time

from sockd_bench.healthz import load_generators

from support import (
    TIMEOUT,
    Daemon,
    InFlight,
    Launcher,
    Session,
    active_connections,
    becomes,
    health,
    request,
    require,
    samples,
    value,
)
from support import listener as entry


def draining(daemon: Daemon) -> float:
    return value(samples(daemon), "sockd_draining")


def _at(event: dict[str, object]) -> datetime.datetime:
    return datetime.datetime.fromisoformat(str(event["timestamp"]))


def test_during_the_drain_delay_new_clients_are_served_and_healthz_says_draining(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")], drain_delay=60, shutdown_timeout=30)
    address = daemon.address("echo")
    becomes(lambda: health(daemon), (200, "ok\n"), "/healthz once every worker serves")
    assert draining(daemon) == 0
    session = Session(address, "before")
    try:
        session.exchange()
        daemon.process.send_signal(signal.SIGTERM)
        mark = len(daemon.events)
        daemon.wait_for("draining", drain_delay=60)
        assert health(daemon) == (503, "draining\n")
        assert draining(daemon) == 1
        for number in range(20):  # new clients, a connection each, and the session open before
            payload = f"during the delay {number}".encode()
            assert request(address, payload) == payload
            session.exchange()
        daemon.process.send_signal(signal.SIGHUP)  # the instance is on its way out: no reload
        assert request(address, b"still") == b"still"
        # The second signal: the stop begins now, not 60 s later; it ends the session as a stop does.
        daemon.process.send_signal(signal.SIGTERM)
        daemon.wait_for("second stop signal: the drain delay is cut short", after=mark)
        assert daemon.process.wait(TIMEOUT) == 0
        assert session.state() == "eof"
    finally:
        session.close()
    names = [event.get("event") for event in daemon.events[mark:]]
    assert "reloading" not in names
    assert "killing worker" not in names


def test_after_the_drain_delay_the_daemon_stops_as_before(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "selector")], drain_delay=1, shutdown_timeout=30)
    session = Session(daemon.address("echo"), "open")
    try:
        session.exchange()
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(TIMEOUT + 1) == 0
        assert session.state() == "eof"  # ended as a stop ends an answered connection
    finally:
        session.close()
    began, stopped = daemon.wait_for("draining"), daemon.wait_for("stopping")
    assert (_at(stopped) - _at(began)).total_seconds() >= 1  # the delay was served out
    assert not [event for event in daemon.events if event.get("event") == "killing worker"]


def test_a_third_signal_kills_what_the_stop_waits_for(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("slow", "tcp", "timestamp", "threaded", delay=20)], drain_delay=60, shutdown_timeout=60)
    pending = InFlight(daemon.address("slow"))
    becomes(lambda: active_connections(daemon, "slow"), 1, "the request accepted")
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for("draining")
    daemon.process.send_signal(signal.SIGTERM)  # the stop: it waits for the request's delay
    daemon.wait_for("stopping")
    assert daemon.stop(signal.SIGTERM, timeout=TIMEOUT) == 0
    assert pending.result() == b""
    assert daemon.wait_for("killing worker", why="second stop signal")


def test_healthz_answers_while_a_load_saturates_the_listener(start_sockd: Launcher) -> None:
    """Two workers and the C echoload on the machine's cores (how fast /healthz answers then is
    sockd_bench/healthz.py's to measure): every probe is answered, and answered 200."""
    require("gcc")
    echoload = load_generators().BUILD / "echoload"
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio", workers=2)])
    becomes(lambda: health(daemon), (200, "ok\n"), "/healthz once every worker serves")
    load = subprocess.Popen(
        [echoload, "tcp", daemon.address("echo"), "50", "64", "5"], stdout=subprocess.PIPE, text=True
    )
    answers: list[tuple[int, str]] = []
    try:
        while load.poll() is None and len(answers) < 200:
            answers.append(health(daemon))
            time.sleep(0.02)
    finally:
        out, _ = load.communicate(timeout=30)
    report = dict(item.split("=", 1) for item in out.split() if "=" in item)
    assert report["errors"] == "0", out
    assert int(report["requests"]) > 0, out
    assert len(answers) >= 10, answers  # probes while the load ran
    assert set(answers) == {(200, "ok\n")}
