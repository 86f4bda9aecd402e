"""The config's `tls` block and a relay's tls:// upstream: what the schema and its rules refuse
(checked in-process, see support.check), and the TLS files they name, read and checked by
`sockd --check` itself (the real command): each bad file is one `file:line: field: message` line
and exit 78, at start too; good files, with SNI, a CRL, `allow` and a verified upstream, pass."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from sockd.config import parse
from sockd.tls.material import load_config

from support import CA, Expected, assert_accepted, assert_rejected, run_sockd, yaml_text

EX_CONFIG = 78

# ---------------------------------------------------------------------------------------------
# What the schema and its rules refuse

TCP = """
listeners:
  - name: web
    protocol: tcp
    host: 127.0.0.1
    port: 0
    handler: echo
    concurrency: asyncio
"""
ONLY_VERIFYING = (
    "only valid with client_auth: optional or required (this listener has client_auth: none:"
    " no client certificate is asked for)"
)


def with_lines(text: str, *lines: str) -> str:
    """A listener's config with these lines added to it (line 8 is the first of them)."""
    return yaml_text(text) + "".join(f"    {line}\n" for line in lines)


SNI = ["tls:", "  cert: /c.pem", "  key: /c.key", "  sni:"]
TLS_BLOCKS = [
    pytest.param(
        ["tls:", "  cert: /c.pem", "  key: /c.key", "  client_auth: required"],
        [(11, "listeners[0].tls.client_auth", "needs client_ca: the CA bundle that verifies client certificates")],
        id="client_auth_without_client_ca",
    ),
    pytest.param(
        ["tls:", "  cert: /c.pem", "  key: /c.key", "  client_ca: /ca.pem", "  crl: /c.crl", "  allow: {cn: [a]}"],
        [
            (11, "listeners[0].tls.client_ca", ONLY_VERIFYING),
            (12, "listeners[0].tls.crl", ONLY_VERIFYING),
            (13, "listeners[0].tls.allow", ONLY_VERIFYING),
        ],
        id="client_ca_crl_and_allow_without_client_auth",
    ),
    pytest.param(
        ["tls:", "  cert: /c.pem", "  key: /c.key", "  min_version: 1.2"],
        [
            (
                11,
                "listeners[0].tls.min_version",
                'must be quoted, as in min_version: "1.2" (YAML read the bare number as 1.2)',
            )
        ],
        id="min_version_unquoted",
    ),
    pytest.param(
        ["tls:", "  cert: /c.pem", "  key: /c.key", '  min_version: "1.1"'],
        [(11, "listeners[0].tls.min_version", "input should be '1.2' or '1.3'")],
        id="min_version_1_1",
    ),
    pytest.param(
        ["tls:", "  cert: /c.pem", "  key: /c.key", '  min_version: "1.3"', "  ciphers: HIGH"],
        [
            (
                12,
                "listeners[0].tls.ciphers",
                'only valid with min_version: "1.2" (TLS 1.3\'s cipher suites are not chosen by this string)',
            )
        ],
        id="ciphers_with_tls_1_3_only",
    ),
    pytest.param(
        ["tls:", "  cert: /c.pem", "  key: /c.key", "  ciphers: NO-SUCH-CIPHER"],
        [
            (
                11,
                "listeners[0].tls.ciphers",
                "no cipher matches 'NO-SUCH-CIPHER': give an OpenSSL cipher list, as `openssl ciphers` reads",
            )
        ],
        id="ciphers_none_matching",
    ),
    pytest.param(
        ["tls:", "  cert: /c.pem", "  key: /c.key", f"  alpn: [h2, '', {'x' * 256}, é]"],
        [
            (11, f"listeners[0].tls.alpn[{index}]", "an ALPN protocol name is 1 to 255 ASCII characters")
            for index in (1, 2, 3)
        ],
        id="alpn_names",
    ),
    pytest.param(
        ["tls:", "  cert: /c.pem", "  key: /c.key", "  handshake_timeout: 0"],
        [(11, "listeners[0].tls.handshake_timeout", "input should be greater than 0")],
        id="handshake_timeout_0",
    ),
    pytest.param(
        [*SNI, "    a.example: {cert: /a.pem, key: /a.key}", "    A.Example: {cert: /a.pem, key: /a.key}"],
        [
            (
                12,
                "listeners[0].tls.sni",
                "'A.Example' and 'a.example' are one name: names are matched without regard to case",
            )
        ],
        id="sni_names_differing_in_case",
    ),
    pytest.param(
        [*SNI, "    127.0.0.1: {cert: /a.pem, key: /a.key}", "    b.example: {cert: /b.pem}"],
        [
            (
                12,
                "listeners[0].tls.sni.127.0.0.1",
                "an address: SNI carries only host names, a client connecting to an address sends none",
            ),
            (13, "listeners[0].tls.sni.b.example.key", "required"),
        ],
        id="sni_address_and_missing_key",
    ),
    pytest.param(
        ["tls:", "  cert: /c.pem", "  kee: /c.key"],
        [(9, "listeners[0].tls.key", "required"), (10, "listeners[0].tls.kee", "unknown key; did you mean 'key'?")],
        id="key_misspelt",
    ),
    pytest.param(
        ["tls:", "  cert: /c.pem", "  key: /c.key", "  client_auth: required", "  client_ca: /ca.pem", "  allow: {}"],
        [
            (
                13,
                "listeners[0].tls.allow",
                "names no client: give cn, dns or uri (without allow, any verified client may in)",
            )
        ],
        id="allow_naming_nobody",
    ),
    pytest.param(
        ["tls:", '  cert: "/c\\0.pem"', "  key: /c.key"],
        [(9, "listeners[0].tls.cert", "may not hold a NUL character")],
        id="nul_in_a_path",
    ),
]


