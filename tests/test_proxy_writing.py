"""The PROXY protocol's writer (sockd.proxy.writing), in process: HAProxy's examples byte for byte,
then, for any addresses, ports and TLVs (hypothesis), a header that is well-formed as
doc/proxy-protocol.txt has it and says what it was given, read back by a decoder of the test's
own written from the spec; read back by sockd's reader too; and the addresses a real socket names."""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockd.proxy import wire
from sockd.proxy.reading import Endpoint, Reader
from sockd.proxy.writing import MAX_CN, UNVERIFIED, IPAddress, addresses, ssl_tlvs, tlv, v1, v2

from support import short_directory

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address

ports = st.integers(0, 65535)
ipv4 = st.builds(lambda address, port: (str(address), port), st.ip_addresses(v=4), ports)
ipv6 = st.builds(lambda address, port: (str(address), port), st.ip_addresses(v=6), ports)
inet = st.one_of(ipv4, ipv6)
# As sockd.proxy.reading names them: a host and port, a Unix socket's path, or nothing.
anything = st.one_of(st.none(), inet, st.text(min_size=1, max_size=108))
tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=8)

# v1's line, as the spec's section 2.1 has it.
V1_LINE = re.compile(rb"PROXY (TCP4|TCP6) (\S+) (\S+) (\d{1,5}) (\d{1,5})\r\n")


def mapped(endpoint: tuple[str, int], into: int) -> tuple[IPAddress, int]:
    """An endpoint in the family a header pairs it in: IPv4 beside IPv6 is IPv4-mapped."""
    address, port = ipaddress.ip_address(endpoint[0]), endpoint[1]
    if into == 4 or address.version == 6:
        return address, port
    return V6(f"::ffff:{address}"), port


def family_of(source: tuple[str, int], destination: tuple[str, int]) -> int:
    both = {ipaddress.ip_address(source[0]).version, ipaddress.ip_address(destination[0]).version}
    return 4 if both == {4} else 6


def read_v2(header: bytes) -> tuple[int, int, bytes, list[tuple[int, bytes]]]:
    """A v2 header as the spec lays it out: (command, family byte, address block, TLVs); every
    length checked."""
    assert header[:12] == wire.V2_SIGNATURE
    version_command, family, length = struct.unpack("!BBH", header[12:16])
    assert version_command >> 4 == 2
    assert len(header) == 16 + length
    block_length = wire.ADDRESS_LENGTHS[family >> 4]
    block = header[16 : 16 + block_length]
    return version_command & 0xF, family, block, read_tlvs(header[16 + block_length :])


def read_tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """TLVs one after the other, to the last byte (the SSL TLV's sub-TLVs too)."""
    found = []
    while data:
        assert len(data) >= 3
        kind, size = struct.unpack("!BH", data[:3])
        assert len(data) >= 3 + size
        found.append((kind, data[3 : 3 + size]))
        data = data[3 + size :]
    return found


# -- HAProxy's examples


def test_the_specs_v1_example_byte_for_byte() -> None:
    source, destination = ("192.168.0.1", 56324), ("192.168.0.11", 443)
    assert v1(source, destination) == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


def test_v1_writes_ipv6_and_an_ipv4_address_beside_one_as_haproxys_inet_ntop_does() -> None:
    assert v1(("2001:db8::1", 1), ("::1", 2)) == b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"
    assert v1(("10.0.0.1", 1), ("::1", 2)) == b"PROXY TCP6 ::ffff:10.0.0.1 ::1 1 2\r\n"
    assert v1(("::ffff:a00:1", 1), ("::1", 2)) == b"PROXY TCP6 ::ffff:10.0.0.1 ::1 1 2\r\n"


def test_a_client_without_an_ip_address_is_unknown_in_v1_and_local_in_v2() -> None:
    # None: a Unix socket's client; a path: one a PROXY header in front named by its socket's path.
    destination = ("127.0.0.1", 80)
    assert v1(None, destination) == v1(destination, None) == b"PROXY UNKNOWN\r\n"
    assert v1("/run/client.sock", "/run/server.sock") == b"PROXY UNKNOWN\r\n"
    assert v2(None, None) == v2("/run/client.sock", "/run/server.sock") == wire.V2_SIGNATURE + b"\x20\x00\x00\x00"


def test_a_v2_header_for_ipv4_byte_for_byte() -> None:
    header = v2(("127.0.0.2", 0x1234), ("127.0.0.1", 80), tlv(wire.PP2_TYPE_NOOP, b"ab"))
    assert header == (
        b"\r\n\r\n\x00\r\nQUIT\n"  # the signature
        b"\x21\x11\x00\x11"  # version 2, PROXY; AF_INET, STREAM; 12 + 5 bytes follow
        b"\x7f\x00\x00\x02\x7f\x00\x00\x01\x12\x34\x00\x50"
        b"\x04\x00\x02ab"
    )


