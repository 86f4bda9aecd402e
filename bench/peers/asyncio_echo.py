"""Reference peers: asyncio echo servers, streams or protocol API, optionally on uvloop.

Usage: python asyncio_echo.py PORT {streams,protocol} [uvloop]
"""

import asyncio
import socket
import sys
from typing import cast


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def stream_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def main(port: int, api: str) -> None:
    loop = asyncio.get_running_loop()
    server: asyncio.Server
    if api == "streams":
        server = await asyncio.start_server(stream_echo, "127.0.0.1", port, backlog=4096)
    else:
        server = await loop.create_server(Echo, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    port, api = int(sys.argv[1]), sys.argv[2]
    if len(sys.argv) > 3 and sys.argv[3] == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(main(port, api))
