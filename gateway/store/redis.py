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

In engine mode (`engine=True`, mode `batches: gateway`) a batch's keys are
`<prefix>{<tree>}:<bid>:<name>` instead: every batch of one tree (engine.tree_of) shares the hash
tag, so a script walks from a batch up to its root on one Cluster slot. Besides the keys above:

- `<prefix>{<tree>}:<bid>:meta`  hash: counts, callbacks, stages, claims (lua/engine.lua lists them)
- `<prefix>{<tree>}:<bid>:jobs`  hash: jid -> mark (engine.Mark)
- `<prefix>engine:watch`         set: the bids being watched (its own slot; no script touches it)

meta and jobs live exactly as long as state: the scripts change their lifetimes together.

Every script starts with lua/prelude.lua, which reads a batch's state the same way everywhere; the
engine's scripts then with lua/engine.lua, which holds its marks, counts and evaluate walk.

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
from .engine import (
    ENGINE_OPEN_TTL,
    BatchSpec,
    BatchStatus,
    Claim,
    Kind,
    Mark,
    Stage,
    Watched,
    is_settled,
    tree_of,
)
from .wire import ReplyError, Subscriber, WireError, connect

log = logging.getLogger("gateway.store")

TIMEOUT = 2.0  # seconds for one round trip: a slow Redis must fail fast, inside clients' 5 s budget
PENDING_SCAN = 1000  # hash entries HSCAN looks at per round trip when pending_jobs looks for members


def _lua(name: str) -> str:
    return resources.files("gateway.store").joinpath(f"lua/{name}.lua").read_text()


_PRELUDE, _ENGINE = _lua("prelude"), _lua("engine")


class _Script:
    def __init__(self, name: str, engine: bool = False):
        parts = [_PRELUDE, _ENGINE, _lua(name)] if engine else [_PRELUDE, _lua(name)]
        self.source = "\n".join(parts)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


STATE, ACQUIRE, RENEW = _Script("state"), _Script("acquire"), _Script("renew")
BEGIN_COMMIT, COMMIT_GO, FINISH_COMMIT, ABANDON = (
    _Script("begin_commit"),
    _Script("commit_go"),
    _Script("finish_commit"),
    _Script("abandon"),
)
TRANSITION = _Script("transition")
NEW_BATCH, JOINED, RAN, CALLBACK_RAN, SETTLE, CONFIRM, TAKE_OVER = (
    _Script(name, engine=True)
    for name in ("new_batch", "joined", "ran", "callback_ran", "settle", "confirm", "take_over")
)
_EVERY_STATE = ",".join(s.value for s in BatchState)
_UNACKED = (Mark.PENDING, Mark.FAILED)
_KEYS = ("state", "leases", "attempts")
_ENGINE_KEYS = (*_KEYS, "meta", "jobs")


