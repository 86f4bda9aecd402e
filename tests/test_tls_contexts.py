"""sockd.tls.contexts: the contexts built from a listener's material (as `load_config` reads it
from the files the tests make) really serve and verify. Each test runs a whole handshake in the
process, a client and a server SSLObject over memory BIOs: the default certificate, SNI's pick,
client certificates required or optional, a revoked one, min_version, ALPN, and a relay's view of
a TLS upstream (verified by its CA and name, showing a client certificate)."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from sockd.config import Listener
from sockd.tls.contexts import normal_name, server_context, upstream_context, upstream_server_name
from sockd.tls.material import load_config

from support import CA, SERVER_NAME, Issued

# Round trips of a handshake: TLS 1.2 takes two, 1.3 one and a half; past this it is stuck.
MAX_FLIGHTS = 10


class HandshakeFailed(Exception):
    def __init__(self, side: str, error: ssl.SSLError) -> None:
        super().__init__(f"{side}: {error}")
        self.side, self.error = side, error


def verify_message(failed: HandshakeFailed) -> str:
    """Why verifying the other end's certificate failed, in OpenSSL's words."""
    assert isinstance(failed.error, ssl.SSLCertVerificationError), failed.error
    return str(failed.error.verify_message)


@dataclass
class Pair:
    """A client and a server over memory BIOs, each side's output carried to the other."""

    client: ssl.SSLObject
    server: ssl.SSLObject
    client_bios: tuple[ssl.MemoryBIO, ssl.MemoryBIO]
    server_bios: tuple[ssl.MemoryBIO, ssl.MemoryBIO]

    def carry(self) -> bool:
        """Move what each side wrote to the other; whether anything moved."""
        to_server, to_client = self.client_bios[1].read(), self.server_bios[1].read()
        self.server_bios[0].write(to_server)
        self.client_bios[0].write(to_client)
        return bool(to_server or to_client)

    def send(self, data: bytes) -> bytes:
        """`data` from the client, as the server reads it (a rejection after the handshake, as TLS
        1.3 sends it, surfaces here)."""
        self.client.write(data)
        self.carry()
        return self.server.read(len(data) + 1)


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str | None = None) -> Pair:
    client_bios, server_bios = (ssl.MemoryBIO(), ssl.MemoryBIO()), (ssl.MemoryBIO(), ssl.MemoryBIO())
    pair = Pair(
        client.wrap_bio(*client_bios, server_hostname=server_hostname),
        server.wrap_bio(*server_bios, server_side=True),
        client_bios,
        server_bios,
    )
    done = {"client": False, "server": False}
    for _ in range(MAX_FLIGHTS):
        for side, end in (("client", pair.client), ("server", pair.server)):
            if not done[side]:
                try:
                    end.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    raise HandshakeFailed(side, exc) from None
        if not pair.carry() and all(done.values()):
            return pair
    raise AssertionError("the handshake did not end")