def test_the_ssl_tlv_of_a_verified_client_byte_for_byte() -> None:
    said = ssl_tlvs("TLSv1.3", verified=True, reused=False, cn="alice", alpn="h2")
    assert said == (
        b"\x20\x00\x17"  # PP2_TYPE_SSL, 23 bytes
        b"\x07\x00\x00\x00\x00"  # PP2_CLIENT_SSL | CERT_CONN | CERT_SESS, verify 0
        b"\x21\x00\x07TLSv1.3"
        b"\x22\x00\x05alice"
        b"\x01\x00\x02h2"  # PP2_TYPE_ALPN
    )


# -- any addresses, ports and TLVs


@given(inet, inet)
def test_v1_is_one_line_of_at_most_107_bytes_naming_both_ends(
    source: tuple[str, int], destination: tuple[str, int]
) -> None:
    header = v1(source, destination)
    assert len(header) <= wire.V1_MAX
    match = V1_LINE.fullmatch(header)
    assert match is not None, header
    kind, src, dst, sport, dport = match.groups()
    family = family_of(source, destination)
    assert kind == (b"TCP4" if family == 4 else b"TCP6")
    said = [(ipaddress.ip_address(src.decode()), int(sport)), (ipaddress.ip_address(dst.decode()), int(dport))]
    assert said == [mapped(source, family), mapped(destination, family)]


@given(anything, anything, tlvs)
def test_v2_is_well_formed_and_says_what_it_was_given(
    source: Endpoint | None, destination: Endpoint | None, given_tlvs: list[tuple[int, bytes]]
) -> None:
    header = v2(source, destination, b"".join(tlv(kind, value) for kind, value in given_tlvs))
    command, family, block, found = read_v2(header)
    assert found == given_tlvs
    if not isinstance(source, tuple) or not isinstance(destination, tuple):  # no IP address
        assert (command, family, block) == (wire.LOCAL, 0x00, b"")
        return
    version = family_of(source, destination)
    assert command == wire.PROXY
    assert family == (0x11 if version == 4 else 0x21)
    size = 4 if version == 4 else 16
    src, dst = ipaddress.ip_address(block[:size]), ipaddress.ip_address(block[size : 2 * size])
    sport, dport = struct.unpack("!HH", block[2 * size :])
    assert [(src, sport), (dst, dport)] == [mapped(source, version), mapped(destination, version)]


@given(
    st.sampled_from(["TLSv1.2", "TLSv1.3"]),
    st.booleans(),
    st.booleans(),
    st.one_of(st.none(), st.text(max_size=80)),
    st.one_of(st.none(), st.text(st.characters(codec="ascii"), min_size=1, max_size=255)),
)
def test_the_ssl_tlvs_say_the_version_the_certificate_and_the_alpn(
    version: str, verified: bool, reused: bool, cn: str | None, alpn: str | None
) -> None:
    said = ssl_tlvs(version, verified=verified, reused=reused, cn=cn, alpn=alpn)
    (kind, ssl), *rest = read_tlvs(said)
    assert kind == wire.PP2_TYPE_SSL
    client, verify = struct.unpack("!BI", ssl[:5])
    subs = read_tlvs(ssl[5:])
    expected_subs = [(wire.PP2_SUBTYPE_SSL_VERSION, version.encode())]
    if verified:
        assert verify == 0
        certificate = wire.PP2_CLIENT_CERT_SESS | (0 if reused else wire.PP2_CLIENT_CERT_CONN)
        assert client == wire.PP2_CLIENT_SSL | certificate
        if cn is not None:
            expected_subs.append((wire.PP2_SUBTYPE_SSL_CN, cn.encode()))
    else:
        assert (client, verify) == (wire.PP2_CLIENT_SSL, UNVERIFIED)
    assert subs == expected_subs
    assert rest == ([] if alpn is None else [(wire.PP2_TYPE_ALPN, alpn.encode())])


