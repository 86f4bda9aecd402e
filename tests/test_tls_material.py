"""The TLS material in the running daemon: read at start and on each reload, the certificates'
expiry on /metrics (sockd_tls_certificate_expiry_timestamp_seconds), new certificate files (the
config unchanged) taken up by a reload with new workers, and a reload to a key that does not match
refused with the old material serving on. The real daemon, `sockd reload`, /metrics; and in-process,
how each certificate presented is named on /metrics."""

from __future__ import annotations

import datetime
import ipaddress
import re
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from sockd.tls.material import Expiry, KeyPair, ServerMaterial, TLSMaterial, UpstreamMaterial, expiries

from support import CA, SERVER_NAME, Daemon, Files, Issued, Launcher, run_sockd, samples
from support import listener as entry
from support.tls import presented, s_client, s_client_session, verifying

EXPIRY = "sockd_tls_certificate_expiry_timestamp_seconds"
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH


def expiry_samples(daemon: Daemon) -> dict[tuple[str, str], float]:
    """The expiry gauge's samples, by (listener, server_name)."""
    return {
        (labels["listener"], labels["server_name"]): value
        for (name, label_set), value in samples(daemon).items()
        if name == EXPIRY
        for labels in [dict(label_set)]
    }


def in_days(days: int) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=days)


def tls_entry(files: Files, **tls: Any) -> dict[str, Any]:
    return entry("web", "tcp", "echo", "asyncio", tls={"cert": str(files.cert), "key": str(files.key), **tls})


def test_the_expiry_of_every_certificate_presented_is_on_metrics(
    start_sockd: Launcher, tmp_path: Path, tls_ca: CA
) -> None:
    default, other = tls_ca.server(not_after=in_days(30)), tls_ca.server("other.example", not_after=in_days(40))
    client = tls_ca.client("relay", not_after=in_days(50))
    default_files, other_files = default.write(tmp_path, "default"), other.write(tmp_path, "other")
    client_files = client.write(tmp_path, "client")
    sni = {"other.example": {"cert": str(other_files.cert), "key": str(other_files.key)}}
    relay = entry(
        "relay",
        "tcp",
        "relay",
        "selector",
        upstream="tls://127.0.0.1:9",
        upstream_ca=str(tls_ca.write(tmp_path)),
        upstream_cert=str(client_files.cert),
        upstream_key=str(client_files.key),
    )
    daemon = start_sockd([tls_entry(default_files, sni=sni), relay, entry("plain", "tcp", "echo", "asyncio")])
    assert expiry_samples(daemon) == {
        ("web", SERVER_NAME): default.not_after,
        ("web", "other.example"): other.not_after,
        ("relay", "upstream"): client.not_after,
    }


def test_workers_of_a_relay_verified_by_the_system_bundle_get_the_bundle_in_their_spec(start_sockd: Launcher) -> None:
    # The bundle (some 200 kB) travels in the spec, through the fork server, to every worker.
    if ssl.get_default_verify_paths().cafile is None:
        pytest.skip("no system CA bundle on this machine")
    daemon = start_sockd([entry("relay", "tcp", "relay", "selector", upstream="tls://127.0.0.1:9", workers=2)])
    assert len(daemon.worker_pids("relay")) == 2
    assert expiry_samples(daemon) == {}


def served_serial(daemon: Daemon, ca: Path) -> int:
    """The serial number of the certificate a new `openssl s_client` is shown."""
    done = s_client(daemon.address("web"), *verifying(ca))
    assert done.returncode == 0, done.stderr
    return int(presented(done.stdout).serial_number)


