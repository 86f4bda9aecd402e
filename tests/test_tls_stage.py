"""What a TLS listener's stage decides about its clients, with real peers: client certificates
(`client_auth`, another CA's, a revoked one), `allow` (ghostunnel's rules: CN, DNS and SPIFFE URI
wildcards), the verified identity in the connection's log line, and a failed handshake's one
throttled warning with its reason, never a traceback."""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_tls import tls_of

from support import (
    CA,
    MODELS,
    SERVER_NAME,
    Daemon,
    Files,
    Launcher,
    StartSockd,
    TLSSession,
    client_context,
    connect,
    eventually,
    handshakes,
    read_to_eof,
    s_client_session,
    verifying,
)
from support import listener as entry

ALLOW = {"cn": ["backup-agent"], "dns": ["*.internal.example"], "uri": ["spiffe://example.org/ns/prod/*"]}
# The models whose connections end differently once refused: the loop's transport, a selector's,
# and a blocking thread's.
STAGE_MODELS = ["asyncio", "selector", "threaded"]


class Clients:
    """Client certificates issued for a test, as files a client loads, the CA file they trust,
    and a CRL that revokes one of them."""

    def __init__(self, ca: CA, directory: Path) -> None:
        self.ca, self.directory = ca, directory
        self.ca_file = ca.write(directory)
        revoked = ca.client("revoked")
        self.revoked = revoked.write(directory, "revoked")
        self.crl = directory / "revoked.crl"
        self.crl.write_bytes(ca.crl([revoked]))

    def files(self, name: str, ca: CA | None = None, **names: Any) -> Files:
        """A client certificate (CA.client's names) issued by `ca` (this CA if None)."""
        return (ca or self.ca).client(**names).write(self.directory, name)

    def context(self, cert: Files | None = None, version: str | None = None) -> ssl.SSLContext:
        return client_context(self.ca_file, version, cert)


