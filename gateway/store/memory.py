"""The in-process ledger: the embedded default when no Redis is configured.

It has exactly the semantics of the Redis ledger, but only one gateway process can see it, so it
is for a sidecar in front of a server that no other gateway fronts. Each method runs without an
`await` in between its reads and writes, which makes it atomic on the event loop.

Scale: a record is one dict entry whose value packs the state and the expiry into one int, and
expiry is incremental: records are filed in one-minute buckets of a wheel, and every call expires
at most `EXPIRE_PER_CALL` of them; a larger backlog (a million records expiring together) drains in
steps of `DRAIN_STEP` every `DRAIN_EVERY` seconds, scheduled only while there is one. No call or
step ever walks the whole ledger, so a million records cost no event-loop stall (bench/ledger.py
measures it).

The engine's data and operations (`batches: gateway`) are memory_engine.py's `MemoryEngineLedger`,
which this class extends; a record's engine data is dropped with it.
"""

from __future__ import annotations

import asyncio
import heapq
import time

from . import (
    COMMITTED,
    COMMITTING,
    FIRED,
    OPEN,
    OPEN_TTL,
    UNKNOWN,
    BatchState,
    CommitGo,
    LeaseReply,
    SealListener,
)
from .engine import ENGINE_OPEN_TTL
from .memory_engine import MemoryEngineLedger

EXPIRE_PER_CALL = 64  # records a call may expire: enough to keep up, never a stall
DRAIN_EVERY, DRAIN_STEP = 0.002, 256  # a backlog of expired records drains in small steps of its own
BUCKET_MS = 60_000
_CODES = (OPEN, COMMITTING, COMMITTED, FIRED)
_CODE = {state: code for code, state in enumerate(_CODES)}


class ExpiryWheel:
    """Keys filed by the minute they expire in; `due` hands out at most `limit` of the expired ones.

    A record is reclaimed up to a minute after it expired (it reads as expired at once: the
    record's own expiry decides that); coarse buckets keep the wheel small beside the records.

    A key filed twice (its record was refreshed) comes out twice: the caller checks the record's
    own expiry before deleting, so a stale filing costs one lookup and nothing else.
    """

    def __init__(self) -> None:
        self._buckets: dict[int, list[str]] = {}
        self._order: list[int] = []  # a heap of the buckets' numbers

    def add(self, key: str, expires_ms: int) -> None:
        slot = expires_ms // BUCKET_MS + 1  # filed after it expired, never before
        bucket = self._buckets.get(slot)
        if bucket is None:
            self._buckets[slot] = bucket = []
            heapq.heappush(self._order, slot)
        bucket.append(key)

    def due(self, now_ms: int, limit: int) -> list[str]:
        keys: list[str] = []
        order = self._order
        while order and order[0] * BUCKET_MS <= now_ms and len(keys) < limit:
            bucket = self._buckets[order[0]]
            take = limit - len(keys)
            keys += bucket[-take:]
            del bucket[-take:]
            if not bucket:
                del self._buckets[heapq.heappop(order)]
        return keys

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())


