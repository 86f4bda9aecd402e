"""The daemon's /metrics, scraped and read as samples."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from support.daemon import Daemon


def scrape(daemon: Daemon, path: str = "/metrics") -> str:
    address = daemon.wait_for("metrics")["address"]
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as response:
        return str(response.read().decode())


def health(daemon: Daemon) -> tuple[int, str]:
    """/healthz's status and body."""
    try:
        return 200, scrape(daemon, "/healthz")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(daemon: Daemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, keyed by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(scrape(daemon))
        for sample in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def rejected(daemon: Daemon, name: str, reason: str) -> float:
    return value(samples(daemon), "sockd_connections_rejected_total", listener=name, reason=reason)


def requests(daemon: Daemon, name: str) -> float:
    return value(samples(daemon), "sockd_requests_total", listener=name)


def active_connections(daemon: Daemon, name: str) -> float:
    return value(samples(daemon), "sockd_connections_active", listener=name)


def errors(daemon: Daemon, name: str, kind: str) -> float:
    return value(samples(daemon), "sockd_errors_total", listener=name, kind=kind)


def handshakes(daemon: Daemon, name: str, result: str) -> float:
    """A TLS listener's handshakes that ended with `result` (ok, failed, timeout, client_cert_rejected)."""
    return value(samples(daemon), "sockd_tls_handshakes_total", listener=name, result=result)


def tls_sessions(daemon: Daemon, name: str, version: str) -> float:
    """A TLS listener's sessions established with `version` (TLSv1.2, TLSv1.3)."""
    return value(samples(daemon), "sockd_tls_sessions_total", listener=name, version=version)
