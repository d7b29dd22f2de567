"""The `BATCH` verbs: `NEW`, `OPEN`, `COMMIT`, `STATUS`.

Subcommands are matched as Faktory matches `QUEUE`'s (Go's `strings.ToUpper`): were Enterprise to
do the same for `BATCH`, `BATCH commit` must not pass unjudged (fail closed). An unknown
subcommand goes to the server only if it cannot name a batch the rules would have to judge.

- `NEW` with a `parent_bid` is admitted like a job of the parent (I3, admission.py); the bid the
  server answers is recorded before the client sees it, so its first PUSH finds the record.
- `OPEN` of a committed batch is refused, or in `member-reopen` allowed to a worker holding one of
  its jobs if the server says none of its callbacks fired (I4).
- `COMMIT` goes to the server only once the fence saw nothing admitted in flight (I8); the ledger
  then follows the server's answer.
- `STATUS` replies teach the ledger (learning.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .. import gotext
from ..config import Mode, UnknownBatch
from ..decisions import Client, Decision, Forward, Later, Settled
from ..protocol import DOLLAR, Command, Reply
from ..store import COMMITTED, FIRED, OPEN, UNKNOWN, BatchStore, StoreError
from . import jobs, policy
from .admission import Admission
from .fence import CommitStart, Fence
from .holdings import Holdings, holder
from .learning import Learner
from .outcomes import Outcomes
from .policy import Malformed, Refusal
from .settings import RuleSettings
from .status import Status, absent
from .status import ask as ask_status

log = logging.getLogger("gateway.guard")

Subcommand = Callable[[str, Command, Client], Decision]


@dataclass(eq=False)
class BatchCommands:
    store: BatchStore
    fence: Fence
    admission: Admission
    holdings: Holdings
    outcomes: Outcomes
    learner: Learner
    settings: RuleSettings

    def __post_init__(self) -> None:
        self._on_bid: dict[bytes, Subcommand] = {
            b"OPEN": self._open,
            b"COMMIT": self._commit,
            b"STATUS": self._status,
        }

    def decide(self, command: Command, client: Client, quiet: bool) -> Decision:
        word, _, rest = command.args.partition(b" ")
        sub = gotext.upper(word)
        if sub == b"NEW":
            return self._new(command, rest, client, quiet)
        handler = self._on_bid.get(sub) if sub is not None else None
        if handler is None:
            if jobs.names_a_batch(rest):
                shown = word[:16].decode("ascii", "replace")
                return self.outcomes.malformed(
                    command, client, f"unknown subcommand {shown!r} with a bid-like argument"
                )
            return None
        try:
            bid = policy.valid_bid(rest.decode("utf-8", "replace").strip())
        except Malformed as exc:
            return self.outcomes.malformed(command, client, str(exc))
        return handler(bid, command, client)

    # ------------------------------------------------------------------------------------------
    # NEW

    def _new(self, command: Command, payload: bytes, client: Client, quiet: bool) -> Decision:
        try:
            spec = jobs.decode(payload)
            parent = jobs.field(spec, "parent_bid") if isinstance(spec, dict) else None
            parent = policy.valid_bid(parent) if parent else None
            callbacks = jobs.callback_jids(spec) if isinstance(spec, dict) else []
        except Malformed as exc:
            return self.outcomes.malformed(command, client, str(exc))
        record = functools.partial(self._record, callbacks=callbacks)
        if parent is None:
            return Forward(command.raw, record)
        return self.admission.forward(command, client, quiet, parent, nest=True, on_reply=record)

    async def _record(self, reply: Reply, callbacks: list[str]) -> bytes:
        if reply.kind == DOLLAR and reply.payload:
            bid = reply.payload.decode("utf-8", "replace")
            if policy.BID.fullmatch(bid):
                # Recorded before the client sees the bid, so its first PUSH finds the record.
                await self.outcomes.quietly("create", self.store.create(bid, OPEN))
                if callbacks:  # what tells a real callback from a copy pushed to the server
                    await self.outcomes.quietly("add_callbacks", self.store.add_callbacks(bid, callbacks))
        return reply.raw

    # ------------------------------------------------------------------------------------------
    # OPEN

    def _open(self, bid: str, command: Command, client: Client) -> Decision:
        return Later(functools.partial(self._judge_open, bid, command, client))

    async def _judge_open(self, bid: str, command: Command, client: Client) -> Settled:
        outcomes, mode = self.outcomes, self.settings.mode
        try:
            state = await self.fence.state(bid)
            if state == UNKNOWN:
                judged = await self.admission.judge_unknown(bid, client)
                if judged is None or judged == OPEN:
                    return Forward(command.raw)
                return outcomes.refuse(outcomes.sealed(bid, judged, nest=False), command, client, bid)
            member = False
            worker = holder(client)
            if state == COMMITTED and mode == Mode.MEMBER_REOPEN and worker:
                member = await outcomes.call("holds", self.holdings.holds(worker, bid))
            refusal = policy.refusal_to_open(bid, state, mode, member)
            if refusal is None and state == COMMITTED:
                refusal = await self._legal_reopen(bid, client)
            elif state == COMMITTED:
                await self.learner.touch(bid)
        except StoreError as exc:
            return outcomes.store_down(bid, command, client, exc)
        if refusal is not None:
            return outcomes.refuse(refusal, command, client, bid)
        return Forward(command.raw)

    async def _legal_reopen(self, bid: str, client: Client) -> Refusal | None:
        """A member may reopen a committed batch only if none of its callbacks fired: ask the server."""
        mode = self.settings.mode
        _, status = await ask_status(client, bid)
        if await self.learner.fired(bid, status):
            return policy.refusal_to_open(bid, FIRED, mode, True)
        before = await self.outcomes.call("reopen", self.store.reopen(bid))
        return None if before == COMMITTED else policy.refusal_to_open(bid, before, mode, True)

    # ------------------------------------------------------------------------------------------
    # COMMIT

    def _commit(self, bid: str, command: Command, client: Client) -> Decision:
        return Later(functools.partial(self._fence_commit, bid, command, client))

    async def _fence_commit(self, bid: str, command: Command, client: Client) -> Settled:
        attempt = self.fence.new_attempt()
        timeout = self.settings.commit_fence_timeout
        try:
            verify = self.settings.unknown_batch == UnknownBatch.VERIFY
            start = await self.fence.begin_commit(bid, attempt, timeout, adopt=not verify)
            if start == CommitStart.UNKNOWN:  # no record: does the server have it?
                reply, _ = await ask_status(client, bid)
                if absent(reply):
                    return Forward(command.raw)  # no such batch: the server's own error, no record
                start = await self.fence.begin_commit(bid, attempt, timeout)
        except StoreError as exc:
            return self.outcomes.store_down(bid, command, client, exc)
        if start == CommitStart.TIMED_OUT:
            return self.outcomes.refuse(policy.refusal_fence_timeout(bid, timeout), command, client, bid)
        return Forward(command.raw, functools.partial(self._committed, bid, attempt, start), linger=True)

    def _committed(
        self, bid: str, attempt: str, start: CommitStart, reply: Reply
    ) -> bytes | Awaitable[bytes]:
        """The ledger follows the server: +OK is committed, whatever else happened meanwhile. The
        client need not wait for that record: until it is written the batch is committing, which
        refuses the same commands (and a lost write reads as committed)."""
        if not reply.is_error:
            self.outcomes.detach(self._finish(bid, attempt, ok=True))
            return reply.raw
        if start != CommitStart.GO:
            return reply.raw
        return self._reopened(bid, attempt, reply)

    async def _reopened(self, bid: str, attempt: str, reply: Reply) -> bytes:
        await self._finish(bid, attempt, ok=False)  # reopened before the client may retry
        return reply.raw

    async def _finish(self, bid: str, attempt: str, ok: bool) -> None:
        try:
            await self.fence.finish_commit(bid, attempt, committed=ok)
        except StoreError as exc:  # the attempt is abandoned; sent, it then reads as committed
            log.warning("store update failed", extra={"operation": "finish_commit", "error": str(exc)})

    # ------------------------------------------------------------------------------------------
    # STATUS

    def _status(self, bid: str, command: Command, client: Client) -> Decision:
        return Forward(command.raw, functools.partial(self._status_seen, bid))

    async def _status_seen(self, bid: str, reply: Reply) -> bytes:
        status = Status.parse(reply)
        if status is not None:
            await self.learner.learn(bid, status)
        return reply.raw
