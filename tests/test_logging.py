"""Logs: JSON lines when stderr is not a terminal, a console renderer when it is."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sockd.logging import Throttled, flush_throttled

from support import (
    SYSTEMD_VARIABLES,
    TIMEOUT,
    Daemon,
    Launcher,
    alive,
    config_text,
    connect,
    eventually,
    inet,
    read_to_eof,
    request,
    run_sockd,
    samples,
    sockd_command,
    value,
)
from support import listener as entry


def test_lines_are_json_with_the_listener_and_its_real_address(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")], logging={"level": "info", "format": "auto"})
    started = daemon.wait_for("listening", listener="echo")
    assert started["protocol"] == "tcp"
    assert started["concurrency"] == "asyncio"
    assert started["handler"] == "echo"
    assert started["level"] == "info"
    assert daemon.wait_for("worker started", listener="echo")["pid"] > 0
    request(daemon.address("echo"), b"x")
    assert daemon.stop() == 0
    assert daemon.other_lines == []  # every line parsed as JSON
    assert [e for e in daemon.events if e["level"] == "debug"] == []  # info hides per-connection detail
    assert daemon.events[-1]["event"] == "stopped"


@pytest.mark.parametrize("no_color", ["", "1"])
def test_a_terminal_gets_the_console_renderer(tmp_path: Path, no_color: str) -> None:
    """In colour, unless $NO_COLOR says otherwise (no-color.org: set and not empty)."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"metrics": {"port": 0}, "listeners": [entry("echo", "tcp", "echo", "selector")]}))
    controller, terminal = pty.openpty()
    environment = {**os.environ, "NO_COLOR": no_color}
    process = subprocess.Popen(
        sockd_command("-c", str(config)), stderr=terminal, stdout=subprocess.DEVNULL, env=environment
    )
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + 20
    try:
        while b"ready" not in output and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                output += os.read(controller, 65536)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        os.close(controller)
    text = output.decode(errors="replace")
    assert "listening" in text
    assert "ready" in text
    assert not text.lstrip().startswith("{")
    assert all(not line.startswith("{") for line in text.splitlines())
    assert ("\x1b[" in text) is not bool(no_color)


def test_the_console_format_in_a_file_has_no_colour(tmp_path: Path) -> None:
    """Colour is for a terminal: `format: console` with stderr a file writes no escape codes."""
    config = tmp_path / "c.yaml"
    config.write_text(config_text([entry("echo", "tcp", "echo", "selector")], logging={"format": "console"}))
    written = tmp_path / "stderr"
    with written.open("wb") as stderr:
        process = subprocess.Popen(sockd_command("-c", str(config)), stderr=stderr, stdout=subprocess.DEVNULL)
    try:
        eventually(lambda: b"ready" in written.read_bytes(), "ready", timeout=TIMEOUT)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    text = written.read_bytes()
    assert b"listening" in text
    assert b"stopped" in text
    assert b"\x1b" not in text


def _reset_after_echo(address: str) -> None:
    """An echo, then a reset: the worker logs the lost connection at debug level."""
    with connect(address) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_reload_that_changes_the_level_reaches_the_workers_of_kept_listeners(start_sockd: Launcher) -> None:
    listeners = [entry("echo", "tcp", "echo", "asyncio")]
    daemon = start_sockd(listeners, logging={"level": "info", "format": "json"})
    pid = daemon.worker_pid("echo")
    _reset_after_echo(daemon.address("echo"))
    plan = daemon.reload(listeners, logging={"level": "debug", "format": "json"})
    assert plan["kept"] == ["echo"]
    mark = len(daemon.events)

    def lost_at_debug() -> bool:  # the worker takes the new level up as it reads its channel
        _reset_after_echo(daemon.address("echo"))
        return any(e.get("event") == "connection lost" for e in daemon.events[mark:])

    eventually(lost_at_debug, "a lost connection logged at debug level")
    lost = daemon.wait_for("connection lost", after=mark)
    assert lost["pid"] == pid  # the worker started at info level, not a new one
    assert lost["level"] == "debug"
    assert [e for e in daemon.events[:mark] if e["level"] == "debug"] == []  # info hid them before


PREFIXED = re.compile(r"<(\d)>(\{.*\})")


