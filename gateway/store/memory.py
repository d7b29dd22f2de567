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

The engine's data (counts, callbacks, jobs' marks: `_EngineBatch`) is kept beside the record and
dropped with it; the engine's transitions and its evaluate walk are written here once, the same
steps the Redis scripts take (lua/engine.lua), each method again without an await inside.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import time
from dataclasses import dataclass, field

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
)

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


@dataclass(slots=True, eq=False)
class _EngineBatch:
    """One batch's engine data: what Redis keeps in its `meta` and `jobs` hashes."""

    parent: str | None = None
    description: str = ""
    created_at: str = ""
    callbacks: dict[Kind, str] = field(default_factory=dict)
    total: int = 0  # members
    ran: int = 0  # members that ran at least once
    acked: int = 0
    failing: int = 0  # members whose last run failed, not ACKed since
    children: int = 0  # child batches created under it
    progress: int = 0  # bumped by every count that changed something
    stage: dict[Kind, Stage] = field(default_factory=lambda: dict.fromkeys(Kind, Stage.NONE))
    over: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))  # children over, once each
    told: set[Kind] = field(default_factory=set)  # stages this batch told its parent are over
    claims: dict[Kind, str] = field(default_factory=dict)  # kind -> token of an unconfirmed claim
    jobs: dict[str, Mark] = field(default_factory=dict)

    def join(self, jid: str) -> bool:
        """The server took jid into the batch: a member, counted once. True if anything changed."""
        match self.jobs.get(jid):
            case None:
                self.jobs[jid] = Mark.PENDING
                self.total += 1
            case Mark.EARLY_ACK:
                self.jobs[jid] = Mark.ACKED
                self.total += 1
                self.ran += 1
                self.acked += 1
            case Mark.EARLY_FAIL:
                self.jobs[jid] = Mark.FAILED
                self.total += 1
                self.ran += 1
                self.failing += 1
            case _:  # a member already: counted once
                return False
        return True

    def run(self, jid: str, ok: bool) -> bool:
        """jid was ACKed (ok) or FAILed. True if anything changed."""
        match self.jobs.get(jid), ok:
            case Mark.PENDING, True:
                self.jobs[jid] = Mark.ACKED
                self.ran += 1
                self.acked += 1
            case Mark.PENDING, False:
                self.jobs[jid] = Mark.FAILED
                self.ran += 1
                self.failing += 1
            case Mark.FAILED, True:  # the retry succeeded
                self.jobs[jid] = Mark.ACKED
                self.acked += 1
                self.failing -= 1
            case None, True:  # ran before its count arrived: kept until joined counts it
                self.jobs[jid] = Mark.EARLY_ACK
            case None, False:
                self.jobs[jid] = Mark.EARLY_FAIL
            case Mark.EARLY_FAIL, True:
                self.jobs[jid] = Mark.EARLY_ACK
            case _:  # failed again, or ACKed already: nothing to count
                return False
        return True

    def ready(self, kind: Kind, committed: bool) -> bool:
        """Is the stage `kind` reached: every member ran (complete) or was ACKed (success), and
        every child's stage is over? Success also waits for the complete callback's ACK."""
        if not committed or self.over[kind] != self.children:
            return False
        if kind == Kind.COMPLETE:
            return self.ran == self.total
        return self.acked == self.total and (
            Kind.COMPLETE not in self.callbacks or self.stage[Kind.COMPLETE] == Stage.DONE
        )

    def is_over(self, kind: Kind, committed: bool) -> bool:
        """Is the stage over, as the parent sees it: its callback ACKed, or, without one, reached."""
        if kind in self.callbacks:
            return self.stage[kind] == Stage.DONE
        return self.ready(kind, committed)

    def settled(self) -> bool:
        return is_settled(self.callbacks, self.stage, self.claims, self.parent, self.told)


class WatchIndex:
    """A set of bids walked with SSCAN's contract: a bid in the set for the whole walk is returned
    at least once. Each bid gets a sequence number when added; the cursor is the next number to
    return, found by bisection, so a page costs its own size and never a walk of the whole set."""

    def __init__(self) -> None:
        self._seq: dict[str, int] = {}
        self._order: list[tuple[int, str]] = []  # (seq, bid), ascending; entries of removed bids linger
        self._next = 1  # cursor 0 means "from the start"

    def add(self, bid: str) -> None:
        if bid not in self._seq:
            self._seq[bid] = self._next
            self._order.append((self._next, bid))
            self._next += 1

    def discard(self, bid: str) -> None:
        if self._seq.pop(bid, None) is not None and len(self._order) > 2 * len(self._seq) + 64:
            self._order = [(seq, bid) for seq, bid in self._order if self._seq.get(bid) == seq]

    def scan(self, cursor: int, count: int) -> tuple[int, list[str]]:
        i = bisect.bisect_left(self._order, (cursor, ""))
        page: list[str] = []
        while i < len(self._order) and len(page) < count:
            seq, bid = self._order[i]
            i += 1
            if self._seq.get(bid) == seq:
                page.append(bid)
        return (self._order[i][0] if i < len(self._order) else 0), page


