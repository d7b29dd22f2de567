"""The commit fence: no command admitted into a batch is handled by the server after the batch's commit.

docs/fence.md has the protocol, the argument and its assumptions (A1-A5); in short:

- **Admission** happens only when nothing is unanswered on the client's upstream connection (the
  guard's barrier), so an admitted command is at the head of the server's queue when written. It
  is local while this gateway's lease on the batch is valid and the batch is not sealed: no store
  call per command. Otherwise one `acquire`, which only an open batch grants, under a new token.
- **Renewal.** Every `renew_every` the gateway beats the leases it is using (commands admitted
  and unanswered, or used in the last `idle` seconds); the others are released. A lease is beaten
  in any state, so a commit waits for every command admitted under it, however long the server
  takes to answer it.
- **The local deadline.** A lease is valid here until `start + valid_for`, `start` read *before*
  the request that took or renewed it. If it was not renewed by then, the gateway resets (RST)
  every upstream connection that carries a command admitted under it; a command not yet written
  is refused instead (`Ticket.writable`, checked right before the write).
- **A connection that dies with an admitted command unanswered** (or that the gateway resets)
  keeps that command counted for `margin + server_bound` more: bytes that reached the server's
  host before the reset are still handled by Faktory.
- **Commit.** `begin_commit` seals the batch (no new leases; every gateway is told and stops
  admitting locally), then `commit_go` is polled until no lease is left in the ledger. A lease
  whose holder died is ended by the committer itself, once it has seen its beat unchanged for
  `lease_life` on its *own* monotonic clock (`LapseWatch`): the ledger's clock plays no part.
  After `commit_fence_timeout` the attempt is withdrawn (`COMMIT_FENCE_TIMEOUT`).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..metrics import Metrics, counted
from ..store import (
    COMMITTED,
    COMMITTING,
    FIRED,
    OPEN,
    UNKNOWN,
    BatchState,
    BatchStore,
    LeaseReply,
    StoreError,
)
from .policy import refusal_lease_lost

log = logging.getLogger("gateway.fence")


@dataclass(frozen=True)
class Timing:
    """The fence's times, in seconds (docs/fence.md has the argument that ties them together).

    Fixed for every gateway: a committer judges other gateways' leases with its own `lease_life`,
    so they must all agree. Tests build smaller ones; nothing else may."""

    margin: float = 2.0  # A2: bytes written reach the server's host within this, or, once reset, never
    # A3: Faktory finishes a command at the head of its connection within this: its per-command
    # context is 5 s (server/server.go processLines); a 16 MiB PUSHB is parsed in ~0.4 s (measured).
    server_bound: float = 10.0
    pause: float = 2.0  # A4: the longest the process may stall between writable() and the write
    lease_life: float = 24.0  # a committer ends another gateway's lease after seeing it unchanged this long
    drift: float = 0.01  # A1: every gateway's monotonic clock runs within 1 % of real time
    renew_every: float = 2.0  # at least three chances to renew before the local deadline
    idle: float = 2.0  # a lease with nothing in flight and no admission for this long is released
    attempt_life: float = (
        30.0  # a commit attempt seen unchanged this long was abandoned (a live one beats every 20 ms)
    )

    @property
    def valid_for(self) -> float:
        """How long a lease is valid here after the request that took or renewed it was sent: the
        committer's lease life, less what its clock may gain on ours, less what may still happen
        after our deadline: the write of a command checked just before it (A4), its delivery (A2),
        then the server's handling (A3). The model in tests/model found the hole without `pause`."""
        return self.lease_life * (1 - 2 * self.drift) - self.pause - self.margin - self.server_bound

    @property
    def after_reset(self) -> float:
        """How long a command whose connection died still counts: bytes already at the server's
        host are handled even after a reset (A2, A3). Measured on this gateway's clock, which may
        run fast (A1)."""
        return (self.margin + self.server_bound) / (1 - self.drift)


TIMING = Timing()
ADMIT_MAX_BYTES = 16 * 2**20  # larger batch commands are refused: SERVER_BOUND is measured up to this
WATCH_LIMIT = 10_000  # batches a LapseWatch remembers before it forgets the stalest
# The production figures under the names the docs and the integration tests use.
MARGIN, SERVER_BOUND, LEASE_LIFE = TIMING.margin, TIMING.server_bound, TIMING.lease_life
VALID_FOR, ATTEMPT_LIFE = TIMING.valid_for, TIMING.attempt_life


