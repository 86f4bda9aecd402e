"""The PROXY header reader on its own (sans-IO): headers the spec allows, each refusal the spec
asks for, and hypothesis's fuzzing: any bytes, in any split across reads, give a header or an
InvalidHeader and never anything else, within the header's memory bound; headers built here (an
encoder of the tests' own, independent of sockd's writer) come back as they were, with the
client's data after them, however both are split."""

from __future__ import annotations

import ipaddress
import itertools
import os
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sockd.config import ProxyVersion
from sockd.proxy.reading import Header, InvalidHeader, Reader
from sockd.proxy.wire import (
    AF_INET,
    AF_INET6,
    AF_UNIX,
    AF_UNSPEC,
    LOCAL,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    PROXY,
    V1_MAX,
    V2_HEADER,
    V2_SIGNATURE,
    crc32c,
)

from support.proxy import tlv, v2

VERSIONS: list[ProxyVersion] = ["v1", "v2", "any"]
FUZZ_EXAMPLES = 2000  # per property: tens of seconds on a loaded machine

Outcome = tuple[Header, bytes] | str | None  # a header and what follows, a refusal's reason, or "more"


def outcome(version: ProxyVersion, chunks: list[bytes]) -> Outcome:
    """What a reader says once fed `chunks` one after another (a header, and all that came after
    it), fed no more once it has answered. Its buffer never holds more than the header's bound."""
    reader = Reader(version)
    seen = b""
    for at, chunk in enumerate(chunks):
        seen += chunk
        try:
            read = reader.feed(chunk)
        except InvalidHeader as exc:
            refused = exc.reason
            break
        if read is not None:
            header, rest = read
            return header, rest + b"".join(chunks[at + 1 :])
        assert len(reader.taken) <= bound(seen), (len(reader.taken), seen[:32])
    else:
        return None
    assert refused
    assert "\n" not in refused  # one line in the log
    return refused


def bound(seen: bytes) -> int:
    """The most a reader may hold of what it was fed, `seen`: a version 1 line, or a version 2
    header of the length it announces (16 bytes until it has)."""
    if seen[:1] == b"P":
        return V1_MAX
    if len(seen) < V2_HEADER:
        return V2_HEADER
    return V2_HEADER + int.from_bytes(seen[14:16], "big")


def own(header: Header) -> ProxyVersion:
    """The config's name for the version a header is of."""
    return "v1" if header.version == 1 else "v2"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


# -- what the spec allows


INET = bytes([192, 0, 2, 1, 198, 51, 100, 7]) + struct.pack("!HH", 5000, 443)


