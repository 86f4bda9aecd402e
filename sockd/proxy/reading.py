"""Reading a PROXY header (doc/proxy-protocol.txt), sans-IO: a `Reader` is fed the bytes a
connection brings, split however they came, and answers with None (more is needed), or the
`Header` and the bytes that came after it; anything else is an `InvalidHeader`, with its reason,
and never another exception. What it holds is bounded by the header's own bound: 107 bytes for
version 1, 16 and the length it announces (at most 65,535) for version 2.

As the spec asks, it is strict: version 1 is one line of printable ASCII ending in CRLF within
107 bytes (no lone CR or LF), with exactly the fields and single spaces the spec lists, IPv4
addresses without leading zeros, ports without them, and both addresses of the family named;
version 2 has a known version, command, family and transport, an address block at least as
long as its family's, TLVs that fit the header exactly, and, if it carries a CRC32c, a header
that matches it. A malformed header is refused as soon as the bytes that make it so arrive,
not when the rest would have come. Which version a listener takes is its config's: `v1` and
`v2` refuse the other, `any` takes either, told apart by the first byte.

`LOCAL` (a balancer's own connection, its health check), `UNKNOWN` and an unspecified family
name no client: the connection's own addresses are the client's (a Header with no `source`).
Of the TLVs, the connection's log keeps UNIQUE_ID, AUTHORITY and ALPN; the others are skipped.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from sockd.config import ProxyVersion
from sockd.proxy.wire import (
    ADDRESS_LENGTHS,
    AF_INET,
    AF_UNIX,
    AF_UNIX_PATH,
    AF_UNSPEC,
    DGRAM,
    LOCAL,
    PP2_CRC32C_LENGTH,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_UNIQUE_ID,
    PP2_UNIQUE_ID_MAX,
    PROXY,
    TLV_HEADER,
    UNSPEC,
    V1_MAX,
    V1_PREFIX,
    V2_HEADER,
    V2_SIGNATURE,
    V2_VERSION,
    crc32c,
)

# An endpoint a header names: (host, port) for TCP over IPv4 or IPv6, a path for a Unix socket.
Endpoint = tuple[str, int] | str

_SIGNATURE = len(V2_SIGNATURE)
_CR = 0x0D


class InvalidHeader(Exception):
    """What a connection sent is not a valid PROXY header (of the version its listener takes)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Header:
    """What a PROXY header said. `source` is the client, `destination` the address it connected
    to; both None when the header names none (LOCAL, UNKNOWN, an unspecified family): the
    connection's own addresses are then the client's."""

    version: int
    source: Endpoint | None = None
    destination: Endpoint | None = None
    unique_id: bytes | None = None
    authority: str | None = None
    alpn: bytes | None = None

    def named(self) -> dict[str, object]:
        """The client, as a log line names it: its address and port, or its Unix socket's path
        (nothing, if the header names none)."""
        source = self.source
        if source is None:
            return {}
        if isinstance(source, str):
            return {"source": source}
        return {"source": source[0], "port": source[1]}

    def fields(self) -> dict[str, object]:
        """What the connection's log line says of it, beyond the client's address."""
        said: dict[str, object] = {}
        if self.unique_id is not None:
            said["unique_id"] = self.unique_id.decode("utf-8", "backslashreplace")
        if self.authority is not None:
            said["authority"] = self.authority
        if self.alpn is not None:
            said["alpn"] = self.alpn.decode("ascii", "backslashreplace")
        return said


class Reader:
    """One connection's header, read as its bytes come (see the module's docstring)."""

    __slots__ = ("accepts", "taken")

    def __init__(self, accepts: ProxyVersion) -> None:
        self.accepts = accepts
        self.taken = bytearray()  # what came before, short of a whole header

    @property
    def begun(self) -> bool:
        """Whether part of a header has come (and waits for the rest)."""
        return bool(self.taken)

    def feed(self, data: bytes) -> tuple[Header, bytes] | None:
        """The header and what came after it, or None until it is whole; InvalidHeader if what
        came cannot begin one. Not to be fed again once it has answered."""
        taken = self.taken
        if not data:
            return None
        if taken:
            taken += data
            buffer: bytes | bytearray = taken
        else:
            buffer = data  # the whole header in one read, as usual: nothing copied
        version = _version(buffer, self.accepts)
        parsed = _v1(buffer) if version == 1 else _v2(buffer)
        if parsed is None:
            if not taken:
                taken += data
            return None
        header, length = parsed
        self.taken = bytearray()
        return header, bytes(buffer[length:])