class RedisStore:
    def __init__(
        self,
        url: str,
        prefix: str,
        committed_retention: float,
        fired_retention: float,
        engine: bool = False,
    ):
        self.conn = connect(url)
        self.url = url
        self.prefix = prefix
        self.engine = engine
        self.channel = f"{prefix}seal"
        self.watch_key = f"{prefix}engine:watch"
        # The lifetimes every script needs, in ms: open/committing, committed, fired. Engine mode
        # applies Ent's own 30 minutes to uncommitted batches; Ent mode outlives Ent's records.
        open_ttl = ENGINE_OPEN_TTL if engine else OPEN_TTL
        self._lifetimes = (int(open_ttl * 1000), int(committed_retention * 1000), int(fired_retention * 1000))
        self._listeners: list[SealListener] = []
        self._subscriber: Subscriber | None = None

    def _tree_prefix(self, bid: str) -> str:
        """Engine mode: the prefix of the keys of every batch of bid's tree (one hash tag)."""
        return f"{self.prefix}{{{tree_of(bid)}}}:"

    def _key(self, bid: str, name: str) -> str:
        if self.engine:
            return f"{self._tree_prefix(bid)}{bid}:{name}"
        return f"{self.prefix}{{{bid}}}:{name}"

    def _keys(self, bid: str) -> list[str]:
        """The keys every script gets (lua/prelude.lua): in engine mode meta and jobs too, so that
        every change of the state's lifetime, by any script, is made to them as well."""
        return [self._key(bid, name) for name in (_ENGINE_KEYS if self.engine else _KEYS)]

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

    async def _eval_engine(self, script: _Script, bid: str, *args):
        """An engine script: ARGV[4] the tree's key prefix, ARGV[5] the bid (lua/engine.lua)."""
        if not self.engine:
            raise TypeError("the engine's operations need RedisStore(..., engine=True): its key layout")
        return await self._eval(script, bid, self._tree_prefix(bid), bid, *args)

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
        key = self._key(bid, "callbacks")
        await asyncio.gather(self._call("SADD", key, *jids), self._call("PEXPIRE", key, self._lifetimes[1]))

    async def is_callback(self, bid: str, jid: str) -> bool:
        return bool(await self._call("SISMEMBER", self._key(bid, "callbacks"), jid))

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

    # ------------------------------------------------------------------------------------------
    # The engine: each step that reads and writes is a script (lua/engine.lua and one file per
    # operation); reads are plain commands, sent together (the connection pipelines them).

    async def new_batch(self, bid: str, spec: BatchSpec) -> BatchState:
        callbacks = [item for kind, job in spec.callbacks.items() for item in (kind.value, job)]
        parent = spec.parent or ""
        reply = await self._eval_engine(NEW_BATCH, bid, parent, spec.description, spec.created_at, *callbacks)
        return BatchState(reply)

    async def joined(self, bid: str, jids: list[str]) -> None:
        if jids:
            await self._eval_engine(JOINED, bid, *jids)

    async def ran(self, bid: str, jid: str, ok: bool, token: str) -> list[Claim]:
        return _claims(await self._eval_engine(RAN, bid, jid, "1" if ok else "0", token), token)

    async def callback_ran(self, bid: str, kind: Kind, token: str) -> list[Claim]:
        return _claims(await self._eval_engine(CALLBACK_RAN, bid, kind.value, token), token)

    async def settle(self, bid: str, token: str) -> list[Claim]:
        return _claims(await self._eval_engine(SETTLE, bid, token), token)

    async def confirm(self, bid: str, kind: Kind, token: str) -> None:
        await self._eval_engine(CONFIRM, bid, kind.value, token)

    async def take_over(self, bid: str, kind: Kind, seen: str, token: str) -> Claim | None:
        job = await self._eval_engine(TAKE_OVER, bid, kind.value, seen, token)
        return None if job is None else Claim(bid, kind, token, job)

    async def _read(self, bid: str, fields: tuple[str, ...]) -> tuple[str | None, dict[str, str | None]]:
        """bid's state (None: no record) and the meta fields asked for, in one round trip."""
        state, values = await asyncio.gather(
            self._call("GET", self._key(bid, "state")), self._call("HMGET", self._key(bid, "meta"), *fields)
        )
        return state, dict(zip(fields, values, strict=True))

    async def batch_status(self, bid: str) -> BatchStatus | None:
        state, meta = await self._read(bid, _STATUS_FIELDS)
        if state is None:
            return None
        total = _int(meta["total"])
        return BatchStatus(
            bid,
            meta["parent"] or None,
            meta["description"] or "",
            meta["created_at"] or "",
            total,
            total - _int(meta["acked"]),
            _int(meta["failing"]),
            Stage(meta["st:complete"] or ""),
            Stage(meta["st:success"] or ""),
        )

    async def pending_jobs(self, bid: str, limit: int) -> list[str]:
        key, cursor = self._key(bid, "jobs"), 0
        found: list[str] = []
        while len(found) < limit:
            cursor, entries = _scan(await self._call("HSCAN", key, cursor, "COUNT", max(limit, PENDING_SCAN)))
            found += [jid for jid, mark in _hash(entries).items() if mark in _UNACKED]
            if cursor == 0:
                break
        return found[:limit]

    async def watch(self, bid: str) -> None:
        await self._call("SADD", self.watch_key, bid)

    async def unwatch(self, bid: str) -> None:
        await self._call("SREM", self.watch_key, bid)

    async def watched(self, cursor: int, count: int) -> tuple[int, list[str]]:
        cursor, bids = _scan(await self._call("SSCAN", self.watch_key, cursor, "COUNT", count))
        return cursor, list(bids)

    async def inspect(self, bids: list[str]) -> dict[str, Watched | None]:
        reads = await asyncio.gather(*(self._read(bid, _WATCH_FIELDS) for bid in bids))
        found: dict[str, Watched | None] = {}
        for bid, (state, meta) in zip(bids, reads, strict=True):
            if state is None:
                found[bid] = None
                continue
            claims = {kind: token for kind in Kind if (token := meta[f"claim:{kind}"])}
            settled = is_settled(
                [kind for kind in Kind if meta[f"cb:{kind}"] is not None],
                {kind: Stage(meta[f"st:{kind}"] or "") for kind in Kind},
                claims,
                meta["parent"] or None,
                [kind for kind in Kind if meta[f"told:{kind}"] == "1"],
            )
            pending = _int(meta["total"]) - _int(meta["acked"])
            found[bid] = Watched(bid, BatchState(state), claims, _int(meta["progress"]), pending, settled)
        return found

    # ------------------------------------------------------------------------------------------

    async def ping(self) -> bool:
        try:
            return await self._call("PING") == "PONG"
        except StoreError:
            return False

    async def close(self) -> None:
        if self._subscriber is not None:
            await self._subscriber.close()
        await self.conn.close()


_STATUS_FIELDS = (
    "parent", "description", "created_at", "total", "acked", "failing", "st:complete", "st:success",
)  # fmt: skip
_WATCH_FIELDS = (
    "parent", "total", "acked", "progress",
    *(f"{field}:{kind}" for field in ("cb", "st", "claim", "told") for kind in Kind),
)  # fmt: skip


def _hash(flat) -> dict[str, str]:
    """A hash's fields, from HGETALL's (or HSCAN's) flat reply; redis-py's cluster client already
    makes it a dict."""
    if isinstance(flat, dict):
        return flat
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def _beats(flat) -> dict[str, int]:
    """A hash's fields as {field: beat}."""
    return {field: int(beat) for field, beat in _hash(flat).items()}


def _scan(reply) -> tuple[int, list | dict]:
    """A SCAN-family reply as (next cursor, entries): Redis sends the cursor as a string, redis-py's
    cluster client as an int."""
    cursor, entries = reply
    return int(cursor), entries


def _claims(reply: list[list[str]], token: str) -> list[Claim]:
    """evaluate's claims ({bid, kind, job} each, lua/engine.lua), all made under `token`."""
    return [Claim(bid, Kind(kind), token, job) for bid, kind, job in reply]


def _int(value: str | None) -> int:
    """A counter of meta: absent (no meta: a record the engine did not make) reads 0."""
    return int(value or 0)
