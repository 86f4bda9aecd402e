"""A real Prometheus (Debian's `prometheus`) scraping daemons, asked through its HTTP API."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from support.daemon import require


@dataclass(frozen=True)
class Prometheus:
    web: str  # host:port of its HTTP API

    def get(self, path: str, **params: str) -> Any:
        """The `data` of an API answer; None while Prometheus is not up yet. A query Prometheus
        refuses (status "error") fails the test with its error."""
        url = f"http://{self.web}/api/v1/{path}?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code == 503:  # starting: "Service Unavailable" until its storage is ready
                return None
            answer = json.loads(error.read())  # a query it refused: the error says why
        except OSError:
            return None
        assert answer["status"] == "success", f"{path} {params}: {answer}"
        return answer["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query's series (none while Prometheus is not up yet)."""
        data = self.get("query", query=expression)
        return [] if data is None else list(data["result"])


@contextlib.contextmanager
def prometheus(directory: Path, targets: Sequence[str], rule_files: Sequence[Path] = ()) -> Iterator[Prometheus]:
    """Prometheus scraping `targets` (job "sockd") and evaluating `rule_files` every second, its
    data in `directory`; stopped at the end."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        web = f"127.0.0.1:{probe.getsockname()[1]}"
    config = directory / "prometheus.yml"
    settings = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": "sockd", "static_configs": [{"targets": list(targets)}]}],
    }
    config.write_text(yaml.safe_dump(settings))
    server = subprocess.Popen(
        [
            require("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address={web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield Prometheus(web)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
