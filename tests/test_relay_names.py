"""handler: relay with an upstream given by name: the name is looked up off the loop, so a slow
name server holds up no client but the ones waiting for it."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_relay import DRIVERS, upstream
from test_relay_udp import echo_datagrams

from support import TIMEOUT, Launcher, connect, eventually, inet, recv_exactly, require
from support import listener as entry

NAME = "upstream.sockd.test"  # in no /etc/hosts: only the test's name server knows it


def answer(query: bytes) -> bytes:
    """The reply to a query for NAME: 127.0.0.1 for an A query, no address for any other (AAAA)."""
    end = 12
    while query[end]:  # the question's name, label by label
        end += 1 + query[end]
    end += 5  # its terminating zero, type and class
    (kind,) = struct.unpack("!H", query[end - 4 : end - 2])
    found = kind == 1
    header = query[:2] + struct.pack("!HHHHH", 0x8180, 1, int(found), 0, 0)  # a response, recursion done
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton("127.0.0.1")  # NAME, IN A
    return header + query[12:end] + (record if found else b"")


class SlowNameServer:
    """A name server on a loopback address of its own, port 53 (resolv.conf cannot say another),
    that answers at once, or, while `held`, only once released."""

    def __init__(self) -> None:
        self.sock = socket.socket(type=socket.SOCK_DGRAM)
        for _ in range(20):
            self.host = f"127.{random.randrange(1, 255)}.{random.randrange(256)}.{random.randrange(1, 255)}"
            with contextlib.suppress(OSError):
                self.sock.bind((self.host, 53))
                break
        else:
            raise AssertionError("no loopback address with port 53 free")
        self.sock.settimeout(0.1)
        self.released = threading.Event()
        self.released.set()
        self.done = threading.Event()
        self.queries = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def hold(self) -> None:
        self.released.clear()

    def release(self) -> None:
        self.released.set()

    def _serve(self) -> None:
        deadline = time.monotonic() + 6 * TIMEOUT
        while not self.done.is_set() and time.monotonic() < deadline:
            try:
                query, sender = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            self.queries += 1
            self.released.wait(max(0.0, deadline - time.monotonic()))
            self.sock.sendto(answer(query), sender)

    def close(self) -> None:
        self.done.set()
        self.released.set()
        self.thread.join(TIMEOUT)
        self.sock.close()


@contextlib.contextmanager
def name_server() -> Iterator[SlowNameServer]:
    server = SlowNameServer()
    try:
        yield server
    finally:
        server.close()


def resolving_through(server: SlowNameServer, directory: Path) -> tuple[str, ...]:
    """The prefix that starts sockd in a mount namespace of its own where /etc/resolv.conf names
    `server` alone (a lookup is not retried for 30 s: the test holds one as long as it likes)."""
    unshare = require("unshare")
    if subprocess.run([unshare, "-m", "true"], capture_output=True, check=False).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("unshare -m fails: CI must run as root, with CAP_SYS_ADMIN")
        pytest.skip("unshare -m needs root (CAP_SYS_ADMIN)")
    resolv = directory / "resolv.conf"
    resolv.write_text(f"nameserver {server.host}\noptions timeout:30 attempts:1\n")
    return (unshare, "-m", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv))


def echo_stream(conn: socket.socket) -> None:
    while data := conn.recv(1024):
        conn.sendall(data)


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
@pytest.mark.parametrize("model", DRIVERS)
def test_a_name_lookup_held_by_its_server_holds_up_no_other_client(
    start_sockd: Launcher, tmp_path: Path, model: str, protocol: str
) -> None:
    """A client relayed already goes on being served while a new client's lookup of the
    upstream's name waits on the name server; once it answers, the new client is served too."""
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(name_server())
        if protocol == "tcp":
            port = int(stack.enter_context(upstream(echo_stream)).url.rpartition(":")[2])
        else:
            far = stack.enter_context(socket.socket(type=socket.SOCK_DGRAM))
            far.bind(("127.0.0.1", 0))
            port = far.getsockname()[1]
            stop = threading.Event()
            echo = threading.Thread(target=echo_datagrams, args=(far, stop), daemon=True)
            echo.start()
            stack.callback(echo.join, TIMEOUT)
            stack.callback(stop.set)
        daemon = start_sockd(
            [entry("r", protocol, "relay", model, upstream=f"{protocol}://{NAME}:{port}")],
            prefix=resolving_through(server, tmp_path),
        )
        relay = daemon.address("r")
        first = stack.enter_context(client(protocol, relay))
        assert exchange(first, b"first") == b"first"  # its lookup answered at once
        server.hold()
        stack.callback(server.release)  # whatever happens: the daemon must be able to stop
        asked = server.queries
        second = stack.enter_context(client(protocol, relay))  # the upstream is looked up for it
        second.send(b"second")
        eventually(lambda: server.queries > asked, "the lookup reached the name server", timeout=TIMEOUT)
        assert exchange(first, b"still here") == b"still here"  # while that lookup waits
        server.release()
        assert receive(second, len(b"second")) == b"second"


@contextlib.contextmanager
def client(protocol: str, address: str) -> Iterator[socket.socket]:
    """A client of the relay: a TCP connection, or a UDP socket connected to it."""
    if protocol == "tcp":
        sock = connect(address)
    else:
        sock = socket.socket(type=socket.SOCK_DGRAM)
        sock.settimeout(TIMEOUT)
        sock.connect(inet(address))
    with sock:
        yield sock


def exchange(sock: socket.socket, data: bytes) -> bytes:
    sock.send(data)
    return receive(sock, len(data))


def receive(sock: socket.socket, size: int) -> bytes:
    return recv_exactly(sock, size) if sock.type == socket.SOCK_STREAM else sock.recv(size)