def _version(buffer: bytes | bytearray, accepts: ProxyVersion) -> int:
    """Which version `buffer` begins, by its first byte, or InvalidHeader if not one `accepts`."""
    first = buffer[0]
    if first == V1_PREFIX[0]:
        if accepts == "v2":
            raise InvalidHeader(_unexpected(buffer, V1_PREFIX, "a version 1 header where version 2 is expected"))
        return 1
    if first == V2_SIGNATURE[0]:
        if accepts == "v1":
            raise InvalidHeader(_unexpected(buffer, V2_SIGNATURE, "a version 2 header where version 1 is expected"))
        return 2
    raise InvalidHeader("not a PROXY header")


def _unexpected(buffer: bytes | bytearray, prefix: bytes, other: str) -> str:
    """Why a header of the other version is refused: it is refused at its first byte, which
    tells the versions apart; it is named so if what came so far does not belie it."""
    return other if buffer[: len(prefix)] == prefix[: len(buffer)] else "not a PROXY header"


def _v1(buffer: bytes | bytearray) -> tuple[Header, int] | None:
    """A version 1 line, and its length with its CRLF; None until its CRLF has come."""
    end = buffer.find(b"\r\n", 0, V1_MAX)
    line = buffer[: end if end >= 0 else V1_MAX]
    if line[: len(V1_PREFIX)] != V1_PREFIX[: len(line)] or 0 <= end < len(V1_PREFIX):
        raise InvalidHeader("not a PROXY header")
    if end < 0:
        if len(buffer) >= V1_MAX:
            raise InvalidHeader("no CRLF within 107 bytes")
        if line[-1] == _CR:  # maybe the CR of the CRLF, its LF to come
            line = line[:-1]
    if not (line.isascii() and line.decode("ascii").isprintable()):
        raise InvalidHeader("a version 1 line holds a byte other than printable ASCII")
    if end < 0:
        return None
    return _v1_fields(line.decode("ascii").split(" ")), end + 2


def _v1_fields(fields: list[str]) -> Header:
    """The fields of a whole version 1 line, after PROXY."""
    protocol = fields[1]
    if protocol == "UNKNOWN":  # the rest of the line, if any, is to be ignored
        return Header(1)
    if protocol not in ("TCP4", "TCP6"):
        raise InvalidHeader(f"unknown protocol {protocol[:8]!r}")
    if len(fields) != 6:
        raise InvalidHeader(f"{protocol} takes two addresses and two ports, one space apart")
    _, _, source, destination, source_port, destination_port = fields
    version = 4 if protocol == "TCP4" else 6
    return Header(
        1,
        (_v1_address(source, version), _v1_port(source_port)),
        (_v1_address(destination, version), _v1_port(destination_port)),
    )


def _v1_address(text: str, version: int) -> str:
    # Python's parsers refuse an IPv4 address's leading zeros, as the spec asks; an IPv6 scope
    # (%eth0) is no part of the spec's format.
    try:
        if version == 4:
            return str(ipaddress.IPv4Address(text))
        if "%" not in text:
            return str(ipaddress.IPv6Address(text))
    except ValueError:
        pass
    raise InvalidHeader(f"not an IPv{version} address: {text[:45]!r}")


def _v1_port(text: str) -> int:
    if text.isdigit() and len(text) <= 5 and (text == "0" or text[0] != "0") and int(text) <= 0xFFFF:
        return int(text)
    raise InvalidHeader(f"not a port: {text[:8]!r}")


def _v2(buffer: bytes | bytearray) -> tuple[Header, int] | None:
    """A version 2 header, and its length; None until all of it has come."""
    if buffer[:_SIGNATURE] != V2_SIGNATURE[: len(buffer)]:
        raise InvalidHeader("not a PROXY header")
    size = len(buffer)
    if size > _SIGNATURE:
        version_command = buffer[_SIGNATURE]
        if version_command & 0xF0 != V2_VERSION:
            raise InvalidHeader(f"version {version_command >> 4} (2 is the only one)")
        if version_command & 0x0F not in (LOCAL, PROXY):
            raise InvalidHeader(f"command {version_command & 0x0F} (LOCAL or PROXY)")
    if size > _SIGNATURE + 1:
        family = buffer[_SIGNATURE + 1]
        if family >> 4 not in ADDRESS_LENGTHS or family & 0x0F > DGRAM:
            raise InvalidHeader(f"family and transport 0x{family:02x}")
    if size < V2_HEADER:
        return None
    length = V2_HEADER + int.from_bytes(buffer[V2_HEADER - 2 : V2_HEADER], "big")
    if size < length:
        return None
    return _v2_block(buffer[:length]), length


