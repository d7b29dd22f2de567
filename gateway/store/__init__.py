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

**The engine** (mode `batches: gateway`, types in engine.py): the gateway answers the BATCH verbs
itself and the ledger counts each batch's jobs on top of the same lifecycle. A batch's counts and
callbacks (`meta`) and its jobs' marks (`jobs`) live exactly as long as its state record. Every
count that can make a callback due runs *evaluate*, atomically: from the batch up to its root,
each callback that is due is claimed (its stage goes to enqueued, the batch to fired) and each
stage that is over is told to the parent once. Complete comes first; success waits until the
complete callback was ACKed; a parent's stage waits for every child's. A claim carries the
caller's token until `confirm`; a watcher takes over a claim whose token it saw unchanged for too
long. An uncommitted engine batch lives `ENGINE_OPEN_TTL` (Ent's 30 minutes).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # engine.py imports BatchState from here
    from .engine import BatchSpec, BatchStatus, Claim, Kind, Watched


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

    # ------------------------------------------------------------------------------------------
    # The engine (batches: gateway)

    async def new_batch(self, bid: str, spec: BatchSpec) -> BatchState:
        """Create bid open, with its counts at zero and `spec`'s callbacks, unless it has a record
        already (then nothing changes and its state is returned: a retried BATCH NEW is harmless).
        A child is counted in its parent's children in the same step; a parent with no record,
        being committed or fired refuses it (an open one takes it under the fence; a committed one
        only when the caller let a worker holding one of its jobs add it): nothing is created and
        the parent's state is returned. OPEN: created."""

    async def joined(self, bid: str, jids: list[str]) -> None:
        """The server took these jobs into bid (+OK): each becomes a member, counted once however
        often it is reported; a job that already ran (its ACK or FAIL came first) is counted as
        run. Counts are taken in any state of the record (a count must never be lost); a bid with
        no record has nothing to count into and is left alone."""

    async def ran(self, bid: str, jid: str, ok: bool, token: str) -> list[Claim]:
        """A job of bid was ACKed (`ok`) or FAILed at the server: its mark and the batch's counts
        move (a job not counted yet keeps its outcome until it is); then evaluate, atomically in
        the same step. Returns the callbacks it claimed, all under `token`, complete first."""

    async def callback_ran(self, bid: str, kind: Kind, token: str) -> list[Claim]:
        """bid's callback job of `kind` was ACKed: its stage moves from enqueued to done (from no
        other stage), its claim is cleared (the ACK proves the server had it); then evaluate.
        Returns the callbacks that made due (the success callback, the parent's), under `token`."""

    async def settle(self, bid: str, token: str) -> list[Claim]:
        """Evaluate bid (and up to its root) after its commit, so that an empty batch, or one whose
        jobs all ran before the commit, fires at once. Returns the claims made, under `token`."""

    async def confirm(self, bid: str, kind: Kind, token: str) -> None:
        """The server took the callback of `kind` (+OK): its claim ends, if `token` still holds it
        (a claim taken over since belongs to its new holder)."""

    async def take_over(self, bid: str, kind: Kind, seen: str, token: str) -> Claim | None:
        """If the claim of `kind` is still held by `seen` (its claimant looks dead), it passes to
        `token` and is returned (the same callback job); else None (confirmed, or taken already)."""

    async def batch_status(self, bid: str) -> BatchStatus | None:
        """BATCH STATUS's figures (pending = members not ACKed, failed = members failing), or None
        when bid has no record. A plain read: not atomic with concurrent counts."""

    async def pending_jobs(self, bid: str, limit: int) -> list[str]:
        """Up to `limit` members of bid not ACKed yet (pending or failing), in no particular order."""

    async def watch(self, bid: str) -> None:
        """Put bid in the watch index (batches being committed or committed whose callbacks are
        not all settled), which every gateway's watcher walks."""

    async def unwatch(self, bid: str) -> None:
        """Take bid out of the watch index (it is settled, or has no record any more)."""

    async def watched(self, cursor: int, count: int) -> tuple[int, list[str]]:
        """One page of the watch index, SSCAN's way: start at cursor 0, go on with the cursor
        returned until it is 0 again; a bid watched for the whole walk comes at least once (maybe
        twice); `count` is a hint of the page's size."""

    async def inspect(self, bids: list[str]) -> dict[str, Watched | None]:
        """What a watcher needs of each bid (None: no record), read in one round trip for all of
        them. Plain reads: each bid's figures may be a moment apart from another's."""

    # ------------------------------------------------------------------------------------------

    async def ping(self) -> bool:
        """The store answers."""

    async def close(self) -> None:
        """Release connections."""
