"""The worker's spec: the supervisor writes it without loading a model or a handler."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# What only a worker may load: the worker module itself, everything that serves a request, and
# uvloop, which the asyncio model imports.
WORKER_ONLY = ("sockd.worker", "sockd.models", "sockd.handlers", "sockd.limits", "uvloop")


@pytest.mark.parametrize("module", ["sockd.supervisor", "sockd.cli"])
def test_the_supervisor_process_loads_no_model_and_no_handler(module: str) -> None:
    code = f"import {module}, json, sys; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = json.loads(result.stdout)
    assert module in loaded
    assert [name for name in loaded if any(name == w or name.startswith(f"{w}.") for w in WORKER_ONLY)] == []
