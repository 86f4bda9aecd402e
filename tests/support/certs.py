"""Certificates for the TLS tests, made by the tests with the `cryptography` package (a test
dependency): a CA with P-256 keys, the server and client certificates it issues, an intermediate
CA, CRLs, and the PEM files sockd's config names (a chain file: the leaf first)."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = datetime.timedelta(days=1)
# What a server certificate names unless a test says otherwise: the loopback addresses the tests
# connect to, and a name to ask for by SNI.
SERVER_NAME = "sockd.test"
LOOPBACK = ("127.0.0.1", "::1")


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def subject(common_name: str | None) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])


@dataclass(frozen=True)
class Files:
    """A certificate chain file and its key file."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Issued:
    """A certificate, its key, and the CA certificates between it and the root (none for a
    certificate the root signed)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    intermediates: tuple[x509.Certificate, ...] = ()

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @property
    def not_after(self) -> float:
        return self.cert.not_valid_after_utc.timestamp()

    def chain_pem(self) -> bytes:
        """The chain as a server presents it: the leaf first, then its intermediates."""
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in (self.cert, *self.intermediates))

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def write(self, directory: Path, name: str) -> Files:
        """`name`.pem (the chain) and `name`.key in `directory`."""
        files = Files(directory / f"{name}.pem", directory / f"{name}.key")
        files.cert.write_bytes(self.chain_pem())
        files.key.write_bytes(self.key_pem())
        return files


class CA:
    """A certificate authority: a root, or an intermediate (`CA.intermediate`)."""

    cert: x509.Certificate

    def __init__(self, name: str = "sockd test CA", parent: CA | None = None) -> None:
        self.name = name
        self.key = _key()
        self.parent = parent
        builder = self._builder(subject(name), self.key.public_key(), now() - DAY, now() + 3650 * DAY)
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        signer = parent.key if parent else self.key
        issuer = parent.cert.subject if parent else subject(name)
        self.cert = builder.issuer_name(issuer).sign(signer, hashes.SHA256())

    def intermediate(self, name: str = "sockd test intermediate CA") -> CA:
        return CA(name, parent=self)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """This CA's certificate and its parents', below the root: what follows a leaf it issues."""
        return (self.cert, *self.parent.chain) if self.parent else ()

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path, name: str = "ca") -> Path:
        path = directory / f"{name}.pem"
        path.write_bytes(self.pem())
        return path

    def server(
        self,
        *dns_names: str,
        ips: Sequence[str] = LOOPBACK,
        common_name: str | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> Issued:
        """A server certificate for `dns_names` (SERVER_NAME unless some are given) and `ips`."""
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names or (SERVER_NAME,)]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        return self.issue(
            subject(common_name if common_name is not None else (dns_names or (SERVER_NAME,))[0]),
            names,
            ExtendedKeyUsageOID.SERVER_AUTH,
            not_before,
            not_after,
        )

    def client(
        self,
        common_name: str | None = "client",
        dns_names: Iterable[str] = (),
        uris: Iterable[str] = (),
        not_after: datetime.datetime | None = None,
    ) -> Issued:
        """A client certificate for `common_name`, with these DNS and URI SANs (SPIFFE IDs)."""
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        names += [x509.UniformResourceIdentifier(uri) for uri in uris]
        return self.issue(subject(common_name), names, ExtendedKeyUsageOID.CLIENT_AUTH, None, not_after)

    def expired(self) -> Issued:
        """A server certificate whose validity ended yesterday."""
        return self.server(not_before=now() - 30 * DAY, not_after=now() - DAY)

    def issue(
        self,
        name: x509.Name,
        alt_names: Sequence[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> Issued:
        """A leaf certificate with any subject and SANs (none: no subjectAltName extension)."""
        key = _key()
        start = not_before or now() - DAY
        builder = self._builder(name, key.public_key(), start, not_after or now() + 90 * DAY)
        if alt_names:  # critical when the subject is empty (RFC 5280)
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=not name)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        cert = builder.issuer_name(self.cert.subject).sign(self.key, hashes.SHA256())
        return Issued(cert, key, self.chain)

    def crl(self, revoked: Iterable[Issued], next_update: datetime.timedelta = DAY) -> bytes:
        """A CRL, as PEM, revoking these certificates this CA issued."""
        builder = x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
        builder = builder.last_update(now() - DAY).next_update(now() + next_update)
        for issued in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(issued.serial).revocation_date(now() - DAY)
            builder = builder.add_revoked_certificate(entry.build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def _builder(
        self,
        name: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        not_before: datetime.datetime,
        not_after: datetime.datetime,
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
        )
