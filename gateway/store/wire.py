"""Connections to Redis for the ledger: one multiplexed, pipelined connection per gateway.

Every batch PUSH costs two ledger round trips, so their CPU cost is the gateway's cost. redis-py's
asyncio client spends ~90 µs of CPU per admit+release pair (a pooled connection, a retry wrapper
and a timeout per call); one connection shared by all sessions, with commands written as they
come and replies matched in order, spends ~19 µs (bench numbers in docs/decisions.md). hiredis, the
parser redis-py itself uses, packs the commands and parses the replies; redis-py still finds the
master behind Sentinel, and serves Redis Cluster, whose slot routing is not worth re-writing.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

from ..urls import redact_url

CONNECT_TIMEOUT = 2.0
log = logging.getLogger("gateway.store")


class WireError(Exception):
    """Redis could not be reached or answered an error."""


class ReplyError(WireError):
    """Redis answered `-ERR ...` (or another error code)."""


class _Pipe(asyncio.Protocol):
    """One TCP (or unix, or TLS) connection; replies resolve the futures in the order sent."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8", errors="replace")
        self.waiters: deque[asyncio.Future] = deque()
        self.transport: asyncio.Transport  # set by connection_made, which asyncio calls first
        self.lost = False
        self.closed = asyncio.get_running_loop().create_future()
        self.on_push: Callable[[object], None] | None = None  # a subscribed connection's messages

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport (uvloop's do not subclass asyncio.Transport: no isinstance).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.waiters and self.on_push is not None:
                self.on_push(reply)
                continue
            waiter = self.waiters.popleft()
            if waiter.done():  # its caller timed out; the reply still had to be consumed
                continue
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(ReplyError(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.closed.done():
            self.closed.set_result(None)
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(WireError(f"connection lost: {exc or 'closed by Redis'}"))

    def send(self, args: tuple) -> asyncio.Future:
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.transport.write(hiredis.pack_command(args))
        return waiter


class PipelinedConnection:
    """`await call(*args)`: dials (again) on demand, so a Redis restart needs no gateway restart."""

    def __init__(self, url: str):
        self.url = url
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.scheme = parts.scheme
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        path = [p for p in parts.path.split("/") if p]
        if parts.scheme == "unix":
            self.db = int(query.get("db", ["0"])[0])
        elif parts.scheme == "redis+sentinel":
            if not path:
                raise ValueError("redis+sentinel:// needs the service name as its path")
            self.service = path[0]
            self.db = int(path[1]) if len(path) > 1 else 0
            hosts = [h.rsplit(":", 1) for h in parts.netloc.rpartition("@")[2].split(",")]
            self.sentinels = [(host, int(port)) for host, port in hosts]
        else:
            self.db = int(path[0]) if path else 0
        self._parts = parts
        self._pipe: _Pipe | None = None
        self._dialing: asyncio.Lock | None = None

    async def _address(self) -> tuple[str, int]:
        if self.scheme == "redis+sentinel":
            from redis.asyncio.sentinel import Sentinel  # only Sentinel users pay for importing it

            sentinel = Sentinel(self.sentinels, socket_timeout=CONNECT_TIMEOUT, password=self.password)
            try:
                return await sentinel.discover_master(self.service)
            finally:
                for client in sentinel.sentinels:
                    await client.aclose()
        if not self._parts.hostname:
            raise WireError(f"no host in {redact_url(self.url)}")
        return self._parts.hostname, self._parts.port or 6379

    async def _dial(self) -> _Pipe:
        loop = asyncio.get_running_loop()
        if self.scheme == "unix":
            _, pipe = await loop.create_unix_connection(_Pipe, self._parts.path)
        else:
            host, port = await self._address()
            context = ssl.create_default_context() if self.scheme == "rediss" else None
            _, pipe = await loop.create_connection(_Pipe, host, port, ssl=context)
        try:
            if self.password:
                auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
                await pipe.send(auth)
            if self.db:
                await pipe.send(("SELECT", self.db))
        except BaseException:  # refused, or the dial timed out: do not keep the socket
            pipe.transport.abort()
            raise
        return pipe

    async def call(self, *args):
        pipe = self._pipe
        if pipe is None or pipe.lost:
            pipe = await self._connect()
        return await pipe.send(args)

    def send_only(self, *args) -> None:
        """Send without waiting for the reply: written at once when connected (no task at all)."""
        pipe = self._pipe
        if pipe is not None and not pipe.lost:
            pipe.send(args).add_done_callback(_ignore)
        else:
            _detach(self.call(*args))

    async def _connect(self) -> _Pipe:
        if self._dialing is None:
            self._dialing = asyncio.Lock()
        async with self._dialing:  # one dial for all the callers that found no connection
            if self._pipe is None or self._pipe.lost:
                try:
                    self._pipe = await asyncio.wait_for(self._dial(), CONNECT_TIMEOUT)
                except (TimeoutError, OSError, ReplyError) as exc:
                    raise WireError(f"cannot connect to {redact_url(self.url)}: {exc}") from exc
            return self._pipe

    def reset(self) -> None:
        if self._pipe is not None and self._pipe.transport is not None:
            self._pipe.transport.abort()

    async def close(self) -> None:
        if self._pipe is not None and self._pipe.transport is not None:
            self._pipe.transport.close()


CLUSTER_IN_FLIGHT = 64  # commands in flight on a Cluster at once (connections per node, at most)


class ClusterConnection:
    """Redis Cluster through redis-py, which routes each command to its slot's node.

    redis-py opens a connection per concurrent command, up to `max_connections` per node, and
    fails the command beyond that (MaxConnectionsError): calls past CLUSTER_IN_FLIGHT wait here
    for a free one instead, so a burst (a sweep reading hundreds of batches, a spike of batch
    commands) is queued, never refused."""

    def __init__(self, url: str):
        from redis.asyncio.cluster import RedisCluster

        self.client = RedisCluster.from_url(
            url.replace("redis+cluster://", "redis://", 1),
            decode_responses=True,
            max_connections=CLUSTER_IN_FLIGHT,
        )
        self._in_flight = asyncio.Semaphore(CLUSTER_IN_FLIGHT)

    async def call(self, *args):
        from redis.exceptions import NoScriptError, RedisError, ResponseError

        try:
            async with self._in_flight:
                reply = await self.client.execute_command(*args)
        except NoScriptError as exc:  # redis-py drops the error code the store looks for
            raise ReplyError(f"NOSCRIPT {exc}") from exc
        except ResponseError as exc:
            raise ReplyError(str(exc)) from exc
        except RedisError as exc:
            raise WireError(str(exc)) from exc
        # redis-py answers PING with True where Redis says PONG; the store speaks Redis.
        return "PONG" if reply is True and args == ("PING",) else reply

    def send_only(self, *args) -> None:
        _detach(self.call(*args))

    def reset(self) -> None:
        """redis-py's cluster client replaces broken connections itself."""

    async def close(self) -> None:
        await self.client.aclose()


class Subscriber:
    """Listens on one pub/sub channel from a connection of its own, and dials again when it drops.

    Messages are best effort by nature (one sent while the connection was down is lost); the
    ledger never depends on them for safety, only for promptness.
    """

    def __init__(self, url: str, channel: str, on_message: Callable[[str], None]):
        if urlsplit(url).scheme == "redis+cluster":
            # PUBLISH on a cluster reaches the subscribers of every node: any node will do.
            url = url.replace("redis+cluster://", "redis://", 1)
        self.dialer = PipelinedConnection(url)
        self.channel = channel
        self.on_message = on_message
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._listen())

    def _push(self, reply: object) -> None:
        if isinstance(reply, list) and len(reply) == 3 and reply[0] == "message":
            self.on_message(reply[2])

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            try:
                pipe = await self.dialer._connect()
                pipe.on_push = self._push
                await pipe.send(("SUBSCRIBE", self.channel))
                delay = 0.1
                await pipe.closed
            except (WireError, OSError, ReplyError) as exc:
                log.debug("seal subscription failed; retrying", extra={"error": str(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.dialer.close()


_detached: set[asyncio.Task] = set()


def _ignore(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log it: a lost release just expires


def _detach(coroutine) -> None:
    task = asyncio.ensure_future(coroutine)
    _detached.add(task)
    task.add_done_callback(_detached.discard)
    task.add_done_callback(_ignore)


def connect(url: str) -> PipelinedConnection | ClusterConnection:
    if urlsplit(url).scheme == "redis+cluster":
        return ClusterConnection(url)
    return PipelinedConnection(url)
