"""The seed's thread-per-connection server (and a thread per datagram for UDP)."""

from __future__ import annotations

import socket
import time

from sockd.models import Address, Stop
from sockd.models.blocking import BlockingModel, OpenConnections, Threads, accepted, answer, received


class Model(BlockingModel):
    def serve(self, sock: socket.socket, stop: Stop) -> None:
        threads = Threads()
        if sock.type == socket.SOCK_DGRAM:
            for data, sender in received(sock, stop):
                threads.start(self._answer, sock, data, sender, time.monotonic())
        else:
            connections = OpenConnections(stop)
            for conn in accepted(sock, stop):
                threads.start(self._serve, connections, conn, stop)
        threads.join()

    # Each thread counts on a recorder of its own: no lock on the hot path, no lost update.

    def _serve(self, connections: OpenConnections, conn: socket.socket, stop: Stop) -> None:
        with self.stats.recorder() as recorder:
            connections.serve(conn, self.handler, self.delay, stop, recorder)

    def _answer(self, sock: socket.socket, data: bytes, sender: Address, started: float) -> None:
        with self.stats.recorder() as recorder:
            answer(sock, self.handler, self.delay, data, sender, recorder=recorder, started=started)
