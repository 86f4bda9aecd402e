"""What a client refused by a limit or an access rule sees, in every model: the end of file the
README promises, never a reset, though it sent its request before it read."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest

from support import MODELS, STDLIB_LOOP, Launcher, connect, eventually, model_options, rejected
from support import listener as entry

# Enough refused clients that a reset, when any were possible, is all but certain among them:
# each sends its request at once, some before the worker accepts it, some after it refuses.
CLIENTS = 200
REQUEST = b"GET / HTTP/1.0\r\n\r\n"


def outcome(address: str) -> str:
    """What one client that sends a request and then reads sees of a refusal."""
    with connect(address) as sock:
        try:
            sock.sendall(REQUEST)
        except BrokenPipeError:  # a Unix socket already shut by sockd takes nothing more
            return "could not send"
        try:
            return "end of file" if sock.recv(65536) == b"" else "data"
        except ConnectionResetError:
            return "reset"


def outcomes(address: str) -> collections.Counter[str]:
    return collections.Counter(outcome(address) for _ in range(CLIENTS))


def assert_each_read_eof(seen: collections.Counter[str], protocol: str) -> None:
    """Every client read an end of file; over AF_UNIX, one whose request came after sockd had
    shut the connection could not send it (EPIPE, as to any closed peer), and never read a reset."""
    allowed = {"end of file", "could not send"} if protocol == "unix" else {"end of file"}
    assert set(seen) <= allowed, seen
    assert seen["end of file"] > 0, seen


@pytest.mark.parametrize("protocol", ["tcp", "unix"])
@pytest.mark.parametrize("model", [*MODELS, STDLIB_LOOP])
def test_a_client_an_access_rule_refuses_reads_eof_not_a_reset(
    start_sockd: Launcher, sockdir: Path, model: str, protocol: str
) -> None:
    name, options = model_options(model)
    if protocol == "unix":
        rule: dict[str, object] = {"allow_uids": [os.getuid() + 1]}
        where: str | Path = sockdir / "refusing.sock"
    else:
        rule, where = {"deny": ["127.0.0.0/8"]}, "127.0.0.1"
    daemon = start_sockd([entry("refusing", protocol, "echo", name, where, workers=1, **options, **rule)])
    address = daemon.address("refusing")
    assert_each_read_eof(outcomes(address), protocol)
    eventually(lambda: rejected(daemon, "refusing", "acl") == CLIENTS, "every refusal counted")


@pytest.mark.parametrize("protocol", ["tcp", "unix"])
@pytest.mark.parametrize("model", ["threaded", "selector", "asyncio"])
def test_a_client_past_max_connections_reads_eof_not_a_reset(
    start_sockd: Launcher, sockdir: Path, model: str, protocol: str
) -> None:
    where = sockdir / "full.sock" if protocol == "unix" else "127.0.0.1"
    daemon = start_sockd([entry("full", protocol, "echo", model, where, workers=1, max_connections=1)])
    address = daemon.address("full")
    with connect(address) as held:
        held.sendall(b"in")
        assert held.recv(2) == b"in"  # admitted: every other client is one too many
        assert_each_read_eof(outcomes(address), protocol)
    eventually(lambda: rejected(daemon, "full", "max_connections") == CLIENTS, "every refusal counted")