def _read_until(journal: socket.socket, received: bytes, wanted: bytes) -> bytes:
    deadline = time.monotonic() + TIMEOUT
    while wanted not in received:
        assert time.monotonic() < deadline, f"no {wanted!r} within {TIMEOUT} s: {received!r}"
        chunk = journal.recv(65536)
        assert chunk, f"EOF before {wanted!r}: {received!r}"
        received += chunk
    return received


def _through_a_journal_stream(tmp_path: Path, journal_stream: str | None) -> list[str]:
    """Run sockd with stderr on a Unix stream socket, as journald hands one to a service, and
    $JOURNAL_STREAM as given (None: that socket's own device and inode); kill its worker (a
    warning), stop it, and return every line the test's end of the socket received."""
    config = tmp_path / "c.yaml"
    config.write_text(config_text([entry("echo", "tcp", "echo", "selector")]))
    journal, stderr = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if journal_stream is None:
        status = os.fstat(stderr.fileno())
        journal_stream = f"{status.st_dev}:{status.st_ino}"
    environment = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    with journal:
        process = subprocess.Popen(
            sockd_command("-c", str(config)),
            stderr=stderr.fileno(),
            stdout=subprocess.DEVNULL,
            env={**environment, "JOURNAL_STREAM": journal_stream},
        )
        stderr.close()
        journal.settimeout(TIMEOUT)
        received = b""
        try:
            received = _read_until(journal, received, b'"ready"')
            started = [line for line in received.decode().splitlines() if '"worker started"' in line]
            os.kill(int(json.loads(started[0][started[0].index("{") :])["pid"]), signal.SIGKILL)
            received = _read_until(journal, received, b'"worker died; restarting"')
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        while chunk := journal.recv(65536):  # to EOF: every process that held stderr has exited
            received += chunk
    return received.decode().splitlines()


def test_on_the_journal_each_line_carries_its_priority(tmp_path: Path) -> None:
    lines = _through_a_journal_stream(tmp_path, None)
    priorities = {"debug": 7, "info": 6, "warning": 4, "error": 3}
    parsed = []
    for line in lines:
        matched = PREFIXED.fullmatch(line)
        assert matched, f"a line without its priority: {line!r}"
        event = json.loads(matched[2])  # after the prefix, the configured format still
        assert int(matched[1]) == priorities[event["level"]], line
        parsed.append((int(matched[1]), event))
    assert {event["level"] for _, event in parsed} >= {"info", "warning"}
    # What `journalctl -p warning` shows: priority 4 (warning) or more urgent.
    shown = [event["event"] for level, event in parsed if level <= 4]
    assert shown == ["worker died; restarting"]
    assert any(event["event"] == "stopped" for _, event in parsed)


@pytest.mark.parametrize("other", ["0:0", "", "/dev/null"])
def test_a_journal_stream_naming_something_else_adds_no_prefix(tmp_path: Path, other: str) -> None:
    if other == "/dev/null":
        status = os.stat(other)
        other = f"{status.st_dev}:{status.st_ino}"
    lines = _through_a_journal_stream(tmp_path, other)
    assert lines
    assert all(json.loads(line)["event"] for line in lines)  # bare JSON lines, as off the journal


def _failing_start_on_the_journal(config: Path) -> tuple[int, list[str]]:
    """Start sockd on `config`, which it cannot serve, with stderr a journal stream (as in
    _through_a_journal_stream): its exit code and every line it wrote."""
    journal, stderr = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    status = os.fstat(stderr.fileno())
    environment = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    with journal, stderr:
        ran = subprocess.run(
            sockd_command("-c", str(config)),
            stderr=stderr.fileno(),
            env={**environment, "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"},
            timeout=30,
            check=False,
        )
        stderr.close()
        journal.settimeout(TIMEOUT)
        lines = b"".join(iter(lambda: journal.recv(65536), b"")).decode().splitlines()
    return ran.returncode, lines


def test_on_the_journal_a_config_error_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(config_text([entry("echo", "tcp", "echo", "selector", port=70000, workers=0)]))
    returncode, lines = _failing_start_on_the_journal(config)
    assert returncode == 78
    assert len(lines) == 2  # each problem its own line, each an error for `journalctl -p err`
    assert all(line.startswith(f"<3>{config}:") for line in lines), lines


