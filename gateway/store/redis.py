"""The shared ledger in Redis, for any number of gateways.

Keys (prefix configurable, `fgw:` by default); the two keys of one batch share the hash tag
`{<bid>}` so that each Lua script touches one Redis Cluster slot:

- `<prefix>{<bid>}:state`   string: open | committing | committed | fired, with a TTL
- `<prefix>{<bid>}:leases`  sorted set: lease token -> expiry (server clock, ms)
- `<prefix>{wid:<wid>}:held` hash: jid -> "<expiry ms> <bid> [<bid>]" (mode member-reopen)

URLs: `redis://`, `rediss://`, `unix://` as redis-py reads them; `redis+sentinel://[:pw@]h1:26379,
h2:26379/<service>[/<db>]` for Sentinel; `redis+cluster://h:p` for Cluster.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from . import COMMITTED, COMMITTING, FIRED, OPEN, OPEN_TTL, UNKNOWN, StoreError

TIMEOUT = 2.0  # seconds for one round trip: a slow Redis must fail fast, inside clients' 5 s budget


def _script(name: str) -> str:
    return resources.files("gateway.store").joinpath(f"lua/{name}.lua").read_text()


def connect(url: str):
    """A redis-py asyncio client for any of the supported URL forms."""
    # No socket_timeout: redis-py enforces it with a task per read; RedisStore._call bounds the
    # whole round trip with one cheap asyncio.timeout instead.
    options = {"socket_connect_timeout": TIMEOUT, "decode_responses": True}
    parts = urlsplit(url)
    if parts.scheme == "redis+sentinel":
        hosts = [h.rsplit(":", 1) for h in parts.netloc.rpartition("@")[2].split(",")]
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("redis+sentinel:// needs the service name as its path")
        password = unquote(parts.password) if parts.password else None
        sentinel = Sentinel(
            [(h, int(p)) for h, p in hosts], sentinel_kwargs={"password": password}, **options
        )
        return sentinel.master_for(path[0], db=int(path[1]) if len(path) > 1 else 0, password=password)
    if parts.scheme == "redis+cluster":
        return RedisCluster.from_url(url.replace("redis+cluster://", "redis://", 1), **options)
    return aioredis.Redis.from_url(url, **options)


class RedisStore:
    def __init__(self, url: str, prefix: str, retention: float, lease_ttl: float):
        self.client = connect(url)
        self.prefix = prefix
        self.retention_ms = int(retention * 1000)
        self.lease_ttl_ms = int(lease_ttl * 1000)
        self._transition = self.client.register_script(_script("transition"))
        self._admit = self.client.register_script(_script("admit"))
        self._live_leases = self.client.register_script(_script("live_leases"))

    def _state_key(self, bid: str) -> str:
        return f"{self.prefix}{{{bid}}}:state"

    def _lease_key(self, bid: str) -> str:
        return f"{self.prefix}{{{bid}}}:leases"

    def _held_key(self, wid: str) -> str:
        return f"{self.prefix}{{wid:{wid}}}:held"

    def _ttl_ms(self, state: str) -> int:
        return int(OPEN_TTL * 1000) if state in (OPEN, COMMITTING) else self.retention_ms

    async def _call(self, awaitable):
        try:
            async with asyncio.timeout(TIMEOUT):
                return await awaitable
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreError(str(exc) or type(exc).__name__) from exc

    async def _move(self, bid: str, allowed: tuple[str, ...], new: str) -> str:
        return await self._call(
            self._transition(keys=[self._state_key(bid)], args=[",".join(allowed), new, self._ttl_ms(new)])
        )

    async def create(self, bid: str, state: str = OPEN) -> None:
        await self._call(self.client.set(self._state_key(bid), state, px=self._ttl_ms(state), nx=True))

    async def state(self, bid: str) -> str:
        return await self._call(self.client.get(self._state_key(bid))) or UNKNOWN

    async def admit(self, bid: str, token: str) -> str:
        keys = [self._state_key(bid), self._lease_key(bid)]
        return await self._call(self._admit(keys=keys, args=[token, self.lease_ttl_ms]))

    async def release(self, bid: str, token: str) -> None:
        await self._call(self.client.zrem(self._lease_key(bid), token))

    async def begin_commit(self, bid: str) -> str:
        return await self._move(bid, (OPEN, UNKNOWN), COMMITTING)

    async def live_leases(self, bid: str) -> int:
        return int(await self._call(self._live_leases(keys=[self._lease_key(bid)])))

    async def finish_commit(self, bid: str, committed: bool) -> None:
        await self._move(bid, (COMMITTING,), COMMITTED if committed else OPEN)

    async def reopen(self, bid: str) -> str:
        return await self._move(bid, (COMMITTED,), OPEN)

    async def mark_fired(self, bid: str) -> None:
        await self._call(self.client.set(self._state_key(bid), FIRED, px=self.retention_ms))

    async def hold(self, wid: str, jid: str, bids: list[str], ttl: float) -> None:
        expires = int((time.time() + ttl) * 1000)
        key = self._held_key(wid)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(key, jid, " ".join([str(expires), *bids]))
            pipe.pexpire(key, int(ttl * 1000), gt=True)
            pipe.pexpire(key, int(ttl * 1000), nx=True)
            await self._call(pipe.execute())

    async def unhold(self, wid: str, jid: str) -> None:
        await self._call(self.client.hdel(self._held_key(wid), jid))

    async def holds(self, wid: str, bid: str) -> bool:
        now = time.time() * 1000
        for value in await self._call(self.client.hvals(self._held_key(wid))):
            expires, *bids = value.split(" ")
            if bid in bids and int(expires) > now:
                return True
        return False

    async def ping(self) -> bool:
        try:
            return bool(await self._call(self.client.ping()))
        except StoreError:
            return False

    async def close(self) -> None:
        await self.client.aclose()
