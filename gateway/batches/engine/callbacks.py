"""Callbacks (`batches: gateway`): pushing what the ledger decided to fire, exactly once as far
as a gateway's crash allows (docs/engine.md has the argument).

The ledger finds a callback due and *claims* it in one atomic step (st "1", a claim token), so
exactly one gateway ever gets the claim. That gateway pushes the callback job on its own
connection to the server (producer.py) and confirms the claim once the server said `+OK`.

A claimant that dies leaves its claim in the ledger. Every gateway sweeps the batches being
committed or committed (the ledger's watch index) and takes over a claim it has seen unchanged
for `lease_life` on its own monotonic clock. A claimant writes the push only within
`valid_for` of starting its claim, so by the fence's own assumptions (A1-A3, docs/fence.md) the
server has handled that push before anyone can take the claim over: a slow push is never
doubled. What remains is a crash between the server's `+OK` and the confirmation (one ledger
round trip): the gateway that takes over pushes the callback again, with the same jid.

The sweep also spots stalled batches: committed, jobs pending, and no progress for
`batch_stall_after` (a worker that ACKs around the gateway, a job deleted by hand).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable

from ...metrics import Metrics
from ...producer import Producer, ProducerError
from ...store import COMMITTED, FIRED, BatchStore, StoreError
from ...store.engine import Claim, Kind, Watched
from ..fence import Timing

log = logging.getLogger("gateway.engine")

SWEEP_EVERY = 5.0  # seconds between two sweeps of the watch index
SWEEP_PAGE = 200  # bids read per round trip
PUSH_RETRY_EVERY = 0.5


class Callbacks:
    def __init__(
        self,
        store: BatchStore,
        producer: Producer,
        metrics: Metrics,
        timing: Timing,
        stall_after: float,
        clock: Callable[[], float] = time.monotonic,
        gateway_id: str | None = None,
    ):
        self.store = store
        self.producer = producer
        self.metrics = metrics
        self.timing = timing
        self.stall_after = stall_after
        self.clock = clock
        prefix = gateway_id or f"{os.uname().nodename}-{os.getpid()}-{os.urandom(3).hex()}"
        self._tokens = (f"{prefix}-{n}" for n in itertools.count(1))
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        # What the sweeps saw: (bid, kind) -> (claim token, when first seen with it), and
        # bid -> (progress, when first seen with it).
        self._claims_seen: dict[tuple[str, Kind], tuple[str, float]] = {}
        self._progress_seen: dict[str, tuple[int, float]] = {}
        self.stalled: set[str] = set()

    def new_token(self) -> str:
        return next(self._tokens)

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def close(self) -> None:
        """Stop sweeping; pushes under way finish (a claim left behind is taken over)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.timing.valid_for)
        await self.producer.close()

    # ------------------------------------------------------------------------------------------
    # Pushing what was claimed

    def fire(self, claims: list[Claim], claimed_at: float) -> None:
        """Push the callbacks of `claims` (in order: a complete before a success), without
        holding up the reply that made them due. `claimed_at`: read before the claiming call."""
        task = asyncio.get_running_loop().create_task(self._push_all(claims, claimed_at))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push_all(self, claims: list[Claim], claimed_at: float) -> None:
        for claim in claims:
            await self._push(claim, claimed_at)

    async def _push(self, claim: Claim, claimed_at: float) -> None:
        # Written only before this deadline: after it, another gateway may take the claim over
        # (it waits lease_life, longer than valid_for plus the server's bound: docs/engine.md).
        write_before = claimed_at + self.timing.valid_for
        while True:
            try:
                reply = await self.producer.push(claim.job.encode(), write_before)
                break
            except ProducerError as exc:
                if self.clock() >= write_before:
                    log.warning(
                        "callback not pushed in time; another gateway takes it over",
                        extra={"bid": claim.bid, "callback": claim.kind.value, "error": str(exc)},
                    )
                    self.metrics.callbacks.labels(claim.kind.value, "deferred").inc()
                    return
                await asyncio.sleep(PUSH_RETRY_EVERY)
        if reply.is_error:
            # The server refused the job itself (it was checked at BATCH NEW): pushing it again
            # cannot help. The claim is confirmed so that nobody loops on it; the error is loud.
            log.error(
                "the server refused a callback job",
                extra={
                    "bid": claim.bid,
                    "callback": claim.kind.value,
                    "reply": reply.raw[:200].decode(errors="replace"),
                },
            )
            self.metrics.callbacks.labels(claim.kind.value, "refused").inc()
        else:
            self.metrics.callbacks.labels(claim.kind.value, "pushed").inc()
            self.metrics.callback_latency.observe(self.clock() - claimed_at)
        try:
            await self.store.confirm(claim.bid, claim.kind, claim.token)
        except StoreError as exc:
            # Left claimed: another gateway will push it again after lease_life (a duplicate).
            log.error(
                "callback pushed but not confirmed; it may be pushed twice",
                extra={"bid": claim.bid, "callback": claim.kind.value, "error": str(exc)},
            )

    # ------------------------------------------------------------------------------------------
    # Sweeping: claims of dead gateways, stalled batches

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            try:
                await self.sweep()
            except StoreError as exc:
                log.warning("engine sweep failed", extra={"error": str(exc)})
            except Exception:
                log.exception("engine sweep failed")

    async def sweep(self) -> None:
        cursor, seen = 0, set()
        while True:
            cursor, bids = await self.store.watched(cursor, SWEEP_PAGE)
            if bids:
                found = await self.store.inspect(bids)
                for bid, watched in found.items():
                    seen.add(bid)
                    await self._look_at(bid, watched)
            if cursor == 0:
                break
        # Forget what is no longer watched.
        self._claims_seen = {key: value for key, value in self._claims_seen.items() if key[0] in seen}
        self._progress_seen = {bid: value for bid, value in self._progress_seen.items() if bid in seen}
        self.stalled &= seen
        self.metrics.batches_stalled.set(len(self.stalled))

    async def _look_at(self, bid: str, watched: Watched | None) -> None:
        if watched is None or watched.settled:
            await self.store.unwatch(bid)  # gone (expired), or nothing left to fire or confirm
            return
        now = self.clock()
        for kind, token in watched.claims.items():
            first = self._claims_seen.get((bid, kind))
            if first is None or first[0] != token:
                self._claims_seen[bid, kind] = (token, now)
            elif now - first[1] >= self.timing.lease_life:
                await self._take_over(bid, kind, token)
        progress = self._progress_seen.get(bid)
        if progress is None or progress[0] != watched.progress:
            self._progress_seen[bid] = (watched.progress, now)
            self.stalled.discard(bid)
        elif (
            watched.state in (COMMITTED, FIRED)
            and watched.pending > 0
            and now - progress[1] >= self.stall_after
        ):
            if bid not in self.stalled:
                log.warning(
                    "batch stalled: pending jobs made no progress",
                    extra={"bid": bid, "pending": watched.pending},
                )
            self.stalled.add(bid)

    async def _take_over(self, bid: str, kind: Kind, seen: str) -> None:
        claimed_at = self.clock()
        claim = await self.store.take_over(bid, kind, seen, self.new_token())
        if claim is None:
            return  # confirmed, or taken over by another gateway meanwhile
        log.warning(
            "taking over a callback whose gateway went away", extra={"bid": bid, "callback": kind.value}
        )
        self.metrics.callbacks.labels(kind.value, "taken_over").inc()
        self._claims_seen.pop((bid, kind), None)
        self.fire([claim], claimed_at)