def _closed(daemon: Daemon, listener: str, after: int = 0) -> dict[str, Any]:
    return daemon.wait_for("connection closed", listener=listener, after=after)


@pytest.mark.parametrize("model", ["asyncio", "selector", "threaded"])
def test_log_connections_says_how_each_connection_ended(start_sockd: Launcher, sockdir: Path, model: str) -> None:
    daemon = start_sockd(
        [
            entry("echo", "tcp", "echo", model, log_connections=True),
            entry("uds", "unix", "echo", model, sockdir / "e.sock", log_connections=True),
            entry("stamp", "tcp", "timestamp", model, log_connections=True, max_message_size=8),
            entry("quiet", "tcp", "echo", model, log_connections=True, first_byte_timeout=0.3),
            entry("off", "tcp", "echo", model),
        ]
    )
    with connect(daemon.address("echo")) as client:
        for word in (b"one", b"two", b"three"):  # each answered before the next: three requests
            client.sendall(word)
            assert client.recv(10) == word
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(client) == b""
        port = client.getsockname()[1]
    line = _closed(daemon, "echo")
    assert (line["source"], line["port"]) == ("127.0.0.1", port)
    assert (line["requests"], line["bytes_in"], line["bytes_out"], line["ended"]) == (3, 11, 11, "client closed")
    assert line["duration"] >= 0
    assert line["level"] == "info"

    assert request(str(sockdir / "e.sock"), b"local") == b"local"
    line = _closed(daemon, "uds")
    assert (line["peer_pid"], line["peer_uid"]) == (os.getpid(), os.getuid())
    assert (line["requests"], line["bytes_in"], line["ended"]) == (1, 5, "client closed")

    with connect(daemon.address("stamp")) as client:
        client.sendall(b"far more than eight bytes")
        assert read_to_eof(client) == b""
    line = _closed(daemon, "stamp")
    assert (line["requests"], line["bytes_in"], line["bytes_out"], line["ended"]) == (0, 25, 0, "too large")

    with connect(daemon.address("quiet")) as client:
        assert read_to_eof(client) == b""  # says nothing: closed after first_byte_timeout
    assert _closed(daemon, "quiet")["ended"] == "timeout"

    assert request(daemon.address("off"), b"unlogged") == b"unlogged"
    with connect(daemon.address("echo")) as client:
        client.sendall(b"held")
        assert client.recv(10) == b"held"
        mark = len(daemon.events)
        daemon.process.send_signal(signal.SIGTERM)
        assert read_to_eof(client) == b""  # the drain ended its input
        port = client.getsockname()[1]
    line = _closed(daemon, "echo", after=mark)
    assert (line["port"], line["requests"], line["ended"]) == (port, 1, "drained")
    assert daemon.process.wait(30) == 0
    assert [e for e in daemon.events if e.get("event") == "connection closed" and e["listener"] == "off"] == []


RELAY_DRIVERS = ["asyncio", "selector"]  # busy_poll runs the selector's


@pytest.mark.parametrize("model", RELAY_DRIVERS)
def test_log_connections_logs_each_relayed_connection(start_sockd: Launcher, sockdir: Path, model: str) -> None:
    echo = f"unix://{sockdir / 'echo.sock'}"
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        daemon = start_sockd(
            [
                entry("echo", "unix", "echo", model, sockdir / "echo.sock"),
                entry("relay", "tcp", "relay", model, upstream=echo, log_connections=True),
                entry("uds", "unix", "relay", model, sockdir / "r.sock", upstream=echo, log_connections=True),
                entry("refused", "tcp", "relay", model, upstream=_url(refusing), log_connections=True),
                entry("off", "tcp", "relay", model, upstream=echo),
            ]
        )
        with connect(daemon.address("refused")) as client, contextlib.suppress(ConnectionResetError):
            assert client.recv(1) == b""
        line = _closed(daemon, "refused")
    assert (line["requests"], line["bytes_in"], line["bytes_out"], line["ended"]) == (1, 0, 0, "upstream failed")

    with connect(daemon.address("relay")) as client:
        for word in (b"one", b"two", b"three"):
            client.sendall(word)
            assert client.recv(10) == word
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(client) == b""
        port = client.getsockname()[1]
    line = _closed(daemon, "relay")
    assert (line["source"], line["port"]) == ("127.0.0.1", port)
    # One request: the relayed connection, as sockd_requests_total counts it.
    assert (line["requests"], line["bytes_in"], line["bytes_out"], line["ended"]) == (1, 11, 11, "client closed")
    assert line["duration"] >= 0
    assert line["level"] == "info"

    assert request(str(sockdir / "r.sock"), b"local") == b"local"
    line = _closed(daemon, "uds")
    assert (line["peer_pid"], line["peer_uid"]) == (os.getpid(), os.getuid())
    assert (line["bytes_in"], line["bytes_out"], line["ended"]) == (5, 5, "client closed")

    assert request(daemon.address("off"), b"unlogged") == b"unlogged"
    assert daemon.stop() == 0
    assert [e for e in daemon.events if e.get("event") == "connection closed" and e["listener"] == "off"] == []