class LapseWatch:
    """What this gateway saw of entries it does not own (other gateways' leases, commit
    attempts): each entry's beat, and when, on this gateway's monotonic clock, the reply that
    first showed that beat arrived. An entry seen at the same beat for `life` has lapsed: whoever
    owned it has not beaten it since before that reply, at least `life` ago (docs/fence.md).

    Beats only grow while an entry exists, and a deleted entry is never created again (a lease
    token is used for one acquisition only), so an unchanged beat means no renewal in between."""

    def __init__(self, life: float, clock: Callable[[], float]):
        self.life = life
        self.clock = clock
        self._seen: dict[str, dict[str, tuple[int, float]]] = {}  # bid -> {entry: (beat, since)}

    def saw(self, bid: str, beats: dict[str, int]) -> dict[str, int]:
        """Record the entries a reply that just arrived showed; return those that have lapsed."""
        now = self.clock()
        before = self._seen.pop(bid, {})
        seen = {}
        for entry, beat in beats.items():
            old = before.get(entry)
            seen[entry] = old if old is not None and old[0] == beat else (beat, now)
        if seen:
            if len(self._seen) >= WATCH_LIMIT:
                del self._seen[next(iter(self._seen))]  # the one seen longest ago (dicts keep order)
            self._seen[bid] = seen
        return {entry: beat for entry, (beat, since) in seen.items() if now - since >= self.life}

    def lapsed(self, bid: str) -> dict[str, int]:
        """The entries of bid seen unchanged for `life` so far (without a new reply)."""
        now = self.clock()
        return {e: beat for e, (beat, since) in self._seen.get(bid, {}).items() if now - since >= self.life}

    def forget(self, bid: str) -> None:
        self._seen.pop(bid, None)


class _Lease:
    """This gateway's lease on one batch, under one `token`: a token names one acquisition, so
    the release of an old lease can never remove a newer one, and an entry a committer ended is
    never beaten back to life."""

    __slots__ = ("acquiring", "bid", "deadline", "inflight", "lost", "outcome", "sealed", "timer", "token",
                 "used", "written")  # fmt: skip

    def __init__(self, bid: str, token: str):
        self.bid = bid
        self.token = token
        self.deadline = 0.0  # local monotonic time until which commands may be written under it
        self.inflight = 0  # admitted and not yet answered (nor refused, nor given up)
        self.written: set[Ticket] = set()  # written upstream and unanswered: the ones to abort
        self.sealed = False  # a commit began: admit nothing more locally
        self.lost = False  # dropped, or past its deadline without renewal: dead for good
        self.used = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.acquiring: asyncio.Event | None = None  # set when its acquire has an answer
        self.outcome: BatchState | StoreError | None = None  # what that answer was

    def admits(self, now: float) -> bool:
        return not self.sealed and not self.lost and now < self.deadline


class Ticket:
    """One admitted command's hold on its batch's lease (see decisions.Ticket)."""

    __slots__ = ("_abort", "done", "fence", "lease")

    def __init__(self, fence: Fence, lease: _Lease):
        self.fence = fence
        self.lease = lease
        self.done = False
        self._abort: Callable[[], None] | None = None

    def writable(self) -> bool:
        lease = self.lease
        return not lease.lost and self.fence.clock() < lease.deadline

    def unwritable_reply(self) -> bytes:
        self._finish()
        self.fence.metrics.lease_lost.inc()
        return refusal_lease_lost(self.lease.bid).reply()

    def written(self, abort: Callable[[], None]) -> None:
        self._abort = abort
        self.lease.written.add(self)

    def abort(self) -> None:
        if self._abort is not None:
            self._abort()

    def answered(self) -> None:
        self._finish()

    def lost(self) -> None:
        """The connection died (or was reset) before the reply. The command may still reach the
        server's host, and bytes there are still handled (A2, A3): the lease keeps counting it,
        and stays renewed, for `Timing.after_reset`."""
        if not self.done:
            self.lease.written.discard(self)
            asyncio.get_running_loop().call_later(self.fence.timing.after_reset, self._finish)

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.lease.written.discard(self)
        self.fence._finished(self.lease)


