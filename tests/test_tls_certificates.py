"""sockd.tls.certificates, the DER reader of a certificate's expiry and names: what it reads agrees
with the `cryptography` package on certificates it made (with and without SANs and a subject,
UTCTime and GeneralizedTime validity, the string kinds a name may be), and on any bytes at all it
returns the facts or raises CertificateError, never another exception."""

from __future__ import annotations

import contextlib
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sockd.tls.certificates import CertificateError, Facts, facts, facts_of_pem, pem_blocks

from support import CA, Issued, subject

SERVER = ExtendedKeyUsageOID.SERVER_AUTH


def der(issued: Issued) -> bytes:
    return issued.cert.public_bytes(serialization.Encoding.DER)


def assert_agrees(issued: Issued) -> Facts:
    """The reader's facts are the cryptography package's."""
    cert = issued.cert
    found = facts(der(issued))
    assert found.not_after == cert.not_valid_after_utc.timestamp()
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert found.common_name == (names[-1].value if names else None)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        assert found.dns_names == ()
    else:
        assert list(found.dns_names) == san.get_values_for_type(x509.DNSName)
    return found


def test_a_server_certificate_with_names_and_addresses(tls_ca: CA) -> None:
    found = assert_agrees(tls_ca.server("a.example", "b.example"))
    assert found.dns_names == ("a.example", "b.example")
    assert found.common_name == "a.example"
    assert found.name == "a.example"


def test_a_certificate_without_subject_alternative_names(tls_ca: CA) -> None:
    found = assert_agrees(tls_ca.issue(subject("only-a-cn"), [], SERVER))
    assert (found.dns_names, found.name) == ((), "only-a-cn")


def test_a_certificate_without_a_subject(tls_ca: CA) -> None:
    found = assert_agrees(tls_ca.issue(x509.Name([]), [x509.DNSName("nameless.example")], SERVER))
    assert (found.common_name, found.name) == (None, "nameless.example")


def test_a_client_certificate_with_uris_and_no_dns_name(tls_ca: CA) -> None:
    found = assert_agrees(tls_ca.client("agent", uris=["spiffe://example.org/ns/prod/agent"]))
    assert (found.common_name, found.dns_names) == ("agent", ())


@pytest.mark.parametrize(
    "year",
    [
        pytest.param(2049, id="utctime"),  # RFC 5280: UTCTime through 2049
        pytest.param(2050, id="generalizedtime"),  # GeneralizedTime from 2050 on
        pytest.param(9999, id="generalizedtime_last_year"),
    ],
)
def test_validity_as_utctime_and_generalizedtime(tls_ca: CA, year: int) -> None:
    end = datetime.datetime(year, 12, 31, 23, 59, 58, tzinfo=datetime.UTC)
    found = assert_agrees(tls_ca.server(not_after=end))
    assert found.not_after == end.timestamp()


def test_an_expired_certificate_reads_its_past_expiry(tls_ca: CA) -> None:
    issued = tls_ca.expired()
    assert assert_agrees(issued).not_after < datetime.datetime.now(datetime.UTC).timestamp()


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (_ASN1Type.UTF8String, "Zoë ☃"),
        (_ASN1Type.PrintableString, "printable"),
        (_ASN1Type.IA5String, "ia5"),
        (_ASN1Type.T61String, "teletex"),
        (_ASN1Type.BMPString, "bmp ☃"),
        (_ASN1Type.UniversalString, "universal ☃"),
    ],
)
def test_a_common_name_in_each_string_kind(tls_ca: CA, kind: _ASN1Type, value: str) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value, _type=kind)])
    assert assert_agrees(tls_ca.issue(name, [], SERVER)).common_name == value


def test_several_common_names_read_as_the_last(tls_ca: CA) -> None:
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "first"), x509.NameAttribute(NameOID.COMMON_NAME, "last")]
    )
    assert assert_agrees(tls_ca.issue(name, [], SERVER)).common_name == "last"


