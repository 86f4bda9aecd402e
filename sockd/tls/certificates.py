"""The facts sockd needs of an X.509 certificate (when it expires, its subject's common name, its
DNS names), read from its DER by a reader of the little of ASN.1 a certificate is made of.

Python's ssl reads a certificate only once a handshake has verified it, and only as a dict of
strings; the supervisor needs the facts of the certificates it serves (for their expiry on
/metrics, and to refuse an expired one at --check) without a handshake, and without another
dependency. The reader is strict (DER: definite, shortest lengths; nothing after the end) and
bounded (every length is checked against what is left), and whatever the bytes, it returns the
facts or raises CertificateError: never another exception.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from dataclasses import dataclass

# Universal tags (X.690), and the context-specific ones a certificate uses.
BOOLEAN, INTEGER, BIT_STRING, OCTET_STRING, OID = 0x01, 0x02, 0x03, 0x04, 0x06
UTF8_STRING, PRINTABLE_STRING, TELETEX_STRING, IA5_STRING = 0x0C, 0x13, 0x14, 0x16
UTC_TIME, GENERALIZED_TIME, UNIVERSAL_STRING, BMP_STRING = 0x17, 0x18, 0x1C, 0x1E
SEQUENCE, SET = 0x30, 0x31
VERSION, EXTENSIONS, DNS_NAME = 0xA0, 0xA3, 0x82  # [0] EXPLICIT, [3] EXPLICIT, [2] IMPLICIT IA5String

COMMON_NAME = bytes([0x55, 0x04, 0x03])  # 2.5.4.3
SUBJECT_ALT_NAME = bytes([0x55, 0x1D, 0x11])  # 2.5.29.17

# How each DirectoryString kind is decoded (TeletexString as Latin-1, as OpenSSL shows it).
_TEXT = {
    UTF8_STRING: "utf-8",
    PRINTABLE_STRING: "ascii",
    IA5_STRING: "ascii",
    TELETEX_STRING: "latin-1",
    BMP_STRING: "utf-16-be",
    UNIVERSAL_STRING: "utf-32-be",
}

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n(.*?)-----END CERTIFICATE-----", re.DOTALL)


class CertificateError(ValueError):
    """Bytes that are not a certificate this reader can read."""


@dataclass(frozen=True)
class Facts:
    not_after: float  # the end of its validity, Unix time
    common_name: str | None  # the subject's CN (the last, if it has several), or None
    dns_names: tuple[str, ...]  # its subjectAltName's dNSName entries, in order

    @property
    def name(self) -> str | None:
        """The name a person knows it by: its first DNS name, or else its common name."""
        return self.dns_names[0] if self.dns_names else self.common_name


def pem_blocks(pem: str | bytes) -> list[bytes]:
    """The DER of each certificate in PEM text, in order (CertificateError for bad base64)."""
    text = pem.encode("latin-1") if isinstance(pem, str) else pem
    try:
        return [base64.b64decode(body, validate=False) for body in _PEM_CERTIFICATE.findall(text)]
    except binascii.Error as exc:
        raise CertificateError(f"bad base64 in a certificate: {exc}") from None


def facts_of_pem(pem: str | bytes) -> Facts:
    """The facts of the first certificate in PEM text (a chain's leaf)."""
    blocks = pem_blocks(pem)
    if not blocks:
        raise CertificateError("no certificate (-----BEGIN CERTIFICATE-----)")
    return facts(blocks[0])


def facts(der: bytes) -> Facts:
    """The facts of one certificate, from its DER."""
    certificate = _Reader(der).only(SEQUENCE)
    tbs = certificate.take(SEQUENCE)
    certificate.take(SEQUENCE)  # signatureAlgorithm
    certificate.take(BIT_STRING)  # signatureValue
    certificate.end()
    if tbs.peek() == VERSION:
        tbs.take(VERSION)
    tbs.take(INTEGER)  # serialNumber
    tbs.take(SEQUENCE)  # signature
    tbs.take(SEQUENCE)  # issuer
    validity = tbs.take(SEQUENCE)
    validity.take_time()  # notBefore
    not_after = validity.take_time()
    validity.end()
    subject = tbs.take(SEQUENCE)
    tbs.take(SEQUENCE)  # subjectPublicKeyInfo
    dns_names: tuple[str, ...] = ()
    while not tbs.done():
        tag, field = tbs.take_any()
        if tag == EXTENSIONS:
            dns_names = _dns_names(field.only(SEQUENCE))
        # issuerUniqueID [1] and subjectUniqueID [2]: not needed
    return Facts(not_after, _common_name(subject), dns_names)


def _common_name(name: _Reader) -> str | None:
    """The subject's last CN: as Go's crypto/x509 (ghostunnel's) reads it."""
    found = None
    while not name.done():
        relative = name.take(SET)
        while not relative.done():
            attribute = relative.take(SEQUENCE)
            oid = attribute.take(OID).rest()
            tag, value = attribute.take_any()
            attribute.end()
            if oid == COMMON_NAME:
                found = _text(tag, value.rest())
    return found


def _dns_names(extensions: _Reader) -> tuple[str, ...]:
    names: tuple[str, ...] = ()
    while not extensions.done():
        extension = extensions.take(SEQUENCE)
        oid = extension.take(OID).rest()
        if extension.peek() == BOOLEAN:
            extension.take(BOOLEAN)  # critical
        value = extension.take(OCTET_STRING)
        extension.end()
        if oid == SUBJECT_ALT_NAME:
            general_names = value.only(SEQUENCE)
            found = []
            while not general_names.done():
                tag, entry = general_names.take_any()
                if tag == DNS_NAME:
                    found.append(_text(IA5_STRING, entry.rest()))
            names = tuple(found)
    return names


def _text(tag: int, value: bytes) -> str:
    encoding = _TEXT.get(tag)
    if encoding is None:
        raise CertificateError(f"a name of ASN.1 type {tag:#04x}, not a string")
    try:
        return value.decode(encoding)
    except UnicodeDecodeError:
        raise CertificateError(f"a name that is not {encoding}") from None


class _Reader:
    """DER's tag-length-value items, one after another, within bytes[start:stop]."""

    def __init__(self, data: bytes, start: int = 0, stop: int | None = None) -> None:
        self.data = data
        self.at = start
        self.stop = len(data) if stop is None else stop

    def done(self) -> bool:
        return self.at >= self.stop

    def end(self) -> None:
        if not self.done():
            raise CertificateError(f"{self.stop - self.at} unexpected bytes at the end of an item")

    def peek(self) -> int | None:
        return None if self.done() else self.data[self.at]

    def rest(self) -> bytes:
        return self.data[self.at : self.stop]

    def take_any(self) -> tuple[int, _Reader]:
        """The next item's tag, and a reader of its contents."""
        if self.stop - self.at < 2:
            raise CertificateError("truncated: an item's tag and length are missing")
        tag, first = self.data[self.at], self.data[self.at + 1]
        if tag & 0x1F == 0x1F:
            raise CertificateError("a tag number above 30 (no certificate field has one)")
        at = self.at + 2
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0:
                raise CertificateError("an indefinite length (BER, not DER)")
            if count > 4:
                raise CertificateError("a length of more than 4 bytes")
            if self.stop - at < count:
                raise CertificateError("truncated: an item's length is cut short")
            length = int.from_bytes(self.data[at : at + count], "big")
            if length < 0x80 or length >> (8 * (count - 1)) == 0:
                raise CertificateError("a length not in its shortest form (BER, not DER)")
            at += count
        if length > self.stop - at:
            raise CertificateError(f"truncated: an item of {length} bytes where {self.stop - at} are left")
        self.at = at + length
        return tag, _Reader(self.data, at, at + length)

    def take(self, expected: int) -> _Reader:
        tag, item = self.take_any()
        if tag != expected:
            raise CertificateError(f"expected ASN.1 tag {expected:#04x}, found {tag:#04x}")
        return item

    def only(self, expected: int) -> _Reader:
        """The one item these bytes hold."""
        item = self.take(expected)
        self.end()
        return item

    def take_time(self) -> float:
        tag, item = self.take_any()
        text = item.rest()
        if tag == UTC_TIME and len(text) == 13:
            year, rest = int(_digits(text[:2])), text[2:]
            year += 1900 if year >= 50 else 2000  # RFC 5280: YY of 50 or more is 19YY
        elif tag == GENERALIZED_TIME and len(text) == 15:
            year, rest = int(_digits(text[:4])), text[4:]
        else:
            raise CertificateError("a validity time that is neither YYMMDDHHMMSSZ nor YYYYMMDDHHMMSSZ")
        if rest[-1:] != b"Z":
            raise CertificateError("a validity time not in UTC (Z)")
        digits = _digits(rest[:-1])
        month, day, hour, minute, second = (int(digits[i : i + 2]) for i in range(0, 10, 2))
        try:
            when = datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.UTC)
        except ValueError as exc:
            raise CertificateError(f"a validity time that is no date: {exc}") from None
        return when.timestamp()


def _digits(text: bytes) -> str:
    if not (text.isascii() and text.isdigit()):
        raise CertificateError("a validity time with something other than digits")
    return text.decode("ascii")
