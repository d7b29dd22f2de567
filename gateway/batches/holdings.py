"""Mode member-reopen: which batch jobs each worker holds, from FETCH until ACK or FAIL.

The ledger keeps the holdings (keyed by `wid`, so a worker whose pooled connections land on
different gateways is recognised). This gateway also remembers which of them it saw fetched, so
that an ACK or FAIL through it releases the holding at once; the rest end with the job's
reservation. That local memory expires with the reservation too: a worker that dies without ACK
leaves nothing behind here.
"""

from __future__ import annotations

import time
from itertools import islice

from ..decisions import Client
from ..store import BatchStore


def holder(client: Client) -> str | None:
    """Holdings belong to a worker id *and* the address it connects from: a wid is whatever a
    client says, and this stops a process elsewhere from borrowing a real worker's."""
    if not client.wid:
        return None
    return f"{client.wid}@{client.peer.rpartition(':')[0]}"


DEFAULT_RESERVATION = 1800.0  # Faktory's default reserve_for, for jobs that do not say
PRUNE_EVERY = 256  # fetches between two prunings of expired local entries (bounded work)


class Holdings:
    def __init__(self, store: BatchStore, clock=time.monotonic):
        self.store = store
        self.clock = clock
        self._here: dict[str, dict[str, float]] = {}  # wid -> {jid: expires}
        self._fetches = 0

    def holds_any(self, wid: str | None) -> bool:
        return wid in self._here

    async def fetched(self, wid: str, jid: str, bids: list[str], reserve_for: float | None) -> None:
        ttl = reserve_for or DEFAULT_RESERVATION
        self._here.setdefault(wid, {})[jid] = self.clock() + ttl
        self._fetches += 1
        if self._fetches % PRUNE_EVERY == 0:
            self._prune()
        await self.store.hold(wid, jid, bids, ttl)

    def finished(self, wid: str, jid: str) -> bool:
        """An ACK or FAIL of jid by wid: True when this gateway had seen it fetched (then the
        caller releases the holding in the store)."""
        jobs = self._here.get(wid)
        if not jobs or jobs.pop(jid, None) is None:
            return False
        if not jobs:
            del self._here[wid]
        return True

    async def holds(self, wid: str, bid: str) -> bool:
        return await self.store.holds(wid, bid)

    def _prune(self) -> None:
        """Look at the PRUNE_EVERY workers seen longest ago; the live ones go to the back, so the
        next pruning looks at others (no walk over every worker)."""
        now = self.clock()
        for wid in list(islice(self._here, PRUNE_EVERY)):
            jobs = self._here.pop(wid)
            for jid in [jid for jid, expires in jobs.items() if expires <= now]:
                del jobs[jid]
            if jobs:
                self._here[wid] = jobs
