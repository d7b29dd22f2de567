"""A bare TCP relay on uvloop: the floor for any Python proxy on this machine.

    python bench/relay.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT

One upstream connection per client connection, bytes copied both ways as they come, no framing,
no metrics, no ordering, no flow control. Whatever the gateway costs above this is its own code;
what this costs is the price of a userspace hop (two reads, two writes, the event loop).
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport):
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc) -> None:
        self.client.close()


class Client(asyncio.Protocol):
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.upstream: asyncio.Transport | None = None
        self.early = b""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.pause_reading()
        self.dialing = asyncio.ensure_future(self.dial())

    async def dial(self) -> None:
        self.upstream, _ = await asyncio.get_running_loop().create_connection(
            lambda: Upstream(self.transport), self.host, self.port
        )
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.upstream.write(data)

    def connection_lost(self, exc) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def main() -> None:
    port, host, upstream_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    server = await asyncio.get_running_loop().create_server(
        lambda: Client(host, upstream_port), "127.0.0.1", port, backlog=1024
    )
    print(f"relay listening on 127.0.0.1:{port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
