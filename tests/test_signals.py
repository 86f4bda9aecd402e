"""The supervisor's signals (sockd.supervisor): signals that mean nothing to sockd are ignored, a
HUP during a stop does not end the process before its cleanup, and a storm of HUPs keeps the
bound on generations at every moment. The real daemon, real signals."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from support import TIMEOUT, Daemon, Launcher, Session, alive, config_text, connect, request
from support import listener as entry

IGNORED = (signal.SIGUSR1, signal.SIGALRM)  # the three, but SIGUSR2: an upgrade (test_upgrade.py)
IGNORED_EVENT = "signal ignored: sockd gives it no meaning"


def test_usr1_and_alrm_are_ignored_logged_once_and_sockd_serves_on(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    for signum in IGNORED:
        os.kill(daemon.process.pid, signum)
    for signum in IGNORED:
        daemon.wait_for(IGNORED_EVENT, signal=signal.Signals(signum).name)
    for _ in range(2):
        for signum in IGNORED:
            os.kill(daemon.process.pid, signum)
    # Python runs pending handlers in the signals' numeric order, SIGHUP first: the second
    # reload's turn comes after the one that took these.
    for _ in range(2):
        mark = len(daemon.events)
        os.kill(daemon.process.pid, signal.SIGHUP)
        daemon.wait_for("reloaded", after=mark)
    logged = [e["signal"] for e in daemon.events if e.get("event") == IGNORED_EVENT]
    assert sorted(logged) == sorted(signal.Signals(signum).name for signum in IGNORED)  # each once
    assert request(daemon.address("echo"), b"still here") == b"still here"
    assert daemon.stop() == 0


def test_hups_during_a_stop_leave_exit_0_and_the_socket_file_removed(start_sockd: Launcher, sockdir: Path) -> None:
    path = sockdir / "slow.sock"
    daemon = start_sockd([entry("slow", "unix", "echo", "threaded", path, delay=1.0)])
    with connect(str(path), timeout=30) as session:
        session.sendall(b"first")
        assert session.recv(64) == b"first"
        session.sendall(b"second")  # in flight: the stop may wait for its answer
        daemon.process.send_signal(signal.SIGTERM)
        daemon.wait_for("stopping")
        sent, deadline = 0, time.monotonic() + 30
        # Until the process has exited (a zombie takes a signal harmlessly; only we reap it).
        while daemon.process.poll() is None and time.monotonic() < deadline and sent < 100_000:
            os.kill(daemon.process.pid, signal.SIGHUP)
            sent += 1
            time.sleep(0.0005)
        assert daemon.process.wait(TIMEOUT) == 0, (sent, daemon.other_lines)
    daemon.wait_for("stopped")
    assert not path.exists()


# The README's bound: at most 8 old generations alive per listener, besides the current one.
ALIVE_GENERATIONS = 1 + 8
STORM_SECONDS = 8.0
STORM_SIGNALS = 5_000
# A reload's last line: a reload whose new workers could not all start (a loaded machine) started them.
OUTCOMES = ("reloaded", "reload failed in part: new workers could not be started")


def _children(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is `pid`, from /proc."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(name))
    return {child for child in found if alive(child)}


class Storm:
    """HUPs sent as fast as they go, each after a config change that restarts the listener, for
    STORM_SECONDS or STORM_SIGNALS; clients opening sessions and keeping them meanwhile; and the
    supervisor's live workers counted throughout."""

    def __init__(self, daemon: Daemon, texts: list[str], address: str) -> None:
        self.daemon, self.texts, self.address = daemon, texts, address
        self.sent = 0
        self.most_workers = 0
        self.done = threading.Event()
        self.sessions: list[Session] = []
        self.threads = [threading.Thread(target=run) for run in (self._signal, self._sample, self._clients)]
        for thread in self.threads:
            thread.start()

    def _signal(self) -> None:
        pid, path = self.daemon.process.pid, self.daemon.config_path
        new = path.with_suffix(".new")
        deadline = time.monotonic() + STORM_SECONDS
        try:
            while self.sent < STORM_SIGNALS and time.monotonic() < deadline:
                new.write_text(self.texts[self.sent % len(self.texts)])
                new.replace(path)
                os.kill(pid, signal.SIGHUP)
                self.sent += 1
        finally:
            self.done.set()

    def _sample(self) -> None:
        supervisor = self.daemon.process.pid
        servers = {int(e["pid"]) for e in self.daemon.events if e.get("event") == "fork server started"}
        deadline = time.monotonic() + STORM_SECONDS + 2 * TIMEOUT
        # Past the storm too: until its last reloads are done.
        while not self._settled() and time.monotonic() < deadline:
            self.most_workers = max(self.most_workers, len(_children(supervisor) - servers))

    def _settled(self) -> bool:
        """Whether the storm is over and every reload it began is done."""
        events = [e.get("event") for e in list(self.daemon.events)]
        return self.done.is_set() and events.count("reloading") == sum(event in OUTCOMES for event in events)

    def _clients(self) -> None:
        while not self.done.is_set() and len(self.sessions) < 64:
            with contextlib.suppress(AssertionError, OSError):  # its generation ended meanwhile
                session = Session(self.address, f"storm-{len(self.sessions)}")
                self.sessions.append(session)
                session.exchange()
            time.sleep(0.05)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(STORM_SECONDS + 3 * TIMEOUT)
        for session in self.sessions:
            session.close()


def test_a_storm_of_hups_never_has_more_generations_alive_than_the_bound(start_sockd: Launcher) -> None:
    def listeners(model: str) -> list[dict[str, object]]:
        return [entry("storm", "tcp", "echo", model, workers=2)]

    settings: dict[str, Any] = {"shutdown_timeout": 60}  # old generations serve their sessions on through the storm
    daemon = start_sockd(listeners("threaded"), **settings)
    address = daemon.address("storm")
    texts = [config_text(listeners(model), **settings) for model in ("selector", "threaded")]
    storm = Storm(daemon, texts, address)
    storm.join()
    reloads = len([e for e in daemon.events if e.get("event") == "reloading"])
    assert reloads > 2 * ALIVE_GENERATIONS, (reloads, storm.sent)  # a storm that could overrun the bound
    assert storm.most_workers <= ALIVE_GENERATIONS * 2, (storm.most_workers, reloads, storm.sent)
    assert request(address, b"after the storm") == b"after the storm"
