"""The in-process ledger: the embedded default when no Redis is configured.

It has exactly the semantics of the Redis ledger, but only one gateway process can see it, so it
is for a sidecar in front of a server that no other gateway fronts. Each method runs without an
`await` in between its reads and writes, which makes it atomic on the event loop.
"""

from __future__ import annotations

import time

from . import COMMITTED, COMMITTING, FIRED, OPEN, OPEN_TTL, UNKNOWN


class MemoryStore:
    def __init__(self, retention: float, lease_ttl: float, clock=time.monotonic):
        self.retention = retention
        self.lease_ttl = lease_ttl
        self.clock = clock
        self._batches: dict[str, tuple[str, float]] = {}  # bid -> (state, expires at)
        self._leases: dict[str, dict[str, float]] = {}  # bid -> {token: expires at}
        self._held: dict[str, dict[str, tuple[list[str], float]]] = {}  # wid -> {jid: (bids, expires at)}
        self._last_sweep = clock()

    def _get(self, bid: str) -> str:
        now = self.clock()
        if now - self._last_sweep > 60:
            self._sweep(now)
        record = self._batches.get(bid)
        if record is None or record[1] <= now:
            return UNKNOWN
        return record[0]

    def _set(self, bid: str, state: str) -> None:
        ttl = OPEN_TTL if state in (OPEN, COMMITTING) else self.retention
        self._batches[bid] = (state, self.clock() + ttl)

    def _sweep(self, now: float) -> None:
        """Forget expired records, so memory follows the number of live batches."""
        self._last_sweep = now
        self._batches = {bid: rec for bid, rec in self._batches.items() if rec[1] > now}
        self._leases = {
            bid: live
            for bid, leases in self._leases.items()
            if (live := {t: e for t, e in leases.items() if e > now})
        }
        self._held = {
            wid: live
            for wid, jobs in self._held.items()
            if (live := {j: h for j, h in jobs.items() if h[1] > now})
        }

    async def create(self, bid: str, state: str = OPEN) -> None:
        if self._get(bid) == UNKNOWN:
            self._set(bid, state)

    async def state(self, bid: str) -> str:
        return self._get(bid)

    async def admit(self, bid: str, token: str) -> str:
        state = self._get(bid)
        if state == OPEN:
            self._leases.setdefault(bid, {})[token] = self.clock() + self.lease_ttl
        return state

    def release(self, bid: str, token: str) -> None:
        self._leases.get(bid, {}).pop(token, None)

    def _move(self, bid: str, allowed: tuple[str, ...], new: str) -> str:
        state = self._get(bid)
        if state in allowed:
            self._set(bid, new)
        return state

    async def begin_commit(self, bid: str) -> str:
        return self._move(bid, (OPEN, UNKNOWN), COMMITTING)

    async def live_leases(self, bid: str) -> int:
        now = self.clock()
        return sum(1 for expires in self._leases.get(bid, {}).values() if expires > now)

    async def finish_commit(self, bid: str, committed: bool) -> None:
        self._move(bid, (COMMITTING,), COMMITTED if committed else OPEN)

    async def reopen(self, bid: str) -> str:
        return self._move(bid, (COMMITTED,), OPEN)

    async def mark_fired(self, bid: str) -> None:
        self._set(bid, FIRED)

    async def hold(self, wid: str, jid: str, bids: list[str], ttl: float) -> None:
        self._held.setdefault(wid, {})[jid] = (bids, self.clock() + ttl)

    async def unhold(self, wid: str, jid: str) -> None:
        self._held.get(wid, {}).pop(jid, None)

    async def holds(self, wid: str, bid: str) -> bool:
        now = self.clock()
        return any(bid in bids and expires > now for bids, expires in self._held.get(wid, {}).values())

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        pass
