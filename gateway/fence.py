"""The commit fence: no command admitted into a batch reaches the server after the batch's commit.

One lease per batch and per gateway, held in the ledger on the store's clock (store/__init__.py):

- **Admission** is local while this gateway's lease on the batch is valid and the batch is not
  sealed: no store call per command. Otherwise one `acquire`, which only an open batch grants.
- **Renewal.** Every `RENEW_EVERY` the gateway renews the leases it is using: those with admitted
  commands unanswered, or used in the last `IDLE` seconds; the others are released. A live lease
  is renewed in any state, so a commit waits for every command admitted under it, however long
  the server takes to answer it (a stalled link, a client's own pipeline ahead of it).
- **The local deadline.** A lease is valid here until `start + LEASE_TTL * (1 - DRIFT) - MARGIN`,
  where `start` is read *before* the request that took or renewed it: always earlier than the
  store's own expiry. If it has not been renewed by then (the store is unreachable, the reply was
  late), the gateway resets (RST) every upstream connection that carries a command admitted under
  it, and a command not yet written is refused instead (`Ticket.writable`, checked right before
  the write). So when the store lets the lease lapse and a commit goes through, nothing admitted
  under it can still be on its way, within the assumptions in docs/fence.md.
- **Commit.** `begin_commit` seals the batch (no new leases; every gateway is notified and stops
  admitting locally at once), then `commit_go` is polled until no lease is live, which marks the
  attempt sent atomically with that check. After `commit_fence_timeout` the attempt is withdrawn
  (`COMMIT_FENCE_TIMEOUT`); the batch reopens unless another attempt is live.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import os
import time
from collections.abc import Callable

from .metrics import Metrics, counted
from .policy import refusal_lease_lost
from .store import COMMITTED, COMMITTING, FIRED, OPEN, UNKNOWN, BatchState, BatchStore, LeaseReply, StoreError

log = logging.getLogger("gateway.fence")
monotonic = time.monotonic

LEASE_TTL = 10.0  # a lease's life in the ledger, on the store's clock
MARGIN = 2.0  # the local deadline comes this much before the ledger's expiry (docs/fence.md: A2, A3)
DRIFT = 0.01  # clock-rate difference tolerated between this host and the store (A1)
RENEW_EVERY = 2.0  # three chances to renew before the local deadline
IDLE = 2.0  # a lease with nothing in flight and no admission for this long is released
ATTEMPT_EXTRA = 30.0  # a commit attempt lives the fence timeout plus this: its gateway may be slow, not dead
VALID_FOR = LEASE_TTL * (1 - DRIFT) - MARGIN


class _Lease:
    """This gateway's lease on one batch. Its `token` names it in the ledger: a lease dropped
    here and one taken again a moment later are different entries, so the release of the first
    can never remove the second (which a concurrent commit must still wait for)."""

    __slots__ = ("bid", "deadline", "inflight", "lost", "sealed", "timer", "token", "used", "written")

    def __init__(self, bid: str, token: str):
        self.bid = bid
        self.token = token
        self.deadline = 0.0  # local monotonic time until which commands may be written under it
        self.inflight = 0  # admitted and not yet answered (nor refused, nor given up)
        self.written: set[Ticket] = set()  # written upstream and unanswered: the ones to abort
        self.sealed = False  # a commit began: admit nothing more locally
        self.lost = False  # past its deadline without renewal: dead for good
        self.used = 0.0
        self.timer: asyncio.TimerHandle | None = None

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
        return not lease.lost and monotonic() < lease.deadline

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
        """The connection died before the reply: the command may still be in the network for a
        moment (A2), so the lease keeps counting it for MARGIN."""
        if not self.done:
            asyncio.get_running_loop().call_later(MARGIN, self._finish)

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
    def __init__(self, store: BatchStore, metrics: Metrics, gateway_id: str | None = None):
        self.store = store
        self.metrics = metrics
        self.gateway_id = gateway_id or os.urandom(6).hex()
        self._leases: dict[str, _Lease] = {}
        self._tokens = map(f"{self.gateway_id}-{{}}".format, itertools.count())
        self._renewer: asyncio.Task | None = None

    def start(self) -> None:
        """Inside the event loop: renew leases, and hear about seals from other gateways."""
        self.store.on_seal(self._sealed)
        self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        for lease in list(self._leases.values()):
            if not lease.inflight:
                self._drop(lease, release=True)

    # ------------------------------------------------------------------------------------------
    # Admission

    def admit_locally(self, bid: str) -> Ticket | None:
        """A ticket when this gateway's lease on bid allows it without asking the store."""
        lease = self._leases.get(bid)
        if lease is None:
            return None
        now = monotonic()
        if not lease.admits(now):
            return None
        lease.inflight += 1
        lease.used = now
        return Ticket(self, lease)

    async def admit(self, bid: str) -> tuple[BatchState, Ticket | None]:
        """Admit one command into bid: (OPEN, ticket), or (the state that refuses it, None).

        Raises StoreError when the store cannot be asked."""
        ticket = self.admit_locally(bid)
        if ticket is not None:
            return OPEN, ticket
        lease = self._leases.get(bid)
        if lease is None or lease.lost:
            # Registered before asking, with no deadline yet: a seal heard meanwhile finds it.
            lease = self._leases[bid] = _Lease(bid, next(self._tokens))
        started = monotonic()
        lease.inflight += 1  # counted while asking, so that a seal heard meanwhile does not drop it
        try:
            reply = await counted(self.metrics, "acquire", self.store.acquire(bid, lease.token, LEASE_TTL))
        except BaseException:
            self._finished(lease)
            raise
        if reply.state != OPEN or lease.lost:
            # Refused; or granted, but this lease was given up meanwhile (its release may already
            # have removed the grant): only a seal does that, so the batch is committing now.
            lease.sealed = True
            self._finished(lease)
            return (reply.state if reply.state != OPEN else COMMITTING), None
        # Granted before any seal (the ledger orders them): a commit waits for this lease, so
        # the command may go even if a seal was heard while asking.
        self._extend(lease, started)
        lease.used = monotonic()
        return OPEN, Ticket(self, lease)

    def _extend(self, lease: _Lease, started: float) -> None:
        deadline = started + VALID_FOR
        if deadline > lease.deadline:
            lease.deadline = deadline
            if lease.timer is None:
                self._arm(lease)

    def _arm(self, lease: _Lease) -> None:
        # The event loop's clock is cached per iteration (and libuv's counts milliseconds), so a
        # timer can fire a little before time.monotonic() reaches the deadline: aim a millisecond
        # late and look again when it fires. A deadline that a renewal moved later is re-armed.
        delay = max(lease.deadline - monotonic(), 0.0) + 0.001
        lease.timer = asyncio.get_running_loop().call_later(delay, self._deadline_check, lease)

    def _deadline_check(self, lease: _Lease) -> None:
        lease.timer = None
        if lease.lost:
            return
        if monotonic() < lease.deadline:
            self._arm(lease)
            return
        self._lose(lease, "the lease could not be renewed before its local deadline")

    def _lose(self, lease: _Lease, why: str) -> None:
        """Nothing admitted under this lease may reach the server any more: reset its connections.

        The lease is never released after this: bytes just reset may still be on the wire for
        MARGIN (A2), and a release would let a commit go before they are gone (the model in
        tests/model finds that trace). It lapses in the ledger by itself."""
        lease.lost = True
        if self._leases.get(lease.bid) is lease:
            del self._leases[lease.bid]
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
        if lease.inflight == 0 and lease.sealed and not lease.lost:
            self._drop(lease, release=True)
        elif lease.inflight == 0 and lease.deadline == 0.0 and not lease.lost:
            self._drop(lease, release=False)  # never granted

    def _drop(self, lease: _Lease, release: bool) -> None:
        if self._leases.get(lease.bid) is lease:
            del self._leases[lease.bid]
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
            await asyncio.sleep(RENEW_EVERY)
            try:
                await self.renew_all()
            except Exception:  # never let the renewer die: the deadlines still protect
                log.exception("lease renewal failed")

    async def renew_all(self) -> None:
        now = monotonic()
        renewing = []
        for lease in list(self._leases.values()):
            if lease.deadline == 0.0:
                continue  # its first acquire is still on its way
            if lease.inflight or now - lease.used < IDLE:
                renewing.append(lease)
            else:
                self._drop(lease, release=True)
        if renewing:
            await asyncio.gather(*(self._renew(lease) for lease in renewing))

    async def _renew(self, lease: _Lease) -> None:
        started = monotonic()
        try:
            reply: LeaseReply = await counted(
                self.metrics, "renew", self.store.renew(lease.bid, lease.token, LEASE_TTL)
            )
        except StoreError as exc:
            log.warning("lease renewal failed", extra={"bid": lease.bid, "error": str(exc)})
            return  # the deadline timer acts if no later renewal succeeds
        if lease.lost:
            return
        if not reply.held:
            self._lose(lease, "the ledger no longer holds the lease")
            return
        self._extend(lease, started)
        if reply.state != OPEN:
            self._sealed(lease.bid)

    # ------------------------------------------------------------------------------------------
    # Commit

    def new_attempt(self) -> str:
        return next(self._tokens)

    async def begin_commit(self, bid: str, attempt: str, timeout: float, adopt: bool = True) -> CommitStart:
        """Seal bid and wait until nothing admitted into it is in flight at any gateway. Without
        `adopt`, a batch the ledger has no record of is left alone (CommitStart.UNKNOWN).

        Raises StoreError when the store cannot be asked (the attempt then expires by itself)."""
        ttl = timeout + ATTEMPT_EXTRA
        # This gateway stops admitting into bid now, and releases an idle lease of its own ahead
        # of the seal (one connection keeps the order), so the first check can already go.
        self._sealed(bid)
        # The first check is sent right behind the seal, unawaited: one round trip, not two.
        begun, go = await asyncio.gather(
            counted(self.metrics, "begin_commit", self.store.begin_commit(bid, attempt, ttl, adopt)),
            counted(self.metrics, "commit_go", self.store.commit_go(bid, attempt, ttl, adopt)),
            return_exceptions=True,
        )
        for outcome in (begun, go):
            if isinstance(outcome, BaseException):
                raise outcome
        if begun == UNKNOWN and not adopt:
            return CommitStart.UNKNOWN
        if begun in (COMMITTED, FIRED):
            return CommitStart.REPEAT
        started = monotonic()
        deadline = started + timeout
        delay = 0.0005
        try:
            while not go:
                if monotonic() + delay > deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
                go = await counted(self.metrics, "commit_go", self.store.commit_go(bid, attempt, ttl))
        finally:
            self.metrics.fence_wait.observe(monotonic() - started)
        if go:
            return CommitStart.GO
        await self.finish_commit(bid, attempt, committed=False)
        return CommitStart.TIMED_OUT

    async def finish_commit(self, bid: str, attempt: str, committed: bool) -> None:
        await counted(self.metrics, "finish_commit", self.store.finish_commit(bid, attempt, committed))

    def local_leases(self) -> int:
        return len(self._leases)
