"""The batch ledger: the lifecycle of every batch, shared by every gateway that uses the same store.

One interface (`BatchStore`), two implementations with the same semantics and the same tests:
`MemoryStore` (one process; the embedded default) and `RedisStore` (every multi-step transition a
Lua script, so that gateways sharing one Redis see one order of events).

States: `open` -> `committing` -> `committed` -> `fired` (terminal). A failed commit goes back to
`open`; a legal reopen (mode member-reopen) moves `committed` back to `open`. A bid with no record
is `unknown`.

The commit fence lives here as data (docs/fence.md has the argument). **No fence decision reads
a clock here**: leases and commit attempts carry *beats* (counters), not expiry times, and only
the gateways measure time, each on its own monotonic clock. So a step of the ledger's clock, or a
failover to a host whose clock differs, cannot shorten anything.
- **Gateway leases.** A gateway that admits commands into a batch holds one lease per batch
  (`acquire`), renews it while it has admitted commands unanswered (`renew`: the beat goes up) and
  drops it when it is done (`release`). Only an open batch grants one; a lease can be renewed in
  any state, which is what makes a commit wait for it.
- **Commit attempts.** `begin_commit` moves the batch to committing and registers an attempt;
  gateways are told (`on_seal`) so that they stop admitting at once. `commit_go` atomically ends the
  leases the committer has seen unchanged for a whole lease life (on its own clock), and if no lease
  is left marks the attempt *sent*. `finish_commit` follows the server's answer: `+OK` always means
  committed; a failure or a fence timeout reopens the batch only when no other attempt remains.
  An attempt whose gateway died is *abandoned*: a gateway that saw every attempt's beat unchanged
  for long enough resolves it (`abandon`): never sent reopens the batch; possibly sent (it may
  have reached the server) leaves it committed, the safe reading.
- **Lifetime.** Open and committing records live `OPEN_TTL` (Ent drops an uncommitted batch after
  30 minutes). Committed records live `committed_retention` from the last time a gateway saw the
  batch (`touch`), so a batch whose jobs retry for weeks stays sealed; fired records live
  `fired_retention` and then age out.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol


class BatchState(enum.StrEnum):
    OPEN = "open"
    COMMITTING = "committing"
    COMMITTED = "committed"
    FIRED = "fired"
    UNKNOWN = "unknown"  # no record


OPEN, COMMITTING, COMMITTED, FIRED, UNKNOWN = (
    BatchState.OPEN,
    BatchState.COMMITTING,
    BatchState.COMMITTED,
    BatchState.FIRED,
    BatchState.UNKNOWN,
)

# Ent drops an uncommitted batch after 30 minutes; the record outlives it by a margin.
OPEN_TTL = 45 * 60.0


class StoreError(Exception):
    """The store could not answer; the caller applies `on_store_error`."""


class LeaseReply:
    """The answer to `acquire`/`renew`: the batch's state and whether this gateway's lease is held."""

    __slots__ = ("held", "state")

    def __init__(self, state: BatchState, held: bool):
        self.state = state
        self.held = held

    def __repr__(self) -> str:
        return f"LeaseReply({self.state}, held={self.held})"


class CommitGo:
    """The answer to `commit_go`: `go`, or the leases still in the ledger (token -> beat)."""

    __slots__ = ("go", "leases")

    def __init__(self, go: bool, leases: dict[str, int] | None = None):
        self.go = go
        self.leases = leases or {}

    def __repr__(self) -> str:
        return "CommitGo(go)" if self.go else f"CommitGo(wait for {self.leases})"


SealListener = Callable[[str], None]


class BatchStore(Protocol):
    async def create(self, bid: str, state: BatchState = OPEN) -> None:
        """Record a batch the server just created (or one verified with BATCH STATUS), if not known."""

    async def state(self, bid: str) -> BatchState:
        """The batch's state, or UNKNOWN."""

    async def acquire(self, bid: str, token: str) -> LeaseReply:
        """Take the lease `token` (or beat it again) if the batch is open; else report its state."""

    async def renew(self, bid: str, token: str) -> LeaseReply:
        """Beat the lease if it is still in the ledger, whatever the state; `held` False if a
        committer ended it (it is never taken again under the same token)."""

    def release(self, bid: str, token: str) -> None:
        """Drop the lease (nothing of it is in flight). Not awaited: a lost release only makes a
        committer wait until it sees the lease unchanged for a whole lease life."""

    async def begin_commit(self, bid: str, attempt: str, adopt: bool = True) -> BatchState:
        """Move open (or, with `adopt`, unknown) to committing, or join a commit already under way;
        register (beat) the attempt; tell every gateway. Returns the state before."""

    async def commit_go(self, bid: str, attempt: str, lapsed: dict[str, int], adopt: bool = True) -> CommitGo:
        """Atomically: end the leases whose beat equals the one in `lapsed` (the committer saw
        them unchanged for a whole lease life); if no lease is left, mark the attempt sent and
        go; else beat the attempt and report the leases left. Committed or fired: go (a repeated
        commit, the server answers). Not committing (this attempt was abandoned and the batch
        reopened): seal again and wait. Safe to send right behind begin_commit, unawaited."""

    async def finish_commit(self, bid: str, attempt: str, committed: bool) -> BatchState:
        """The server answered (committed: +OK), or the attempt gave up. Returns the new state."""

    async def attempts(self, bid: str) -> dict[str, int]:
        """The commit attempts registered on bid (`w:<id>` waiting, `s:<id>` sent) and their beats."""

    async def abandon(self, bid: str, seen: dict[str, int]) -> BatchState:
        """If bid is committing and its attempts are exactly `seen` (every beat unchanged), resolve
        it: any sent attempt makes it committed, else it is open again. Returns the state after."""

    async def reopen(self, bid: str) -> BatchState:
        """Atomically move committed to open (a legal reopen); return the state it had before."""

    async def mark_fired(self, bid: str) -> None:
        """A callback of the batch was enqueued: nothing may join it ever again."""

    async def touch(self, bid: str) -> None:
        """The batch was seen again: a committed record starts its retention anew."""

    def on_seal(self, listener: SealListener) -> None:
        """Call `listener(bid)` when any gateway begins committing bid (best effort: renewals
        carry the same news when a notification is lost)."""

    async def add_callbacks(self, bid: str, jids: list[str]) -> None:
        """The jids the client gave bid's callback jobs in its BATCH NEW (Go, Ruby and Rust set
        them; the server enqueues the callbacks under those jids)."""

    async def is_callback(self, bid: str, jid: str) -> bool:
        """Was jid given to one of bid's callbacks at BATCH NEW?"""

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