@pytest.mark.parametrize(("lines", "expected"), TLS_BLOCKS)
def test_the_tls_block_is_checked(tmp_path: Path, lines: list[str], expected: list[Expected]) -> None:
    assert_rejected(tmp_path, with_lines(TCP, *lines), *expected)


RELAY = """
listeners:
  - name: web
    protocol: tcp
    host: 127.0.0.1
    port: 0
    concurrency: asyncio
"""

RELAY_OPTIONS = [
    pytest.param(
        ["handler: echo", "upstream_ca: /ca.pem"],
        [(8, "listeners[0].upstream_ca", "only valid with handler: relay (this listener has handler: echo)")],
        id="upstream_ca_without_relay",
    ),
    pytest.param(
        ["handler: relay", "upstream: tcp://127.0.0.1:1", "upstream_ca: /ca.pem", "upstream_server_name: a.example"],
        [
            (9, "listeners[0].upstream_ca", "only valid with a tls:// upstream (this listener's is tcp://)"),
            (10, "listeners[0].upstream_server_name", "only valid with a tls:// upstream (this listener's is tcp://)"),
        ],
        id="upstream_tls_options_with_a_tcp_upstream",
    ),
    pytest.param(
        ["handler: relay", "upstream: tls://127.0.0.1:1", "upstream_cert: /c.pem"],
        [(9, "listeners[0].upstream_cert", "needs upstream_key: a client certificate goes with its key")],
        id="upstream_cert_without_key",
    ),
    pytest.param(
        ["handler: relay", "upstream: tls://127.0.0.1:1", "upstream_key: /c.key"],
        [(9, "listeners[0].upstream_key", "needs upstream_cert: a client certificate goes with its key")],
        id="upstream_key_without_cert",
    ),
    pytest.param(
        ["handler: relay", "upstream: tls://127.0.0.1"],
        [
            (
                8,
                "listeners[0].upstream",
                "should be tcp://host:port, tls://host:port, udp://host:port or unix:///path",
            )
        ],
        id="tls_upstream_without_port",
    ),
]


@pytest.mark.parametrize(("lines", "expected"), RELAY_OPTIONS)
def test_the_relay_upstream_tls_options_are_checked(tmp_path: Path, lines: list[str], expected: list[Expected]) -> None:
    assert_rejected(tmp_path, with_lines(RELAY, *lines), *expected)


def test_tls_on_a_udp_listener_says_dtls_is_out_of_scope(tmp_path: Path) -> None:
    text = with_lines(TCP.replace("protocol: tcp", "protocol: udp").replace("asyncio", "selector"), "tls:")
    text += "      cert: /c.pem\n      key: /c.key\n"
    message = "only valid with protocol: tcp or unix (DTLS, TLS over UDP, is out of scope)"
    assert_rejected(tmp_path, text, (9, "listeners[0].tls", message))


