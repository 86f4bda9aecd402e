"""Binding at start through a port held by connections alone (sockd.bind_retry), in process, on
real loopback sockets."""

from __future__ import annotations

import socket
import time

import pytest

from sockd.bind_retry import bind_retrying
from sockd.config import InetListener
from sockd.sockets import BindError, bind

from support import TIMEOUT, held_port


def listener_on(port: int) -> InetListener:
    return InetListener(name="a", protocol="tcp", host="127.0.0.1", port=port, handler="echo", concurrency="selector")


def test_a_stop_ends_the_wait_for_a_port_held_by_connections() -> None:
    asked = 0

    def stop_requested() -> bool:
        nonlocal asked
        asked += 1
        return asked == 3  # the third refusal comes with a stop

    with held_port() as port:
        listener = listener_on(port)
        with pytest.raises(BindError, match="address already in use"):
            bind_retrying(lambda: bind(listener), port, time.monotonic() + TIMEOUT, {}, stop_requested)
    assert asked == 3


def test_a_port_a_server_holds_is_not_waited_for() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        listener = listener_on(port)
        with pytest.raises(BindError, match="address already in use"):
            bind_retrying(lambda: bind(listener), port, time.monotonic() + TIMEOUT, {}, lambda: False)
