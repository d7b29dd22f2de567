"""The batch guard: sees each command before it is forwarded, and some replies before the client.

`decide` is called for every command on the hot path, so it decides with byte checks first: most
commands return None (forward unchanged) without decoding anything. The rest return a decision
(decisions.Forward or Respond) or, when the store or the server must be asked first, an
awaitable of one; the session holds later commands of that connection back until it resolves.

Invariants (docs/invariants.md has each with its test) and where they are kept here:
- I1, I2: a PUSH / PUSHB job with `custom.bid` is admitted only into an open batch (`_admit`),
  under a lease of the commit fence (fence.py).
- I3: BATCH NEW with `parent_bid` is admitted like a job of the parent.
- I4: BATCH OPEN is judged by policy.refusal_to_open; in member-reopen mode the server's own
  BATCH STATUS is checked before a committed batch is reopened.
- I8: BATCH COMMIT goes to the server only after the fence saw nothing admitted in flight.
- Admission waits until every earlier command of the connection was answered (the barrier), so
  that an admitted command is at the head of the server's queue when it is written: a lease then
  covers the server's handling of that one command, never a client's queue before it (Faktory
  handles what reached it even after a reset: docs/fence.md, A3).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable

from . import gotext, policy, shield
from .config import Config
from .decisions import Client, Decision, Forward, Respond
from .fence import ADMIT_MAX_BYTES, CommitStart, Fence, Ticket, TicketGroup
from .holdings import Holdings
from .metrics import Metrics, counted
from .policy import MEMBER_REOPEN, SHADOW, Malformed, Refusal
from .protocol import DOLLAR, Command, Reply, bulk_reply
from .status import Status, absent
from .status import ask as ask_status
from .store import COMMITTED, FIRED, OPEN, UNKNOWN, BatchState, BatchStore, StoreError

log = logging.getLogger("gateway.guard")

TOUCH_EVERY = 3600.0  # a committed record is refreshed at most this often per batch per gateway
MEMBER_BID = re.compile(rb'"bid"\s*:\s*"([A-Za-z0-9_.:-]{1,128})"')
ALWAYS_DECIDED = frozenset((b"BATCH", b"QUEUE"))  # verbs decide() may answer whatever their bytes
FINISHING = frozenset((b"ACK", b"FAIL"))  # decided only while this gateway holds jobs for the worker


class BatchGuard:
    def __init__(
        self,
        store: BatchStore,
        config: Config,
        metrics: Metrics,
        fence: Fence | None = None,
        clock=time.monotonic,
    ):
        self.store = store
        self.clock = clock
        self.config = config
        self.metrics = metrics
        self.fence = fence or Fence(store, metrics)
        self.holdings = Holdings(store)
        self._touched: dict[str, float] = {}
        self._background: set[asyncio.Task] = set()

    def start(self) -> None:
        self.fence.start()

    async def close(self) -> None:
        await self.fence.close()

    # ------------------------------------------------------------------------------------------
    # Dispatch (hot path)

    def decide(self, command: Command, client: Client) -> Decision | Awaitable[Decision]:
        verb = command.verb
        if not command.args and (shielded := shield.judge(command)) is not None:
            return self._shield(shielded, command, client)
        if verb == b"PUSH":
            return self._push(command, client) if policy.may_name_a_batch(command.args) else None
        if verb == b"FETCH":
            return Forward(command.raw, self.fetch_reply_handler(client))
        if verb == b"BATCH":
            return self._batch(command, client)
        if verb == b"PUSHB":
            return self._push_bulk(command, client) if policy.may_name_a_batch(command.args) else None
        if verb in (b"ACK", b"FAIL") and self.holdings.holds_any(self._holder(client)):
            self._finished(command, client)
        elif verb == b"QUEUE" and (shielded := shield.judge(command)) is not None:
            return self._shield(shielded, command, client)
        return None

    def _shield(self, shielded: shield.Shielded, command: Command, client: Client) -> Decision:
        """A line the server would crash on: answered here, in every mode, never forwarded."""
        self.metrics.shielded.labels(shielded.verb).inc()
        log.warning(
            "shielded a line the server would crash on",
            extra={"verb": shielded.verb, "source": shielded.source, "wid": client.wid, "peer": client.peer},
        )
        return Respond(shielded.reply)

    # ------------------------------------------------------------------------------------------
    # The fast lane (pipeline.py): chunks and replies that need no decision

    def unchecked(self, verbs: list[bytes], chunk: bytes, client: Client) -> bool:
        """True when decide() would forward every command of `chunk` (whole lines, with these
        verbs) unchanged and touch no state, FETCH aside: its decision only concerns its reply
        (fetch_reply_handler, needed only where fetch_reply_needs_rules). A cheap superset check:
        False sends the chunk through decide(), command by command."""
        if not ALWAYS_DECIDED.isdisjoint(verbs) or policy.may_name_a_batch(chunk):
            return False
        return FINISHING.isdisjoint(verbs) or not self.holdings.holds_any(self._holder(client))

    def admitted_push(self, verbs: list[bytes], chunk: bytes, client: Client) -> Ticket | None:
        """The fast lane for a batch PUSH: the admission ticket when `chunk` is one PUSH line that
        decide() would forward unchanged under a lease this gateway holds (the same reading, the
        same local admission, nothing held by the server ahead of it); else None, and decide()
        takes the command as usual."""
        if len(verbs) != 1 or verbs[0] != b"PUSH" or client.unanswered() or len(chunk) > ADMIT_MAX_BYTES:
            return None
        line = chunk[:-2] if chunk.endswith(b"\r\n") else chunk[:-1]  # as Command.parse splits it
        try:
            bid, reserved = policy.read_push(line.partition(b" ")[2])
        except Malformed:
            return None
        if reserved or bid is None:
            return None
        return self.fence.admit_locally(bid)

    def fetch_reply_handler(self, client: Client):
        """The reply handler of a FETCH (the one decide() gives it)."""
        return lambda reply: self._fetched(reply, client)

    @staticmethod
    def fetch_reply_needs_rules(data: bytes) -> bool:
        """False when no FETCH reply within `data` can be seen by _fetched: it reads only jobs
        whose bytes name a batch (`bid"` also finds `"_bid"`); for the rest it returns the reply."""
        return b'bid"' in data

    # ------------------------------------------------------------------------------------------
    # Outcomes: refusals, shadow mode and store failures each handled in one place

    def _refuse(self, refusal: Refusal, command: Command, client: Client, bid: str | None) -> Decision:
        """Refuse, or in shadow mode count and forward. Every refusal is logged once: the audit trail."""
        fields = {
            "code": refusal.code,
            "verb": command.verb.decode("ascii", "replace")[:16],
            "bid": bid,
            "wid": client.wid,
            "peer": client.peer,
            "mode": self.config.mode,
        }
        if self.config.mode == SHADOW:
            self.metrics.shadow_refusals.labels(refusal.code).inc()
            log.info("would refuse (shadow mode)", extra=fields)
            return Forward(command.raw)
        self.metrics.refusals.labels(refusal.code).inc()
        log.warning("refused", extra=fields)
        return Respond(refusal.reply())

    def _malformed(self, command: Command, client: Client, problem: str) -> Decision:
        return self._refuse(policy.refusal_malformed(command.verb.decode(), problem), command, client, None)

    def _store_failed(self, bid: str, client: Client, exc: StoreError) -> Refusal | None:
        """`on_store_error`: the refusal to give when the store cannot be asked, or None (allow)."""
        log.warning("store unavailable", extra={"bid": bid, "peer": client.peer, "error": str(exc)})
        if self.config.on_store_error == "allow":
            return None
        return policy.refusal_store_down(bid, self.config.on_store_error)

    def _store_down(self, bid: str, command: Command, client: Client, exc: StoreError) -> Decision:
        refusal = self._store_failed(bid, client, exc)
        return Forward(command.raw) if refusal is None else self._refuse(refusal, command, client, bid)

    def _store(self, operation: str, awaitable):
        return counted(self.metrics, operation, awaitable)

    async def _quietly(self, operation: str, awaitable) -> None:
        """A store update whose failure changes no decision (it is logged and counted)."""
        try:
            await self._store(operation, awaitable)
        except StoreError as exc:
            log.warning("store update failed", extra={"operation": operation, "error": str(exc)})

    def _sealed_refusal(self, bid: str, state: BatchState, nest: bool) -> Refusal:
        if state == UNKNOWN:
            return policy.refusal_unknown(bid, self.config.unknown_batch)
        mode = self.config.mode
        return policy.refusal_to_nest(bid, state, mode) if nest else policy.refusal_to_add(bid, state, mode)

    # ------------------------------------------------------------------------------------------
    # Admission: the commit fence's entry half

    async def _admit(self, bid: str, client: Client) -> tuple[BatchState | None, Ticket | None]:
        """Admit one command into bid. (OPEN, ticket); (OPEN, None) when `unknown_batch: allow`
        let an unknown batch through; (None, None) when the server has no such batch (its own
        answer goes to the client); else (the state that refuses, None). Raises StoreError."""
        state, ticket = await self.fence.admit(bid)
        if state == UNKNOWN:
            judged = await self._judge_unknown(bid, client)
            if judged == OPEN and self.config.unknown_batch != "allow":
                return await self.fence.admit(bid)
            return judged, None
        if state == COMMITTED:
            await self._touch(bid)  # seen again: it must stay sealed for as long as it can fire
        return state, ticket

    async def _judge_unknown(self, bid: str, client: Client) -> BatchState | None:
        """A batch with no record (created before the gateway, or expired): `unknown_batch`
        decides. None: the server says it has no such batch, so nothing can join it and the
        command goes to the server, whose own error the client gets (clients match on its text)."""
        if self.config.unknown_batch == "allow":
            return OPEN
        if self.config.unknown_batch == "reject":
            return UNKNOWN
        reply, status = await ask_status(client, bid)
        if status is None:
            return None if absent(reply) else UNKNOWN
        if status.fired:
            await self._store("mark_fired", self.store.mark_fired(bid))
            return FIRED
        await self._store("create", self.store.create(bid, OPEN))
        return OPEN

    def _touch_due(self, bid: str) -> bool:
        """A committed batch seen again restarts its retention; at most once per TOUCH_EVERY."""
        now = self.clock()
        if now - self._touched.get(bid, -TOUCH_EVERY) < TOUCH_EVERY:
            return False
        if len(self._touched) > 100_000:
            self._touched.clear()
        self._touched[bid] = now
        return True

    async def _touch(self, bid: str) -> None:
        if self._touch_due(bid):
            await self._quietly("touch", self.store.touch(bid))

    def _forward_admitted(
        self, command: Command, client: Client, bid: str, nest: bool, on_reply=None, data: bytes | None = None
    ) -> Decision | Awaitable[Decision]:
        """The fast path: nothing is unanswered on this connection and this gateway's lease on
        bid admits locally: no store call, no task. Otherwise the full admission."""
        if len(command.raw) > ADMIT_MAX_BYTES:
            return self._refuse(
                policy.refusal_too_large(len(command.raw), ADMIT_MAX_BYTES), command, client, bid
            )
        if not client.unanswered():
            ticket = self.fence.admit_locally(bid)
            if ticket is not None:
                return Forward(data or command.raw, on_reply, ticket)
        return self._admit_and_forward(command, client, bid, nest, on_reply)

    async def _admit_and_forward(
        self, command: Command, client: Client, bid: str, nest: bool, on_reply
    ) -> Decision:
        if client.unanswered():
            await client.all_answered()
        try:
            state, ticket = await self._admit(bid, client)
        except StoreError as exc:
            return self._store_down(bid, command, client, exc)
        if state is None:  # no such batch: the server's own answer
            return Forward(command.raw, on_reply)
        if state != OPEN:
            return self._refuse(self._sealed_refusal(bid, state, nest), command, client, bid)
        return Forward(command.raw, on_reply, ticket)

    # ------------------------------------------------------------------------------------------
    # PUSH and PUSHB

    def _push(self, command: Command, client: Client) -> Decision | Awaitable[Decision]:
        try:
            bid, reserved = policy.read_push(command.args)
        except Malformed as exc:
            return self._malformed(command, client, str(exc))
        if reserved:
            return self._refuse(policy.refusal_reserved(reserved), command, client, None)
        if bid is None:
            return None
        return self._forward_admitted(command, client, bid, nest=False)

    def _push_bulk(self, command: Command, client: Client) -> Decision | Awaitable[Decision]:
        try:
            jobs = policy.read_bulk(command.args)
        except Malformed as exc:
            return self._malformed(command, client, str(exc))
        if jobs is None:
            return None  # the server's own error for a PUSHB that is not a list
        bids = [job.bid for job in jobs]
        reserved = [job.reserved for job in jobs]
        if not any(bids) and not any(reserved):
            return None
        return self._push_bulk_into(jobs, bids, reserved, command, client)

    async def _push_bulk_into(
        self, jobs: list, bids: list, reserved: list, command: Command, client: Client
    ) -> Decision:
        """Admit each batch once; refuse only the jobs whose batch refuses (or that carry a
        reserved key); forward the rest as one PUSHB."""
        if any(bids) and len(command.raw) > ADMIT_MAX_BYTES:
            return self._refuse(
                policy.refusal_too_large(len(command.raw), ADMIT_MAX_BYTES), command, client, None
            )
        if client.unanswered():
            await client.all_answered()
        tickets: list[Ticket] = []
        refusals: dict[str, Refusal] = {}
        for keys in reserved:
            if keys:
                self._refuse(policy.refusal_reserved(keys), command, client, None)
        bids = [None if keys else bid for bid, keys in zip(bids, reserved, strict=True)]
        try:
            for bid in dict.fromkeys(b for b in bids if b):
                try:
                    state, ticket = await self._admit(bid, client)
                except StoreError as exc:
                    if (refusal := self._store_failed(bid, client, exc)) is not None:
                        refusals[bid] = refusal
                    continue
                if ticket is not None:
                    tickets.append(ticket)
                if state is not None and state != OPEN:
                    refusals[bid] = self._sealed_refusal(bid, state, nest=False)
        except BaseException:  # the connection went away meanwhile: end the admissions taken
            for ticket in tickets:
                ticket.answered()
            raise
        for bid, refusal in refusals.items():
            self._refuse(refusal, command, client, bid)  # logs and counts once per batch
        group = TicketGroup.of(tickets)
        verdicts = [
            policy.refusal_reserved(keys) if keys else refusals.get(bid)
            for bid, keys in zip(bids, reserved, strict=True)
        ]
        if not any(verdicts) or self.config.mode == SHADOW:
            return Forward(command.raw, None, group)
        refused = {
            job.jid: f"{verdict.code} {verdict.message}"
            for job, verdict in zip(jobs, verdicts, strict=True)
            if verdict is not None
        }
        kept = [verdict is None for verdict in verdicts]
        if not any(kept):
            if group is not None:
                group.answered()  # nothing goes to the server: the admissions end here
            return Respond(bulk_reply(json.dumps(refused, separators=(",", ":")).encode()))
        data = policy.bulk_line(command.args, kept)  # the kept jobs, each as the client sent it
        return Forward(data, lambda reply: _merge_refused(reply, refused), group)

    # ------------------------------------------------------------------------------------------
    # BATCH

    def _batch(self, command: Command, client: Client) -> Decision | Awaitable[Decision]:
        word, _, rest = command.args.partition(b" ")
        # Matched as Faktory matches QUEUE's subcommands (Go's strings.ToUpper): were Enterprise
        # to do the same for BATCH, `BATCH commit` must not pass unjudged (fail closed).
        sub = gotext.upper(word)
        if sub == b"NEW":
            return self._batch_new(command, rest, client)
        if sub not in (b"OPEN", b"COMMIT", b"STATUS"):
            # Not a subcommand the gateway knows: it goes to the server only if it cannot name
            # a batch the rules would have to judge.
            if policy.names_a_batch(rest):
                shown = word[:16].decode("ascii", "replace")
                return self._malformed(
                    command, client, f"unknown subcommand {shown!r} with a bid-like argument"
                )
            return None
        try:
            bid = policy.valid_bid(rest.decode("utf-8", "replace").strip())
        except Malformed as exc:
            return self._malformed(command, client, str(exc))
        if sub == b"OPEN":
            return self._batch_open(bid, command, client)
        if sub == b"COMMIT":
            return self._batch_commit(bid, command, client)
        return Forward(command.raw, lambda reply: self._status_seen(bid, reply))

    def _batch_new(self, command: Command, payload: bytes, client: Client) -> Decision | Awaitable[Decision]:
        try:
            spec = policy.decode(payload)
            parent = policy.field(spec, "parent_bid") if isinstance(spec, dict) else None
            parent = policy.valid_bid(parent) if parent else None
            callbacks = policy.callback_jids(spec) if isinstance(spec, dict) else []
        except Malformed as exc:
            return self._malformed(command, client, str(exc))

        async def record(reply: Reply) -> bytes:
            if reply.kind == DOLLAR and reply.payload:
                bid = reply.payload.decode("utf-8", "replace")
                if policy.BID.fullmatch(bid):
                    # Recorded before the client sees the bid, so its first PUSH finds the record.
                    await self._quietly("create", self.store.create(bid, OPEN))
                    if callbacks:  # what tells a real callback from a copy pushed to the server
                        await self._quietly("add_callbacks", self.store.add_callbacks(bid, callbacks))
            return reply.raw

        if parent is None:
            return Forward(command.raw, record)
        return self._forward_admitted(command, client, parent, nest=True, on_reply=record)

    async def _batch_open(self, bid: str, command: Command, client: Client) -> Decision:
        try:
            state = await self.fence.state(bid)
            if state == UNKNOWN:
                state = await self._judge_unknown(bid, client)
                if state is None or state == OPEN:
                    return Forward(command.raw)
                return self._refuse(self._sealed_refusal(bid, state, nest=False), command, client, bid)
            member = False
            holder = self._holder(client)
            if state == COMMITTED and self.config.mode == MEMBER_REOPEN and holder:
                member = await self._store("holds", self.holdings.holds(holder, bid))
            refusal = policy.refusal_to_open(bid, state, self.config.mode, member)
            if refusal is None and state == COMMITTED:
                refusal = await self._legal_reopen(bid, client)
            elif state == COMMITTED:
                await self._touch(bid)
        except StoreError as exc:
            return self._store_down(bid, command, client, exc)
        if refusal is not None:
            return self._refuse(refusal, command, client, bid)
        return Forward(command.raw)

    async def _legal_reopen(self, bid: str, client: Client) -> Refusal | None:
        """A member may reopen a committed batch only if none of its callbacks fired: ask the server."""
        _, status = await ask_status(client, bid)
        if status is not None and status.fired:
            await self._store("mark_fired", self.store.mark_fired(bid))
            return policy.refusal_to_open(bid, FIRED, self.config.mode, True)
        before = await self._store("reopen", self.store.reopen(bid))
        return None if before == COMMITTED else policy.refusal_to_open(bid, before, self.config.mode, True)

    async def _batch_commit(self, bid: str, command: Command, client: Client) -> Decision:
        attempt = self.fence.new_attempt()
        timeout = self.config.commit_fence_timeout
        try:
            verify = self.config.unknown_batch == "verify"
            start = await self.fence.begin_commit(bid, attempt, timeout, adopt=not verify)
            if start == CommitStart.UNKNOWN:  # no record: does the server have it?
                reply, _ = await ask_status(client, bid)
                if absent(reply):
                    return Forward(command.raw)  # no such batch: the server's own error, no record
                start = await self.fence.begin_commit(bid, attempt, timeout)
        except StoreError as exc:
            return self._store_down(bid, command, client, exc)
        if start == CommitStart.TIMED_OUT:
            return self._refuse(policy.refusal_fence_timeout(bid, timeout), command, client, bid)

        async def finish(ok: bool) -> None:
            try:
                await self.fence.finish_commit(bid, attempt, committed=ok)
            except StoreError as exc:  # the attempt expires; sent, it then reads as committed
                log.warning("store update failed", extra={"operation": "finish_commit", "error": str(exc)})

        def committed(reply: Reply) -> bytes | Awaitable[bytes]:
            # The ledger follows the server: +OK is committed, whatever else happened meanwhile.
            # The client need not wait for that record: until it is written the batch is
            # committing, which refuses the same commands (and a lost write reads as committed).
            if not reply.is_error:
                self._detach(finish(True))
                return reply.raw
            if start != CommitStart.GO:
                return reply.raw
            return self._after(finish(False), reply)  # reopened before the client may retry

        return Forward(command.raw, committed, linger=True)

    async def _status_seen(self, bid: str, reply: Reply) -> bytes:
        status = Status.parse(reply)
        if status is not None:
            await self._learn(bid, status)
        return reply.raw

    async def _learn(self, bid: str, status: Status) -> None:
        """What the server's own BATCH STATUS says: fired is final; otherwise a committed record
        was seen again and starts its retention anew."""
        if status.fired:
            await self._quietly("mark_fired", self.store.mark_fired(bid))
        else:
            await self._touch(bid)

    # ------------------------------------------------------------------------------------------
    # FETCH, ACK, FAIL: callbacks seen, and (member-reopen) what workers hold

    @staticmethod
    def _holder(client: Client) -> str | None:
        """Holdings belong to a worker id *and* the address it connects from: a wid is whatever a
        client says, and this stops a process elsewhere from borrowing a real worker's."""
        if not client.wid:
            return None
        return f"{client.wid}@{client.peer.rpartition(':')[0]}"

    def _fetched(self, reply: Reply, client: Client) -> bytes | Awaitable[bytes]:
        payload = reply.payload
        if not payload or reply.kind != DOLLAR:
            return reply.raw
        if b'"_bid"' in payload or (self.config.mode == MEMBER_REOPEN and b'bid"' in payload):
            return self._learn_from_job(reply, client)
        if b'"bid"' in payload:
            # A member job fetched again (a retry, say): its batch is alive, and if committed it
            # must stay sealed. Found without decoding: a wrong guess only refreshes a record.
            member = MEMBER_BID.search(payload)
            if member is not None and self._touch_due(bid := member.group(1).decode()):
                return self._refreshed(bid, reply)
        return reply.raw

    async def _refreshed(self, bid: str, reply: Reply) -> bytes:
        await self._quietly("touch", self.store.touch(bid))
        return reply.raw

    async def _learn_from_job(self, reply: Reply, client: Client) -> bytes:
        try:
            job = policy.decode(reply.payload)
            custom = job.get("custom") if isinstance(job, dict) else None
        except Malformed:
            return reply.raw
        if not isinstance(custom, dict):
            return reply.raw
        callback_of = _valid(custom.get("_bid"))
        jid = job.get("jid")
        member_of: list[str] = []
        if callback_of:
            # Anyone can push a job that looks like a callback straight to the server: only the
            # server's own BATCH STATUS says whether the callback was enqueued and who the parent
            # is, and only the jid its BATCH NEW gave the callback tells the real job from a copy.
            _, status = await ask_status(client, callback_of)
            if status is not None and status.fired:
                await self._quietly("mark_fired", self.store.mark_fired(callback_of))
                parent = _valid(custom.get("_pbid"))
                if (
                    self.config.mode == MEMBER_REOPEN
                    and parent
                    and parent == status.parent
                    and isinstance(jid, str)
                    and await self._is_callback(callback_of, jid)
                ):
                    member_of.append(parent)
        bid = _valid(custom.get("bid"))
        if bid:
            member_of.append(bid)
            await self._touch(bid)
        holder = self._holder(client)
        if self.config.mode == MEMBER_REOPEN and holder and member_of and isinstance(jid, str):
            reserve = job.get("reserve_for")
            reserve = float(reserve) if isinstance(reserve, (int, float)) and reserve > 0 else None
            await self._quietly("hold", self.holdings.fetched(holder, jid, member_of, reserve))
        return reply.raw

    async def _is_callback(self, bid: str, jid: str) -> bool:
        try:
            return await self._store("is_callback", self.store.is_callback(bid, jid))
        except StoreError as exc:  # not proven: no membership (the worker can retry its reopen later)
            log.warning("store call failed", extra={"operation": "is_callback", "error": str(exc)})
            return False

    def _finished(self, command: Command, client: Client) -> None:
        try:
            body = policy.decode(command.args)
        except Malformed:
            return  # the server answers its own error
        jid = body.get("jid") if isinstance(body, dict) else None
        holder = self._holder(client)
        if isinstance(jid, str) and holder and self.holdings.finished(holder, jid):
            self._detach(self._quietly("unhold", self.store.unhold(holder, jid)))

    @staticmethod
    async def _after(coroutine, reply: Reply) -> bytes:
        await coroutine
        return reply.raw

    def _detach(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _valid(bid: object) -> str | None:
    return bid if isinstance(bid, str) and policy.BID.fullmatch(bid) else None


def _merge_refused(reply: Reply, refused: dict) -> bytes:
    """The server's jid-to-error map for the jobs it got, with the gateway's refusals added."""
    if reply.kind != DOLLAR or reply.payload is None:
        return reply.raw
    try:
        merged = {**json.loads(reply.payload), **refused}
    except (ValueError, RecursionError):
        return reply.raw
    return bulk_reply(json.dumps(merged, separators=(",", ":")).encode())
