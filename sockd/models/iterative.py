"""The seed's single-threaded server: accept a client, serve it to completion, then the next."""

from __future__ import annotations

import socket

from sockd.models.blocking import BlockingModel, accepted, received
from sockd.stopping import Stop


class Model(BlockingModel):
    def serve(self, sock: socket.socket, stop: Stop) -> None:
        self.stopping_on(stop, sock)
        self.serve_in_turn(sock, stop)

    def serve_in_turn(self, sock: socket.socket, stop: Stop) -> None:
        """One connection (or datagram) after another until `stop`: what each of thread_pool's
        threads runs too."""
        with self.stats.recorder() as recorder:
            if sock.type == socket.SOCK_DGRAM:
                answer = self.answerer(self.datagrams(sock, recorder))
                for data, sender in received(sock, stop, recorder):
                    answer(data, sender)
                return
            for conn, address in accepted(sock, stop, recorder):
                self.serve_connection(conn, address, recorder)
