"""The seed's single-threaded server: accept a client, serve it to completion, then the next."""

from __future__ import annotations

import socket
import time

from sockd.models import Stop
from sockd.models.blocking import BlockingModel, OpenConnections, accepted, answer, received


class Model(BlockingModel):
    def serve(self, sock: socket.socket, stop: Stop) -> None:
        with self.stats.recorder() as recorder:
            if sock.type == socket.SOCK_DGRAM:
                for data, sender in received(sock, stop):
                    answer(sock, self.handler, self.delay, data, sender, recorder=recorder, started=time.monotonic())
                return
            connections = OpenConnections(stop)
            for conn in accepted(sock, stop):
                connections.serve(conn, self.handler, self.delay, stop, recorder)