@pytest.mark.parametrize("model", RELAY_DRIVERS)
def test_a_relayed_connections_line_says_which_side_ended_it(start_sockd: Launcher, sockdir: Path, model: str) -> None:
    echo = f"unix://{sockdir / 'echo.sock'}"
    with socket.socket() as far:
        far.bind(("127.0.0.1", 0))  # an upstream the test plays itself, outside the daemon's drain
        far.listen(1)
        far.settimeout(TIMEOUT)
        daemon = start_sockd(
            [
                entry("echo", "unix", "echo", model, sockdir / "echo.sock"),
                entry("day", "unix", "daytime", model, sockdir / "day.sock"),
                entry("relay", "tcp", "relay", model, upstream=echo, log_connections=True),
                entry("first", "tcp", "relay", model, upstream=f"unix://{sockdir / 'day.sock'}", log_connections=True),
                entry("quiet", "tcp", "relay", model, upstream=echo, log_connections=True, first_byte_timeout=0.3),
                entry("held", "tcp", "relay", model, upstream=_url(far), log_connections=True),
            ]
        )
        with connect(daemon.address("first")) as client:
            said = read_to_eof(client)  # daytime speaks and closes: the upstream ends first
        line = _closed(daemon, "first")
        assert said
        assert (line["bytes_in"], line["bytes_out"], line["ended"]) == (0, len(said), "upstream closed")

        with connect(daemon.address("quiet")) as client:
            assert read_to_eof(client) == b""  # says nothing: closed after first_byte_timeout
        assert _closed(daemon, "quiet")["ended"] == "timeout"

        _reset_after_echo(daemon.address("relay"))
        assert _closed(daemon, "relay")["ended"] == "reset"

        with connect(daemon.address("held")) as client:
            client.sendall(b"held")
            upstream, _ = far.accept()
            with upstream:
                assert upstream.recv(10) == b"held"
                upstream.sendall(b"back")
                assert client.recv(10) == b"back"
                mark = len(daemon.events)
                daemon.process.send_signal(signal.SIGTERM)
                assert read_to_eof(upstream) == b""  # the drain ended the client's input: passed on
            assert read_to_eof(client) == b""
            port = client.getsockname()[1]
    line = _closed(daemon, "held", after=mark)
    assert (line["port"], line["bytes_in"], line["bytes_out"], line["ended"]) == (port, 4, 4, "drained")
    assert daemon.process.wait(30) == 0


def _url(sock: socket.socket) -> str:
    """The tcp:// upstream of a test's own socket on loopback."""
    return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def _lines_until(fd: int, wanted: bytes) -> list[dict[str, Any]]:
    """The JSON lines read from `fd` up to the one holding `wanted`."""
    received = b""
    deadline = time.monotonic() + TIMEOUT
    while wanted not in received:
        assert time.monotonic() < deadline, f"no {wanted!r} within {TIMEOUT} s: {received!r}"
        if select.select([fd], [], [], 0.5)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"EOF before {wanted!r}: {received!r}"
            received += chunk
    return [json.loads(line) for line in received.decode().splitlines() if line.startswith("{")]


def _dropped(metrics: str) -> float:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=TIMEOUT) as response:
        found = text_string_to_metric_families(response.read().decode())
        return next((s.value for f in found for s in f.samples if s.name == "sockd_log_lines_dropped_total"), 0.0)