def test_the_leaf_of_a_pem_chain_and_every_block(tls_ca: CA) -> None:
    intermediate = tls_ca.intermediate()
    leaf = intermediate.server("leaf.example")
    pem = leaf.chain_pem()
    assert facts_of_pem(pem).dns_names == ("leaf.example",)
    assert facts_of_pem(pem.decode()) == facts_of_pem(pem)
    assert [facts(block).common_name for block in pem_blocks(pem)] == ["leaf.example", intermediate.name]
    with pytest.raises(CertificateError, match="no certificate"):
        facts_of_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


def test_bad_base64_in_a_pem_block() -> None:
    with pytest.raises(CertificateError, match="base64"):
        pem_blocks(b"-----BEGIN CERTIFICATE-----\nnot*base64\n-----END CERTIFICATE-----\n")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "truncated"),
        (b"\x30", "truncated"),
        (b"\x30\x80\x00\x00", "indefinite length"),
        (b"\x30\x81\x05" + b"\x00" * 5, "shortest form"),
        (b"\x30\x82\x00\x90" + b"\x00" * 0x90, "shortest form"),
        (b"\x30\x85\x01\x00\x00\x00\x00", "more than 4 bytes"),
        (b"\x30\x05\x00", "truncated"),
        (b"\x1f\x01\x00", "tag number above 30"),
        (b"\x31\x00", "expected ASN.1 tag 0x30"),
        (b"\x30\x00\x00\x00", "unexpected bytes"),
    ],
)
def test_malformed_der_is_refused_with_the_reason(data: bytes, words: str) -> None:
    with pytest.raises(CertificateError, match=words):
        facts(data)


def _replace_time(tls_ca: CA, old: bytes, new: bytes) -> bytes:
    data = der(tls_ca.server(not_after=datetime.datetime(2049, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)))
    assert data.count(old) == 1
    return data.replace(old, new)


@pytest.mark.parametrize(
    ("new", "words"),
    [
        (b"\x17\x0d490102030405+", "not in UTC"),
        (b"\x17\x0d4901020304x5Z", "other than digits"),
        (b"\x17\x0d491302030405Z", "no date"),
        (b"\x18\x0d490102030405Z", "neither"),
    ],
)
def test_a_validity_time_not_as_rfc_5280_writes_it(tls_ca: CA, new: bytes, words: str) -> None:
    with pytest.raises(CertificateError, match=words):
        facts(_replace_time(tls_ca, b"\x17\x0d490102030405Z", new))


# -- any bytes: the facts or CertificateError

_SAMPLE = CA().server("fuzz.example")
SAMPLE = der(_SAMPLE)


def read_or_refuse(data: bytes) -> None:
    try:
        found = facts(data)
    except CertificateError:
        return
    assert isinstance(found, Facts)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048))
@example(SAMPLE)
def test_any_bytes_are_read_or_refused(data: bytes) -> None:
    read_or_refuse(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real certificate's DER, a few bytes of it changed, cut, or added."""
    data = bytearray(SAMPLE)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        at = draw(st.integers(min_value=0, max_value=len(data) - 1))
        match draw(st.sampled_from(["set", "cut", "insert", "truncate"])):
            case "set":
                data[at] = draw(st.integers(min_value=0, max_value=255))
            case "cut":
                del data[at : at + draw(st.integers(min_value=1, max_value=8))]
            case "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            case "truncate":
                del data[at:]
        if not data:
            break
    return bytes(data)


@settings(max_examples=1000, deadline=None)
@given(mutated())
def test_a_mutated_certificate_is_read_or_refused(data: bytes) -> None:
    read_or_refuse(data)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=512).map(lambda body: b"-----BEGIN CERTIFICATE-----\n" + body + b"\n-----END CERTIFICATE-----")
)
def test_any_pem_body_is_read_or_refused(pem: bytes) -> None:
    with contextlib.suppress(CertificateError):
        facts_of_pem(pem)
