"""The batch ledger: the lifecycle of every batch, shared by every gateway that uses the same store.

One interface (`BatchStore`), two implementations with the same semantics and the same tests:
`MemoryStore` (one process; the embedded default) and `RedisStore` (every multi-step transition a
Lua script, so that gateways sharing one Redis see one order of events).

States: `open` -> `committing` -> `committed` -> `fired` (terminal). A failed commit goes back to
`open`; a legal reopen (mode member-reopen) moves `committed` back to `open`. A bid with no record
is `unknown`.
"""

from __future__ import annotations

from typing import Protocol

OPEN, COMMITTING, COMMITTED, FIRED, UNKNOWN = "open", "committing", "committed", "fired", "unknown"

# Ent drops an uncommitted batch after 30 minutes; the record outlives it by a margin.
OPEN_TTL = 45 * 60.0


class StoreError(Exception):
    """The store could not answer; the caller applies `on_store_error`."""


class BatchStore(Protocol):
    async def create(self, bid: str, state: str = OPEN) -> None:
        """Record a batch the server just created (or one verified with BATCH STATUS), if not known."""

    async def state(self, bid: str) -> str:
        """The batch's state, or UNKNOWN."""

    async def admit(self, bid: str, token: str) -> str:
        """Atomically: if the batch is open, hold a lease `token` on it and return OPEN; else its state."""

    def release(self, bid: str, token: str) -> None:
        """The admitted command was answered by the server: drop its lease. Nothing waits for
        this; should it be lost, the lease expires by itself."""

    async def begin_commit(self, bid: str) -> str:
        """Atomically move open (or unknown) to committing and return the state it had before."""

    async def live_leases(self, bid: str) -> int:
        """Leases not yet released nor expired."""

    async def finish_commit(self, bid: str, committed: bool) -> None:
        """committing -> committed when the server said +OK, back to open when it refused."""

    async def reopen(self, bid: str) -> str:
        """Atomically move committed to open (a legal reopen); return the state it had before."""

    async def mark_fired(self, bid: str) -> None:
        """A callback of the batch was enqueued: nothing may join it ever again."""

    async def hold(self, wid: str, jid: str, bids: list[str], ttl: float) -> None:
        """Worker `wid` fetched job `jid`, which belongs to (or is a callback of a child of) `bids`."""

    async def unhold(self, wid: str, jid: str) -> None:
        """Worker `wid` acknowledged or failed `jid`."""

    async def holds(self, wid: str, bid: str) -> bool:
        """Does worker `wid` hold a job of `bid` (or a callback of one of its children)?"""

    async def ping(self) -> bool:
        """The store answers."""

    async def close(self) -> None:
        """Release connections."""
