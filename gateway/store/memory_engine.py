"""The engine's half of the in-process ledger (`batches: gateway`): each batch's counts, callbacks
and jobs' marks (`EngineBatch`, what Redis keeps in a batch's `meta` and `jobs` hashes), the
watch index, and the engine's transitions and evaluate walk, written once here as the same steps
the Redis scripts take (lua/engine.lua). `MemoryStore` (memory.py) is this plus the records,
leases and commit attempts; each method runs without an `await` between its reads and writes.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from . import COMMITTED, FIRED, OPEN, UNKNOWN, BatchState
from .engine import BatchSpec, BatchStatus, Claim, Kind, Mark, Stage, Watched, is_settled


@dataclass(slots=True, eq=False)
class EngineBatch:
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


class MemoryEngineLedger:
    """The engine's operations of the BatchStore interface on in-process data. The records' half
    (`_get`, `_set`: a batch's state and expiry) is MemoryStore's; a record's engine data is
    dropped with it (MemoryStore._drop)."""

    def __init__(self) -> None:
        self._engine: dict[str, EngineBatch] = {}  # bid -> its engine data
        self._watch = WatchIndex()

    def _get(self, bid: str) -> BatchState:
        raise NotImplementedError  # MemoryStore's

    def _set(self, bid: str, state: BatchState, ttl_ms: int | None = None) -> None:
        raise NotImplementedError  # MemoryStore's

    def _engine_batch(self, bid: str) -> EngineBatch | None:
        """bid's engine data; None when it has no record. A record made without any (`create`, an
        adopted commit) reads as an empty batch, as a missing meta hash does in Redis."""
        if self._get(bid) == UNKNOWN:
            return None
        batch = self._engine.get(bid)
        if batch is None:
            batch = self._engine[bid] = EngineBatch()
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
        self._engine[bid] = EngineBatch(spec.parent, spec.description, spec.created_at, dict(spec.callbacks))
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
