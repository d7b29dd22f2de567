"""The shared ledger in Redis, for any number of gateways.

Keys (prefix configurable, `fgw:` by default); the two keys of one batch share the hash tag
`{<bid>}` so that each Lua script touches one Redis Cluster slot:

- `<prefix>{<bid>}:state`    string: open | committing | committed | fired, with a TTL
- `<prefix>{<bid>}:leases`   sorted set: lease token -> expiry (Redis's clock, ms)
- `<prefix>{wid:<wid>}:held` hash: jid -> "<expiry ms> <bid> [<bid>]" (mode member-reopen)

URLs: `redis://[[user]:pw@]host:port/db`, `rediss://...` (TLS), `unix:///path?db=N`,
`redis+sentinel://[:pw@]h1:26379,h2:26379/<service>[/<db>]`, `redis+cluster://host:port`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from importlib import resources

from . import COMMITTED, COMMITTING, FIRED, OPEN, OPEN_TTL, UNKNOWN, StoreError
from .wire import ReplyError, WireError, connect

TIMEOUT = 2.0  # seconds for one round trip: a slow Redis must fail fast, inside clients' 5 s budget


class _Script:
    def __init__(self, name: str):
        self.source = resources.files("gateway.store").joinpath(f"lua/{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


TRANSITION, ADMIT, LIVE_LEASES = _Script("transition"), _Script("admit"), _Script("live_leases")


class RedisStore:
    def __init__(self, url: str, prefix: str, retention: float, lease_ttl: float):
        self.conn = connect(url)
        self.prefix = prefix
        self.retention_ms = int(retention * 1000)
        self.lease_ttl_ms = int(lease_ttl * 1000)

    def _state_key(self, bid: str) -> str:
        return f"{self.prefix}{{{bid}}}:state"

    def _lease_key(self, bid: str) -> str:
        return f"{self.prefix}{{{bid}}}:leases"

    def _held_key(self, wid: str) -> str:
        return f"{self.prefix}{{wid:{wid}}}:held"

    def _ttl_ms(self, state: str) -> int:
        return int(OPEN_TTL * 1000) if state in (OPEN, COMMITTING) else self.retention_ms

    async def _call(self, *args):
        try:
            async with asyncio.timeout(TIMEOUT):
                return await self.conn.call(*args)
        except TimeoutError as exc:
            self.conn.reset()  # a stalled connection is dropped; the next call dials afresh
            raise StoreError(f"no answer from Redis within {TIMEOUT:g}s") from exc
        except (WireError, OSError) as exc:
            raise StoreError(str(exc) or type(exc).__name__) from exc

    async def _eval(self, script: _Script, keys: list[str], *args):
        try:
            return await self._call("EVALSHA", script.sha, len(keys), *keys, *args)
        except StoreError as exc:
            if not isinstance(exc.__cause__, ReplyError) or "NOSCRIPT" not in str(exc):
                raise
            # A restarted (or new) Redis has no scripts yet: EVAL runs and caches it.
            return await self._call("EVAL", script.source, len(keys), *keys, *args)

    async def _move(self, bid: str, allowed: tuple[str, ...], new: str) -> str:
        return await self._eval(TRANSITION, [self._state_key(bid)], ",".join(allowed), new, self._ttl_ms(new))

    async def create(self, bid: str, state: str = OPEN) -> None:
        await self._call("SET", self._state_key(bid), state, "PX", self._ttl_ms(state), "NX")

    async def state(self, bid: str) -> str:
        return await self._call("GET", self._state_key(bid)) or UNKNOWN

    async def admit(self, bid: str, token: str) -> str:
        return await self._eval(ADMIT, [self._state_key(bid), self._lease_key(bid)], token, self.lease_ttl_ms)

    def release(self, bid: str, token: str) -> None:
        self.conn.send_only("ZREM", self._lease_key(bid), token)

    async def begin_commit(self, bid: str) -> str:
        return await self._move(bid, (OPEN, UNKNOWN), COMMITTING)

    async def live_leases(self, bid: str) -> int:
        return int(await self._eval(LIVE_LEASES, [self._lease_key(bid)]))

    async def finish_commit(self, bid: str, committed: bool) -> None:
        await self._move(bid, (COMMITTING,), COMMITTED if committed else OPEN)

    async def reopen(self, bid: str) -> str:
        return await self._move(bid, (COMMITTED,), OPEN)

    async def mark_fired(self, bid: str) -> None:
        await self._call("SET", self._state_key(bid), FIRED, "PX", self.retention_ms)

    async def hold(self, wid: str, jid: str, bids: list[str], ttl: float) -> None:
        key, ttl_ms = self._held_key(wid), int(ttl * 1000)
        expires = int(time.time() * 1000) + ttl_ms
        # Sent together: the connection pipelines them. The key lives as long as its longest job.
        await asyncio.gather(
            self._call("HSET", key, jid, " ".join([str(expires), *bids])),
            self._call("PEXPIRE", key, ttl_ms, "GT"),
            self._call("PEXPIRE", key, ttl_ms, "NX"),
        )

    async def unhold(self, wid: str, jid: str) -> None:
        await self._call("HDEL", self._held_key(wid), jid)

    async def holds(self, wid: str, bid: str) -> bool:
        now = time.time() * 1000
        for value in await self._call("HVALS", self._held_key(wid)):
            expires, *bids = value.split(" ")
            if bid in bids and int(expires) > now:
                return True
        return False

    async def ping(self) -> bool:
        try:
            return await self._call("PING") == "PONG"
        except StoreError:
            return False

    async def close(self) -> None:
        await self.conn.close()
