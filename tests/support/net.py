"""Loopback clients: stream connections, datagrams, persistent sessions, ports held or squatted,
and forged datagrams."""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator

from support.daemon import require
from support.waits import TIMEOUT


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A loopback TCP port held by a client connection alone, no server on it, until the block
    ends: sockd's start waits to bind it (see sockd.bind_retry), which holds sockd with
    its modules imported and its signals caught, before anything serves. The connection is then
    reset (SO_LINGER 0: no TIME-WAIT), and sockd binds the port within a retry."""
    with socket.create_server(("127.0.0.1", 0)) as server, socket.socket() as client:
        client.bind(("127.0.0.1", 0))  # no SO_REUSEADDR: sockd's bind conflicts with it
        client.connect(server.getsockname())
        try:
            yield client.getsockname()[1]
        finally:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def free_port() -> int:
    """A loopback TCP port free now, for a listener that must keep its port across restarts (port 0
    would give each start another)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# What sockd logs while it waits for a held port (see held_port).
WAITING_FOR_CONNECTIONS = "address in use by connections, not a server: waiting for them to end"


def connect(address: str, timeout: float = TIMEOUT, source: str | None = None) -> socket.socket:
    """A stream connection to a listener's logged address: host:port, [v6]:port or a path; from
    the loopback address `source` if given (any of 127.0.0.0/8 is this host's)."""
    if address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address)
        return sock
    return socket.create_connection(inet(address), timeout=timeout, source_address=source and (source, 0))


def inet(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def listen_backlog(address: str) -> int:
    """The backlog of the socket listening at a listener's logged address (host:port or a Unix
    socket path), as the kernel holds it: ss(8) shows it as a listening socket's Send-Q."""
    query = ["-Hlx", "src", address] if address.startswith("/") else ["-Hltn", f"sport = :{inet(address)[1]}"]
    shown = subprocess.run([require("ss"), *query], capture_output=True, text=True, check=True, timeout=TIMEOUT)
    (line,) = shown.stdout.splitlines()
    fields = line.split()
    return int(fields[fields.index("LISTEN") + 2])  # State, Recv-Q, Send-Q


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def said(address: str) -> bytes:
    """Everything the server says to a client that says nothing, until it closes (a greeting:
    daytime's line, an agent's answer)."""
    with connect(address) as sock:
        return read_to_eof(sock)


def request(address: str, payload: bytes) -> bytes:
    """Send `payload`, half-close, and read everything the server sends until it closes."""
    with connect(address) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return read_to_eof(sock)


def datagram(address: str, payload: bytes, timeout: float = TIMEOUT) -> bytes:
    host, port = inet(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(payload, (host, port))
        reply, sender = sock.recvfrom(65536)
        assert sender[:2] == (host, port)
        return reply


@contextlib.contextmanager
def squatting(protocol: str) -> Iterator[str]:
    """A loopback port held by someone else, as a listener address."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def forge_datagram(source: tuple[str, int], destination: tuple[str, int], payload: bytes) -> None:
    """Send a UDP datagram over IPv4 that claims to come from `source`, any address and port, as
    an attacker would (CVE-1999-0103): a raw socket, so root only. The IP header's length and
    checksum are left to the kernel; the UDP checksum is 0, which IPv4 reads as none."""
    udp = struct.pack("!HHHH", source[1], destination[1], 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,  # IPv4, a 20-byte header
        0,
        20 + len(udp),
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(source[0]),
        socket.inet_aton(destination[0]),
    )
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:  # IP_HDRINCL implied
        raw.sendto(ip + udp, (destination[0], 0))


# ---------------------------------------------------------------------------------------------
# Persistent sessions and the processes that hold them: what a reload's old generation serves.


class SessionEnded(AssertionError):
    """The server ended a session's input (EOF) before the whole reply came back."""


class Session:
    """A persistent stream connection doing request/response on an echo (or a relay to one):
    every payload is unique, and every reply is read in full and compared byte for byte."""

    def __init__(self, address: str, name: str, timeout: float = TIMEOUT) -> None:
        self.name = name
        self.sock = connect(address, timeout=timeout)
        self.exchanges = 0

    def payload(self, size: int) -> bytes:
        head = f"{self.name}#{self.exchanges}|".encode()
        body = bytes((self.exchanges + i) % 251 for i in range(max(0, size - len(head))))
        return head + body

    def exchange(self, size: int = 64) -> None:
        """One request and its whole reply: SessionEnded at an EOF, AssertionError if the reply
        differs, OSError (a reset, a timeout) as the socket raises it."""
        payload = self.payload(size)
        self.sock.sendall(payload)
        reply = recv_exactly(self.sock, len(payload))
        if len(reply) < len(payload) and payload.startswith(reply):
            raise SessionEnded(f"{self.name}: EOF after {self.exchanges} replies and {len(reply)} bytes of the next")
        if reply != payload:
            raise AssertionError(f"{self.name}: sent {payload[:40]!r}…, got {reply[:40]!r}…")
        self.exchanges += 1

    def state(self) -> str:
        """Without sending anything: "open", "eof" (the server closed it) or "reset"."""
        timeout = self.sock.gettimeout()
        self.sock.settimeout(0)  # non-blocking: with a timeout, Python would wait for data
        try:
            data = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return "open"
        except ConnectionResetError:
            return "reset"
        finally:
            self.sock.settimeout(timeout)
        return "eof" if data == b"" else f"unexpected {data!r}"

    def close(self) -> None:
        self.sock.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """`size` bytes, or fewer if the peer ends its output first."""
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(size - got, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


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


def echo(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    sock.sendall(payload)
    return receive(sock, len(payload))


def receive(sock: socket.socket, size: int) -> bytes:
    """`size` bytes, or fewer if the server closes first."""
    received = b""
    while len(received) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def served(address: str) -> bool:
    """Whether a new connection is served (not closed at once by a limit)."""
    try:
        return request(address, b"again") == b"again"
    except OSError as exc:
        # Closed at once: reset while sending, or before the half-close (ENOTCONN).
        if isinstance(exc, ConnectionError) or exc.errno == errno.ENOTCONN:
            return False
        raise
