"""The TLS files a config names (certificate chains, keys, CA bundles, CRLs), read and checked when
the config is loaded (`sockd --check`, the start, each reload), into `TLSMaterial`: PEM text that
travels to the workers in their spec (sockd.spec), so that a worker reads no file. A file that is
missing, unreadable, not PEM, a key that does not match its certificate, a CA bundle or CRL that
OpenSSL cannot load, or a certificate already expired is a config problem at the field that names
it (`sockd.yaml:12: listeners[0].tls.cert: no such file: /x.pem`).

Also how the material is handed to OpenSSL, which loads certificates and keys only from files:
through a memfd (`/proc/self/fd/N`), closed once loaded (sockd.tls.contexts builds on it).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import itertools
import os
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from sockd.config import (
    MAX_FILE_BYTES,
    Config,
    Listener,
    Problem,
    TLSConfig,
    TLSFiles,
    config_warnings,
    load_document,
    read_regular,
    reason,
)
from sockd.tls.certificates import CertificateError, Facts, facts, pem_blocks


class _Material(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KeyPair(_Material):
    """A certificate chain (leaf first) and its key, as PEM."""

    cert: str
    key: str = Field(repr=False)  # never in a log line or a traceback


class ServerMaterial(_Material):
    """What a TLS listener serves: its default certificate, one per SNI name, and what verifies
    its clients."""

    default: KeyPair
    sni: dict[str, KeyPair] = {}  # by the name as the config writes it
    client_ca: str | None = None
    crl: str | None = None


class UpstreamMaterial(_Material):
    """What a relay to a tls:// upstream verifies it by (upstream_ca, else the system's CA bundle
    as it was at load), and the client certificate it shows, if any."""

    ca: str
    client: KeyPair | None = None


class TLSMaterial(_Material):
    """A listener's TLS material: its own (a `tls` block), its upstream's (a tls:// upstream), or both."""

    server: ServerMaterial | None = None
    upstream: UpstreamMaterial | None = None


Material = dict[str, TLSMaterial]  # by listener name: the listeners with TLS on either side


@dataclass(frozen=True)
class Loaded:
    """A config, and the TLS material of its listeners, read together; and what is valid in it but
    worth a warning (sockd.config.rules.config_warnings), as `file:line: field: message` lines."""

    config: Config
    material: Material
    warnings: tuple[str, ...]


def load_config(path: str | os.PathLike[str]) -> Loaded:
    """The config file at `path` and the TLS files it names; every problem of either is a line
    of a ConfigError, as `sockd --check` prints them."""
    document = load_document(path)
    material, problems = read_material(document.config)
    if problems:
        raise document.error(problems)
    return Loaded(document.config, material, tuple(document.lines(config_warnings(document.config.listeners))))


def read_material(config: Config) -> tuple[Material, list[Problem]]:
    """Every listener's TLS material, or the problems of the files it names (each placed at the
    field that names the file)."""
    material: Material = {}
    problems: list[Problem] = []
    for index, listener in enumerate(config.listeners):
        reading = _Reading(("listeners", index), problems)
        server = _server(listener.tls, reading) if listener.tls is not None else None
        upstream = _upstream(listener, reading) if relays_to_tls(listener) else None
        if server is not None or upstream is not None:
            material[listener.name] = TLSMaterial(server=server, upstream=upstream)
    return material, problems


def relays_to_tls(listener: Listener) -> bool:
    """Whether the listener relays to a tls:// upstream."""
    return listener.upstream is not None and listener.upstream_endpoint[0] == "tls"


@dataclass(frozen=True)
class Expiry:
    """When a certificate sockd presents ends (Unix time), and the name it is presented by."""

    listener: str
    server_name: str
    not_after: float


def expiries(material: Material) -> list[Expiry]:
    """Every certificate the listeners present: a TLS listener's default one (by its first DNS
    name, else its CN, else "default"), one per SNI name (by that name), and a relay's client
    certificate for its upstream ("upstream"). A name already taken by another of the listener's
    certificates is left for the role's ("default 2" at worst): each sample has labels of its own."""
    found = []
    for listener, tls in material.items():
        presented: list[tuple[str | None, str, KeyPair]] = []
        if tls.server is not None:
            # SNI's first: a client asking for a name gets that name's certificate, which owns it.
            presented += [(name, "sni", pair) for name, pair in tls.server.sni.items()]
            presented.append((_facts(tls.server.default).name, "default", tls.server.default))
        if tls.upstream is not None and tls.upstream.client is not None:
            presented.append((None, "upstream", tls.upstream.client))
        taken: set[str] = set()
        for name, role, pair in presented:
            candidates = itertools.chain((name, role), (f"{role} {n}" for n in itertools.count(2)))
            label = next(label for label in candidates if label and label not in taken)
            taken.add(label)
            found.append(Expiry(listener, label, _facts(pair).not_after))
    return found


def _facts(pair: KeyPair) -> Facts:
    """The facts of a pair's leaf certificate (found readable when it was loaded)."""
    return facts(pem_blocks(pair.cert)[0])


# -- handing material to OpenSSL


def load_pair(context: ssl.SSLContext, pair: KeyPair) -> None:
    """`context` presents this certificate chain and key."""
    with _memfd(pair.cert) as cert, _memfd(pair.key) as key:
        context.load_cert_chain(cert, key, password=_no_password)


def load_crl(context: ssl.SSLContext, crl: str) -> None:
    """`context`'s store holds these CRLs (cadata takes certificates only; a file, CRLs too)."""
    with _memfd(crl) as path:
        context.load_verify_locations(cafile=path)


@contextlib.contextmanager
def _memfd(text: str) -> Iterator[str]:
    fd = os.memfd_create("sockd-tls", os.MFD_CLOEXEC)
    try:
        data = memoryview(text.encode("ascii"))
        while data:
            data = data[os.write(fd, data) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _no_password() -> bytes:
    # Without a callback, OpenSSL would ask for a passphrase on the terminal. read_material refuses
    # an encrypted key first; this only keeps a worker from ever waiting on a prompt.
    raise ssl.SSLError("the key is encrypted")


# -- reading and checking the files

# PEM blocks: their kind, and the text between BEGIN and END (headers, if any, and base64).
_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_KEY_KINDS = ("PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY", "ENCRYPTED PRIVATE KEY")
At = tuple[str | int, ...]  # a field's place in the config


@dataclass
class _Reading:
    """The files of one listener, read one by one; each problem found is added to `problems`,
    at the field that names the file (under `at`, the listener's place)."""

    at: At
    problems: list[Problem]

    def problem(self, field: At, message: str) -> None:
        self.problems.append(((*self.at, *field), message))

    def pem(self, field: At, path: str) -> dict[str, list[str]] | None:
        """The PEM blocks of the file at `path`, by kind; None if it cannot be read."""
        try:
            raw = read_regular(path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                self.problem(field, f"no such file: {path}")
            else:
                self.problem(field, f"cannot read {path}: {reason(exc)}")
            return None
        if len(raw) > MAX_FILE_BYTES:
            self.problem(field, f"{path} is larger than {MAX_FILE_BYTES >> 20} MiB: not a TLS file")
            return None
        # Only the blocks are kept: a bundle's comments may be in any encoding, PEM is ASCII.
        blocks: dict[str, list[str]] = {}
        for match in _PEM.finditer(raw.decode("latin-1")):
            if not match[0].isascii():
                self.problem(field, f"{path} is not PEM: a -----BEGIN {match[1]}----- block holds non-ASCII bytes")
                return None
            blocks.setdefault(match[1], []).append(match[0] + "\n")
        if not blocks and raw[:1] == b"\x30":  # an ASN.1 SEQUENCE: DER, the binary form
            self.problem(field, f"{path} is DER, not PEM: convert it (openssl x509 -inform der -in FILE -out FILE.pem)")
            return None
        return blocks

    def certificates(self, field: At, path: str) -> str | None:
        """The certificates of a file, as PEM, each one OpenSSL reads."""
        blocks = self.pem(field, path)
        if blocks is None:
            return None
        certificates = "".join(blocks.get("CERTIFICATE", []))
        if not certificates:
            self.problem(field, f"no certificate in {path} (PEM: -----BEGIN CERTIFICATE-----)")
            return None
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=certificates)
        except ssl.SSLError as exc:
            self.problem(field, f"OpenSSL cannot read the certificates in {path}: {_openssl(exc)}")
            return None
        return certificates

    def chain(self, field: At, path: str) -> str | None:
        """A certificate chain, leaf first, its leaf not expired."""
        chain = self.certificates(field, path)
        if chain is None:
            return None
        try:
            leaf = facts(pem_blocks(chain)[0])
        except CertificateError as exc:
            self.problem(field, f"the certificate in {path} cannot be read: {exc}")
            return None
        if leaf.not_after < time.time():
            self.problem(field, f"the certificate in {path} expired on {_moment(leaf.not_after)}")
            return None
        return chain

    def key(self, field: At, path: str) -> str | None:
        blocks = self.pem(field, path)
        if blocks is None:
            return None
        keys = [(kind, block) for kind in _KEY_KINDS for block in blocks.get(kind, [])]
        if not keys:
            self.problem(field, f"no private key in {path} (PEM: -----BEGIN PRIVATE KEY-----)")
            return None
        if len(keys) > 1:
            self.problem(field, f"{path} holds {len(keys)} private keys: give one")
            return None
        kind, key = keys[0]
        if kind == "ENCRYPTED PRIVATE KEY" or "\nProc-Type: 4,ENCRYPTED" in key:  # PKCS#8's, or a legacy key's
            self.problem(field, f"the key in {path} is encrypted: sockd reads unencrypted keys (keep the file private)")
            return None
        return key

    def pair(self, cert: tuple[At, str], key: tuple[At, str], server: bool) -> KeyPair | None:
        """A certificate chain and its key, each (field, path), checked to go together."""
        (cert_field, cert_path), (key_field, key_path) = cert, key
        chain, private = self.chain(cert_field, cert_path), self.key(key_field, key_path)
        if chain is None or private is None:
            return None
        pair = KeyPair(cert=chain, key=private)
        try:
            load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT), pair)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                self.problem(key_field, f"the key does not match the certificate in {cert_path}")
            else:
                self.problem(key_field, f"OpenSSL cannot load the key in {key_path}: {_openssl(exc)}")
            return None
        return pair

    def crl(self, field: At, path: str) -> str | None:
        blocks = self.pem(field, path)
        if blocks is None:
            return None
        crls = "".join(blocks.get("X509 CRL", []))
        if not crls:
            self.problem(field, f"no CRL in {path} (PEM: -----BEGIN X509 CRL-----)")
            return None
        try:
            load_crl(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), crls)
        except ssl.SSLError as exc:
            self.problem(field, f"OpenSSL cannot read the CRL in {path}: {_openssl(exc)}")
            return None
        return crls