class MemoryStore:
    def __init__(
        self,
        committed_retention: float,
        fired_retention: float,
        clock=time.monotonic,
        engine: bool = False,
    ):
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
        self._engine: dict[str, _EngineBatch] = {}  # bid -> its engine data, dropped with its record
        self._watch = WatchIndex()
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
    # The engine

    def _engine_batch(self, bid: str) -> _EngineBatch | None:
        """bid's engine data; None when it has no record. A record made without any (`create`, an
        adopted commit) reads as an empty batch, as a missing meta hash does in Redis."""
        if self._get(bid) == UNKNOWN:
            return None
        batch = self._engine.get(bid)
        if batch is None:
            batch = self._engine[bid] = _EngineBatch()
        return batch

    def _evaluate(self, bid: str, token: str) -> list[Claim]:
        """From bid up to its root: claim each callback that is due (complete first) and tell the
        parent each stage that is over, once. A fired batch never takes a job again, so its
        counts only move towards readiness and nothing here is ever undone."""
        claims: list[Claim] = []
        at: str | None = bid
        while at is not None:
            state = self._get(at)
            batch = self._engine_batch(at)
            if batch is None:  # no record: nothing to fire, nobody to tell
                break
            committed = state in (COMMITTED, FIRED)
            for kind in Kind:
                if (
                    kind in batch.callbacks
                    and batch.stage[kind] == Stage.NONE
                    and batch.ready(kind, committed)
                ):
                    batch.stage[kind] = Stage.ENQUEUED
                    batch.claims[kind] = token
                    self._set(at, FIRED)
                    claims.append(Claim(at, kind, token, batch.callbacks[kind]))
            parent = self._engine_batch(batch.parent) if batch.parent is not None else None
            if parent is None:
                break
            for kind in Kind:
                if kind not in batch.told and batch.is_over(kind, committed):
                    batch.told.add(kind)
                    parent.over[kind] += 1
            at = batch.parent
        return claims

    async def new_batch(self, bid: str, spec: BatchSpec) -> BatchState:
        state = self._get(bid)
        if state != UNKNOWN:
            return state
        if spec.parent is not None:
            # The caller admitted the child under the parent's lease (open), or let a worker that
            # holds a job of the committed parent add it (lua/new_batch.lua); any other state
            # refuses the child, and says why.
            parent_state, parent = self._get(spec.parent), self._engine_batch(spec.parent)
            if parent is None or parent_state not in (OPEN, COMMITTED):
                return parent_state
            parent.children += 1
        self._set(bid, OPEN)
        self._engine[bid] = _EngineBatch(spec.parent, spec.description, spec.created_at, dict(spec.callbacks))
        return OPEN

    async def joined(self, bid: str, jids: list[str]) -> None:
        batch = self._engine_batch(bid)
        if batch is not None:
            changed = [batch.join(jid) for jid in jids]  # a list: any() alone would stop at the first
            if any(changed):
                batch.progress += 1

    async def ran(self, bid: str, jid: str, ok: bool, token: str) -> list[Claim]:
        batch = self._engine_batch(bid)
        if batch is None:
            return []
        if batch.run(jid, ok):
            batch.progress += 1
        return self._evaluate(bid, token)

    async def callback_ran(self, bid: str, kind: Kind, token: str) -> list[Claim]:
        batch = self._engine_batch(bid)
        if batch is None:
            return []
        if batch.stage[kind] == Stage.ENQUEUED:
            batch.stage[kind] = Stage.DONE
            batch.claims.pop(kind, None)  # its ACK proves the server had it: nothing to take over
            batch.progress += 1
        return self._evaluate(bid, token)

    async def settle(self, bid: str, token: str) -> list[Claim]:
        return self._evaluate(bid, token)

    async def confirm(self, bid: str, kind: Kind, token: str) -> None:
        batch = self._engine_batch(bid)
        if batch is not None and batch.claims.get(kind) == token:
            del batch.claims[kind]

    async def take_over(self, bid: str, kind: Kind, seen: str, token: str) -> Claim | None:
        batch = self._engine_batch(bid)
        if batch is None or batch.claims.get(kind) != seen:
            return None
        batch.claims[kind] = token
        return Claim(bid, kind, token, batch.callbacks[kind])

    async def batch_status(self, bid: str) -> BatchStatus | None:
        batch = self._engine_batch(bid)
        if batch is None:
            return None
        return BatchStatus(
            bid,
            batch.parent,
            batch.description,
            batch.created_at,
            batch.total,
            batch.total - batch.acked,
            batch.failing,
            batch.stage[Kind.COMPLETE],
            batch.stage[Kind.SUCCESS],
        )

    async def pending_jobs(self, bid: str, limit: int) -> list[str]:
        batch = self._engine_batch(bid)
        if batch is None:
            return []
        unacked = (jid for jid, mark in batch.jobs.items() if mark in (Mark.PENDING, Mark.FAILED))
        return list(itertools.islice(unacked, limit))

    async def watch(self, bid: str) -> None:
        self._watch.add(bid)

    async def unwatch(self, bid: str) -> None:
        self._watch.discard(bid)

    async def watched(self, cursor: int, count: int) -> tuple[int, list[str]]:
        return self._watch.scan(cursor, count)

    async def inspect(self, bids: list[str]) -> dict[str, Watched | None]:
        found: dict[str, Watched | None] = {}
        for bid in bids:
            batch = self._engine_batch(bid)
            if batch is None:
                found[bid] = None
                continue
            pending = batch.total - batch.acked
            found[bid] = Watched(
                bid, self._get(bid), dict(batch.claims), batch.progress, pending, batch.settled()
            )
        return found

    # ------------------------------------------------------------------------------------------

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        if self._drain is not None:
            self._drain.cancel()

    def __len__(self) -> int:
        return len(self._batches)
