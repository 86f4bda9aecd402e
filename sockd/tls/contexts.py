"""The OpenSSL contexts of a listener, built from its material (sockd.tls.material) alone, so that a
worker reads no file: `server_context` for a `tls` block, `upstream_context` for a relay to a
tls:// upstream (with `upstream_server_name`, the name the caller passes as server_hostname), both
together as a worker's relay takes them: `upstream_tls_for`."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from sockd.config import Config, Listener, TLSConfig
from sockd.handlers import UpstreamTLS
from sockd.tls.material import (
    KeyPair,
    ServerMaterial,
    UpstreamMaterial,
    load_crl,
    load_pair,
    read_material,
    upstream_tls,
)

if TYPE_CHECKING:
    from sockd.spec import WorkerSpec

VERIFY_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# Renegotiation is a client's way to make the server redo a handshake's work at will; compression
# leaks secrets (CRIME). Python's contexts already refuse compression: said here, not assumed.
OPTIONS = ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)


def server_context(tls: TLSConfig, material: ServerMaterial) -> ssl.SSLContext:
    """The context a TLS listener serves its connections with: its default certificate, and one
    context per SNI name, switched to as a client's ClientHello names it (a name it does not
    know, or none, keeps the default certificate)."""
    context = _server(tls, material, material.default)
    if material.sni:
        by_name = {normal_name(name): _server(tls, material, pair) for name, pair in material.sni.items()}

        def pick(connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            try:
                chosen = by_name.get(normal_name(name)) if name is not None else None
            except UnicodeError:  # a name no config could hold: the default certificate
                chosen = None
            if chosen is not None:
                connection.context = chosen

        context.sni_callback = pick
    return context


def _server(tls: TLSConfig, material: ServerMaterial, pair: KeyPair) -> ssl.SSLContext:
    """A whole context for one certificate: OpenSSL takes the client verification's store and the
    ALPN choice from the context an SNI switch lands on, so each has them all."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.options |= OPTIONS
    context.minimum_version = VERSIONS[tls.min_version]
    if tls.ciphers is not None:
        context.set_ciphers(tls.ciphers)
    if tls.alpn:
        context.set_alpn_protocols(tls.alpn)
    load_pair(context, pair)
    if material.client_ca is not None:
        context.load_verify_locations(cadata=material.client_ca)
    if material.crl is not None:
        load_crl(context, material.crl)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.verify_mode = VERIFY_MODES[tls.client_auth]
    return context


def upstream_context(listener: Listener, material: UpstreamMaterial) -> ssl.SSLContext:
    """The context a relay opens its tls:// upstream with: the upstream verified against
    upstream_ca (else the system's CAs, as read at load), its name checked, and the client
    certificate presented if one is configured. As ssl.create_default_context, without a file."""
    if listener.upstream is None:
        raise ValueError(f"listener {listener.name!r} relays to no upstream")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.options |= OPTIONS
    context.load_verify_locations(cadata=material.ca)
    if material.client is not None:
        load_pair(context, material.client)
    return context


def upstream_tls_for(spec: WorkerSpec) -> UpstreamTLS | None:
    """The TLS of a worker's relay to a tls:// upstream, if it has one (see sockd.handlers.Relay)."""
    listener = spec.listener
    if not upstream_tls(listener):
        return None
    # Until the spec carries the material the supervisor read: read here, as stage_for does.
    material, _ = read_material(Config(listeners=[listener]))
    upstream = material[listener.name].upstream
    assert upstream is not None
    return UpstreamTLS(upstream_context(listener, upstream), upstream_server_name(listener))


def upstream_server_name(listener: Listener) -> str:
    """The name the upstream's certificate must have (an address: one of its IP SANs)."""
    if listener.upstream_server_name is not None:
        return listener.upstream_server_name
    _, where = listener.upstream_endpoint
    if not isinstance(where, tuple):
        raise ValueError(f"listener {listener.name!r} relays to a Unix socket, not a tls:// upstream")
    return where[0]


def normal_name(name: str) -> str:
    """A server name as SNI compares it: its A-label (as Python hands the callback an IDN),
    lower case, without a final dot."""
    return name.rstrip(".").encode("idna").decode("ascii").lower()
