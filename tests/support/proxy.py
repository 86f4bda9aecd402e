"""PROXY headers as a balancer sends them, built by the tests themselves (not by sockd's writer,
so that each side checks the other): a version 2 header of any command, family and block, its
TLVs, and a client's header of either version."""

from __future__ import annotations

import ipaddress
import struct

from sockd.proxy.wire import AF_INET, AF_INET6, AF_UNSPEC, LOCAL, PROXY, STREAM, V2_SIGNATURE

# Where the clients of the tests' headers connected to (TEST-NET-1, as the clients are TEST-NET-1's too).
SERVER = ("192.0.2.1", 443)


def v2(command: int, family: int, block: bytes, transport: int = STREAM) -> bytes:
    """A version 2 header: `block` is its addresses and TLVs."""
    return V2_SIGNATURE + bytes([0x20 | command, family << 4 | transport]) + struct.pack("!H", len(block)) + block


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def header(version: str, client: tuple[str, int], server: tuple[str, int] = SERVER, tlvs: bytes = b"") -> bytes:
    """The header a balancer of `version` ("v1", "v2") sends for `client` connected to `server`."""
    source, destination = ipaddress.ip_address(client[0]), ipaddress.ip_address(server[0])
    if version == "v1":
        return f"PROXY TCP{source.version} {source} {destination} {client[1]} {server[1]}\r\n".encode()
    block = source.packed + destination.packed + struct.pack("!HH", client[1], server[1])
    return v2(PROXY, AF_INET if source.version == 4 else AF_INET6, block + tlvs)


# A balancer's health check: a connection of its own, which names no client.
LOCAL_HEADER = v2(LOCAL, AF_UNSPEC, b"", 0)
