"""The worker's spec: the supervisor writes it without loading a model or a handler, and the
worker reads back exactly what was written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sockd.config import parse
from sockd.spec import WorkerSettings, WorkerSpec

# What only a worker may load: the worker module itself, everything that serves a request, and
# uvloop, which the asyncio model imports. (The package sockd.models itself is the registry of
# model names, which the config reads: its model modules are what a supervisor must not load.)
WORKER_ONLY = (
    "sockd.worker",
    "sockd.lifecycle",
    "sockd.transports",
    "sockd.relay",
    "sockd.handlers",
    "sockd.limits",
    "uvloop",
)


@pytest.mark.parametrize("module", ["sockd.supervisor", "sockd.cli"])
def test_the_supervisor_process_loads_no_model_and_no_handler(module: str) -> None:
    code = f"import {module}, json, sys; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = json.loads(result.stdout)
    assert module in loaded
    worker_only = [name for name in loaded if any(name == w or name.startswith(f"{w}.") for w in WORKER_ONLY)]
    assert worker_only + [name for name in loaded if name.startswith("sockd.models.")] == []


def test_a_spec_reads_back_as_written() -> None:
    config = parse(
        """
logging: {level: debug, format: json}
metrics: {enabled: false, buckets: [0.001, 1]}
shutdown_timeout: 2.5
worker_timeout: 7
listeners:
  - {name: u, protocol: unix, path: /tmp/sockd-spec.sock, mode: "0600", handler: echo, concurrency: selector}
""",
        "test.yaml",
    )
    settings = WorkerSettings.of(config, frozenset({5300, 53}))
    assert settings.bucket_count == 3
    spec = settings.spec(config.listeners[0])
    read = WorkerSpec.model_validate_json(spec.model_dump_json(exclude_unset=True))
    assert read == spec
    assert json.loads(read.model_dump_json()) == {
        "listener": config.listeners[0].model_dump(mode="json"),
        "logging": {"level": "debug", "format": "json"},
        "buckets": [0.001, 1.0],
        "metrics": False,
        "shutdown_timeout": 2.5,
        "worker_timeout": 7.0,
        "udp_ports": [53, 5300],
    }