def test_a_udp_listener_does_not_relay_to_a_tls_upstream(tmp_path: Path) -> None:
    text = with_lines(
        RELAY.replace("protocol: tcp", "protocol: udp"), "handler: relay", "upstream: tls://127.0.0.1:443"
    )
    message = "a udp listener relays to a udp upstream, a stream listener to tcp, tls or unix"
    assert_rejected(tmp_path, text, (8, "listeners[0].upstream", message))


def test_a_tls_upstream_is_a_tcp_stream_to_host_and_port() -> None:
    text = """
listeners:
  - {name: a, protocol: tcp, host: 127.0.0.1, port: 0, handler: relay, concurrency: selector,
     upstream: "tls://[::1]:443", upstream_server_name: db.example}
  - {name: b, protocol: unix, path: /tmp/b.sock, handler: relay, concurrency: asyncio, upstream: "tls://db.example:5432"}
"""
    a, b = parse(text, "c.yaml").listeners
    assert a.upstream_endpoint == ("tls", ("::1", 443))
    assert b.upstream_endpoint == ("tls", ("db.example", 5432))
    assert (a.upstream_server_name, b.upstream_server_name) == ("db.example", None)


def test_the_json_schema_describes_the_tls_block() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    result = run_sockd("--schema")
    document = json.loads(result.stdout)
    example = yaml.safe_load(with_lines(TCP, "tls: {cert: /c.pem, key: /c.key, client_auth: optional, client_ca: /ca}"))
    jsonschema.validate(example, document)
    example["listeners"][0]["tls"]["client_auth"] = "sometimes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(example, document)


# ---------------------------------------------------------------------------------------------
# The files: read and checked by `sockd --check`


@dataclass(frozen=True)
class Made:
    """The files of a good TLS setup, written by `made`."""

    directory: Path
    ca: CA
    cert: Path
    key: Path
    other_cert: Path
    other_key: Path
    client_ca: Path
    crl: Path


@pytest.fixture
def made(tmp_path: Path, tls_ca: CA) -> Made:
    server = tls_ca.server().write(tmp_path, "server")
    other = tls_ca.server("other.example").write(tmp_path, "other")
    client_ca = CA("clients CA")
    crl = tmp_path / "clients.crl"
    crl.write_bytes(client_ca.crl([client_ca.client("revoked")]))
    return Made(tmp_path, tls_ca, server.cert, server.key, other.cert, other.key, client_ca.write(tmp_path), crl)


def tls_listener(made: Made, **tls: object) -> str:
    """A config of one TLS listener: tls.cert on line 9, tls.key on line 10, then `tls`'s keys in order."""
    block = {"cert": str(made.cert), "key": str(made.key), **tls}
    return with_lines(TCP, "tls:", *(f"  {key}: {json.dumps(value)}" for key, value in block.items()))


def relay_listener(**upstream: object) -> str:
    """A second listener, a relay to tls://127.0.0.1:1 (on line 17 of a config after `tls_listener`'s
    first), with these upstream_* options in order from line 18."""
    fields = {"name": "relay", "protocol": "tcp", "host": "127.0.0.1", "port": 0, "handler": "relay"}
    fields |= {"concurrency": "selector", "upstream": "tls://127.0.0.1:1", **upstream}
    lines = [f"{key}: {value}" for key, value in fields.items()]
    return f"  - {lines[0]}\n" + "".join(f"    {line}\n" for line in lines[1:])


def assert_check_refuses(made: Made, text: str, *expected: Expected) -> None:
    """`sockd --check` exits 78 with exactly these lines, and so does starting sockd on the file."""
    path = made.directory / "sockd.yaml"
    path.write_text(text)
    lines = [f"{path}:{line}: {field}: {message}" for line, field, message in sorted(expected)]
    result = run_sockd("--check", "-c", str(path))
    assert (result.returncode, result.stdout, result.stderr.splitlines()) == (EX_CONFIG, "", lines)


def write(made: Made, name: str, data: bytes) -> str:
    path = made.directory / name
    path.write_bytes(data)
    return str(path)


def test_a_missing_certificate(made: Made) -> None:
    missing = made.directory / "missing.pem"
    text = tls_listener(made).replace(str(made.cert), str(missing))
    assert_check_refuses(made, text, (9, "listeners[0].tls.cert", f"no such file: {missing}"))


