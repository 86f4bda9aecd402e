"""deploy/grafana/sockd.json: what deploy/grafana/dashboard.py builds with grafana-foundation-sdk, and
every query in it (its template variables substituted as Grafana would) answered with series by a
real Prometheus that scraped a sockd under load and evaluated deploy/prometheus/sockd-rules.yaml."""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import CA, ROOT, SERVER_NAME, Launcher, client_context, connect, datagram, echo, eventually, request
from support import listener as entry
from support.prometheus import Prometheus, prometheus

GRAFANA = ROOT / "deploy" / "grafana"
RULES = ROOT / "deploy" / "prometheus" / "sockd-rules.yaml"
LISTENERS = ("echo", "tls", "udp")
# What Grafana puts for $__rate_interval with a 1 s scrape interval is 4 s at least: a little more
# leaves room for a late scrape.
RATE_INTERVAL = "10s"


def dashboard() -> dict[str, Any]:
    found: dict[str, Any] = json.loads((GRAFANA / "sockd.json").read_text())
    return found


def test_the_dashboard_is_what_the_sdk_builds() -> None:
    built = subprocess.run(
        [sys.executable, str(GRAFANA / "dashboard.py")], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(built.stdout) == dashboard(), "python deploy/grafana/dashboard.py > deploy/grafana/sockd.json"


def expressions(found: dict[str, Any]) -> Iterator[str]:
    for panel in found["panels"]:
        for target in panel.get("targets", []):
            yield str(target["expr"])


def substituted(expression: str, instance: str) -> str:
    """As Grafana's Prometheus data source writes a multi-value variable into a query: a regex of
    the values chosen, each escaped (in PromQL's string syntax: a backslash doubled)."""
    escaped = instance.replace(".", "\\\\.")
    listeners = "(" + "|".join(LISTENERS) + ")"
    replaced = expression.replace("$instance", escaped).replace("$listener", listeners)
    return replaced.replace("$__rate_interval", RATE_INTERVAL)


@pytest.fixture
def loaded(start_sockd: Launcher, tls_ca: CA, tmp_path: Path) -> Iterator[str]:
    """A sockd with a TCP, a TLS and a UDP listener, each answering requests until the test ends:
    its metrics endpoint's address."""
    files = tls_ca.server().write(tmp_path, "server")
    tls = {"cert": str(files.cert), "key": str(files.key)}
    daemon = start_sockd(
        [
            entry("echo", "tcp", "echo", "asyncio"),
            entry("tls", "tcp", "echo", "asyncio", tls=tls),
            entry("udp", "udp", "echo", "selector"),
        ]
    )
    addresses = {name: daemon.address(name) for name in LISTENERS}
    context = client_context(tls_ca.write(tmp_path))
    done = threading.Event()
    failures: list[BaseException] = []

    def load() -> None:
        try:
            while not done.is_set():
                assert request(addresses["echo"], b"tcp") == b"tcp"
                with context.wrap_socket(connect(addresses["tls"]), server_hostname=SERVER_NAME) as tls:
                    assert echo(tls, b"tls") == b"tls"
                assert datagram(addresses["udp"], b"udp") == b"udp"
        except BaseException as failure:  # said by the test, not lost in this thread
            failures.append(failure)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        yield str(daemon.wait_for("metrics")["address"])
    finally:
        done.set()
        thread.join()
    assert not failures, failures


def answered(server: Prometheus, expression: str) -> bool:
    """Whether the query has series yet, each a number (a quantile of no requests would be NaN)."""
    series = server.query(expression)
    return bool(series) and all(math.isfinite(float(each["value"][1])) for each in series)


def test_every_query_returns_series_from_prometheus_scraping_sockd_under_load(loaded: str, tmp_path: Path) -> None:
    found = dashboard()
    queries = list(expressions(found))
    assert len(queries) == 14
    with prometheus(tmp_path, [loaded], [RULES]) as server:
        for expression in queries:
            query = substituted(expression, loaded)
            eventually(functools.partial(answered, server, query), f"series for {query}", timeout=60)
        # The variables' values: label_values(SERIES, LABEL), which Grafana asks of the series API.
        variables = [v for v in found["templating"]["list"] if v["type"] == "query"]
        values = {}
        for variable in variables:
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"])
            assert match is not None, variable["query"]
            selector, label = substituted(match[1], loaded), match[2]
            values[variable["name"]] = set(server.get(f"label/{label}/values", **{"match[]": selector}))
    assert values == {"instance": {loaded}, "listener": set(LISTENERS)}
