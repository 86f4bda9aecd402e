"""Clients of a TLS listener: `openssl s_client` held open for many requests, a Python ssl
session (net.Session over TLS), and a ClientHello; the certificates they are given come
from support.certs."""

from __future__ import annotations

import contextlib
import os
import select
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509

from support.certs import SERVER_NAME, Files
from support.daemon import require
from support.net import Session, connect, inet, read_to_eof
from support.waits import TIMEOUT

# A TLS version as the config, the openssl command, Python's ssl and sockd's metrics name it.
VERSIONS = {
    "1.2": ("-tls1_2", ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
    "1.3": ("-tls1_3", ssl.TLSVersion.TLSv1_3, "TLSv1.3"),
}


def client_context(ca: Path, version: str | None = None, cert: Files | None = None) -> ssl.SSLContext:
    """A client that trusts `ca`, checks the server's name, speaks only `version` if given, and
    presents `cert` if given."""
    context = ssl.create_default_context(cafile=str(ca))
    if version is not None:
        context.minimum_version = context.maximum_version = VERSIONS[version][1]
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    return context


class TLSSession(Session):
    """net.Session over TLS: unique payloads on one connection, each reply read whole and compared."""

    def __init__(self, address: str, name: str, context: ssl.SSLContext, server_name: str = SERVER_NAME) -> None:
        super().__init__(address, name)
        self.sock = context.wrap_socket(self.sock, server_hostname=server_name)


def tls_request(address: str, context: ssl.SSLContext, payload: bytes, server_name: str = SERVER_NAME) -> bytes:
    """Send `payload` over TLS and read all the server says until it closes."""
    with context.wrap_socket(connect(address), server_hostname=server_name) as sock:
        if payload:
            sock.sendall(payload)
        return read_to_eof(sock)


def verifying(ca: Path, server_name: str = SERVER_NAME) -> tuple[str, ...]:
    """s_client's options to verify the server against `ca` and its name, and fail if it does not."""
    return ("-CAfile", str(ca), "-verify_return_error", "-verify_hostname", server_name, "-servername", server_name)


def s_client_command(address: str, *options: str) -> list[str]:
    host, port = inet(address)
    return [
        require("openssl"),
        "s_client",
        "-connect",
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        *options,
    ]


def s_client(address: str, *options: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """`openssl s_client` run to its end, given `input`: with -quiet it ignores the end of its
    input and ends with the server's close; without, it ends at the end of its input, after the
    handshake (and prints the server's certificate)."""
    return subprocess.run(
        s_client_command(address, *options), input=input, capture_output=True, timeout=TIMEOUT * 3, check=False
    )


def presented(output: bytes) -> x509.Certificate:
    """The server certificate an s_client run (without -quiet) printed."""
    return x509.load_pem_x509_certificate(output)


class SClient:
    """`openssl s_client` on one connection for as many requests as a test sends: what is written
    to its input goes to the server, what the server says comes back on its output. Commands
    (a line starting with Q or R) are off, and the end of its input ends the connection."""

    def __init__(self, address: str, *options: str) -> None:
        command = s_client_command(address, "-quiet", "-no_ign_eof", "-nocommands", *options)
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
        )

    def exchange(self, payload: bytes) -> bytes:
        """Write `payload` (under a pipe's 64 KiB, so that neither pipe fills while the other
        waits) and read as many bytes back, or fewer if s_client ends or the server is silent."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(payload)
        fd, received = self.process.stdout.fileno(), b""
        while len(received) < len(payload) and select.select([fd], [], [], TIMEOUT)[0]:
            chunk = os.read(fd, len(payload) - len(received))
            if not chunk:
                break
            received += chunk
        return received

    def close(self) -> tuple[int, str]:
        """End its input (s_client then closes the connection): its exit status and what it said."""
        assert self.process.stdin is not None
        assert self.process.stderr is not None
        self.process.stdin.close()
        code = self.process.wait(TIMEOUT)
        return code, self.process.stderr.read().decode(errors="replace")


@contextlib.contextmanager
def s_client_session(address: str, *options: str) -> Iterator[SClient]:
    client = SClient(address, *options)
    try:
        yield client
    finally:
        if client.process.poll() is None:
            client.process.kill()
        client.process.wait(TIMEOUT)
        for pipe in (client.process.stdin, client.process.stdout, client.process.stderr):
            if pipe is not None:
                pipe.close()


def client_hello() -> bytes:
    """A real client's first flight: its ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with contextlib.suppress(ssl.SSLWantReadError):
        ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=SERVER_NAME).do_handshake()
    return outgoing.read()
