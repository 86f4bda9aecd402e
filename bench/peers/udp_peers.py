"""Reference peers for UDP echo: the seed's blocking recvfrom/sendto loop, or asyncio datagram endpoint.

Usage: python udp_peers.py PORT {blocking,asyncio,uvloop}
"""

import asyncio
import socket
import sys
from typing import cast


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", port))
    await asyncio.Event().wait()


if __name__ == "__main__":
    port, kind = int(sys.argv[1]), sys.argv[2]
    if kind == "blocking":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", port))
        while True:
            data, addr = s.recvfrom(65536)
            s.sendto(data, addr)
    if kind == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(main(port))
