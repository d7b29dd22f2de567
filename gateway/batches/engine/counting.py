"""What the engine counts (`batches: gateway`): the ledger learns of a batch's jobs from the
replies that prove what the server did.

- A member joins when the server answers `+OK` to its PUSH (or leaves it out of a PUSHB's error
  map): never before, never for a refused job. The push's admission (its fence ticket) is held
  until the count is in the ledger (order.py ends a ticket after its reply handler), so a commit
  cannot pass the fence with a job the server took and the ledger has not counted.
- A job ran when a worker's ACK or FAIL of it got the server's `+OK`. The gateway knows which
  jids are batch jobs from the FETCH replies it relayed (`custom.bid`, or `custom._bid` and `_cb`
  on a callback job): an ACK of any other job costs a dict lookup and no ledger call.
  The ledger's counts are idempotent per jid (a re-run, a retried FAIL, a doubled ACK count once),
  and an ACK that reaches the ledger before the producer's count is kept until the count comes.
- A callback job's ACK moves its state to "2", which may let its batch's success callback, or its
  parent's callbacks, fire.

What the ledger decides to fire comes back as claims, which callbacks.py pushes.

Assumption: a worker FETCHes and ACKs a job through the same gateway (a sidecar does: every
connection of the pod goes to it). An ACK through another gateway, or straight to the server, is
not seen: the job stays pending, and its batch shows as stalled (docs/engine.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple, TypeGuard

from ...protocol import DOLLAR, Reply
from ...store import BatchStore, StoreError
from ...store.engine import Claim, Kind
from .. import policy
from ..outcomes import Outcomes
from .callbacks import Callbacks

log = logging.getLogger("gateway.engine")

DEFAULT_RESERVATION = 1800.0  # Faktory's default reserve_for, for jobs that do not say
# A count the ledger could not take is retried this long (the push's lease is held meanwhile, so a
# commit waits for it); after that it is given up, logged and counted as lost.
COUNT_RETRY_FOR, COUNT_RETRY_EVERY = 30.0, 0.5
PRUNE_EVERY = 256  # fetches between two prunings of expired entries (bounded work)


class Tracked(NamedTuple):
    """A batch job this gateway relayed to a worker, until its ACK or FAIL (or its reservation ends)."""

    bid: str
    kind: Kind | None  # the callback's kind, for a callback job; None for a member
    expires: float


class Counting:
    def __init__(
        self,
        store: BatchStore,
        outcomes: Outcomes,
        callbacks: Callbacks,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.outcomes = outcomes
        self.callbacks = callbacks
        self.clock = clock
        self.tracked: dict[str, Tracked] = {}  # jid -> its batch, in fetch order
        self._fetches = 0

    # ------------------------------------------------------------------------------------------
    # Members: PUSH and PUSHB replies

    def pushed(self, bid: str, jid: str) -> Callable[[Reply], Awaitable[bytes]]:
        """The reply handler of an admitted PUSH into bid."""

        async def count(reply: Reply) -> bytes:
            if not reply.is_error and jid:
                await self._joined(bid, [jid])
            return reply.raw

        return count

    async def pushed_bulk(self, reply: Reply, members: dict[str, list[str]]) -> None:
        """After a PUSHB's reply: every job of `members` (bid -> jids) the server did not list
        in its jid-to-error map joined its batch."""
        if reply.is_error:
            return  # the whole PUSHB failed: nothing joined
        refused: set[str] = set()
        if reply.kind == DOLLAR and reply.payload:
            try:
                errors = json.loads(reply.payload)
            except ValueError:
                errors = None
            if not isinstance(errors, dict):
                log.error("a PUSHB reply that is no jid map; its batch jobs are not counted")
                return
            refused = set(errors)
        await asyncio.gather(
            *(self._joined(bid, [jid for jid in jids if jid not in refused]) for bid, jids in members.items())
        )

    async def _joined(self, bid: str, jids: list[str]) -> None:
        if jids:
            await self._retried("joined", lambda: self.store.joined(bid, jids), bid)

    # ------------------------------------------------------------------------------------------
    # Jobs handed out: FETCH replies

    def fetched(self, job: dict) -> None:
        """A FETCH reply's job (decoded): remember it if it is a batch job."""
        jid = job.get("jid")
        custom = job.get("custom")
        if not isinstance(jid, str) or not isinstance(custom, dict):
            return
        reserve = job.get("reserve_for")
        reserve = float(reserve) if isinstance(reserve, (int, float)) and reserve > 0 else DEFAULT_RESERVATION
        expires = self.clock() + reserve
        callback_of, kind, bid = custom.get("_bid"), custom.get("_cb"), custom.get("bid")
        if _valid(callback_of) and kind in (Kind.COMPLETE, Kind.SUCCESS):
            self._track(jid, Tracked(callback_of, Kind(kind), expires))
        elif _valid(bid):
            self._track(jid, Tracked(bid, None, expires))

    def _track(self, jid: str, tracked: Tracked) -> None:
        self.tracked.pop(jid, None)  # re-inserted at the end: the dict stays in expiry order
        self.tracked[jid] = tracked
        self._fetches += 1
        if self._fetches % PRUNE_EVERY == 0:
            self._prune()

    def _prune(self) -> None:
        """Forget jobs whose reservation ended (the server hands them out again; the next
        FETCH tracks them anew). Oldest first, stopping at the first live one."""
        now = self.clock()
        tracked = self.tracked
        for jid in list(tracked):
            if tracked[jid].expires > now:
                break
            del tracked[jid]

    def holds_any(self) -> bool:
        return bool(self.tracked)

    # ------------------------------------------------------------------------------------------
    # ACK and FAIL

    def finishing(self, verb: bytes, args: bytes) -> Callable[[Reply], Awaitable[bytes]] | None:
        """The reply handler of an ACK or FAIL of a tracked batch job; None for any other job."""
        if not self.tracked:  # here for a worker's holdings only: no JSON to read
            return None
        jid = _jid_of(args)
        tracked = self.tracked.get(jid) if jid else None
        if tracked is None or jid is None:
            return None
        ok = verb == b"ACK"
        if tracked.kind is not None and not ok:
            return None  # a failed callback stays enqueued ("1"); the server retries it

        async def count(reply: Reply) -> bytes:
            self.tracked.pop(jid, None)
            if reply.is_error:
                return reply.raw  # the server did not take it: the job runs again, and is tracked again
            claimed_at = self.clock()
            token = self.callbacks.new_token()
            if (kind := tracked.kind) is not None:
                claims = await self._retried(
                    "callback_ran", lambda: self.store.callback_ran(tracked.bid, kind, token), tracked.bid
                )
            else:
                claims = await self._retried(
                    "ran", lambda: self.store.ran(tracked.bid, jid, ok, token), tracked.bid
                )
            if claims:
                self.callbacks.fire(claims, claimed_at)
            return reply.raw

        return count

    # ------------------------------------------------------------------------------------------

    async def _retried(self, operation: str, call: Callable[[], Awaitable], bid: str):
        """A count must not be lost to a blip of the ledger: retried for COUNT_RETRY_FOR."""
        give_up = self.clock() + COUNT_RETRY_FOR
        while True:
            try:
                return await self.outcomes.call(operation, call())
            except StoreError as exc:
                if self.clock() >= give_up:
                    self.outcomes.metrics.engine_lost_counts.inc()
                    log.error(
                        "batch count lost: the ledger did not answer",
                        extra={"operation": operation, "bid": bid, "error": str(exc)},
                    )
                    return None
                await asyncio.sleep(COUNT_RETRY_EVERY)


def _jid_of(args: bytes) -> str | None:
    try:
        body = json.loads(args)
    except ValueError:
        return None  # the server answers its own error
    jid = body.get("jid") if isinstance(body, dict) else None
    return jid if isinstance(jid, str) else None


def _valid(bid: object) -> TypeGuard[str]:
    return isinstance(bid, str) and policy.BID.fullmatch(bid) is not None


__all__ = ["Claim", "Counting", "Tracked"]
