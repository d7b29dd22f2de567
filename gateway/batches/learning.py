"""What the server's own answers tell the ledger, in one place.

The server is the only authority on whether a batch's callback was enqueued (`BATCH STATUS`:
`complete_st` or `success_st` set). Wherever the rules learn that (a BATCH STATUS a client asked,
the gateway's own question about an unknown batch or a reopen, a fetched callback job), it goes
through `fired`: the batch is fired for good. And a committed batch seen again (its status asked,
a member job fetched, a refused push) starts its retention anew (`touch`), at most once an hour
per batch per gateway, so that it stays sealed for as long as the server may still fire it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..store import BatchStore
from .outcomes import Outcomes
from .status import Status

TOUCH_EVERY = 3600.0  # a committed record is refreshed at most this often per batch per gateway
TOUCHED_LIMIT = 100_000  # batches remembered for that throttle before the memory starts again


class Learner:
    def __init__(self, store: BatchStore, outcomes: Outcomes, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.outcomes = outcomes
        self.clock = clock
        self._touched: dict[str, float] = {}

    async def fired(self, bid: str, status: Status | None) -> bool:
        """Whether the server's status says a callback of bid was enqueued; if so the ledger is
        told (a failure to record it changes no decision: the server's word is the decision)."""
        if status is None or not status.fired:
            return False
        await self.outcomes.quietly("mark_fired", self.store.mark_fired(bid))
        return True

    async def learn(self, bid: str, status: Status) -> None:
        """A BATCH STATUS the server gave: fired is final; otherwise the batch was seen again."""
        if not await self.fired(bid, status):
            await self.touch(bid)

    def touch_due(self, bid: str) -> bool:
        now = self.clock()
        if now - self._touched.get(bid, -TOUCH_EVERY) < TOUCH_EVERY:
            return False
        if len(self._touched) > TOUCHED_LIMIT:
            self._touched.clear()
        self._touched[bid] = now
        return True

    async def touch(self, bid: str) -> None:
        """A committed batch seen again restarts its retention (at most once per TOUCH_EVERY)."""
        if self.touch_due(bid):
            await self.outcomes.quietly("touch", self.store.touch(bid))