class TicketGroup:
    """The tickets of one PUSHB whose jobs join several batches: one ticket to the session."""

    __slots__ = ("tickets",)

    def __init__(self, tickets: list[Ticket]):
        self.tickets = tickets

    @classmethod
    def of(cls, tickets: list[Ticket]) -> Ticket | TicketGroup | None:
        if len(tickets) < 2:
            return tickets[0] if tickets else None
        return cls(tickets)

    def writable(self) -> bool:
        return all(ticket.writable() for ticket in self.tickets)

    def unwritable_reply(self) -> bytes:
        lapsed = next(ticket for ticket in self.tickets if not ticket.writable())
        for ticket in self.tickets:
            if ticket is not lapsed:
                ticket.answered()
        return lapsed.unwritable_reply()

    def written(self, abort: Callable[[], None]) -> None:
        for ticket in self.tickets:
            ticket.written(abort)

    def answered(self) -> None:
        for ticket in self.tickets:
            ticket.answered()

    def lost(self) -> None:
        for ticket in self.tickets:
            ticket.lost()


class CommitStart(enum.Enum):
    GO = "go"  # no admitted command is in flight anywhere: forward the commit
    REPEAT = "repeat"  # already committed or fired: forward it, the server answers
    UNKNOWN = "unknown"  # no record, and not adopted: the guard asks the server first
    TIMED_OUT = "timed-out"  # commands were still in flight at the deadline: refuse, the client retries


