"""The seed's single-threaded server: accept a client, serve it to completion, then the next."""

from __future__ import annotations

import socket
import time

from sockd.models import Stop
from sockd.models.blocking import BlockingModel, OpenConnections, accepted, received


class Model(BlockingModel):
    def serve(self, sock: socket.socket, stop: Stop) -> None:
        with self.stats.recorder() as recorder:
            if sock.type == socket.SOCK_DGRAM:
                for data, sender in received(sock, stop, recorder):
                    self.answer(sock, data, sender, recorder, time.monotonic())
                return
            connections = OpenConnections(self, stop)
            for conn, address in accepted(sock, stop, recorder):
                connections.serve(conn, address, recorder)
