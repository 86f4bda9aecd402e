"""The PROXY protocol's wire format (doc/proxy-protocol.txt, sections 2.1 and 2.2), shared by the
reader and the writer."""

from __future__ import annotations

# Version 1: one line of text, at most 107 bytes with its CRLF.
V1_PREFIX = b"PROXY "
V1_MAX = 107
# Version 2: a 12-byte signature, then version and command, family and transport, the length of
# what follows (addresses and TLVs), big-endian.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16  # the signature and the four bytes after it
V2_VERSION = 0x20
LOCAL, PROXY = 0x0, 0x1  # the command: a balancer's own connection (a health check), or a client's
# Family (high nibble) and transport (low nibble) of the address block.
AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX = 0x0, 0x1, 0x2, 0x3
UNSPEC, STREAM, DGRAM = 0x0, 0x1, 0x2
# The address block's length for each family: two addresses and, but for AF_UNIX, two ports.
ADDRESS_LENGTHS = {AF_UNSPEC: 0, AF_INET: 12, AF_INET6: 36, AF_UNIX: 216}
# TLV types (section 2.2.x).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30
# The SSL TLV's client field: bits said of the client's connection and certificate.
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04
# The address block's fields: two IPv4 or IPv6 addresses and two ports, or two Unix paths of
# AF_UNIX_PATH bytes each (NUL-padded), all in network byte order.
AF_UNIX_PATH = 108
# A TLV's header: its type and the length of its value (big-endian), before the value.
TLV_HEADER = 3
# A TLV's length is at most this, as is the length of what follows the 16-byte header.
MAX_LENGTH = 0xFFFF
PP2_CRC32C_LENGTH = 4
PP2_UNIQUE_ID_MAX = 128  # section 2.2.5: "up to 128 bytes"


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli's polynomial, reflected
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes | bytearray) -> int:
    """The CRC32c of `data` (RFC 4960, appendix B), as PP2_TYPE_CRC32C carries it: of the whole
    header, its own four bytes zero."""
    crc = 0xFFFFFFFF
    table = _CRC32C
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