def test_a_log_reader_that_went_away_costs_lines_not_the_daemon(tmp_path: Path, sockdir: Path) -> None:
    """stderr a pipe whose reader closed: every line is EPIPE. A worker's line (a connection with
    log_connections) and the supervisor's (a reload) are dropped and counted; nothing dies."""
    listeners = [
        entry("echo", "tcp", "echo", "selector", log_connections=True),
        entry("uds", "unix", "echo", "threaded", sockdir / "e.sock", log_connections=True),
    ]
    config = tmp_path / "c.yaml"
    config.write_text(config_text(listeners))
    reader, writer = os.pipe()
    environment = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    process = subprocess.Popen(
        sockd_command("-c", str(config)), stderr=writer, stdout=subprocess.DEVNULL, env=environment
    )
    os.close(writer)
    try:
        events = _lines_until(reader, b'"ready"')
    finally:
        os.close(reader)  # the logger died
    try:
        addresses = {e["listener"]: e["address"] for e in events if e["event"] == "listening"}
        workers = {e["listener"]: e["pid"] for e in events if e["event"] == "worker started"}
        metrics = next(e["address"] for e in events if e["event"] == "metrics")
        assert request(addresses["echo"], b"first") == b"first"  # its worker logs "connection closed"
        eventually(lambda: _dropped(metrics) >= 1, "the worker's line counted as dropped")
        process.send_signal(signal.SIGHUP)  # the supervisor logs "reloading" and "reloaded"
        eventually(lambda: _dropped(metrics) >= 3, "the supervisor's lines counted as dropped")
        for name, address in addresses.items():
            assert request(address, name.encode()) == name.encode()
        eventually(lambda: _dropped(metrics) >= 5, "the two connections' lines counted as dropped")
        assert process.poll() is None
        assert all(alive(pid) for pid in workers.values())  # the first workers serve on: none died
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0  # nor does the interpreter's last flush of stderr fail the exit


# A path a config accepts, that a client of the journal or of sd_notify must not see as lines of
# their own: a regular file there, so that binding it fails and the error names it.
FORGED = "e\n<0>sockd: EMERGENCY\nWATCHDOG=trigger"


def test_a_newline_in_a_path_that_fails_to_bind_stays_in_its_journal_line(tmp_path: Path, sockdir: Path) -> None:
    path = sockdir / FORGED
    path.touch()
    config = tmp_path / "c.yaml"
    config.write_text(config_text([entry("uds", "unix", "echo", "selector", path)], logging={"format": "console"}))
    assert run_sockd("--check", "-c", str(config)).returncode == 0
    returncode, lines = _failing_start_on_the_journal(config)
    assert returncode == 71
    errors = [line for line in lines if line.startswith("<3>")]
    assert len(errors) == 1, lines  # the bind error, one line, the path escaped in it
    assert "e\\n<0>sockd: EMERGENCY\\nWATCHDOG=trigger" in errors[0]
    assert all(PRIORITY.match(line) and not line.startswith("<0>") for line in lines), lines


PRIORITY = re.compile(r"<[3-7]>")  # sockd's own: error to debug


def test_a_reload_that_fails_to_bind_a_forged_path_logs_it_on_one_line(tmp_path: Path, sockdir: Path) -> None:
    """The console renderer (which writes str values as they are) on the journal: the reload's
    error, which names the path, is one line with its priority."""
    path = sockdir / FORGED
    path.touch()
    config = tmp_path / "c.yaml"
    console = {"logging": {"level": "info", "format": "console"}}
    config.write_text(config_text([entry("echo", "tcp", "echo", "selector")], **console))
    journal, stderr = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    status = os.fstat(stderr.fileno())
    environment = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    with journal:
        process = subprocess.Popen(
            sockd_command("-c", str(config)),
            stderr=stderr.fileno(),
            stdout=subprocess.DEVNULL,
            env={**environment, "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"},
        )
        stderr.close()
        journal.settimeout(TIMEOUT)
        try:
            received = _read_until(journal, b"", b"ready")
            config.write_text(config_text([entry("uds", "unix", "echo", "selector", path)], **console))
            process.send_signal(signal.SIGHUP)
            received = _read_until(journal, received, b"reload rolled back")
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        while chunk := journal.recv(65536):
            received += chunk
    lines = received.decode().splitlines()
    rolled_back = [line for line in lines if "reload rolled back" in line]
    assert len(rolled_back) == 1, lines
    assert rolled_back[0].startswith("<3>")
    assert "e\\n<0>sockd: EMERGENCY\\nWATCHDOG=trigger" in rolled_back[0]
    assert all(PRIORITY.match(line) for line in lines), lines


