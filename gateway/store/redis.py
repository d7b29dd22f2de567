"""The shared ledger in Redis, for any number of gateways.

Keys (prefix configurable, `fgw:` by default); the keys of one batch share the hash tag `{<bid>}`
so that each Lua script touches one Redis Cluster slot:

- `<prefix>{<bid>}:state`     string: open | committing | committed | fired, with a TTL
- `<prefix>{<bid>}:leases`    hash: lease token -> beat (no expiry: see lua/prelude.lua)
- `<prefix>{<bid>}:attempts`  hash: commit attempt ('w:' waiting, 's:' sent) -> beat
- `<prefix>{<bid>}:callbacks` set: the jids its BATCH NEW gave its callbacks (mode member-reopen)
- `<prefix>{wid:<wid>}:held`  hash: jid -> "<expiry ms> <bid> [<bid>]" (mode member-reopen)
- channel `<prefix>seal`      a bid, published when a commit seals it (works on Cluster too:
                              PUBLISH reaches every node's subscribers)

Every script starts with lua/prelude.lua, which reads a batch's state the same way everywhere.

URLs: `redis://[[user]:pw@]host:port/db`, `rediss://...` (TLS), `unix:///path?db=N`,
`redis+sentinel://[:pw@]h1:26379,h2:26379/<service>[/<db>]`, `redis+cluster://host:port`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from importlib import resources

from . import (
    COMMITTED,
    FIRED,
    OPEN,
    OPEN_TTL,
    BatchState,
    CommitGo,
    LeaseReply,
    SealListener,
    StoreError,
)
from .wire import ReplyError, Subscriber, WireError, connect

log = logging.getLogger("gateway.store")

TIMEOUT = 2.0  # seconds for one round trip: a slow Redis must fail fast, inside clients' 5 s budget
_PRELUDE = resources.files("gateway.store").joinpath("lua/prelude.lua").read_text()


class _Script:
    def __init__(self, name: str):
        body = resources.files("gateway.store").joinpath(f"lua/{name}.lua").read_text()
        self.source = _PRELUDE + "\n" + body
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


STATE, ACQUIRE, RENEW = _Script("state"), _Script("acquire"), _Script("renew")
BEGIN_COMMIT, COMMIT_GO, FINISH_COMMIT, ABANDON = (
    _Script("begin_commit"),
    _Script("commit_go"),
    _Script("finish_commit"),
    _Script("abandon"),
)
TRANSITION = _Script("transition")
_EVERY_STATE = ",".join(s.value for s in BatchState)


class RedisStore:
    def __init__(self, url: str, prefix: str, committed_retention: float, fired_retention: float):
        self.conn = connect(url)
        self.url = url
        self.prefix = prefix
        self.channel = f"{prefix}seal"
        # The lifetimes every script needs, in ms: open/committing, committed, fired.
        self._lifetimes = (int(OPEN_TTL * 1000), int(committed_retention * 1000), int(fired_retention * 1000))
        self._listeners: list[SealListener] = []
        self._subscriber: Subscriber | None = None

    def _keys(self, bid: str) -> list[str]:
        tag = f"{self.prefix}{{{bid}}}"
        return [f"{tag}:state", f"{tag}:leases", f"{tag}:attempts"]

    def _held_key(self, wid: str) -> str:
        return f"{self.prefix}{{wid:{wid}}}:held"

    async def _call(self, *args):
        try:
            async with asyncio.timeout(TIMEOUT):
                return await self.conn.call(*args)
        except TimeoutError as exc:
            self.conn.reset()  # a stalled connection is dropped; the next call dials afresh
            raise StoreError(f"no answer from Redis within {TIMEOUT:g}s") from exc
        except (WireError, OSError) as exc:
            raise StoreError(str(exc) or type(exc).__name__) from exc

    async def _eval(self, script: _Script, bid: str, *args):
        keys = self._keys(bid)
        try:
            return await self._call("EVALSHA", script.sha, len(keys), *keys, *self._lifetimes, *args)
        except StoreError as exc:
            if not isinstance(exc.__cause__, ReplyError) or "NOSCRIPT" not in str(exc):
                raise
            # A restarted (or new) Redis has no scripts yet: EVAL runs and caches it.
            return await self._call("EVAL", script.source, len(keys), *keys, *self._lifetimes, *args)

    async def _move(self, bid: str, allowed: str, new: BatchState) -> BatchState:
        return BatchState(await self._eval(TRANSITION, bid, allowed, new.value))

    async def create(self, bid: str, state: BatchState = OPEN) -> None:
        ttl = self._lifetimes[{COMMITTED: 1, FIRED: 2}.get(state, 0)]
        await self._call("SET", self._keys(bid)[0], state.value, "PX", ttl, "NX")

    async def state(self, bid: str) -> BatchState:
        return BatchState(await self._eval(STATE, bid))

    async def acquire(self, bid: str, token: str) -> LeaseReply:
        state, held = await self._eval(ACQUIRE, bid, token)
        return LeaseReply(BatchState(state), bool(held))

    async def renew(self, bid: str, token: str) -> LeaseReply:
        state, held = await self._eval(RENEW, bid, token)
        return LeaseReply(BatchState(state), bool(held))

    def release(self, bid: str, token: str) -> None:
        self.conn.send_only("HDEL", self._keys(bid)[1], token)

    async def begin_commit(self, bid: str, attempt: str, adopt: bool = True) -> BatchState:
        args = (attempt, self.channel, bid, "1" if adopt else "0")
        return BatchState(await self._eval(BEGIN_COMMIT, bid, *args))

    async def commit_go(self, bid: str, attempt: str, lapsed: dict[str, int], adopt: bool = True) -> CommitGo:
        pairs = [item for token, beat in lapsed.items() for item in (token, beat)]
        reply = await self._eval(COMMIT_GO, bid, attempt, self.channel, bid, "1" if adopt else "0", *pairs)
        if reply[0]:
            return CommitGo(True)
        return CommitGo(False, _beats(reply[1:]))

    async def finish_commit(self, bid: str, attempt: str, committed: bool) -> BatchState:
        return BatchState(await self._eval(FINISH_COMMIT, bid, attempt, "1" if committed else "0"))

    async def attempts(self, bid: str) -> dict[str, int]:
        return _beats(await self._call("HGETALL", self._keys(bid)[2]))

    async def abandon(self, bid: str, seen: dict[str, int]) -> BatchState:
        pairs = [item for attempt, beat in seen.items() for item in (attempt, beat)]
        return BatchState(await self._eval(ABANDON, bid, *pairs))

    async def reopen(self, bid: str) -> BatchState:
        return await self._move(bid, COMMITTED.value, OPEN)

    async def mark_fired(self, bid: str) -> None:
        await self._move(bid, _EVERY_STATE, FIRED)

    async def touch(self, bid: str) -> None:
        await self._move(bid, COMMITTED.value, COMMITTED)

    def on_seal(self, listener: SealListener) -> None:
        """Listen on the seal channel from a connection of its own (a subscribed connection can
        send nothing else). Started on first use, from inside the event loop."""
        self._listeners.append(listener)
        if self._subscriber is None:
            self._subscriber = Subscriber(self.url, self.channel, self._sealed)
            self._subscriber.start()

    def _sealed(self, bid: str) -> None:
        for listener in self._listeners:
            listener(bid)

    async def add_callbacks(self, bid: str, jids: list[str]) -> None:
        key = f"{self.prefix}{{{bid}}}:callbacks"
        await asyncio.gather(self._call("SADD", key, *jids), self._call("PEXPIRE", key, self._lifetimes[1]))

    async def is_callback(self, bid: str, jid: str) -> bool:
        return bool(await self._call("SISMEMBER", f"{self.prefix}{{{bid}}}:callbacks", jid))

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
        if self._subscriber is not None:
            await self._subscriber.close()
        await self.conn.close()


def _beats(flat) -> dict[str, int]:
    """A hash's fields as {field: beat}, from HGETALL's flat reply (redis-py's cluster client
    already makes it a dict)."""
    if isinstance(flat, dict):
        return {field: int(beat) for field, beat in flat.items()}
    return {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}