def client_context(ca: CA | None = None, issued: Issued | None = None, tmp_path: Path | None = None) -> ssl.SSLContext:
    """A client that verifies the server against `ca` (else verifies nothing), showing `issued`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cadata=ca.pem().decode())
    if issued is not None:
        assert tmp_path is not None
        files = issued.write(tmp_path, "client")
        context.load_cert_chain(files.cert, files.key)
    return context


@dataclass(frozen=True)
class Served:
    listener: Listener
    context: ssl.SSLContext


def serve(tmp_path: Path, issued: Issued, tls: dict[str, Any] | None = None, **options: Any) -> Served:
    """One TLS listener serving `issued`'s certificate, its config's `tls` block adding `tls`:
    the config written and loaded, and the server context built from its material."""
    files = issued.write(tmp_path, "server")
    block = {"cert": str(files.cert), "key": str(files.key), **(tls or {})}
    listener = {"name": "web", "protocol": "tcp", "host": "127.0.0.1", "port": 0, "handler": "echo"}
    listener |= {"concurrency": "asyncio", "tls": block, **options}
    path = tmp_path / "sockd.yaml"
    path.write_text(json.dumps({"listeners": [listener]}))  # JSON is YAML
    loaded = load_config(path)
    [served] = loaded.config.listeners
    material = loaded.material["web"].server
    assert served.tls is not None
    assert material is not None
    return Served(served, server_context(served.tls, material))


def peer_serial(end: ssl.SSLObject) -> int:
    """The serial number of the certificate the other end showed (verified or not)."""
    der = end.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_the_default_certificate_is_served_and_carries_bytes(tmp_path: Path, tls_ca: CA) -> None:
    issued = tls_ca.server()
    served = serve(tmp_path, issued)
    pair = handshake(served.context, client_context(tls_ca), SERVER_NAME)
    assert peer_serial(pair.client) == issued.serial
    assert pair.send(b"ping") == b"ping"
    assert pair.server.version() == "TLSv1.3"


def test_an_address_is_verified_by_the_certificates_ip_names(tmp_path: Path, tls_ca: CA) -> None:
    served = serve(tmp_path, tls_ca.server())
    pair = handshake(served.context, client_context(tls_ca), "127.0.0.1")
    assert pair.send(b"x") == b"x"


def test_sni_picks_the_certificate_of_the_name_asked_for(tmp_path: Path, tls_ca: CA) -> None:
    default, other = tls_ca.server(), tls_ca.server("other.example")
    files = other.write(tmp_path, "other")
    served = serve(tmp_path, default, {"sni": {"other.example": {"cert": str(files.cert), "key": str(files.key)}}})
    client = client_context(tls_ca)
    assert peer_serial(handshake(served.context, client, "other.example").client) == other.serial
    assert peer_serial(handshake(served.context, client, "OTHER.Example").client) == other.serial
    assert peer_serial(handshake(served.context, client, SERVER_NAME).client) == default.serial
    # A name it has no certificate for, and no name at all: the default certificate.
    unverified = client_context()
    assert peer_serial(handshake(served.context, unverified, "unknown.example").client) == default.serial
    assert peer_serial(handshake(served.context, unverified).client) == default.serial


def test_an_internationalised_sni_name_is_matched_by_its_a_label(tmp_path: Path, tls_ca: CA) -> None:
    other = tls_ca.server("xn--bcher-kva.example")
    files = other.write(tmp_path, "other")
    served = serve(
        tmp_path, tls_ca.server(), {"sni": {"bücher.example": {"cert": str(files.cert), "key": str(files.key)}}}
    )
    assert normal_name("Bücher.Example.") == "xn--bcher-kva.example"
    pair = handshake(served.context, client_context(tls_ca), "xn--bcher-kva.example")
    assert peer_serial(pair.client) == other.serial


@pytest.fixture
def clients_ca() -> CA:
    return CA("clients CA")


def verifying(tmp_path: Path, tls_ca: CA, clients_ca: CA, client_auth: str, **tls: Any) -> Served:
    ca = clients_ca.write(tmp_path, "clients")
    return serve(tmp_path, tls_ca.server(), {"client_auth": client_auth, "client_ca": str(ca), **tls})


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_auth_required_refuses_a_client_without_a_certificate(
    tmp_path: Path, tls_ca: CA, clients_ca: CA, version: ssl.TLSVersion
) -> None:
    served = verifying(tmp_path, tls_ca, clients_ca, "required")
    client = client_context(tls_ca)
    client.maximum_version = version
    with pytest.raises(HandshakeFailed) as failed:
        handshake(served.context, client, SERVER_NAME)
    assert failed.value.side == "server"
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(failed.value.error.reason)


def test_client_auth_required_refuses_a_client_of_another_ca(tmp_path: Path, tls_ca: CA, clients_ca: CA) -> None:
    served = verifying(tmp_path, tls_ca, clients_ca, "required")
    stranger = CA("another CA").client("stranger")
    with pytest.raises(HandshakeFailed) as failed:
        handshake(served.context, client_context(tls_ca, stranger, tmp_path), SERVER_NAME)
    assert (failed.value.side, failed.value.error.reason) == ("server", "CERTIFICATE_VERIFY_FAILED")


def test_client_auth_required_lets_a_client_of_its_ca_in(tmp_path: Path, tls_ca: CA, clients_ca: CA) -> None:
    served = verifying(tmp_path, tls_ca, clients_ca, "required")
    agent = clients_ca.client("backup-agent")
    pair = handshake(served.context, client_context(tls_ca, agent, tmp_path), SERVER_NAME)
    assert peer_serial(pair.server) == agent.serial
    assert pair.send(b"hello") == b"hello"


def test_client_auth_optional_lets_both_in(tmp_path: Path, tls_ca: CA, clients_ca: CA) -> None:
    served = verifying(tmp_path, tls_ca, clients_ca, "optional")
    anonymous = handshake(served.context, client_context(tls_ca), SERVER_NAME)
    assert anonymous.server.getpeercert() is None
    assert anonymous.send(b"a") == b"a"
    agent = clients_ca.client("agent")
    known = handshake(served.context, client_context(tls_ca, agent, tmp_path), SERVER_NAME)
    assert peer_serial(known.server) == agent.serial


def test_a_revoked_client_certificate_is_refused(tmp_path: Path, tls_ca: CA, clients_ca: CA) -> None:
    revoked, good = clients_ca.client("revoked"), clients_ca.client("good")
    crl = tmp_path / "clients.crl"
    crl.write_bytes(clients_ca.crl([revoked]))
    served = verifying(tmp_path, tls_ca, clients_ca, "required", crl=str(crl))
    with pytest.raises(HandshakeFailed) as failed:
        handshake(served.context, client_context(tls_ca, revoked, tmp_path), SERVER_NAME)
    assert failed.value.side == "server"
    assert verify_message(failed.value) == "certificate revoked"
    pair = handshake(served.context, client_context(tls_ca, good, tmp_path), SERVER_NAME)
    assert peer_serial(pair.server) == good.serial


def test_the_crl_is_checked_behind_an_sni_name_too(tmp_path: Path, tls_ca: CA, clients_ca: CA) -> None:
    # OpenSSL verifies a client with the store of the context SNI switched to.
    revoked = clients_ca.client("revoked")
    crl = tmp_path / "clients.crl"
    crl.write_bytes(clients_ca.crl([revoked]))
    files = tls_ca.server("other.example").write(tmp_path, "other")
    sni = {"other.example": {"cert": str(files.cert), "key": str(files.key)}}
    served = verifying(tmp_path, tls_ca, clients_ca, "required", crl=str(crl), sni=sni)
    with pytest.raises(HandshakeFailed):
        handshake(served.context, client_context(tls_ca, revoked, tmp_path), "other.example")
    with pytest.raises(HandshakeFailed):
        handshake(served.context, client_context(tls_ca), "other.example")


def test_min_version_1_3_refuses_a_client_of_tls_1_2(tmp_path: Path, tls_ca: CA) -> None:
    served = serve(tmp_path, tls_ca.server(), {"min_version": "1.3"})
    old = client_context(tls_ca)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(HandshakeFailed) as failed:
        handshake(served.context, old, SERVER_NAME)
    assert failed.value.side == "server"
    assert failed.value.error.reason == "UNSUPPORTED_PROTOCOL"
    assert handshake(served.context, client_context(tls_ca), SERVER_NAME).server.version() == "TLSv1.3"


def test_min_version_1_2_and_ciphers_serve_tls_1_2(tmp_path: Path, tls_ca: CA) -> None:
    served = serve(tmp_path, tls_ca.server(), {"ciphers": "ECDHE-ECDSA-CHACHA20-POLY1305"})
    old = client_context(tls_ca)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    pair = handshake(served.context, old, SERVER_NAME)
    assert pair.server.version() == "TLSv1.2"
    cipher = pair.server.cipher()
    assert cipher is not None
    assert cipher[0] == "ECDHE-ECDSA-CHACHA20-POLY1305"


def test_alpn_is_negotiated(tmp_path: Path, tls_ca: CA) -> None:
    served = serve(tmp_path, tls_ca.server(), {"alpn": ["my-proto", "http/1.1"]})
    client = client_context(tls_ca)
    client.set_alpn_protocols(["other", "my-proto"])
    pair = handshake(served.context, client, SERVER_NAME)
    assert pair.client.selected_alpn_protocol() == pair.server.selected_alpn_protocol() == "my-proto"


def test_renegotiation_and_compression_are_off(tmp_path: Path, tls_ca: CA) -> None:
    served = serve(tmp_path, tls_ca.server())
    assert served.context.options & ssl.OP_NO_RENEGOTIATION
    assert served.context.options & ssl.OP_NO_COMPRESSION
    pair = handshake(served.context, client_context(tls_ca), SERVER_NAME)
    assert pair.server.compression() is None


# -- a relay's TLS upstream


def relay(tmp_path: Path, upstream: str, **options: Any) -> tuple[Listener, ssl.SSLContext]:
    """A relay to `upstream` with these upstream_* options: its listener and upstream context."""
    listener = {"name": "relay", "protocol": "tcp", "host": "127.0.0.1", "port": 0, "handler": "relay"}
    listener |= {"concurrency": "selector", "upstream": upstream, **options}
    path = tmp_path / "relay.yaml"
    path.write_text(json.dumps({"listeners": [listener]}))
    loaded = load_config(path)
    [relaying] = loaded.config.listeners
    material = loaded.material["relay"].upstream
    assert material is not None
    return relaying, upstream_context(relaying, material)


def test_the_upstream_is_verified_by_upstream_ca_and_its_address(tmp_path: Path, tls_ca: CA) -> None:
    upstream = serve(tmp_path, tls_ca.server())
    listener, context = relay(tmp_path, "tls://127.0.0.1:5000", upstream_ca=str(tls_ca.write(tmp_path)))
    assert upstream_server_name(listener) == "127.0.0.1"
    pair = handshake(upstream.context, context, upstream_server_name(listener))
    assert pair.send(b"relayed") == b"relayed"


def test_the_upstream_is_verified_by_upstream_server_name(tmp_path: Path, tls_ca: CA) -> None:
    upstream = serve(tmp_path, tls_ca.server("db.example"))
    ca = str(tls_ca.write(tmp_path))
    listener, context = relay(tmp_path, "tls://127.0.0.1:5000", upstream_ca=ca, upstream_server_name="db.example")
    assert upstream_server_name(listener) == "db.example"
    handshake(upstream.context, context, upstream_server_name(listener))
    wrong, context = relay(tmp_path, "tls://127.0.0.1:5000", upstream_ca=ca, upstream_server_name="web.example")
    with pytest.raises(HandshakeFailed) as failed:
        handshake(upstream.context, context, upstream_server_name(wrong))
    assert failed.value.side == "client"
    assert verify_message(failed.value).startswith("Hostname mismatch")


def test_an_upstream_of_an_unknown_ca_is_refused(tmp_path: Path, tls_ca: CA) -> None:
    upstream = serve(tmp_path, CA("unknown CA").server())
    listener, context = relay(tmp_path, "tls://127.0.0.1:5000", upstream_ca=str(tls_ca.write(tmp_path)))
    with pytest.raises(HandshakeFailed) as failed:
        handshake(upstream.context, context, upstream_server_name(listener))
    assert (failed.value.side, failed.value.error.reason) == ("client", "CERTIFICATE_VERIFY_FAILED")


def test_the_relay_shows_its_client_certificate(tmp_path: Path, tls_ca: CA) -> None:
    clients = CA("clients CA")
    upstream = verifying(tmp_path, tls_ca, clients, "required")
    issued = clients.client("relay")
    shown, shown_serial = issued.write(tmp_path, "relay-client"), issued.serial
    listener, context = relay(
        tmp_path,
        "tls://127.0.0.1:5000",
        upstream_ca=str(tls_ca.write(tmp_path)),
        upstream_cert=str(shown.cert),
        upstream_key=str(shown.key),
    )
    pair = handshake(upstream.context, context, upstream_server_name(listener))
    assert peer_serial(pair.server) == shown_serial