def test_new_certificate_files_are_served_by_new_workers_after_a_reload_while_a_session_goes_on(
    start_sockd: Launcher, tmp_path: Path, tls_ca: CA
) -> None:
    first = tls_ca.server(not_after=in_days(30))
    files, ca = first.write(tmp_path, "server"), tls_ca.write(tmp_path)
    daemon = start_sockd([tls_entry(files)])
    old_worker = daemon.worker_pid("web")
    assert expiry_samples(daemon) == {("web", SERVER_NAME): first.not_after}
    assert served_serial(daemon, ca) == first.serial
    config = daemon.config_path.read_text()

    with s_client_session(daemon.address("web"), *verifying(ca)) as session:
        assert session.exchange(b"before the reload\n") == b"before the reload\n"
        renewed = tls_ca.server(not_after=in_days(60))
        replace_files(renewed, files)
        mark = len(daemon.events)
        done = run_sockd("reload", str(daemon.process.pid))
        assert (done.returncode, done.stdout, done.stderr) == (0, "reloaded: restarted 1\n", "")
        assert daemon.config_path.read_text() == config  # the config is the same: its files are not
        assert daemon.wait_for("reloaded", after=mark)["restarted"] == ["web"]
        new_worker = daemon.worker_pid("web", after=mark)
        assert new_worker != old_worker
        assert daemon.wait_for("replaced", listener="web", after=mark)["retired"] == [old_worker]
        assert expiry_samples(daemon) == {("web", SERVER_NAME): renewed.not_after}
        # A new client gets the new certificate; the session opened before goes on in the old worker.
        assert served_serial(daemon, ca) == renewed.serial
        assert session.exchange(b"after the reload\n") == b"after the reload\n"
        assert old_worker in daemon.worker_pids("web")

    # The same contents again: nothing to do.
    mark = len(daemon.events)
    done = run_sockd("reload", str(daemon.process.pid))
    assert (done.returncode, done.stdout) == (0, "reloaded: kept 1\n")
    assert daemon.worker_pids("web")[-1] == new_worker


def test_a_reload_to_a_key_that_does_not_match_is_refused_and_the_old_material_serves_on(
    start_sockd: Launcher, tmp_path: Path, tls_ca: CA
) -> None:
    first = tls_ca.server(not_after=in_days(30))
    files = first.write(tmp_path, "server")
    daemon = start_sockd([tls_entry(files)])
    worker = daemon.worker_pid("web")

    stranger = tls_ca.server(not_after=in_days(90))
    files.key.write_bytes(stranger.key_pem())  # the certificate stays: the pair no longer matches
    mark = len(daemon.events)
    done = run_sockd("reload", str(daemon.process.pid))
    assert (done.returncode, done.stdout) == (1, ""), done
    problem = (
        rf"{re.escape(str(daemon.config_path))}:\d+: listeners\[0\]\.tls\.key:"
        rf" the key does not match the certificate in {re.escape(str(files.cert))}"
    )
    prefix = "sockd reload: reload failed, still serving the previous config: "
    assert re.fullmatch(re.escape(prefix) + problem + "\n", done.stderr), done.stderr
    assert re.fullmatch(problem, str(daemon.wait_for("config error", after=mark)["problem"]))
    assert daemon.worker_pids("web") == [worker]
    found = samples(daemon)
    assert found[("sockd_config_last_reload_successful", frozenset())] == 0
    assert expiry_samples(daemon) == {("web", SERVER_NAME): first.not_after}
    assert served_serial(daemon, tls_ca.write(tmp_path)) == first.serial


def replace_files(issued: Issued, files: Files) -> None:
    """New contents for the same paths, each renamed over the old file (as a certificate manager
    does), so that a reload never reads one half written."""
    for path, data in ((files.cert, issued.chain_pem()), (files.key, issued.key_pem())):
        new = path.with_suffix(".new")
        new.write_bytes(data)
        new.replace(path)


# -- how each certificate presented is named on /metrics


def pair(issued: Issued) -> KeyPair:
    return KeyPair(cert=issued.chain_pem().decode(), key=issued.key_pem().decode())


def test_the_default_certificate_is_named_by_its_first_dns_name_else_its_cn_else_default(tls_ca: CA) -> None:
    named, cn_only = tls_ca.server("a.example", "b.example"), tls_ca.client("just-a-cn")
    nameless = tls_ca.issue(x509.Name([]), [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], SERVER_AUTH)
    material = {
        name: TLSMaterial(server=ServerMaterial(default=pair(issued)))
        for name, issued in (("one", named), ("two", cn_only), ("three", nameless))
    }
    assert expiries(material) == [
        Expiry("one", "a.example", named.not_after),
        Expiry("two", "just-a-cn", cn_only.not_after),
        Expiry("three", "default", nameless.not_after),
    ]


def test_a_name_taken_by_an_sni_certificate_leaves_the_others_their_roles(tls_ca: CA) -> None:
    # Each expires on another day, to tell them apart.
    default, sni, named_upstream, client = (tls_ca.server("upstream", not_after=in_days(days)) for days in (1, 2, 3, 4))
    server = ServerMaterial(default=pair(default), sni={"upstream": pair(sni), "default": pair(named_upstream)})
    material = {"web": TLSMaterial(server=server, upstream=UpstreamMaterial(ca="", client=pair(client)))}
    assert [(found.server_name, found.not_after) for found in expiries(material)] == [
        ("upstream", sni.not_after),
        ("default", named_upstream.not_after),
        ("default 2", default.not_after),
        ("upstream 2", client.not_after),
    ]