@pytest.fixture(scope="module")
def clients(tls_ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Clients:
    return Clients(tls_ca, tmp_path_factory.mktemp("clients"))


@pytest.fixture(scope="module", params=STAGE_MODELS)
def served(request: pytest.FixtureRequest, start_module_sockd: Launcher, clients: Clients) -> Iterator[Daemon]:
    """One daemon per model: listeners requiring a client certificate, taking one optionally,
    with `allow`, and with a CRL; every one logs its connections."""
    model: str = request.param
    server = clients.ca.server().write(clients.directory, "server")
    listeners: dict[str, dict[str, Any]] = {
        "required": {"client_auth": "required"},
        "optional": {"client_auth": "optional"},
        "allowed": {"client_auth": "required", "allow": ALLOW},
        "revoking": {"client_auth": "required", "crl": str(clients.crl)},
    }
    daemon = start_module_sockd(
        [
            entry(
                name,
                "tcp",
                "echo",
                model,
                log_connections=True,
                tls=tls_of(server, client_ca=str(clients.ca_file), **options),
            )
            for name, options in listeners.items()
        ]
    )
    yield daemon
    assert daemon.stop() == 0


def admitted(address: str, context: ssl.SSLContext) -> bool:
    """Whether the server, once the handshake is done, echoes what the client sends."""
    session = TLSSession(address, "admitted?", context)
    try:
        session.exchange(100)
    except (OSError, AssertionError):
        return False
    finally:
        session.close()
    return True


def refusal(address: str, context: ssl.SSLContext) -> str:
    """How the server ends a client that, its handshake done on its side, waits for a word: with
    an alert (its reason), or a close ("closed"). Sending nothing, the client leaves no unread
    byte at the server for its close to turn into a reset."""
    try:
        with context.wrap_socket(connect(address), server_hostname=SERVER_NAME) as sock:
            said = sock.recv(1)
    except ssl.SSLError as exc:
        return str(exc.reason)
    assert said == b"", said
    return "closed"


def rejected(daemon: Daemon, name: str) -> float:
    return handshakes(daemon, name, "client_cert_rejected")


def refused_and_counted(daemon: Daemon, name: str, context: ssl.SSLContext) -> str:
    """The refusal of a client (see refusal), once its handshake is counted client_cert_rejected."""
    before = rejected(daemon, name)
    how = refusal(daemon.address(name), context)
    eventually(lambda: rejected(daemon, name) == before + 1, f"the client counted client_cert_rejected on {name}")
    return how


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_client_auth_required_refuses_a_client_without_a_certificate(
    served: Daemon, clients: Clients, version: str
) -> None:
    how = refused_and_counted(served, "required", clients.context(version=version))
    # TLS 1.2 fails the handshake; in 1.3 the client's side is done before the server checks.
    assert how == {"1.2": "SSLV3_ALERT_HANDSHAKE_FAILURE", "1.3": "TLSV13_ALERT_CERTIFICATE_REQUIRED"}[version]


def test_client_auth_required_refuses_a_certificate_of_another_ca(served: Daemon, clients: Clients) -> None:
    stranger = clients.files("stranger", CA("another CA"), common_name="stranger")
    assert refused_and_counted(served, "required", clients.context(stranger)) == "TLSV1_ALERT_UNKNOWN_CA"


def test_client_auth_required_admits_a_certificate_of_its_ca_with_s_client(served: Daemon, clients: Clients) -> None:
    cert = clients.files("good")
    options = (*verifying(clients.ca_file), "-cert", str(cert.cert), "-key", str(cert.key))
    before = handshakes(served, "required", "ok")
    with s_client_session(served.address("required"), *options) as client:
        for size in (1, 1000, 16385):
            payload = os.urandom(size)
            assert client.exchange(payload) == payload
        code, said = client.close()
    assert code == 0, said
    eventually(lambda: handshakes(served, "required", "ok") == before + 1, "the handshake counted ok")


def test_s_client_without_a_certificate_gets_no_echo_from_a_listener_that_requires_one(
    served: Daemon, clients: Clients
) -> None:
    with s_client_session(served.address("required"), *verifying(clients.ca_file), "-tls1_3") as client:
        assert client.exchange(b"hello") == b""
        _, said = client.close()
    assert "certificate required" in said, said


def test_client_auth_optional_admits_a_client_with_a_certificate_and_one_without(
    served: Daemon, clients: Clients
) -> None:
    assert admitted(served.address("optional"), clients.context(clients.files("good")))
    assert admitted(served.address("optional"), clients.context())


def test_allow_admits_a_client_matching_any_one_name_and_refuses_the_others(served: Daemon, clients: Clients) -> None:
    address = served.address("allowed")
    allowed: dict[str, dict[str, Any]] = {
        "the CN": {"common_name": "backup-agent"},
        "a DNS wildcard's one label": {"common_name": "x", "dns_names": ["db.internal.example"]},
        "a DNS name in any case": {"common_name": "x", "dns_names": ["DB.Internal.Example"]},
        "a SPIFFE wildcard's one segment": {"common_name": None, "uris": ["spiffe://example.org/ns/prod/web"]},
        "one of several names": {"common_name": "nobody", "dns_names": ["a.example", "b.internal.example"]},
    }
    for why, names in allowed.items():
        assert admitted(address, clients.context(clients.files("allowed", **names))), why
    refused: dict[str, dict[str, Any]] = {
        "another CN": {"common_name": "backup-agent-2"},
        "a CN in a SAN": {"common_name": "x", "dns_names": ["backup-agent"]},
        "two labels for a DNS *": {"common_name": "x", "dns_names": ["a.db.internal.example"]},
        "the DNS wildcard's parent": {"common_name": "x", "dns_names": ["internal.example"]},
        "two segments for a URI *": {"common_name": None, "uris": ["spiffe://example.org/ns/prod/web/extra"]},
        "the URI wildcard's parent": {"common_name": None, "uris": ["spiffe://example.org/ns/prod"]},
        "another trust domain": {"common_name": None, "uris": ["spiffe://example.com/ns/prod/web"]},
        "no name at all": {"common_name": "x"},
    }
    for why, names in refused.items():
        # Refused after the handshake: the client's side ends with the server's close_notify.
        assert refused_and_counted(served, "allowed", clients.context(clients.files("refused", **names))) == "closed", (
            why
        )


def test_allow_refusal_names_the_client_in_a_warning_and_in_its_connection_line(
    served: Daemon, clients: Clients
) -> None:
    mark = len(served.events)
    refused_and_counted(served, "allowed", clients.context(clients.files("intruder", common_name="intruder")))
    served.wait_for(
        "TLS client refused: its certificate names none that `allow` lists", after=mark, client_cn="intruder"
    )
    line = served.wait_for("connection closed", after=mark, listener="allowed", client_cn="intruder")
    assert line["ended"] == "client certificate refused"


def test_a_revoked_client_certificate_is_refused_and_a_good_one_admitted(served: Daemon, clients: Clients) -> None:
    revoked = clients.context(clients.revoked)
    assert refused_and_counted(served, "revoking", revoked) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    assert admitted(served.address("revoking"), clients.context(clients.files("good")))


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_the_verified_identity_and_version_are_in_the_connection_line(
    served: Daemon, clients: Clients, version: str
) -> None:
    names: dict[str, Any] = {
        "common_name": f"agent-{version}",
        "dns_names": ["agent.internal.example"],
        "uris": ["spiffe://example.org/ns/prod/agent"],
    }
    mark = len(served.events)
    assert admitted(served.address("optional"), clients.context(clients.files("agent", **names), version))
    line = served.wait_for("connection closed", after=mark, listener="optional", client_cn=f"agent-{version}")
    assert (line["client_dns"], line["client_uri"]) == (names["dns_names"], names["uris"])
    assert line["tls"] == f"TLSv{version}"


def test_a_client_without_a_certificate_has_no_identity_in_its_connection_line(
    served: Daemon, clients: Clients
) -> None:
    mark = len(served.events)
    assert admitted(served.address("optional"), clients.context())
    line = served.wait_for("connection closed", after=mark, listener="optional")
    assert not {"client_cn", "client_dns", "client_uri"} & line.keys(), line


# What clients that do not speak TLS send a TLS listener: bytes no protocol has, an HTTP request,
# and a plaintext echo client's line.
NOT_TLS = {
    "garbage": bytes(range(255, 127, -1)),
    "http": b"GET / HTTP/1.1\r\nHost: sockd.test\r\n\r\n",
    "plaintext": b"hello, echo?\n",
}
EACH = 5  # times each is sent: one warning says the first, the throttle holds back the rest


def not_tls(address: str, payload: bytes) -> None:
    """Send what is not TLS, and wait until the server ends the connection."""
    with connect(address) as sock, contextlib.suppress(ConnectionResetError):
        sock.sendall(payload)
        read_to_eof(sock)


@pytest.mark.parametrize("model", MODELS)
def test_a_failed_handshake_is_counted_and_said_in_one_throttled_warning_with_its_reason(
    start_sockd: StartSockd, tls_ca: CA, tmp_path: Path, model: str
) -> None:
    files = tls_ca.server().write(tmp_path, "server")
    daemon = start_sockd([entry("tls", "tcp", "echo", model, tls=tls_of(files, handshake_timeout=1))])
    address = daemon.address("tls")
    for payload in NOT_TLS.values():
        for _ in range(EACH):
            not_tls(address, payload)
    with connect(address) as silent:  # a client waiting for the server to speak first
        assert read_to_eof(silent) == b""
    failed = len(NOT_TLS) * EACH
    eventually(lambda: handshakes(daemon, "tls", "failed") == failed, f"{failed} handshakes counted failed")
    eventually(lambda: handshakes(daemon, "tls", "timeout") == 1, "the silent client's handshake counted timeout")
    for reason in ("http request", "timeout"):  # what OpenSSL says of an HTTP request, and the silent client
        daemon.wait_for("TLS handshake failed", reason=reason)
    warnings = [event for event in daemon.events if event.get("event") == "TLS handshake failed"]
    reasons = [warning["reason"] for warning in warnings]
    assert all(reasons), warnings
    # One line for each reason so far, saying the first of its kind (the rest wait for the
    # throttle's window to end).
    assert len(reasons) == len(set(reasons)) < failed, warnings
    assert all(warning["count"] == 1 for warning in warnings), warnings
    assert not any("exception" in event or event.get("level") == "error" for event in daemon.events)
    assert not daemon.other_lines, daemon.other_lines