class _Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _said(captured: list[structlog.typing.EventDict]) -> list[tuple[object, int]]:
    return [(line.get("reason"), line["count"]) for line in captured]


def test_a_throttled_line_accounts_for_every_event_by_the_end_of_its_window_per_reason() -> None:
    clock = _Clock()
    warn = Throttled("rejected", every=10.0, per="reason", clock=clock)
    with structlog.testing.capture_logs() as captured:
        warn(reason="connection_rate", source="a")  # the first: said at once
        clock.now += 1
        for _ in range(4799):
            warn(reason="connection_rate", source="b")
        warn(reason="max_connections", source="c")  # another reason: its own window, said at once
        assert _said(captured) == [("connection_rate", 1), ("max_connections", 1)]
        clock.now += 8.9
        warn.flush()  # within the window: nothing yet
        assert len(captured) == 2
        clock.now += 0.2
        warn.flush()  # the end of the first window: what it held, with no further event needed
        assert _said(captured)[2:] == [("connection_rate", 4799)]
        assert captured[2]["source"] == "b"  # the latest held event's details
        clock.now += 1
        warn(reason="connection_rate", source="d")  # in the window that line opened: held
        warn(reason="max_connections", source="e")  # the other's window held nothing: said at once
        assert _said(captured)[3:] == [("max_connections", 1)]
        clock.now += 10
        warn.flush()
        assert _said(captured)[4:] == [("connection_rate", 1)]
        clock.now += 20
        warn.flush()  # quiet windows: nothing to say, and the next event is said at once
        warn(reason="connection_rate", source="f")
        warn(reason="connection_rate", source="g")
        clock.now += 1
        flush_throttled()  # the process exits: what the window held is said before its end
    assert _said(captured)[5:] == [("connection_rate", 1), ("connection_rate", 1)]
    assert sum(count for reason, count in _said(captured) if reason == "connection_rate") == 4803


def test_a_throttled_window_ends_with_its_line_though_no_event_follows() -> None:
    """The timer, on the real clock: the held events are said when the window ends."""
    warn = Throttled("too many", every=0.05)
    with structlog.testing.capture_logs() as captured:
        for _ in range(3):
            warn(limit=16)
        eventually(lambda: len(captured) == 2, "the window's line", timeout=TIMEOUT)
    assert [line["count"] for line in captured] == [1, 2]


def test_two_reasons_in_one_window_each_get_lines_that_add_up_to_the_metric(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("e", "tcp", "echo", "selector", max_connections=1, deny=["127.0.0.2/32"])])
    address = inet(daemon.address("e"))
    refused = {"max_connections": ("127.0.0.1", 20), "acl": ("127.0.0.2", 15)}
    with connect(daemon.address("e")) as held:
        held.sendall(b"x")
        assert held.recv(1) == b"x"  # admitted: it takes the one place
        for source, times in refused.values():
            for _ in range(times):
                with (
                    socket.create_connection(address, TIMEOUT, (source, 0)) as sock,
                    contextlib.suppress(ConnectionResetError),
                ):
                    assert sock.recv(1) == b""  # closed at once
        expected = {reason: times for reason, (_, times) in refused.items()}

        def counted() -> dict[str, float]:
            found = samples(daemon)
            return {r: value(found, "sockd_connections_rejected_total", listener="e", reason=r) for r in refused}

        eventually(lambda: counted() == expected, "every rejection counted")

        def logged(reason: str) -> int:
            return sum(e["count"] for e in daemon.events if e.get("event") == "rejected" and e["reason"] == reason)

        # Within a window (10 s) and a margin: no further rejection is needed for the rest to be said.
        eventually(lambda: all(logged(r) == expected[r] for r in refused), "every rejection in a line", timeout=30)
    assert {e["reason"] for e in daemon.events if e.get("event") == "rejected"} == set(refused)
