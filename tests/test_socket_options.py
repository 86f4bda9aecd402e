"""Socket options on a listener and its connections, in every model, through the running daemon:
the connection's options, backlog and reuse_port, ipv6_only and freebind."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from pathlib import Path

import pytest

from support import (
    MODELS,
    TIMEOUT,
    Launcher,
    connect,
    echo,
    inet,
    listen_backlog,
    options_for,
    request,
    run_sockd,
)
from support import listener as entry

EX_UNAVAILABLE = 71


# -- socket options


def server_side(pid: int, client: socket.socket) -> socket.socket:
    """The worker's own socket for `client`'s connection, taken with pidfd_getfd(2), so its options
    can be read as the kernel holds them."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            fd = libc.syscall(438, pidfd, int(name), 0)  # pidfd_getfd on x86_64 and aarch64
            if fd < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            sock = socket.socket(fileno=fd)
            with contextlib.suppress(OSError):
                if sock.type == socket.SOCK_STREAM and sock.getpeername() == client.getsockname():
                    return sock
            sock.close()
    finally:
        os.close(pidfd)
    raise AssertionError("no worker socket for this connection")


@pytest.mark.parametrize("model", MODELS)
def test_connection_socket_options(start_sockd: Launcher, model: str) -> None:
    tuned = {"nodelay": False, "keepalive": True, "recv_buffer": 65536, "send_buffer": 65536}
    daemon = start_sockd(
        [
            entry("default", "tcp", "echo", model, **options_for(model)),
            entry("tuned", "tcp", "echo", model, **options_for(model, **tuned)),
        ]
    )
    for name, nodelay, keepalive in [("default", 1, 0), ("tuned", 0, 1)]:
        with connect(daemon.address(name)) as client:
            assert echo(client) == b"ping"
            with server_side(daemon.worker_pid(name), client) as server:
                assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == nodelay, name
                assert server.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == keepalive, name
                if name == "tuned":  # Linux reports double what was asked (its bookkeeping share)
                    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 65536
                    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 65536


def test_backlog_and_reuse_port(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("e", "tcp", "echo", "selector", backlog=17, reuse_port=True)])
    address = daemon.address("e")
    host, port = inet(address)
    assert listen_backlog(address) == 17
    # SO_REUSEPORT lets another process (another sockd, say) listen on the same port beside it.
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind((host, port))
        other.listen()


def test_a_busy_port_without_reuse_port_is_refused(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("e", "tcp", "echo", "selector")])
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError, match="Address already in use"):
            other.bind(inet(daemon.address("e")))


def test_ipv6_only(start_sockd: Launcher) -> None:
    daemon = start_sockd(
        [
            entry("dual", "tcp", "echo", "selector", "::", ipv6_only=False),
            entry("only", "tcp", "echo", "selector", "::", ipv6_only=True),
        ]
    )
    dual, only = (inet(daemon.address(name))[1] for name in ("dual", "only"))
    assert request(f"127.0.0.1:{dual}", b"v4") == b"v4"  # IPv4 clients reach a dual-stack socket
    assert request(f"[::1]:{only}", b"v6") == b"v6"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", only), timeout=TIMEOUT)


def test_freebind_binds_an_address_this_host_does_not_have(start_sockd: Launcher, tmp_path: Path) -> None:
    # 192.0.2.1 is TEST-NET-1: never on this host. Nothing is sent to it.
    daemon = start_sockd([entry("e", "tcp", "echo", "selector", "192.0.2.1", freebind=True)])
    assert daemon.address("e").startswith("192.0.2.1:")
    config = tmp_path / "no-freebind.yaml"
    config.write_text(
        "listeners:\n- {name: e, protocol: tcp, host: 192.0.2.1, port: 0, handler: echo, concurrency: selector}\n"
    )
    result = run_sockd("-c", str(config))
    assert result.returncode == EX_UNAVAILABLE
    assert "cannot bind listener 'e' to tcp 192.0.2.1:0: cannot assign requested address" in result.stderr
