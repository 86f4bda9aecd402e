"""The seed's thread pool: `threads` threads, each running the iterative server on the shared
socket, so at most `threads` clients are served at once and the rest wait in the backlog."""

from __future__ import annotations

import socket

from sockd.config import Listener
from sockd.counters import Stats
from sockd.handlers import Handler
from sockd.lifecycle import Staging
from sockd.models import iterative
from sockd.models.blocking import Threads
from sockd.stopping import Stop


class Model:
    def __init__(
        self,
        listener: Listener,
        handler: Handler,
        stats: Stats,
        udp_ports: frozenset[int],
        stage: Staging | None = None,
    ) -> None:
        self.size = listener.threads
        self.iterative = iterative.Model(listener, handler, stats, udp_ports, stage)

    def serve(self, sock: socket.socket, stop: Stop) -> None:
        self.iterative.stopping_on(stop, sock)  # once for the pool, not once per thread
        threads = Threads()
        for _ in range(self.size):
            threads.start(self.iterative.serve_in_turn, sock, stop)
        threads.join()
