"""Concurrency models: one small interface, one module each, and the registry of their names.

A model serves one listening socket with one listener's handler until `stop` is set. What a
connection's life is (admission, the handler, delays, timeouts, the drain, counting) is decided
by sockd.lifecycle; a model only waits and moves bytes, and owns every thread, timer and
connection it creates. Its duties, whichever way it waits:

1. Take the listening socket as non-blocking: its O_NONBLOCK flag lives on the open file
   description, which every worker sharing the socket sees, so no model may rely on a blocking
   accept() or recvfrom(). Wait for work without spinning (busy_poll excepted: spinning is its
   point).
2. Accept through `transports.admit` (the listener's limits; a refused connection is closed at
   once, an EOF to its client: see transports.refuse), then make each connection with
   `lifecycle.stream` and drive it through its transport (sockd.transports) as asyncio drives a
   protocol; feed datagrams to a `lifecycle.Datagrams`. A relaying model joins each client to
   its upstream (sockd.relay).
3. When accept() fails for want of descriptors (`shared.accept_failed`), keep serving the open
   connections and accept again after RESOURCE_PAUSE.
4. Count on a Recorder from `stats.recorder()`, one per thread. Beat: an event loop calls
   `stats.beat()` at least every BEAT_INTERVAL; a blocking thread marks `recorder.busy_since`
   while it works on a request, so a stuck request stops the heartbeat.
5. Once `stop` is set, accept no more but go on serving the connections open; once
   `stop.ending` is set, call `Service.drain()`. Return when both are set, no
   connection is open and no delayed reply is due. (A datagram listener has no connection to
   keep: it may treat the first step as both.)

sockd.models.registry lists them, and loads a model's module only when it is used.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sockd.config import Listener
    from sockd.counters import Stats
    from sockd.handlers import Handler
    from sockd.lifecycle import Staging
    from sockd.stopping import Stop


class Model(Protocol):
    def __init__(
        self,
        listener: Listener,
        handler: Handler,
        stats: Stats,
        udp_ports: frozenset[int],
        stage: Staging | None = None,
    ) -> None:
        """`udp_ports`: the ports of the daemon's UDP listeners, for the Service (see
        lifecycle.REFLECTORS); `stage`: what each stream connection passes through before its
        handler (a PROXY header, a TLS handshake: see lifecycle.Service), for the Service too."""

    def serve(self, sock: socket.socket, stop: Stop) -> None:
        """Serve `sock` until `stop` is set, its open connections until `stop.ending` is set or
        they close, then finish the requests in flight and return."""