@pytest.mark.parametrize(
    ("wire", "header"),
    [
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 5000 443\r\n", Header(1, ("192.0.2.1", 5000), ("198.51.100.7", 443))),
        (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", Header(1, ("0.0.0.0", 0), ("255.255.255.255", 65535))),
        (b"PROXY TCP6 2001:DB8::1 ::1 1 2\r\n", Header(1, ("2001:db8::1", 1), ("::1", 2))),
        (
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
            b" 65535 65535\r\n",
            Header(
                1,
                ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            ),
        ),
        (b"PROXY UNKNOWN\r\n", Header(1)),
        (b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535 whatever\r\n", Header(1)),  # the rest is ignored
        (v2(PROXY, AF_INET, INET), Header(2, ("192.0.2.1", 5000), ("198.51.100.7", 443))),
        (
            v2(
                PROXY, AF_INET6, ipaddress.IPv6Address("2001:db8::1").packed + bytes(15) + b"\x01" + b"\x00\x01\x00\x02"
            ),
            Header(2, ("2001:db8::1", 1), ("::1", 2)),
        ),
        (
            v2(PROXY, AF_UNIX, b"/run/a.sock".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")),
            Header(2, "/run/a.sock", "/run/b"),
        ),
        (v2(LOCAL, AF_UNSPEC, b"", 0), Header(2)),  # a balancer's health check
        (v2(LOCAL, AF_INET, INET), Header(2)),  # LOCAL: whatever the block says is ignored
        (v2(PROXY, AF_UNSPEC, b"anything", 0), Header(2)),  # a client the balancer cannot name
        (v2(PROXY, AF_INET, INET, 0), Header(2)),  # nor its transport
        (
            v2(
                PROXY,
                AF_INET,
                INET
                + tlv(PP2_TYPE_NOOP, b"")
                + tlv(PP2_TYPE_UNIQUE_ID, b"id-1")
                + tlv(PP2_TYPE_SSL, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"))
                + tlv(PP2_TYPE_AUTHORITY, "bücher.example".encode())
                + tlv(PP2_TYPE_ALPN, b"h2")
                + tlv(0xE0, b"custom")
                + tlv(PP2_TYPE_UNIQUE_ID, b"the first is kept"),
            ),
            Header(2, ("192.0.2.1", 5000), ("198.51.100.7", 443), b"id-1", "bücher.example", b"h2"),
        ),
    ],
)
def test_a_valid_header_is_read_and_what_follows_it_handed_on(wire: bytes, header: Header) -> None:
    for version in ("any", own(header)):
        assert Reader(version).feed(wire + b"GET / HTTP/1.1\r\n") == (header, b"GET / HTTP/1.1\r\n")
        assert outcome(version, [bytes([byte]) for byte in wire]) == (header, b"")


def test_a_header_with_a_crc32c_that_matches_is_read() -> None:
    # HAProxy 2.6's own, with `proxy-v2-options unique-id,crc32c`.
    wire = (
        b"\r\n\r\n\x00\r\nQUIT\n!\x11\x00D\x7f\x00\x00\x02\x7f\x00\x00\x01\xbe\xfb\xa25\x03\x00\x04\x1bC\xe7\xda"
        b"\x05\x00.7F000002:BEFB_7F000001:A235_6B15358C_0000:16E4"
    )
    header, rest = Reader("v2").feed(wire + b"hi") or (None, b"")
    assert header == Header(
        2, ("127.0.0.2", 48891), ("127.0.0.1", 41525), b"7F000002:BEFB_7F000001:A235_6B15358C_0000:16E4"
    )
    assert rest == b"hi"
    assert crc32c(b"123456789") == 0xE3069283  # RFC 4960's check value


def test_the_log_keeps_the_tlvs_as_text() -> None:
    header = Header(2, ("192.0.2.1", 1), ("192.0.2.2", 2), b"id\xff", "host.example", b"h2")
    assert header.fields() == {"unique_id": "id\\xff", "authority": "host.example", "alpn": "h2"}
    assert Header(1).fields() == {}


# -- what the spec refuses


def with_crc(block: bytes, wrong: bool = False) -> bytes:
    wire = v2(PROXY, AF_INET, block + tlv(PP2_TYPE_CRC32C, bytes(4)))
    crc = crc32c(wire) ^ (1 if wrong else 0)
    return wire[:-4] + struct.pack("!I", crc)


@pytest.mark.parametrize(
    ("version", "wire", "reason"),
    [
        ("any", b"GET / HTTP/1.1\r\n", "not a PROXY header"),
        ("any", b"\x16\x03\x01", "not a PROXY header"),  # a TLS ClientHello
        ("v1", b"PROXY\r\n", "not a PROXY header"),
        ("v1", b"PROXYTCP4", "not a PROXY header"),
        ("v1", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n", "a version 1 line holds a byte other than printable ASCII"),
        ("v1", b"PROXY TCP4 192.0.2.1\r192.0.2.2 1 2\r\n", "a version 1 line holds a byte other than printable ASCII"),
        ("v1", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\r\n", "a version 1 line holds a byte other than printable ASCII"),
        ("v1", b"PROXY UNKNOWN \xc3\xa9\r\n", "a version 1 line holds a byte other than printable ASCII"),
        ("v1", b"PROXY UNKNOWN" + b" " * 94, "no CRLF within 107 bytes"),
        ("v1", b"PROXY UNKNOWNS\r\n", "unknown protocol 'UNKNOWNS'"),
        ("v1", b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n", "unknown protocol 'TCP5'"),
        ("v1", b"PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n", "unknown protocol 'tcp4'"),
        ("v1", b"PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n", "TCP4 takes two addresses and two ports, one space apart"),
        ("v1", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n", "TCP4 takes two addresses and two ports, one space apart"),
        ("v1", b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n", "TCP4 takes two addresses and two ports, one space apart"),
        ("v1", b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n", "not an IPv4 address: '192.0.2.01'"),
        ("v1", b"PROXY TCP4 192.0.2.256 192.0.2.2 1 2\r\n", "not an IPv4 address: '192.0.2.256'"),
        ("v1", b"PROXY TCP4 ::1 192.0.2.2 1 2\r\n", "not an IPv4 address: '::1'"),
        ("v1", b"PROXY TCP6 ::1 192.0.2.2 1 2\r\n", "not an IPv6 address: '192.0.2.2'"),
        ("v1", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not an IPv6 address: 'fe80::1%eth0'"),
        ("v1", b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n", "not a port: '01'"),
        ("v1", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 65536\r\n", "not a port: '65536'"),
        ("v1", b"PROXY TCP4 192.0.2.1 192.0.2.2 +1 2\r\n", "not a port: '+1'"),
        ("v1", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 \r\n", "not a port: ''"),
        ("v1", v2(LOCAL, AF_UNSPEC, b"", 0), "a version 2 header where version 1 is expected"),
        ("v1", b"\n", "not a PROXY header"),
        ("v2", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n", "a version 1 header where version 2 is expected"),
        ("v2", b"SSH-2.0-OpenSSH_9.2", "not a PROXY header"),
        ("v2", b"\r\n\r\n\x00\r\nQUIT\r", "not a PROXY header"),
        ("v2", V2_SIGNATURE + b"\x11", "version 1 (2 is the only one)"),
        ("v2", V2_SIGNATURE + b"\x22", "command 2 (LOCAL or PROXY)"),
        ("v2", V2_SIGNATURE + b"\x21\x41", "family and transport 0x41"),
        ("v2", V2_SIGNATURE + b"\x21\x13", "family and transport 0x13"),
        ("v2", v2(PROXY, AF_INET, INET[:11]), "an address block of 11 bytes, short of its family's 12"),
        ("v2", v2(PROXY, AF_INET6, bytes(35)), "an address block of 35 bytes, short of its family's 36"),
        ("v2", v2(PROXY, AF_UNIX, bytes(215)), "an address block of 215 bytes, short of its family's 216"),
        ("v2", v2(PROXY, AF_INET, INET + b"\x04\x00"), "a TLV cut short by the header's end"),
        ("v2", v2(PROXY, AF_INET, INET + b"\x04\x00\x02x"), "a TLV (type 0x04) longer than what is left of the header"),
        (
            "v2",
            v2(PROXY, AF_INET, INET + tlv(PP2_TYPE_UNIQUE_ID, bytes(129))),
            "a UNIQUE_ID of 129 bytes (at most 128)",
        ),
        ("v2", v2(PROXY, AF_INET, INET + tlv(PP2_TYPE_AUTHORITY, b"\xff")), "an AUTHORITY that is not UTF-8"),
        ("v2", v2(PROXY, AF_INET, INET + tlv(PP2_TYPE_CRC32C, bytes(3))), "a CRC32C of 3 bytes (4)"),
        ("v2", with_crc(INET, wrong=True), "the header does not match its CRC32C"),
    ],
)
def test_what_the_spec_refuses_is_refused_with_its_reason(version: ProxyVersion, wire: bytes, reason: str) -> None:
    assert outcome(version, [wire]) == reason
    assert outcome(version, [bytes([byte]) for byte in wire]) == reason  # however it comes


def test_a_crc32c_that_matches_passes() -> None:
    assert outcome("v2", [with_crc(INET)]) == (Header(2, ("192.0.2.1", 5000), ("198.51.100.7", 443)), b"")


@pytest.mark.parametrize(
    ("version", "first", "reason"),
    [
        ("any", b"G", "not a PROXY header"),
        ("v1", b"PROXI", "not a PROXY header"),
        ("v2", V2_SIGNATURE + b"\x30", "version 3 (2 is the only one)"),
        ("v1", b"PROXY TCP4 192.0.2.1\n", "a version 1 line holds a byte other than printable ASCII"),
    ],
)
def test_a_refusal_comes_with_the_byte_that_decides_it_not_with_the_rest(
    version: ProxyVersion, first: bytes, reason: str
) -> None:
    assert outcome(version, [first]) == reason


def test_a_header_not_whole_yet_asks_for_more() -> None:
    assert outcome("any", [b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r"]) is None
    assert outcome("any", [V2_SIGNATURE + b"\x21\x11\x00\x0c" + INET[:11]]) is None
    assert Reader("any").feed(b"") is None


def test_a_version_2_header_may_announce_64_kib_and_is_held_until_it_is_whole() -> None:
    wire = v2(PROXY, AF_INET, INET + tlv(PP2_TYPE_NOOP, bytes(0xFFFF - 12 - 3)))
    assert len(wire) == V2_HEADER + 0xFFFF
    assert outcome("v2", split(wire, list(range(0, len(wire), 4096)))) == (
        Header(2, ("192.0.2.1", 5000), ("198.51.100.7", 443)),
        b"",
    )


# -- fuzzing


@dataclass(frozen=True)
class Built:
    """A header as the tests encode it, and what the reader must make of it."""

    wire: bytes
    header: Header


def v1_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address, exploded: bool) -> str:
    return address.exploded if exploded and address.version == 6 else str(address)


@st.composite
def v1_headers(draw: st.DrawFn) -> Built:
    if draw(st.booleans()):
        tail = draw(st.sampled_from(["", " 192.0.2.1 192.0.2.2 1 2", " anything at all"]))
        return Built(f"PROXY UNKNOWN{tail}\r\n".encode(), Header(1))
    family = draw(st.sampled_from([4, 6]))
    addresses = st.ip_addresses(v=4) if family == 4 else st.ip_addresses(v=6)
    source, destination = draw(addresses), draw(addresses)
    ports = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
    exploded = draw(st.booleans())
    line = f"PROXY TCP{family} {v1_address(source, exploded)} {v1_address(destination, exploded)} {ports[0]} {ports[1]}"
    header = Header(1, (str(source), ports[0]), (str(destination), ports[1]))
    return Built(f"{line}\r\n".encode(), header)


KEPT = (PP2_TYPE_UNIQUE_ID, PP2_TYPE_AUTHORITY, PP2_TYPE_ALPN, PP2_TYPE_CRC32C)
unknown_tlvs = st.tuples(st.integers(0, 255).filter(lambda kind: kind not in KEPT), st.binary(max_size=64))
paths = st.lists(st.integers(1, 255), min_size=1, max_size=108).map(bytes)  # NUL ends a path


@st.composite
def v2_headers(draw: st.DrawFn) -> Built:
    # Mostly a client's (what names none is a few bytes, and is skipped whole).
    command = draw(st.sampled_from([LOCAL, PROXY, PROXY, PROXY]))
    family = draw(st.sampled_from([AF_UNSPEC, AF_INET, AF_INET, AF_INET6, AF_INET6, AF_UNIX]))
    transport = draw(st.sampled_from([0, 1, 1, 1, 2]))
    source: tuple[str, int] | str
    destination: tuple[str, int] | str
    if family == AF_UNIX:
        paths_drawn = draw(paths), draw(paths)
        block = b"".join(path.ljust(108, b"\0") for path in paths_drawn)
        source, destination = os.fsdecode(paths_drawn[0]), os.fsdecode(paths_drawn[1])
    elif family in (AF_INET, AF_INET6):
        drawn = st.ip_addresses(v=4) if family == AF_INET else st.ip_addresses(v=6)
        addresses = draw(drawn), draw(drawn)
        ports = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
        block = addresses[0].packed + addresses[1].packed + struct.pack("!HH", *ports)
        source, destination = (str(addresses[0]), ports[0]), (str(addresses[1]), ports[1])
    else:
        block = draw(st.binary(max_size=32))  # whatever an unspecified family carries, skipped
    unique_id = draw(st.none() | st.binary(max_size=128))
    authority = draw(st.none() | st.text(max_size=64))
    alpn = draw(st.none() | st.binary(max_size=32))
    tlvs = [tlv(kind, value) for kind, value in draw(st.lists(unknown_tlvs, max_size=4))]
    for kind, value in ((PP2_TYPE_UNIQUE_ID, unique_id), (PP2_TYPE_ALPN, alpn)):
        if value is not None:
            tlvs.append(tlv(kind, value))
    if authority is not None:
        tlvs.append(tlv(PP2_TYPE_AUTHORITY, authority.encode()))
    tlvs = draw(st.permutations(tlvs))
    crc = draw(st.booleans()) and family != AF_UNSPEC
    if crc:
        tlvs.insert(draw(st.integers(0, len(tlvs))), tlv(PP2_TYPE_CRC32C, bytes(4)))
    wire = v2(command, family, block + b"".join(tlvs), transport)
    if crc:
        at = wire.index(tlv(PP2_TYPE_CRC32C, bytes(4)), V2_HEADER + len(block)) + 3
        wire = wire[:at] + struct.pack("!I", crc32c(wire)) + wire[at + 4 :]
    if command == LOCAL or family == AF_UNSPEC or transport == 0:
        return Built(wire, Header(2))
    return Built(wire, Header(2, source, destination, unique_id, authority, alpn))


headers = st.one_of(v1_headers(), v2_headers())


@st.composite
def garbage(draw: st.DrawFn) -> bytes:
    """Bytes near a header as often as far from one: random, or a valid header cut short,
    with bytes changed, inserted or removed."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    wire = bytearray(draw(headers).wire)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(wire)))
        how = draw(st.sampled_from(["change", "insert", "remove", "cut"]))
        if how == "change" and at < len(wire):
            wire[at] = draw(st.integers(0, 255))
        elif how == "insert":
            wire[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif how == "remove":
            del wire[at : at + draw(st.integers(1, 4))]
        elif how == "cut":
            del wire[at:]
    return bytes(wire) + draw(st.binary(max_size=16))


@settings(max_examples=FUZZ_EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(data=garbage(), version=st.sampled_from(VERSIONS), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_any_bytes_in_any_split_give_a_header_or_a_refusal_and_nothing_else(
    data: bytes, version: ProxyVersion, cuts: list[int]
) -> None:
    whole = outcome(version, [data])
    pieces = outcome(version, split(data, cuts))
    event("header" if isinstance(whole, tuple) else "refused" if isinstance(whole, str) else "more")
    # However the bytes came, the same verdict: the same header and rest, or a refusal (a split
    # may be refused sooner, for the first byte that makes it one), or a wait for more.
    assert type(pieces) is type(whole)
    if isinstance(whole, tuple):
        assert pieces == whole


@settings(max_examples=FUZZ_EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(built=headers, data=st.binary(max_size=64), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_a_header_built_here_comes_back_with_the_clients_data_however_both_are_split(
    built: Built, data: bytes, cuts: list[int]
) -> None:
    event(f"v{built.header.version}, {'no client named' if built.header.source is None else 'a client'}")
    expected = (built.header, data)
    assert outcome("any", [built.wire + data]) == expected
    assert outcome(own(built.header), split(built.wire + data, cuts)) == expected
    other: ProxyVersion = "v2" if built.header.version == 1 else "v1"
    assert isinstance(outcome(other, split(built.wire + data, cuts)), str)
