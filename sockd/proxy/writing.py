"""The PROXY protocol's writer: the header a relay with `upstream_proxy_protocol` sends its
upstream before any byte of the client's (HAProxy's `send-proxy` and `send-proxy-v2`).

It is written as HAProxy writes it (make_proxy_line, in its src/connection.c), so that whatever
reads HAProxy's header reads this one. The ends it names are the reader's Endpoints (a host and
port, or a Unix socket's path): the client's as the listener knows it (its socket's peer, or what
a PROXY header in front named) and the address it reached. Two IP addresses of one family are
TCP4 (AF_INET in v2) or TCP6 (AF_INET6); an IPv4 address beside an IPv6 one is given as
IPv4-mapped IPv6. A client without an IP address (a Unix socket's) is v1's `UNKNOWN` and v2's
LOCAL command with no address, after which the receiver must use the connection's own addresses;
v2 could carry a Unix client's paths in an AF_UNIX block, but HAProxy's reader (2.6 and since)
then parses its TLVs from the header's first byte, and refuses the connection.

v2 carries TLVs besides: with TLS terminated by the listener, PP2_TYPE_SSL (the version, whether
the client showed a verified certificate, and its subject's CN) and PP2_TYPE_ALPN, as HAProxy's
`send-proxy-v2-ssl-cn` sends them.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Protocol

from sockd.proxy.reading import Endpoint
from sockd.proxy.wire import (
    AF_INET,
    AF_INET6,
    AF_UNSPEC,
    LOCAL,
    MAX_LENGTH,
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_SSL,
    PROXY,
    STREAM,
    UNSPEC,
    V1_PREFIX,
    V2_SIGNATURE,
    V2_VERSION,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Inet = tuple[IPAddress, int]

UNKNOWN = V1_PREFIX + b"UNKNOWN\r\n"
# The SSL TLV's verify field when the client showed no verified certificate: the spec asks for
# anything but zero (HAProxy leaves it zero, which a reader would take for a verified client);
# this is OpenSSL's X509_V_ERR_UNSPECIFIED.
UNVERIFIED = 1
# A client certificate's CN longer than this is left out of the SSL TLV (RFC 5280 allows 64
# characters; OpenSSL takes what a CA signed): what a client shows cannot make the header overflow
# its length field, which the CN, the version and the ALPN together stay well within.
MAX_CN = 4096

_V2_LENGTH = struct.Struct("!BBH")  # version and command, family and transport, the length after
_TLV = struct.Struct("!BH")
_SSL = struct.Struct("!BI")  # the SSL TLV's client bits and verify field
_PORTS = struct.Struct("!HH")
_MAPPED = b"\0" * 10 + b"\xff\xff"  # an IPv4-mapped IPv6 address's first 12 bytes


def v1(source: Endpoint | None, destination: Endpoint | None) -> bytes:
    """A version 1 header: `PROXY TCP4|TCP6 source destination sport dport\\r\\n`, or
    `PROXY UNKNOWN\\r\\n` unless both ends have an IP address; at most 104 bytes (V1_MAX: 107)."""
    ends = _inet(source, destination)
    if ends is None:
        return UNKNOWN
    (src, sport), (dst, dport) = ends
    family, name = (socket.AF_INET, b"TCP4") if src.version == 4 else (socket.AF_INET6, b"TCP6")
    # inet_ntop, as HAProxy writes them: an IPv4-mapped address ends in dotted quad.
    texts = (socket.inet_ntop(family, src.packed).encode(), socket.inet_ntop(family, dst.packed).encode())
    return b"%s%s %s %s %d %d\r\n" % (V1_PREFIX, name, *texts, sport, dport)


def v2(source: Endpoint | None, destination: Endpoint | None, tlvs: bytes = b"") -> bytes:
    """A version 2 header, its TLVs (`tlv`'s, joined) after the addresses: the PROXY command with
    both ends' addresses, or the LOCAL command without any unless both have an IP address. A
    ValueError if the addresses and TLVs exceed the header's length field (MAX_LENGTH)."""
    ends = _inet(source, destination)
    if ends is None:
        command, family, block = LOCAL, AF_UNSPEC << 4 | UNSPEC, b""
    else:
        (src, sport), (dst, dport) = ends
        command = PROXY
        family = (AF_INET if src.version == 4 else AF_INET6) << 4 | STREAM
        block = src.packed + dst.packed + _PORTS.pack(sport, dport)
    length = len(block) + len(tlvs)
    if length > MAX_LENGTH:
        raise ValueError(f"a PROXY v2 header holds at most {MAX_LENGTH} bytes after its first 16, not {length}")
    return V2_SIGNATURE + _V2_LENGTH.pack(V2_VERSION | command, family, length) + block + tlvs


def tlv(kind: int, value: bytes) -> bytes:
    """One TLV of type `kind` (a ValueError if `value` is longer than MAX_LENGTH)."""
    if len(value) > MAX_LENGTH:
        raise ValueError(f"a TLV's value holds at most {MAX_LENGTH} bytes, not {len(value)}")
    return _TLV.pack(kind, len(value)) + value


def ssl_tlvs(version: str, *, verified: bool, reused: bool, cn: str | None, alpn: str | None) -> bytes:
    """What v2 says of a client's TLS, terminated by the listener: PP2_TYPE_SSL with its
    `version` ("TLSv1.3", as OpenSSL names it) and, if the client showed a `verified`
    certificate, the bits that say so (on this connection, unless its session was `reused`, when
    the certificate came with the connection that began it) and its subject's `cn`; then
    PP2_TYPE_ALPN with the protocol the handshake chose, if any."""
    client, verify = PP2_CLIENT_SSL, UNVERIFIED
    if verified:
        client |= PP2_CLIENT_CERT_SESS if reused else PP2_CLIENT_CERT_SESS | PP2_CLIENT_CERT_CONN
        verify = 0
    inner = _SSL.pack(client, verify) + tlv(PP2_SUBTYPE_SSL_VERSION, version.encode("ascii"))
    if verified and cn is not None:
        name = cn.encode()
        if len(name) <= MAX_CN:
            inner += tlv(PP2_SUBTYPE_SSL_CN, name)
    said = tlv(PP2_TYPE_SSL, inner)
    if alpn is not None:
        said += tlv(PP2_TYPE_ALPN, alpn.encode("ascii"))
    return said


def _inet(source: Endpoint | None, destination: Endpoint | None) -> tuple[Inet, Inet] | None:
    """Both ends as IP addresses of one family (an IPv4 address beside an IPv6 one becomes
    IPv4-mapped), or None unless both have one. A link-local address's interface (fe80::1%eth0),
    which is this host's, is dropped."""
    if not isinstance(source, tuple) or not isinstance(destination, tuple):
        return None
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        src, dst = _as_ipv6(src), _as_ipv6(dst)
    return (src, source[1]), (dst, destination[1])


def _as_ipv6(address: IPAddress) -> IPAddress:
    return address if address.version == 6 else ipaddress.IPv6Address(_MAPPED + address.packed)


class Named(Protocol):
    """What a connection's socket says of its ends (a socket, or uvloop's stand-in for one)."""

    @property
    def family(self) -> int: ...

    def getpeername(self) -> object: ...

    def getsockname(self) -> object: ...


def addresses(sock: Named | None) -> tuple[Endpoint | None, Endpoint | None]:
    """The client and the address it connected to, as the connection's socket names them: both
    None for a Unix socket's client (no IP address), or for a client gone already (its socket
    too, as uvloop's transport says once closed)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None, None
    try:
        return _endpoint(sock.getpeername()), _endpoint(sock.getsockname())
    except OSError:
        return None, None


def _endpoint(name: object) -> tuple[str, int]:
    assert isinstance(name, tuple)
    return name[0], name[1]
