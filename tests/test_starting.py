"""A start: the real port of a port 0 is logged, a port held by a client's TIME-WAIT is waited for
(a listener's and the metrics endpoint's), and nothing is imported from the working directory.
The real daemon."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support import (
    TIMEOUT,
    Daemon,
    Launcher,
    config_text,
    eventually,
    request,
    require,
    scrape,
)
from support import listener as entry


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