def test_a_directory_for_a_key(made: Made) -> None:
    text = tls_listener(made).replace(str(made.key), str(made.directory))
    assert_check_refuses(made, text, (10, "listeners[0].tls.key", f"cannot read {made.directory}: is a directory"))


def test_a_certificate_that_is_not_pem(made: Made) -> None:
    garbage = write(made, "garbage.pem", b"hello, not a certificate\n")
    text = tls_listener(made).replace(str(made.cert), garbage)
    message = f"no certificate in {garbage} (PEM: -----BEGIN CERTIFICATE-----)"
    assert_check_refuses(made, text, (9, "listeners[0].tls.cert", message))


def test_a_certificate_in_der(made: Made) -> None:
    der = write(made, "server.der", made.ca.server().cert.public_bytes(serialization.Encoding.DER))
    text = tls_listener(made).replace(str(made.cert), der)
    message = f"{der} is DER, not PEM: convert it (openssl x509 -inform der -in FILE -out FILE.pem)"
    assert_check_refuses(made, text, (9, "listeners[0].tls.cert", message))


def test_a_certificate_block_that_openssl_cannot_read(made: Made) -> None:
    broken = write(made, "broken.pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    path = made.directory / "sockd.yaml"
    path.write_text(tls_listener(made).replace(str(made.cert), broken))
    result = run_sockd("--check", "-c", str(path))
    assert result.returncode == EX_CONFIG
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{path}:9: listeners[0].tls.cert: OpenSSL cannot read the certificates in {broken}: ")


def test_a_key_that_does_not_match_the_certificate(made: Made) -> None:
    text = tls_listener(made).replace(str(made.key), str(made.other_key))
    message = f"the key does not match the certificate in {made.cert}"
    assert_check_refuses(made, text, (10, "listeners[0].tls.key", message))


def test_a_certificate_given_as_the_key(made: Made) -> None:
    text = tls_listener(made).replace(str(made.key), str(made.other_cert))
    message = f"no private key in {made.other_cert} (PEM: -----BEGIN PRIVATE KEY-----)"
    assert_check_refuses(made, text, (10, "listeners[0].tls.key", message))


def test_an_encrypted_key(made: Made) -> None:
    issued = made.ca.server()
    encryption = serialization.BestAvailableEncryption(b"secret")
    encrypted = issued.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    cert, key = write(made, "enc.pem", issued.chain_pem()), write(made, "enc.key", encrypted)
    text = tls_listener(made).replace(str(made.cert), cert).replace(str(made.key), key)
    message = f"the key in {key} is encrypted: sockd reads unencrypted keys (keep the file private)"
    assert_check_refuses(made, text, (10, "listeners[0].tls.key", message))


def test_an_expired_certificate(made: Made) -> None:
    expired = made.ca.expired()
    files = expired.write(made.directory, "expired")
    text = tls_listener(made).replace(str(made.cert), str(files.cert)).replace(str(made.key), str(files.key))
    when = expired.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    message = f"the certificate in {files.cert} expired on {when}"
    assert_check_refuses(made, text, (9, "listeners[0].tls.cert", message))


def test_a_client_ca_bundle_without_a_certificate_and_a_crl_that_openssl_cannot_read(made: Made) -> None:
    crl = write(made, "broken.crl", b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    text = tls_listener(made, client_auth="required", client_ca=str(made.key), crl=crl)
    path = made.directory / "sockd.yaml"
    path.write_text(text)
    result = run_sockd("--check", "-c", str(path))
    assert result.returncode == EX_CONFIG
    first, second = result.stderr.splitlines()
    assert (
        first
        == f"{path}:12: listeners[0].tls.client_ca: no certificate in {made.key} (PEM: -----BEGIN CERTIFICATE-----)"
    )
    assert second.startswith(f"{path}:13: listeners[0].tls.crl: OpenSSL cannot read the CRL in {crl}: ")


def test_a_crl_file_holding_no_crl(made: Made) -> None:
    text = tls_listener(made, client_auth="optional", client_ca=str(made.client_ca), crl=str(made.client_ca))
    message = f"no CRL in {made.client_ca} (PEM: -----BEGIN X509 CRL-----)"
    assert_check_refuses(made, text, (13, "listeners[0].tls.crl", message))


def test_an_sni_name_with_a_mismatched_key_and_a_missing_file(made: Made) -> None:
    missing = made.directory / "nope.pem"
    sni = {
        "other.example": {"cert": str(made.other_cert), "key": str(made.key)},
        "b.example": {"cert": str(missing), "key": str(made.key)},
    }
    text = tls_listener(made, sni=sni)
    assert_check_refuses(
        made,
        text,
        (11, "listeners[0].tls.sni.other.example.key", f"the key does not match the certificate in {made.other_cert}"),
        (11, "listeners[0].tls.sni.b.example.cert", f"no such file: {missing}"),
    )


def test_every_bad_file_of_a_config_at_once_and_the_same_at_start(made: Made) -> None:
    missing = made.directory / "missing.key"
    text = tls_listener(made).replace(str(made.key), str(missing)) + relay_listener(
        upstream_ca=made.directory / "no-ca.pem", upstream_cert=made.cert, upstream_key=made.other_key
    )
    expected = [
        (10, "listeners[0].tls.key", f"no such file: {missing}"),
        (18, "listeners[1].upstream_ca", f"no such file: {made.directory / 'no-ca.pem'}"),
        (20, "listeners[1].upstream_key", f"the key does not match the certificate in {made.cert}"),
    ]
    assert_check_refuses(made, text, *expected)
    path = made.directory / "sockd.yaml"
    result = run_sockd("-c", str(path))
    lines = [f"{path}:{line}: {field}: {message}" for line, field, message in expected]
    assert (result.returncode, result.stderr.splitlines()) == (EX_CONFIG, lines)


def test_good_files_pass_the_check(made: Made) -> None:
    client = made.ca.client("relay-client").write(made.directory, "client")
    tls = {
        "client_auth": "required",
        "client_ca": str(made.client_ca),
        "min_version": "1.2",
        "ciphers": "ECDHE+AESGCM",
        "alpn": ["my-proto", "http/1.1"],
        "handshake_timeout": 5,
        "sni": {"other.example": {"cert": str(made.other_cert), "key": str(made.other_key)}},
        "crl": str(made.crl),
        "allow": {"cn": ["backup-agent"], "dns": ["*.internal.example"], "uri": ["spiffe://example.org/ns/prod/*"]},
    }
    text = tls_listener(made, **tls) + relay_listener(
        upstream_ca=made.ca.write(made.directory),
        upstream_server_name="sockd.test",
        upstream_cert=client.cert,
        upstream_key=client.key,
    )
    path = made.directory / "sockd.yaml"
    path.write_text(text)
    result = run_sockd("--check", "-c", str(path))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{path}: OK, 2 listeners\n", "")
    assert_accepted(made.directory, text, 2)


def test_a_tls_upstream_without_upstream_ca_is_verified_by_the_system_bundle(made: Made) -> None:
    system = ssl.get_default_verify_paths().cafile
    if system is None:
        pytest.skip("no system CA bundle on this machine")
    text = with_lines(RELAY, "handler: relay", "upstream: tls://example.org:443")
    path = made.directory / "sockd.yaml"
    path.write_text(text)
    loaded = load_config(path)
    upstream = loaded.material["web"].upstream
    assert upstream is not None
    assert upstream.client is None
    assert upstream.ca.count("-----BEGIN CERTIFICATE-----") == Path(system).read_text().count(
        "-----BEGIN CERTIFICATE-----"
    )


def test_the_material_holds_each_file_as_read(made: Made) -> None:
    text = tls_listener(
        made,
        client_auth="optional",
        client_ca=str(made.client_ca),
        crl=str(made.crl),
        sni={"other.example": {"cert": str(made.other_cert), "key": str(made.other_key)}},
    )
    path = made.directory / "sockd.yaml"
    path.write_text(text)
    loaded = load_config(path)
    server = loaded.material["web"].server
    assert server is not None
    assert loaded.material["web"].upstream is None
    assert server.default.cert == made.cert.read_text()
    assert server.default.key == made.key.read_text()
    assert server.sni["other.example"].cert == made.other_cert.read_text()
    assert (server.client_ca, server.crl) == (made.client_ca.read_text(), made.crl.read_text())
    assert "PRIVATE KEY" not in repr(server)  # a key is never shown
    assert type(server).model_validate_json(server.model_dump_json()) == server  # as it travels to a worker


def test_a_config_without_tls_has_no_material(tmp_path: Path) -> None:
    path = tmp_path / "sockd.yaml"
    path.write_text(yaml_text(TCP))
    assert load_config(path).material == {}
