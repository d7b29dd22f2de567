"""The batch guard: sees each command before it is forwarded, and some replies before the client.

`inspect` is called for every command on the hot path, so it decides with byte checks first:
most commands return None (forward unchanged) without decoding anything. The rest return a
decision (`Forward` with a reply handler, or `Respond` with a refusal) or, when the store must be
asked, an awaitable of one; the session keeps later commands waiting until it resolves.

Invariants (design.md section 2) and where they are kept:
- I1, I2: PUSH / PUSHB jobs with `custom.bid` are admitted only into an open batch (`_admit`).
- I3: BATCH NEW with `parent_bid` is admitted like a job of the parent.
- I4: BATCH OPEN is judged by policy.refusal_to_open, and in member-reopen mode the server's own
  BATCH STATUS is checked before a committed batch is reopened.
- The commit fence (I8): an admission holds a lease until the server answers; BATCH COMMIT moves
  the batch to committing (no new leases) and waits for the leases to end before forwarding.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from typing import TYPE_CHECKING

from . import policy
from .config import Config
from .metrics import Metrics
from .policy import MEMBER_REOPEN, SHADOW, Malformed, Refusal
from .protocol import DOLLAR, Command, Reply, bulk_reply
from .session import Forward, Respond
from .store import COMMITTED, FIRED, OPEN, UNKNOWN, BatchStore, StoreError

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("gateway.guard")

# How long an admission's lease lives if its gateway never sees the server's reply (it died, or
# the connection broke). Longer than any sane PUSH round trip; short enough that a dead gateway
# delays commits of that batch only briefly.
LEASE_TTL = 15.0
DEFAULT_RESERVATION = 1800.0  # Faktory's default reserve_for, for jobs that do not say


class BatchGuard:
    def __init__(self, store: BatchStore, config: Config, metrics: Metrics):
        self.store = store
        self.config = config
        self.metrics = metrics
        self._background: set[asyncio.Task] = set()
        self._held_here: dict[str, set[str]] = {}  # wid -> jids fetched through this gateway
        # Lease tokens need only be unique among live leases: this process's id and a counter.
        self._tokens = map(f"{os.urandom(4).hex()}-{{}}".format, itertools.count())

    # ------------------------------------------------------------------------------------------
    # Dispatch (hot path)

    def inspect(self, command: Command, session: Session):
        verb = command.verb
        if verb == b"PUSH":
            return self._push(command, session) if policy.may_name_a_batch(command.args) else None
        if verb == b"FETCH":
            return Forward(command.raw, lambda reply: self._fetched(reply, session))
        if verb == b"BATCH":
            return self._batch(command, session)
        if verb == b"PUSHB":
            return self._push_bulk(command, session) if policy.may_name_a_batch(command.args) else None
        if verb in (b"ACK", b"FAIL") and session.wid in self._held_here:
            self._finished(command, session.wid)
        elif verb == b"QUEUE" and not command.args.strip():
            # Faktory 1.9.4 panics on a bare QUEUE and the whole server goes down with it.
            return self._malformed(
                command, session, "a subcommand is required (PAUSE, RESUME, REMOVE, LATENCY)"
            )
        return None

    # ------------------------------------------------------------------------------------------
    # Outcomes

    def _refuse(self, refusal: Refusal, command: Command, session: Session, bid: str | None):
        """Refuse, or in shadow mode count and forward. Every refusal is logged once: the audit trail."""
        fields = {
            "code": refusal.code,
            "verb": command.verb.decode("ascii", "replace")[:16],
            "bid": bid,
            "wid": session.wid,
            "peer": session.peer,
            "mode": self.config.mode,
        }
        if self.config.mode == SHADOW:
            self.metrics.shadow_refusals.labels(refusal.code).inc()
            log.info("would refuse (shadow mode)", extra=fields)
            return Forward(command.raw)
        self.metrics.refusals.labels(refusal.code).inc()
        log.warning("refused", extra=fields)
        return Respond(refusal.reply())

    def _malformed(self, command: Command, session: Session, problem: str):
        return self._refuse(policy.refusal_malformed(command.verb.decode(), problem), command, session, None)

    async def _store(self, operation: str, awaitable):
        self.metrics.store_calls.labels(operation).inc()
        try:
            return await awaitable
        except StoreError as exc:
            self.metrics.store_errors.labels(operation).inc()
            log.warning("store call failed", extra={"operation": operation, "error": str(exc)})
            raise

    def _later(self, coroutine) -> None:
        """Store work whose result nobody waits for (an unhold); tracked so it is not lost."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _release(self, bid: str, token: str) -> None:
        self.metrics.store_calls.labels("release").inc()
        self.store.release(bid, token)

    async def _quietly(self, operation: str, awaitable) -> None:
        try:
            await self._store(operation, awaitable)
        except StoreError as exc:
            log.warning("store update failed", extra={"operation": operation, "error": str(exc)})

    # ------------------------------------------------------------------------------------------
    # Admission: the commit fence's entry half

    async def _admit(self, bid: str, session: Session) -> tuple[str | None, str]:
        """Try to add to `bid`. Returns (lease token or None, state that decided)."""
        token = next(self._tokens)
        state = await self._store("admit", self.store.admit(bid, token))
        if state == UNKNOWN:
            state = await self._judge_unknown(bid, session)
            if state == OPEN:
                state = await self._store("admit", self.store.admit(bid, token))
            elif state == "allow":
                return None, OPEN
        return (token if state == OPEN else None), state

    async def _judge_unknown(self, bid: str, session: Session) -> str:
        """A batch with no record (created before the gateway, or expired): `unknown_batch` decides."""
        if self.config.unknown_batch == "allow":
            return "allow"
        if self.config.unknown_batch == "reject":
            return UNKNOWN
        reply = await session.ask_upstream(b"BATCH STATUS " + bid.encode() + b"\r\n")
        status = self._status_of(reply)
        if not isinstance(status, dict):
            return UNKNOWN  # the server has no such batch
        if policy.status_fired(status):
            await self._store("mark_fired", self.store.mark_fired(bid))
            return FIRED
        await self._store("create", self.store.create(bid, OPEN))
        return OPEN

    @staticmethod
    def _status_of(reply: Reply) -> object:
        if reply.kind != DOLLAR or reply.payload is None:
            return None
        try:
            return json.loads(reply.payload)
        except ValueError:
            return None

    def _releasing(self, bid: str, token: str | None):
        def on_reply(reply: Reply) -> bytes:
            if token is not None:
                self._release(bid, token)
            return reply.raw

        return on_reply

    def _unknown_or_sealed(self, bid: str, state: str, nest: bool) -> Refusal:
        if state == UNKNOWN:
            return policy.refusal_unknown(bid, self.config.unknown_batch)
        return policy.refusal_to_nest(bid, state) if nest else policy.refusal_to_add(bid, state)

    # ------------------------------------------------------------------------------------------
    # PUSH and PUSHB

    def _push(self, command: Command, session: Session):
        try:
            bid = policy.job_bid(policy.decode(command.args))
        except Malformed as exc:
            return self._malformed(command, session, str(exc))
        if bid is None:
            return None
        return self._add_to(bid, command, session, False, lambda token: self._releasing(bid, token))

    async def _add_to(self, bid: str, command: Command, session: Session, nest: bool, on_reply):
        """Admit a job (or a child batch, `nest`) into `bid`; `on_reply(token)` makes its reply handler."""
        try:
            token, state = await self._admit(bid, session)
        except StoreError:
            return self._store_down(bid, command, session)
        if state != OPEN:
            return self._refuse(self._unknown_or_sealed(bid, state, nest), command, session, bid)
        return Forward(command.raw, on_reply(token), linger=token is not None)

    def _store_down(self, bid: str, command: Command, session: Session):
        if self.config.on_store_error == "allow":
            log.warning(
                "store unavailable; allowed by on_store_error", extra={"bid": bid, "peer": session.peer}
            )
            return Forward(command.raw)
        return self._refuse(policy.refusal_store_down(bid), command, session, bid)

    def _push_bulk(self, command: Command, session: Session):
        try:
            jobs = policy.decode(command.args)
            if not isinstance(jobs, list):
                return None  # the server's own error for a PUSHB that is not a list
            bids = [policy.job_bid(job) for job in jobs]
        except Malformed as exc:
            return self._malformed(command, session, str(exc))
        if not any(bids):
            return None
        return self._push_bulk_into(jobs, bids, command, session)

    async def _push_bulk_into(self, jobs: list, bids: list, command: Command, session: Session):
        """Admit each batch once; refuse only the jobs whose batch refuses; forward the rest as one PUSHB."""
        verdicts: dict[str, tuple[str | None, Refusal | None]] = {}
        for bid in dict.fromkeys(b for b in bids if b):
            try:
                token, state = await self._admit(bid, session)
            except StoreError:
                if self.config.on_store_error == "allow":
                    verdicts[bid] = (None, None)
                    continue
                verdicts[bid] = (None, policy.refusal_store_down(bid))
                continue
            verdicts[bid] = (
                token,
                None if state == OPEN else self._unknown_or_sealed(bid, state, nest=False),
            )
        refused = {}
        kept = []
        for job, bid in zip(jobs, bids, strict=True):
            refusal = verdicts[bid][1] if bid else None
            if refusal is None:
                kept.append(job)
                continue
            refused[str(job.get("jid", ""))] = f"{refusal.code} {refusal.message}"
        leases = [(bid, token) for bid, (token, _) in verdicts.items() if token]
        for bid, (_, refusal) in verdicts.items():
            if refusal is not None:
                self._refuse(refusal, command, session, bid)  # logs and counts once per batch
        if not refused or self.config.mode == SHADOW:
            return Forward(command.raw, self._releasing_all(leases, {}), linger=bool(leases))
        if not kept:
            return Respond(bulk_reply(json.dumps(refused, separators=(",", ":")).encode()))
        data = b"PUSHB " + json.dumps(kept, separators=(",", ":")).encode() + b"\r\n"
        return Forward(data, self._releasing_all(leases, refused), linger=bool(leases))

    def _releasing_all(self, leases: list[tuple[str, str]], refused: dict):
        def on_reply(reply: Reply) -> bytes:
            for bid, token in leases:
                self._release(bid, token)
            if not refused or reply.kind != DOLLAR or reply.payload is None:
                return reply.raw
            try:
                merged = {**json.loads(reply.payload), **refused}
            except ValueError:
                return reply.raw
            return bulk_reply(json.dumps(merged, separators=(",", ":")).encode())

        return on_reply

    # ------------------------------------------------------------------------------------------
    # BATCH

    def _batch(self, command: Command, session: Session):
        sub, _, rest = command.args.partition(b" ")
        if sub == b"NEW":
            return self._batch_new(command, rest, session)
        if sub not in (b"OPEN", b"COMMIT", b"STATUS"):
            return None
        try:
            bid = policy.valid_bid(rest.decode("utf-8", "replace").strip())
        except Malformed as exc:
            return self._malformed(command, session, str(exc))
        if sub == b"OPEN":
            return self._batch_open(bid, command, session)
        if sub == b"COMMIT":
            return self._batch_commit(bid, command, session)
        return Forward(command.raw, lambda reply: self._status_seen(bid, reply))

    def _batch_new(self, command: Command, payload: bytes, session: Session):
        try:
            spec = policy.decode(payload)
            parent = policy.field(spec, "parent_bid") if isinstance(spec, dict) else None
            parent = policy.valid_bid(parent) if parent else None
        except Malformed as exc:
            return self._malformed(command, session, str(exc))
        if parent is None:
            return Forward(command.raw, self._recording_new_batch(None, None))
        return self._add_to(
            parent, command, session, True, lambda token: self._recording_new_batch(parent, token)
        )

    def _recording_new_batch(self, parent: str | None, token: str | None):
        async def on_reply(reply: Reply) -> bytes:
            if token is not None:
                self._release(parent, token)
            if reply.kind == DOLLAR and reply.payload:
                bid = reply.payload.decode("utf-8", "replace")
                if policy.BID.fullmatch(bid):
                    # Recorded before the client sees the bid, so its first PUSH finds the record.
                    await self._quietly("create", self.store.create(bid, OPEN))
            return reply.raw

        return on_reply

    async def _batch_open(self, bid: str, command: Command, session: Session):
        try:
            state = await self._store("state", self.store.state(bid))
            if state == UNKNOWN:
                state = await self._judge_unknown(bid, session)
                if state in ("allow", OPEN):
                    return Forward(command.raw)
                return self._refuse(self._unknown_or_sealed(bid, state, nest=False), command, session, bid)
            member = False
            if state == COMMITTED and self.config.mode == MEMBER_REOPEN and session.wid:
                member = await self._store("holds", self.store.holds(session.wid, bid))
            refusal = policy.refusal_to_open(bid, state, self.config.mode, member)
            if refusal is None and state == COMMITTED:
                refusal = await self._legal_reopen(bid, session)
        except StoreError:
            return self._store_down(bid, command, session)
        if refusal is not None:
            return self._refuse(refusal, command, session, bid)
        return Forward(command.raw)

    async def _legal_reopen(self, bid: str, session: Session) -> Refusal | None:
        """A member may reopen a committed batch only if none of its callbacks fired: ask the server."""
        reply = await session.ask_upstream(b"BATCH STATUS " + bid.encode() + b"\r\n")
        status = self._status_of(reply)
        if policy.status_fired(status):
            await self._store("mark_fired", self.store.mark_fired(bid))
            return policy.refusal_to_open(bid, FIRED, self.config.mode, True)
        before = await self._store("reopen", self.store.reopen(bid))
        return None if before == COMMITTED else policy.refusal_to_open(bid, before, self.config.mode, True)

    async def _batch_commit(self, bid: str, command: Command, session: Session):
        try:
            before = await self._store("begin_commit", self.store.begin_commit(bid))
        except StoreError:
            return self._store_down(bid, command, session)
        if before in (COMMITTED, FIRED):
            return Forward(command.raw)  # a repeated commit changes nothing; the server answers it
        timeout = self.config.commit_fence_timeout
        started = time.monotonic()
        try:
            drained = await self._wait_for_leases(bid, started + timeout)
        except StoreError:
            drained = False
        self.metrics.fence_wait.observe(time.monotonic() - started)
        if not drained:
            await self._quietly("finish_commit", self.store.finish_commit(bid, committed=False))
            return self._refuse(policy.refusal_fence_timeout(bid, timeout), command, session, bid)
        return Forward(command.raw, lambda reply: self._committed(bid, reply), linger=True)

    async def _wait_for_leases(self, bid: str, deadline: float) -> bool:
        delay = 0.001
        while await self._store("live_leases", self.store.live_leases(bid)):
            if time.monotonic() + delay > deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return True

    async def _committed(self, bid: str, reply: Reply) -> bytes:
        await self._quietly("finish_commit", self.store.finish_commit(bid, committed=not reply.is_error))
        return reply.raw

    def _status_seen(self, bid: str, reply: Reply):
        if policy.status_fired(self._status_of(reply)):
            return self._record_fired(bid, reply)
        return reply.raw

    async def _record_fired(self, bid: str, reply: Reply) -> bytes:
        await self._quietly("mark_fired", self.store.mark_fired(bid))
        return reply.raw

    # ------------------------------------------------------------------------------------------
    # FETCH, ACK, FAIL: what workers hold, and callbacks seen

    def _fetched(self, reply: Reply, session: Session):
        payload = reply.payload
        if not payload or reply.kind != DOLLAR:
            return reply.raw
        if b'"_bid"' not in payload and not (self.config.mode == MEMBER_REOPEN and b'bid"' in payload):
            return reply.raw
        return self._learn_from_job(reply, session)

    async def _learn_from_job(self, reply: Reply, session: Session) -> bytes:
        try:
            job = json.loads(reply.payload)
            custom = job.get("custom") or {}
        except (ValueError, AttributeError):
            return reply.raw
        callback_of = custom.get("_bid")
        if isinstance(callback_of, str) and policy.BID.fullmatch(callback_of):
            await self._quietly("mark_fired", self.store.mark_fired(callback_of))
        if self.config.mode == MEMBER_REOPEN and session.wid:
            bids = [
                b
                for b in (custom.get("bid"), custom.get("_pbid"))
                if isinstance(b, str) and policy.BID.fullmatch(b)
            ]
            jid = job.get("jid")
            if bids and isinstance(jid, str):
                ttl = float(job.get("reserve_for") or DEFAULT_RESERVATION)
                self._held_here.setdefault(session.wid, set()).add(jid)
                await self._quietly("hold", self.store.hold(session.wid, jid, bids, ttl))
        return reply.raw

    def _finished(self, command: Command, wid: str) -> None:
        held = self._held_here.get(wid)
        try:
            jid = json.loads(command.args).get("jid")
        except (ValueError, AttributeError):
            return
        if held and jid in held:
            held.discard(jid)
            if not held:
                del self._held_here[wid]
            self._later(self._quietly("unhold", self.store.unhold(wid, jid)))