def _v2_block(header: bytes | bytearray) -> Header:
    """A whole version 2 header: its addresses and TLVs."""
    family, transport = header[_SIGNATURE + 1] >> 4, header[_SIGNATURE + 1] & 0x0F
    if header[_SIGNATURE] & 0x0F == LOCAL or family == AF_UNSPEC or transport == UNSPEC:
        # The balancer's own connection, or a client it cannot name: its block is skipped.
        return Header(2)
    addresses = ADDRESS_LENGTHS[family]
    if len(header) < V2_HEADER + addresses:
        raise InvalidHeader(f"an address block of {len(header) - V2_HEADER} bytes, short of its family's {addresses}")
    block = bytes(header[V2_HEADER : V2_HEADER + addresses])
    source: Endpoint
    destination: Endpoint
    if family == AF_UNIX:
        source, destination = _path(block[:AF_UNIX_PATH]), _path(block[AF_UNIX_PATH:])
    else:
        size = 4 if family == AF_INET else 16
        make = ipaddress.IPv4Address if family == AF_INET else ipaddress.IPv6Address
        ports = 2 * size
        source = (str(make(block[:size])), int.from_bytes(block[ports : ports + 2], "big"))
        destination = (str(make(block[size:ports])), int.from_bytes(block[ports + 2 :], "big"))
    unique_id, authority, alpn = _tlvs(header, V2_HEADER + addresses)
    return Header(2, source, destination, unique_id, authority, alpn)


def _path(field: bytes) -> str:
    """A Unix socket's path, NUL-padded (an abstract socket's name begins with a NUL: none)."""
    return os.fsdecode(field.partition(b"\0")[0])


def _tlvs(header: bytes | bytearray, offset: int) -> tuple[bytes | None, str | None, bytes | None]:
    """The TLVs from `offset` to the header's end, each within it: what the log keeps of them
    (UNIQUE_ID, AUTHORITY, ALPN; the first of each), once a CRC32c among them is checked."""
    unique_id: bytes | None = None
    authority: str | None = None
    alpn: bytes | None = None
    end = len(header)
    while offset < end:
        if offset + TLV_HEADER > end:
            raise InvalidHeader("a TLV cut short by the header's end")
        kind = header[offset]
        start = offset + TLV_HEADER
        offset = start + int.from_bytes(header[offset + 1 : start], "big")
        if offset > end:
            raise InvalidHeader(f"a TLV (type 0x{kind:02x}) longer than what is left of the header")
        value = bytes(header[start:offset])
        if kind == PP2_TYPE_CRC32C:
            _check_crc32c(header, start, value)
        elif kind == PP2_TYPE_UNIQUE_ID and unique_id is None:
            if len(value) > PP2_UNIQUE_ID_MAX:
                raise InvalidHeader(f"a UNIQUE_ID of {len(value)} bytes (at most {PP2_UNIQUE_ID_MAX})")
            unique_id = value
        elif kind == PP2_TYPE_AUTHORITY and authority is None:
            try:
                authority = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidHeader("an AUTHORITY that is not UTF-8") from None
        elif kind == PP2_TYPE_ALPN and alpn is None:
            alpn = value
    return unique_id, authority, alpn


def _check_crc32c(header: bytes | bytearray, start: int, value: bytes) -> None:
    if len(value) != PP2_CRC32C_LENGTH:
        raise InvalidHeader(f"a CRC32C of {len(value)} bytes (4)")
    zeroed = bytearray(header)
    zeroed[start : start + PP2_CRC32C_LENGTH] = bytes(PP2_CRC32C_LENGTH)
    if crc32c(zeroed) != int.from_bytes(value, "big"):
        raise InvalidHeader("the header does not match its CRC32C")
