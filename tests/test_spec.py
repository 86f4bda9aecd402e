"""The worker's spec: the supervisor writes it without loading a model or a handler, and the
worker reads back exactly what was written."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from sockd.config import parse
from sockd.spec import WorkerSettings, WorkerSpec
from sockd.tls.contexts import origination, stage_context
from sockd.tls.material import load_config

from support import CA

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
    settings = WorkerSettings.of(config, {}, frozenset({5300, 53}))
    assert settings.bucket_count == 3
    spec = settings.spec(config.listeners[0], "drain")
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
        "state": "drain",
        "tls": None,
    }
    assert (stage_context(read), origination(read)) == (None, None)


def test_a_spec_carries_its_listeners_tls_material_and_builds_its_contexts_without_a_file(
    tmp_path: Path, tls_ca: CA
) -> None:
    server, client = tls_ca.server().write(tmp_path, "server"), tls_ca.client("relay").write(tmp_path, "client")
    ca = tls_ca.write(tmp_path)
    tls = {"cert": str(server.cert), "key": str(server.key), "client_auth": "required", "client_ca": str(ca)}
    relay = {"upstream": "tls://127.0.0.1:9", "upstream_ca": str(ca), "upstream_server_name": "sockd.test"}
    relay |= {"upstream_cert": str(client.cert), "upstream_key": str(client.key)}
    listeners = [
        {
            "name": "plain",
            "protocol": "tcp",
            "host": "127.0.0.1",
            "port": 0,
            "handler": "echo",
            "concurrency": "asyncio",
        },
        {"name": "tls", "protocol": "tcp", "host": "127.0.0.1", "port": 0, "handler": "relay", "concurrency": "asyncio"}
        | relay
        | {"tls": tls},
    ]
    path = tmp_path / "sockd.yaml"
    path.write_text(json.dumps({"listeners": listeners}))
    loaded = load_config(path)
    settings = WorkerSettings.of(loaded.config, loaded.material, frozenset())
    plain, served = (settings.spec(listener, "up") for listener in loaded.config.listeners)
    assert plain.tls is None
    assert served.tls == loaded.material["tls"]
    for file in tmp_path.iterdir():  # a worker reads none: everything is in its spec
        file.unlink()
    read = WorkerSpec.model_validate_json(served.model_dump_json(exclude_unset=True))
    assert read == served
    context = stage_context(read)
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    upstream = origination(read)
    assert upstream is not None
    assert upstream.server_name == "sockd.test"
    assert upstream.context.check_hostname