def test_a_cn_too_long_to_be_a_real_one_is_left_out() -> None:
    said = ssl_tlvs("TLSv1.3", verified=True, reused=False, cn="x" * (MAX_CN + 1), alpn=None)
    [(_, ssl)] = read_tlvs(said)
    assert read_tlvs(ssl[5:]) == [(wire.PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3")]


def test_what_overflows_a_length_field_is_refused_not_cut() -> None:
    with pytest.raises(ValueError, match="a TLV's value holds at most 65535 bytes, not 65536"):
        tlv(wire.PP2_TYPE_NOOP, bytes(65536))
    fills = tlv(wire.PP2_TYPE_NOOP, bytes(65535 - 3))
    assert len(v2(None, None, fills)) == 16 + 65535
    with pytest.raises(ValueError, match="at most 65535 bytes after its first 16, not 65547"):
        v2(("127.0.0.1", 1), ("127.0.0.1", 2), fills)


# -- what a socket names


def test_a_tcp_connection_names_its_client_and_the_address_it_reached() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            port = client.getsockname()[1]
            assert addresses(accepted) == (("127.0.0.1", port), ("127.0.0.1", server.getsockname()[1]))


def test_an_ipv6_connection_names_its_ends() -> None:
    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with server:
        client = socket.create_connection(server.getsockname()[:2])
        accepted, _ = server.accept()
        with client, accepted:
            port = client.getsockname()[1]
            assert addresses(accepted) == (("::1", port), ("::1", server.getsockname()[1]))


class LinkLocal:
    """A socket's names on a link-local IPv6 connection, which loopback cannot make: each address
    comes with its interface."""

    family = socket.AF_INET6

    def getpeername(self) -> tuple[str, int, int, int]:
        return ("fe80::1%eth0", 40000, 0, 2)

    def getsockname(self) -> tuple[str, int, int, int]:
        return ("fe80::2%eth0", 22, 0, 2)


def test_a_link_local_address_is_sent_without_its_interface() -> None:
    assert v1(*addresses(LinkLocal())) == b"PROXY TCP6 fe80::1 fe80::2 40000 22\r\n"


def test_a_unix_client_and_one_gone_have_no_address() -> None:
    with short_directory() as directory:
        path = str(Path(directory) / "s")
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            server.listen()
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(path)
                accepted, _ = server.accept()
                with accepted:
                    assert addresses(accepted) == (None, None)
    unconnected = socket.socket()
    with unconnected:
        assert addresses(unconnected) == (None, None)
    assert addresses(None) == (None, None)


# -- read back by sockd's reader (sockd.proxy.reading)

reader_tlvs = st.lists(
    st.one_of(
        st.tuples(st.just(wire.PP2_TYPE_ALPN), st.binary(min_size=1, max_size=255)),
        st.tuples(st.just(wire.PP2_TYPE_AUTHORITY), st.text(max_size=255).map(str.encode)),
        st.tuples(st.just(wire.PP2_TYPE_UNIQUE_ID), st.binary(max_size=wire.PP2_UNIQUE_ID_MAX)),
        st.tuples(st.sampled_from([wire.PP2_TYPE_NOOP, wire.PP2_TYPE_SSL, 0xE0]), st.binary(max_size=64)),
    ),
    max_size=6,
)


def first(found: list[tuple[int, bytes]], kind: int) -> bytes | None:
    return next((value for each, value in found if each == kind), None)


@given(st.sampled_from(["v1", "v2"]), anything, anything, reader_tlvs, st.binary(max_size=64))
def test_sockds_reader_reads_back_what_the_writer_wrote(
    version: str,
    source: Endpoint | None,
    destination: Endpoint | None,
    given_tlvs: list[tuple[int, bytes]],
    after: bytes,
) -> None:
    if version == "v1":
        header = v1(source, destination)
    else:
        header = v2(source, destination, b"".join(tlv(kind, value) for kind, value in given_tlvs))
    read = Reader("any").feed(header + after)
    assert read is not None
    said, rest = read
    assert rest == after
    if not isinstance(source, tuple) or not isinstance(destination, tuple):
        assert (said.source, said.destination) == (None, None)
        return
    assert isinstance(said.source, tuple)
    assert isinstance(said.destination, tuple)
    family = family_of(source, destination)
    assert mapped(said.source, family) == mapped(source, family)
    assert mapped(said.destination, family) == mapped(destination, family)
    if version == "v2":
        authority = first(given_tlvs, wire.PP2_TYPE_AUTHORITY)
        assert said.unique_id == first(given_tlvs, wire.PP2_TYPE_UNIQUE_ID)
        assert said.alpn == first(given_tlvs, wire.PP2_TYPE_ALPN)
        assert said.authority == (None if authority is None else authority.decode())


def test_sockds_reader_takes_the_ssl_tlvs_of_a_tls_client() -> None:
    said = ssl_tlvs("TLSv1.3", verified=True, reused=False, cn="relay-client", alpn="h2")
    read = Reader("v2").feed(v2(("192.0.2.7", 51000), ("192.0.2.1", 443), said))
    assert read is not None
    header, rest = read
    assert (header.source, header.destination, header.alpn, rest) == (
        ("192.0.2.7", 51000),
        ("192.0.2.1", 443),
        b"h2",
        b"",
    )