class Fence:
    def __init__(
        self,
        store: BatchStore,
        metrics: Metrics,
        gateway_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        timing: Timing = TIMING,
    ):
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.timing = timing
        self.gateway_id = gateway_id or os.urandom(6).hex()
        self._leases: dict[str, _Lease] = {}  # the lease each batch is admitted under here
        self._live: set[_Lease] = set()  # every lease of ours the ledger may hold and we may renew
        self._tokens = map(f"{self.gateway_id}-{{}}".format, itertools.count())
        self._lease_watch = LapseWatch(timing.lease_life, clock)
        self._attempt_watch = LapseWatch(timing.attempt_life, clock)
        self._renewer: asyncio.Task | None = None

    def start(self) -> None:
        """Inside the event loop: renew leases, and hear about seals from other gateways."""
        self.store.on_seal(self._sealed)
        self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        for lease in list(self._live):
            if not lease.inflight:
                self._drop(lease, release=True)

    # ------------------------------------------------------------------------------------------
    # Admission

    def admit_locally(self, bid: str) -> Ticket | None:
        """A ticket when this gateway's lease on bid allows it without asking the store."""
        lease = self._leases.get(bid)
        if lease is None:
            return None
        now = self.clock()
        if not lease.admits(now):
            return None
        lease.inflight += 1
        lease.used = now
        return Ticket(self, lease)

    async def admit(self, bid: str) -> tuple[BatchState, Ticket | None]:
        """Admit one command into bid: (OPEN, ticket), or (the state that refuses it, None).

        The local lease is always tried first, even by a caller that tried it a moment ago: a
        lease taken meanwhile (by another command) must not be replaced by a second one, which a
        seal would not find (`_sealed` seals the current lease) and which would then hold a
        commit until its next renewal.

        Raises StoreError when the store cannot be asked."""
        while True:
            ticket = self.admit_locally(bid)
            if ticket is not None:
                return OPEN, ticket
            lease = self._leases.get(bid)
            if lease is None or lease.acquiring is None or lease.acquiring.is_set():
                break
            await lease.acquiring.wait()  # one acquire per lease: share its answer
            outcome = lease.outcome
            if isinstance(outcome, StoreError):
                raise StoreError(str(outcome))
            assert outcome is not None  # set before `acquiring` is
            if outcome != OPEN:
                return await self._refused(bid, outcome)
        # A new lease, under a token of its own. Registered before asking, with no deadline yet:
        # a seal heard meanwhile finds it. The lease it replaces (sealed, or past its deadline)
        # stays live, and renewed, until what was admitted under it is answered.
        lease = self._leases[bid] = _Lease(bid, next(self._tokens))
        self._live.add(lease)
        lease.acquiring = asyncio.Event()
        started = self.clock()
        lease.inflight += 1  # counted while asking, so that a seal heard meanwhile does not drop it
        try:
            reply = await counted(self.metrics, "acquire", self.store.acquire(bid, lease.token))
        except StoreError as exc:
            lease.outcome = exc
            self._finished(lease)
            raise
        except BaseException:
            lease.outcome = StoreError("admission cancelled")
            self._finished(lease)
            raise
        finally:
            lease.acquiring.set()
        if reply.state != OPEN or lease.lost:
            # Refused; or granted, but this lease was given up meanwhile (its release may already
            # have removed the grant): only a seal does that, so the batch is committing now.
            lease.outcome = reply.state if reply.state != OPEN else COMMITTING
            lease.sealed = True
            self._finished(lease)
            return await self._refused(bid, lease.outcome)
        # Granted before any seal (the ledger orders them): a commit waits for this lease, so
        # the command may go even if a seal was heard while asking.
        lease.outcome = OPEN
        self._extend(lease, started)
        lease.used = self.clock()
        return OPEN, Ticket(self, lease)

    async def _refused(self, bid: str, state: BatchState) -> tuple[BatchState, Ticket | None]:
        """An admission refused because bid is committing: unless its commit was abandoned."""
        if state == COMMITTING and await self.settle(bid) == OPEN:
            return await self.admit(bid)
        return state, None

    async def state(self, bid: str) -> BatchState:
        """The batch's state in the ledger, with an abandoned commit resolved (see `settle`)."""
        state = await counted(self.metrics, "state", self.store.state(bid))
        return await self.settle(bid) if state == COMMITTING else state

    async def settle(self, bid: str) -> BatchState:
        """A committing batch: if every commit attempt on it has been seen unchanged for
        `attempt_life` here, its committers are gone, and `abandon` resolves it (never sent: open
        again; maybe sent: committed). Otherwise it is still committing."""
        attempts = await counted(self.metrics, "attempts", self.store.attempts(bid))
        if self._attempt_watch.saw(bid, attempts) != attempts:
            return COMMITTING
        self._attempt_watch.forget(bid)
        state = await counted(self.metrics, "abandon", self.store.abandon(bid, attempts))
        if state != COMMITTING and attempts:  # none: its committer finished while we read
            log.warning("abandoned commit resolved", extra={"bid": bid, "state": str(state)})
        return state

    def _extend(self, lease: _Lease, started: float) -> None:
        deadline = started + self.timing.valid_for
        if deadline > lease.deadline:
            lease.deadline = deadline
            if lease.timer is None:
                self._arm(lease)

    def _arm(self, lease: _Lease) -> None:
        # The event loop's clock is cached per iteration (and libuv's counts milliseconds), so a
        # timer can fire a little before the clock reaches the deadline: aim a millisecond late
        # and look again when it fires. A deadline that a renewal moved later is re-armed.
        delay = max(lease.deadline - self.clock(), 0.0) + 0.001
        lease.timer = asyncio.get_running_loop().call_later(delay, self._deadline_check, lease)

    def _deadline_check(self, lease: _Lease) -> None:
        lease.timer = None
        if lease.lost:
            return
        if self.clock() < lease.deadline:
            self._arm(lease)
            return
        self._lose(lease, "the lease could not be renewed before its local deadline")

    def _lose(self, lease: _Lease, why: str) -> None:
        """Nothing admitted under this lease may reach the server any more: reset its connections.

        The lease is never released after this: a committer ends it once it has seen it unchanged
        for a lease life, by which time what was written before the deadline has been handled."""
        lease.lost = True
        if self._leases.get(lease.bid) is lease:
            del self._leases[lease.bid]
        self._live.discard(lease)
        if lease.timer is not None:
            lease.timer.cancel()
        if lease.written:
            self.metrics.lease_aborts.inc(len(lease.written))
            log.error(
                "batch lease lost; resetting upstream connections with admitted commands in flight",
                extra={"bid": lease.bid, "connections": len(lease.written), "reason": why},
            )
        for ticket in list(lease.written):
            ticket.abort()

    def _finished(self, lease: _Lease) -> None:
        lease.inflight -= 1
        if lease.inflight or lease.lost:
            return
        if lease.sealed or lease.deadline == 0.0:
            # Sealed: the commit waits for it. Never granted: an acquire that timed out may still
            # have been executed, and its entry would hold commits for a lease life.
            self._drop(lease, release=True)

    def _drop(self, lease: _Lease, release: bool) -> None:
        if self._leases.get(lease.bid) is lease:
            del self._leases[lease.bid]
        self._live.discard(lease)
        if lease.timer is not None:
            lease.timer.cancel()
        lease.lost = True  # a ticket still holding it must not write
        if release:
            self.metrics.store_calls.labels("release").inc()
            self.store.release(lease.bid, lease.token)

    def _sealed(self, bid: str) -> None:
        """A commit of bid began (here or at another gateway): stop admitting into it now; once
        nothing admitted here is in flight, release the lease so that the commit can go."""
        lease = self._leases.get(bid)
        if lease is None:
            return
        lease.sealed = True
        if lease.inflight == 0:
            self._drop(lease, release=True)

    # ------------------------------------------------------------------------------------------
    # Renewal

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.timing.renew_every)
            try:
                await self.renew_all()
            except Exception:  # never let the renewer die: the deadlines still protect
                log.exception("lease renewal failed")

    async def renew_all(self) -> None:
        now = self.clock()
        renewing = []
        for lease in list(self._live):
            if lease.deadline == 0.0:
                continue  # its first acquire is still on its way
            if lease.inflight or now - lease.used < self.timing.idle:
                renewing.append(lease)
            else:
                self._drop(lease, release=True)
        if renewing:
            await asyncio.gather(*(self._renew(lease) for lease in renewing))

    async def _renew(self, lease: _Lease) -> None:
        started = self.clock()
        try:
            reply: LeaseReply = await counted(self.metrics, "renew", self.store.renew(lease.bid, lease.token))
        except StoreError as exc:
            log.warning("lease renewal failed", extra={"bid": lease.bid, "error": str(exc)})
            return  # the deadline timer acts if no later renewal succeeds
        if lease.lost:
            return
        if not reply.held:
            self._lose(lease, "a committer ended the lease (it saw no renewal for a lease life)")
            return
        self._extend(lease, started)
        if reply.state != OPEN:
            lease.sealed = True
            if lease.inflight == 0:
                self._drop(lease, release=True)

    # ------------------------------------------------------------------------------------------
    # Commit

    def new_attempt(self) -> str:
        return next(self._tokens)

    async def begin_commit(self, bid: str, attempt: str, timeout: float, adopt: bool = True) -> CommitStart:
        """Seal bid and wait until nothing admitted into it is in flight at any gateway. Without
        `adopt`, a batch the ledger has no record of is left alone (CommitStart.UNKNOWN).

        Raises StoreError when the store cannot be asked (the attempt is then abandoned, and
        resolved by whoever sees it unchanged for `attempt_life`)."""
        # This gateway stops admitting into bid now, and releases an idle lease of its own ahead
        # of the seal (one connection keeps the order), so the first check can already go.
        self._sealed(bid)
        watch = self._lease_watch
        # The first check is sent right behind the seal, unawaited: one round trip, not two.
        # It may already end leases this gateway watched during an earlier attempt.
        begun, go = await asyncio.gather(
            counted(self.metrics, "begin_commit", self.store.begin_commit(bid, attempt, adopt)),
            counted(self.metrics, "commit_go", self.store.commit_go(bid, attempt, watch.lapsed(bid), adopt)),
            return_exceptions=True,
        )
        if isinstance(begun, BaseException):
            raise begun
        if isinstance(go, BaseException):
            raise go
        if begun == UNKNOWN and not adopt:
            return CommitStart.UNKNOWN
        if begun in (COMMITTED, FIRED):
            return CommitStart.REPEAT
        started = self.clock()
        deadline = started + timeout
        delay = 0.0005
        try:
            while not go.go:
                lapsed = watch.saw(bid, go.leases)
                if self.clock() + delay > deadline:
                    break
                if not lapsed:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.02)
                go = await counted(self.metrics, "commit_go", self.store.commit_go(bid, attempt, lapsed))
        finally:
            self.metrics.fence_wait.observe(self.clock() - started)
        if go.go:
            watch.forget(bid)
            return CommitStart.GO
        await self.finish_commit(bid, attempt, committed=False)
        return CommitStart.TIMED_OUT

    async def finish_commit(self, bid: str, attempt: str, committed: bool) -> None:
        await counted(self.metrics, "finish_commit", self.store.finish_commit(bid, attempt, committed))
