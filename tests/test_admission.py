"""What a client refused by a limit or an access rule sees, in every model: the end of file the
README promises, never a reset, though it sent its request before it read."""

from __future__ import annotations

import collections
import contextlib
import os
import socket
from pathlib import Path

import pytest

from support import MODELS, STDLIB_LOOP, Daemon, Launcher, connect, eventually, model_options, rejected, stopped
from support import listener as entry

# Enough refused clients that a reset, when any were possible, is all but certain among them.
# Half send their request before the worker accepts them (it is stopped meanwhile), half as they
# connect, so that whatever the machine's speed both orders are seen.
CLIENTS = 200
REQUEST = b"GET / HTTP/1.0\r\n\r\n"


def read_outcome(sock: socket.socket) -> str:
    try:
        return "end of file" if sock.recv(65536) == b"" else "data"
    except ConnectionResetError:
        return "reset"


def outcome(address: str) -> str:
    """What one client that sends a request and then reads sees of a refusal."""
    with connect(address) as sock:
        try:
            sock.sendall(REQUEST)
        except BrokenPipeError:  # a Unix socket already shut by sockd takes nothing more
            return "could not send"
        return read_outcome(sock)


def outcomes(daemon: Daemon, listener: str) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """What the clients whose request came before their refusal saw, and what the others saw."""
    address = daemon.address(listener)
    with contextlib.ExitStack() as clients:
        with stopped(*daemon.worker_pids(listener)):  # its requests wait with each client's connect
            early = [clients.enter_context(connect(address)) for _ in range(CLIENTS // 2)]
            for sock in early:
                sock.sendall(REQUEST)
        sent_first = collections.Counter(read_outcome(sock) for sock in early)
    return sent_first, collections.Counter(outcome(address) for _ in range(CLIENTS // 2))


def assert_each_read_eof(seen: tuple[collections.Counter[str], collections.Counter[str]], protocol: str) -> None:
    """Every client read an end of file, whether its request came before the refusal (so sockd
    had it unread) or after; over AF_UNIX, one whose request came after sockd had shut the
    connection could not send it (EPIPE, as to any closed peer). None read a reset."""
    sent_first, the_rest = seen
    assert sent_first == {"end of file": CLIENTS // 2}
    allowed = {"end of file", "could not send"} if protocol == "unix" else {"end of file"}
    assert set(the_rest) <= allowed, the_rest


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
    assert_each_read_eof(outcomes(daemon, "refusing"), protocol)
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
        assert_each_read_eof(outcomes(daemon, "full"), protocol)
    eventually(lambda: rejected(daemon, "full", "max_connections") == CLIENTS, "every refusal counted")