class MemoryStore(MemoryEngineLedger):
    def __init__(
        self,
        committed_retention: float,
        fired_retention: float,
        clock=time.monotonic,
        engine: bool = False,
    ):
        super().__init__()
        # Engine mode applies Ent's own 30 minutes to uncommitted batches; Ent mode outlives Ent's.
        self.open_ms = int((ENGINE_OPEN_TTL if engine else OPEN_TTL) * 1000)
        self.committed_ms = int(committed_retention * 1000)
        self.fired_ms = int(fired_retention * 1000)
        self.clock = clock
        self._epoch = clock()
        self._batches: dict[str, int] = {}  # bid -> expiry_ms << 2 | state code
        # The fence's data carries beats, never times (as in Redis: docs/fence.md, A1).
        self._leases: dict[str, dict[str, int]] = {}  # bid -> {lease token: beat}
        self._attempts: dict[str, dict[str, int]] = {}  # bid -> {'w:<id>' or 's:<id>': beat}
        self._held: dict[str, dict[str, tuple[list[str], int]]] = {}  # wid -> {jid: (bids, expiry)}
        self._callbacks: dict[str, tuple[str, ...]] = {}  # bid -> its callbacks' jids
        self._wheel = ExpiryWheel()
        self._held_wheel = ExpiryWheel()
        self._listeners: list[SealListener] = []
        self._drain: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------------------------------
    # Records

    def _now(self) -> int:
        return int((self.clock() - self._epoch) * 1000)

    def _expire_some(self, now: int, limit: int = EXPIRE_PER_CALL) -> None:
        due = self._wheel.due(now, limit)
        for bid in due:
            packed = self._batches.get(bid)
            if packed is not None and packed >> 2 <= now:
                self._drop(bid)
        for wid in self._held_wheel.due(now, limit):
            jobs = self._held.get(wid)
            if jobs is not None:
                for jid in [jid for jid, (_, expires) in jobs.items() if expires <= now]:
                    del jobs[jid]
                if not jobs:
                    del self._held[wid]
        if len(due) == limit and self._drain is None:  # a backlog: drain it without the callers
            self._drain = asyncio.get_running_loop().call_later(DRAIN_EVERY, self._drain_step)

    def _drop(self, bid: str) -> None:
        del self._batches[bid]
        # Leases are not the record's: their holders release them (as in Redis, where they
        # outlive a record that ages out while pushes are still admitted).
        self._attempts.pop(bid, None)
        self._callbacks.pop(bid, None)
        self._engine.pop(bid, None)

    def _drain_step(self) -> None:
        self._drain = None
        self._expire_some(self._now(), DRAIN_STEP)

    def _get(self, bid: str) -> BatchState:
        now = self._now()
        self._expire_some(now)
        packed = self._batches.get(bid)
        if packed is None:
            return UNKNOWN
        if packed >> 2 <= now:
            # Reclaimed at once, not when the wheel comes to it: a record made again under the same
            # bid must not find the old one's data.
            self._drop(bid)
            return UNKNOWN
        return _CODES[packed & 3]

    def _ttl_ms(self, state: BatchState) -> int:
        if state == COMMITTED:
            return self.committed_ms
        if state == FIRED:
            return self.fired_ms
        return self.open_ms

    def _set(self, bid: str, state: BatchState, ttl_ms: int | None = None) -> None:
        expires = self._now() + (self._ttl_ms(state) if ttl_ms is None else ttl_ms)
        self._batches[bid] = expires << 2 | _CODE[state]
        self._wheel.add(bid, expires)
        if state != COMMITTING:
            self._attempts.pop(bid, None)
        if state == COMMITTED or state == FIRED:
            self._leases.pop(bid, None)  # no lease matters after a commit

    # ------------------------------------------------------------------------------------------
    # The interface

    async def create(self, bid: str, state: BatchState = OPEN) -> None:
        if self._get(bid) == UNKNOWN:
            self._set(bid, state)

    async def state(self, bid: str) -> BatchState:
        return self._get(bid)

    async def acquire(self, bid: str, token: str) -> LeaseReply:
        state = self._get(bid)
        leases = self._leases.get(bid, {})
        if state != OPEN:
            return LeaseReply(state, token in leases)
        leases = self._leases.setdefault(bid, {})
        leases[token] = leases.get(token, 0) + 1
        return LeaseReply(state, True)

    async def renew(self, bid: str, token: str) -> LeaseReply:
        state = self._get(bid)
        leases = self._leases.get(bid, {})
        if token not in leases:
            return LeaseReply(state, False)
        leases[token] += 1
        return LeaseReply(state, True)

    def release(self, bid: str, token: str) -> None:
        leases = self._leases.get(bid)
        if leases is not None:
            leases.pop(token, None)
            if not leases:
                del self._leases[bid]

    def _seal(self, bid: str, attempt: str) -> None:
        if self._get(bid) != COMMITTING:
            self._set(bid, COMMITTING)
        attempts = self._attempts.setdefault(bid, {})
        attempts["w:" + attempt] = attempts.get("w:" + attempt, 0) + 1
        for listener in self._listeners:
            listener(bid)

    async def begin_commit(self, bid: str, attempt: str, adopt: bool = True) -> BatchState:
        before = self._get(bid)
        if before == UNKNOWN and not adopt:
            return before
        if before in (OPEN, UNKNOWN, COMMITTING):
            self._seal(bid, attempt)
        return before

    async def commit_go(self, bid: str, attempt: str, lapsed: dict[str, int], adopt: bool = True) -> CommitGo:
        state = self._get(bid)
        if state in (COMMITTED, FIRED):
            return CommitGo(
                True
            )  # another attempt finished: this one is a repeated commit, the server answers
        if state == UNKNOWN and not adopt:
            return CommitGo(False)
        if state != COMMITTING:  # this attempt was abandoned and the batch reopened: seal it again, wait
            self._seal(bid, attempt)
            return CommitGo(False)
        leases = self._leases.get(bid, {})
        for token in [token for token, beat in leases.items() if lapsed.get(token) == beat]:
            del leases[token]  # seen unchanged for a whole lease life by the committer: ended
        attempts = self._attempts.setdefault(bid, {})
        if leases:
            attempts["w:" + attempt] = attempts.get("w:" + attempt, 0) + 1
            return CommitGo(False, dict(leases))
        attempts.pop("w:" + attempt, None)
        attempts["s:" + attempt] = attempts.get("s:" + attempt, 0) + 1
        # From here the server may have it committed: the record lives as long as a committed one.
        self._set(bid, COMMITTING, self.committed_ms)
        return CommitGo(True)

    async def finish_commit(self, bid: str, attempt: str, committed: bool) -> BatchState:
        state = self._get(bid)
        if state == FIRED:
            return state
        if committed:  # the server said +OK: whatever other attempts or timeouts did, it is committed
            self._set(bid, COMMITTED)
            return COMMITTED
        attempts = self._attempts.get(bid, {})
        attempts.pop("w:" + attempt, None)
        attempts.pop("s:" + attempt, None)
        if state == COMMITTING and not attempts:
            self._set(bid, OPEN)
            return OPEN
        return state

    async def attempts(self, bid: str) -> dict[str, int]:
        return dict(self._attempts.get(bid, {}))

    async def abandon(self, bid: str, seen: dict[str, int]) -> BatchState:
        state = self._get(bid)
        if state != COMMITTING or self._attempts.get(bid, {}) != seen:
            return state
        # A sent attempt may have reached the server: committed is the safe reading.
        state = COMMITTED if any(attempt.startswith("s:") for attempt in seen) else OPEN
        self._set(bid, state)
        return state

    async def reopen(self, bid: str) -> BatchState:
        before = self._get(bid)
        if before == COMMITTED:
            self._set(bid, OPEN)
        return before

    async def mark_fired(self, bid: str) -> None:
        self._set(bid, FIRED)

    async def touch(self, bid: str) -> None:
        if self._get(bid) == COMMITTED:
            self._set(bid, COMMITTED)

    def on_seal(self, listener: SealListener) -> None:
        self._listeners.append(listener)

    async def add_callbacks(self, bid: str, jids: list[str]) -> None:
        if jids and self._get(bid) != UNKNOWN:
            self._callbacks[bid] = tuple(jids)

    async def is_callback(self, bid: str, jid: str) -> bool:
        return self._get(bid) != UNKNOWN and jid in self._callbacks.get(bid, ())

    async def hold(self, wid: str, jid: str, bids: list[str], ttl: float) -> None:
        expires = self._now() + int(ttl * 1000)
        self._held.setdefault(wid, {})[jid] = (bids, expires)
        self._held_wheel.add(wid, expires)

    async def unhold(self, wid: str, jid: str) -> None:
        jobs = self._held.get(wid)
        if jobs is not None:
            jobs.pop(jid, None)
            if not jobs:
                del self._held[wid]

    async def holds(self, wid: str, bid: str) -> bool:
        now = self._now()
        self._expire_some(now)
        return any(bid in bids and expires > now for bids, expires in self._held.get(wid, {}).values())

    # ------------------------------------------------------------------------------------------

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        if self._drain is not None:
            self._drain.cancel()

    def __len__(self) -> int:
        return len(self._batches)
