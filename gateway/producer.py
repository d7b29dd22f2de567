"""The gateway's own connection to the Faktory server, as a producer (`batches: gateway` pushes
callback jobs on it).

Clients' handshakes are relayed and the gateway needs no credentials for them (I7); this is the one
connection the gateway opens in its own name, so it answers the server's `HI` itself: with the
password of the `upstream` URL when the server asks for one (`pwdhash`, as Faktory's Go client
computes it). It is dialled on first use and again after any failure; one command is in flight at
a time (callbacks are rare, and one in flight keeps every reply with its command).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable

from .config import UpstreamURL
from .protocol import Reply, ReplyStream

READ_CHUNK = 65536
MAX_REPLY = 1 << 20  # a producer's replies are short; anything longer is not the server


class ProducerError(Exception):
    """The server could not be reached, refused the handshake, or the connection broke."""


def password_hash(password: str, salt: str, iterations: int) -> str:
    """Faktory's `pwdhash`: sha256 of password + salt, hashed `iterations` times in all, in hex."""
    digest = hashlib.sha256((password + salt).encode()).digest()
    for _ in range(1, iterations):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


class Producer:
    def __init__(
        self,
        upstream: UpstreamURL,
        ssl_context: ssl.SSLContext | None,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.upstream = upstream
        self.clock = clock
        self.ssl_context = ssl_context
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self._conn: _Connection | None = None

    async def push(self, job: bytes, write_before: float | None = None) -> Reply:
        """`PUSH <job>`: the server's reply (`+OK`, or its error). Raises ProducerError when there
        is no answer (the job may or may not have reached the server), or when the line could
        not be written before `write_before` (this producer's clock): then it was not written."""
        return await self.call(b"PUSH " + job, write_before)

    async def call(self, line: bytes, write_before: float | None = None) -> Reply:
        async with self._lock:
            try:
                async with asyncio.timeout(self.timeout):
                    conn = self._conn or await self._dial()
                    if write_before is not None and self.clock() >= write_before:
                        raise ProducerError("too late to write")
                    conn.writer.write(line + b"\r\n")
                    return await conn.reply()
            except (OSError, EOFError, TimeoutError, ProducerError) as exc:
                self._drop()
                raise ProducerError(str(exc) or type(exc).__name__) from exc

    async def _dial(self) -> _Connection:
        upstream = self.upstream
        reader, writer = await asyncio.open_connection(
            upstream.host,
            upstream.port,
            ssl=self.ssl_context,
            server_hostname=upstream.host if self.ssl_context else None,
            limit=MAX_REPLY,
        )
        self._conn = conn = _Connection(reader, writer)
        hi = await conn.reply()
        if hi.kind != ord("+") or not (hi.payload or b"").startswith(b"HI "):
            raise ProducerError(f"expected the server's HI, got {hi.raw[:80]!r}")
        offer = json.loads(hi.payload[3:])  # type: ignore[index]
        hello: dict[str, object] = {
            "v": 2,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "labels": ["faktory-gateway"],
        }
        if "s" in offer:
            if not upstream.password:
                raise ProducerError(
                    "the server wants a password: give it in upstream (tcp://:PASSWORD@host:port)"
                )
            hello["pwdhash"] = password_hash(upstream.password, offer["s"], int(offer.get("i", 1)))
        writer.write(b"HELLO " + json.dumps(hello).encode() + b"\r\n")
        ok = await conn.reply()
        if ok.is_error:
            raise ProducerError(
                f"the server refused the handshake: {ok.raw.decode(errors='replace').strip()}"
            )
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.writer.transport.abort()
            self._conn = None

    async def close(self) -> None:
        if self._conn is not None:
            writer = self._conn.writer
            self._conn = None
            writer.close()


class _Connection:
    """One dialled connection, its replies framed by the same framer as the data path's."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.stream = ReplyStream(MAX_REPLY)
        self.ready: deque[Reply] = deque()

    async def reply(self) -> Reply:
        while not self.ready:
            data = await self.reader.read(READ_CHUNK)
            if not data:
                raise EOFError("the server closed the connection")
            self.ready.extend(self.stream.replies(data))
        return self.ready.popleft()
