"""The OpenSSL contexts of a listener, built from its material (sockd.tls.material) alone, so that a
worker reads no file: `server_context` for a `tls` block, `upstream_context` for a relay to a
tls:// upstream (with `upstream_server_name`, the name the caller passes as server_hostname).
A worker builds them from its spec: `stage_context` and `origination`."""

from __future__ import annotations

import ssl

from sockd.config import Listener, TLSConfig
from sockd.handlers import UpstreamTLS
from sockd.spec import WorkerSpec
from sockd.tls.material import KeyPair, ServerMaterial, UpstreamMaterial, load_crl, load_pair, relays_to_tls

VERIFY_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# Renegotiation is a client's way to make the server redo a handshake's work at will; compression
# leaks secrets (CRIME). Python's contexts already refuse compression: said here, not assumed.
OPTIONS = ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)


def stage_context(spec: WorkerSpec) -> ssl.SSLContext | None:
    """The context a worker's listener serves TLS with, or None if it serves none."""
    tls, material = spec.listener.tls, spec.tls.server if spec.tls is not None else None
    if tls is None:
        return None
    if material is None:
        raise ValueError(f"listener {spec.listener.name!r} has a tls block but its spec no TLS material")
    return server_context(tls, material)


def origination(spec: WorkerSpec) -> UpstreamTLS | None:
    """How a worker's relay opens TLS to its tls:// upstream, or None if its upstream is not one."""
    if not relays_to_tls(spec.listener):
        return None
    material = spec.tls.upstream if spec.tls is not None else None
    if material is None:
        raise ValueError(
            f"listener {spec.listener.name!r} relays to {spec.listener.upstream} but its spec has no TLS material"
        )
    return UpstreamTLS(upstream_context(spec.listener, material), upstream_server_name(spec.listener))


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
