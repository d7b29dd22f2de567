"""Admission into batches: PUSH and PUSHB jobs with `custom.bid`, and child batches (`BATCH NEW`
with `parent_bid`, admitted like a job of the parent: I3). The commit fence's entry half.

A command is admitted only into an open batch (I1, I2), under a lease of the fence, and only when
nothing is unanswered ahead of it on its connection (the barrier: `Later(..., barrier=True)`,
carried out by the pipeline): then it is at the head of the server's queue when written, and the
lease covers the server's handling of that one command (docs/fence.md). In the common case (the
connection is quiet and this gateway's lease admits locally) the decision is synchronous and
costs no store call.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from ..config import Mode, UnknownBatch
from ..decisions import Client, Decision, Forward, Later, ReplyHandler, Respond, Settled
from ..protocol import DOLLAR, Command, Reply, bulk_reply
from ..store import COMMITTED, FIRED, OPEN, UNKNOWN, BatchState, BatchStore, StoreError
from . import jobs, policy
from .engine.counting import Counting
from .fence import ADMIT_MAX_BYTES, Fence, Ticket, TicketGroup
from .holdings import Holdings, holder
from .learning import Learner
from .outcomes import Outcomes
from .policy import Malformed, Refusal
from .settings import RuleSettings
from .status import absent
from .status import ask as ask_status


@dataclass(eq=False)
class Admission:
    store: BatchStore
    fence: Fence
    outcomes: Outcomes
    learner: Learner
    settings: RuleSettings
    holdings: Holdings
    counting: Counting | None = None  # batches: gateway, where the ledger counts what joined

    # ------------------------------------------------------------------------------------------
    # PUSH and PUSHB

    def push(self, command: Command, client: Client, quiet: bool) -> Decision:
        if not jobs.may_name_a_batch(command.args):
            return None
        return self.push_naming(command, client, quiet)

    def push_naming(self, command: Command, client: Client, quiet: bool) -> Decision:
        """push() of a command whose bytes may name a batch: the fast lane (guard.route) scanned
        them already, and a second scan would be paid on every batch PUSH."""
        try:
            bid, reserved, jid = jobs.read_job(command.args)
        except Malformed as exc:
            return self.outcomes.malformed(command, client, str(exc))
        if reserved:
            return self.outcomes.refuse(policy.refusal_reserved(reserved), command, client, None)
        if bid is None:
            return None
        counted = None if self.counting is None else self.counting.pushed(bid, jid)
        return self.forward(command, client, quiet, bid, nest=False, on_reply=counted)

    def push_bulk(self, command: Command, client: Client, quiet: bool) -> Decision:
        if not jobs.may_name_a_batch(command.args):
            return None
        try:
            read = jobs.read_bulk(command.args)
        except Malformed as exc:
            return self.outcomes.malformed(command, client, str(exc))
        if read is None:
            return None  # the server's own error for a PUSHB that is not a list
        if not any(job.bid or job.reserved for job in read):
            return None
        if any(job.bid for job in read) and len(command.raw) > ADMIT_MAX_BYTES:
            return self._too_large(command, client, None)
        return Later(functools.partial(self._push_bulk_into, read, command, client), barrier=True)

    async def _push_bulk_into(self, read: list[jobs.BulkJob], command: Command, client: Client) -> Settled:
        """Admit each batch once; refuse only the jobs whose batch refuses (or that carry a
        reserved key); forward the rest as one PUSHB, and merge the refusals into its reply."""
        outcomes = self.outcomes
        for job in read:
            if job.reserved:
                outcomes.refuse(policy.refusal_reserved(job.reserved), command, client, None)
        bids = [None if job.reserved else job.bid for job in read]
        tickets: list[Ticket] = []
        refusals: dict[str, Refusal] = {}
        try:
            for bid in dict.fromkeys(b for b in bids if b):
                try:
                    state, ticket = await self.admit(bid, client)
                except StoreError as exc:
                    if (refusal := outcomes.store_failed(bid, client, exc)) is not None:
                        refusals[bid] = refusal
                    continue
                if ticket is not None:
                    tickets.append(ticket)
                if state is not None and state != OPEN:
                    refusals[bid] = outcomes.sealed(bid, state, nest=False)
        except BaseException:  # the connection went away meanwhile: end the admissions taken
            for ticket in tickets:
                ticket.answered()
            raise
        for bid, refusal in refusals.items():
            outcomes.refuse(refusal, command, client, bid)  # logs and counts once per batch
        group = TicketGroup.of(tickets)
        verdicts = [
            policy.refusal_reserved(job.reserved) if job.reserved else refusals.get(bid) if bid else None
            for job, bid in zip(read, bids, strict=True)
        ]
        members = self._members(read, bids, verdicts)
        if not any(verdicts) or self.settings.mode == Mode.SHADOW:
            return Forward(command.raw, self._counted(members, {}), group)
        refused = {
            job.jid: f"{verdict.code} {verdict.message}"
            for job, verdict in zip(read, verdicts, strict=True)
            if verdict is not None
        }
        kept = [verdict is None for verdict in verdicts]
        if not any(kept):
            if group is not None:
                group.answered()  # nothing goes to the server: the admissions end here
            return Respond(bulk_reply(json.dumps(refused, separators=(",", ":")).encode()))
        data = jobs.bulk_line(command.args, kept)  # the kept jobs, each as the client sent it
        if members:
            return Forward(data, self._counted(members, refused), group)
        return Forward(data, functools.partial(_merge_refused, refused=refused), group)

    def _members(
        self, read: list[jobs.BulkJob], bids: list[str | None], verdicts: list[Refusal | None]
    ) -> dict[str, list[str]]:
        """batches: gateway: the jobs that go to the server into each batch (bid -> jids)."""
        members: dict[str, list[str]] = {}
        if self.counting is not None:
            for job, bid, verdict in zip(read, bids, verdicts, strict=True):
                if bid and verdict is None and job.jid:
                    members.setdefault(bid, []).append(job.jid)
        return members

    def _counted(self, members: dict[str, list[str]], refused: dict[str, str]) -> ReplyHandler | None:
        """The reply handler of a PUSHB: the engine counts what joined, then the gateway's
        refusals are merged into the reply."""
        counting = self.counting
        if counting is None or not members:
            return functools.partial(_merge_refused, refused=refused) if refused else None

        async def count(reply: Reply) -> bytes:
            await counting.pushed_bulk(reply, members)
            return _merge_refused(reply, refused) if refused else reply.raw

        return count

    # ------------------------------------------------------------------------------------------
    # One command into one batch

    def forward(
        self,
        command: Command,
        client: Client,
        quiet: bool,
        bid: str,
        nest: bool,
        on_reply: ReplyHandler | None = None,
    ) -> Decision:
        """Admit `command` into bid and forward it. When the connection is quiet and this
        gateway's lease on bid admits locally: at once, no store call, no task. Otherwise after
        the barrier, through the full admission (which tries the local lease again: one may have
        been taken meanwhile, by another command, and a second lease would not be sealed)."""
        if len(command.raw) > ADMIT_MAX_BYTES:
            return self._too_large(command, client, bid)
        if quiet and (ticket := self.fence.admit_locally(bid)) is not None:
            return Forward(command.raw, on_reply, ticket)
        work = functools.partial(self._admit_and_forward, command, client, bid, nest, on_reply)
        return Later(work, barrier=True)

    async def _admit_and_forward(
        self,
        command: Command,
        client: Client,
        bid: str,
        nest: bool,
        on_reply: ReplyHandler | None,
    ) -> Settled:
        try:
            state, ticket = await self.admit(bid, client)
        except StoreError as exc:
            return self.outcomes.store_down(bid, command, client, exc)
        if state is None:  # no such batch: the server's own answer
            return Forward(command.raw, on_reply)
        if state != OPEN:
            return self.outcomes.refuse(self.outcomes.sealed(bid, state, nest), command, client, bid)
        return Forward(command.raw, on_reply, ticket)

    async def admit(self, bid: str, client: Client) -> tuple[BatchState | None, Ticket | None]:
        """Admit one command into bid. (OPEN, ticket); (OPEN, None) when `unknown_batch: allow`
        let an unknown batch through; (None, None) when the server has no such batch (its own
        answer goes to the client); else (the state that refuses, None). Raises StoreError."""
        state, ticket = await self.fence.admit(bid)
        if state == COMMITTED and await self._reopened_by(bid, client):
            return OPEN, None  # no lease: the worker's own job keeps the batch from completing
        if state == UNKNOWN:
            judged = await self.judge_unknown(bid, client)
            if judged == OPEN and self.settings.unknown_batch != UnknownBatch.ALLOW:
                return await self.fence.admit(bid)
            return judged, None
        if state == COMMITTED:
            await self.learner.touch(bid)  # seen again: it must stay sealed for as long as it can fire
        return state, ticket

    async def judge_unknown(self, bid: str, client: Client) -> BatchState | None:
        """A batch with no record (created before the gateway, or expired): `unknown_batch`
        decides. None: the server says it has no such batch, so nothing can join it and the
        command goes to the server, whose own error the client gets (clients match on its text)."""
        unknown = self.settings.unknown_batch
        if self.settings.engine:
            return UNKNOWN  # the ledger is the only authority: a batch it has no record of does not exist
        if unknown == UnknownBatch.ALLOW:
            return OPEN
        if unknown == UnknownBatch.REJECT:
            return UNKNOWN
        reply, status = await ask_status(client, bid)
        if status is None:
            return None if absent(reply) else UNKNOWN
        if await self.learner.fired(bid, status):
            return FIRED
        await self.outcomes.call("create", self.store.create(bid, OPEN))
        return OPEN

    async def _reopened_by(self, bid: str, client: Client) -> bool:
        """batches: gateway, member-reopen: a worker holding a job of a committed batch (or a
        callback of one of its children) may add to it without reopening it: the batch cannot
        complete while that job is not done (engine/commands.py), and it stays committed."""
        if not self.settings.engine or self.settings.mode != Mode.MEMBER_REOPEN:
            return False
        worker = holder(client)
        return worker is not None and await self.outcomes.call("holds", self.holdings.holds(worker, bid))

    def _too_large(self, command: Command, client: Client, bid: str | None) -> Decision:
        refusal = policy.refusal_too_large(len(command.raw), ADMIT_MAX_BYTES)
        return self.outcomes.refuse(refusal, command, client, bid)


def _merge_refused(reply: Reply, refused: dict[str, str]) -> bytes:
    """The server's jid-to-error map for the jobs it got, with the gateway's refusals added."""
    if reply.kind != DOLLAR or reply.payload is None:
        return reply.raw
    try:
        merged = {**json.loads(reply.payload), **refused}
    except (ValueError, RecursionError):
        return reply.raw
    return bulk_reply(json.dumps(merged, separators=(",", ":")).encode())