def _server(tls: TLSConfig, reading: _Reading) -> ServerMaterial | None:
    default = reading.pair((("tls", "cert"), tls.cert), (("tls", "key"), tls.key), server=True)
    sni = {name: _sni(reading, name, files) for name, files in tls.sni.items()}
    client_ca = reading.certificates(("tls", "client_ca"), tls.client_ca) if tls.client_ca is not None else None
    crl = reading.crl(("tls", "crl"), tls.crl) if tls.crl is not None else None
    if default is None or (tls.client_ca and client_ca is None) or (tls.crl and crl is None):
        return None
    pairs = {name: pair for name, pair in sni.items() if pair is not None}
    if len(pairs) < len(sni):
        return None
    return ServerMaterial(default=default, sni=pairs, client_ca=client_ca, crl=crl)


def _sni(reading: _Reading, name: str, files: TLSFiles) -> KeyPair | None:
    at = ("tls", "sni", name)
    return reading.pair(((*at, "cert"), files.cert), ((*at, "key"), files.key), server=True)


def _upstream(listener: Listener, reading: _Reading) -> UpstreamMaterial | None:
    if listener.upstream_ca is not None:
        ca = reading.certificates(("upstream_ca",), listener.upstream_ca)
    else:
        system = ssl.get_default_verify_paths().cafile
        if system is None:
            reading.problem(("upstream",), "no system CA bundle to verify the upstream by: give upstream_ca")
            return None
        ca = reading.certificates(("upstream",), system)
    client = None
    if listener.upstream_cert is not None and listener.upstream_key is not None:
        cert, key = (("upstream_cert",), listener.upstream_cert), (("upstream_key",), listener.upstream_key)
        client = reading.pair(cert, key, server=False)
        if client is None:
            return None
    return None if ca is None else UpstreamMaterial(ca=ca, client=client)


def _moment(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _openssl(exc: ssl.SSLError) -> str:
    """OpenSSL's words, without the line of Python's source that Python appends."""
    return re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc.args[1] if len(exc.args) > 1 else exc))
