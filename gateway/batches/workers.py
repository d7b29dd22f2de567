"""What workers do with batch jobs: HELLO (the worker id), FETCH replies, ACK and FAIL.

- A fetched callback job (`custom._bid`) marks its batch fired, once the server's own BATCH STATUS
  confirms a callback was enqueued (anyone can push a look-alike straight to the server).
- A fetched member job (`custom.bid`) shows its batch alive: a committed one stays sealed.
- In `member-reopen` mode, which worker holds which batch job, from FETCH until ACK or FAIL
  (holdings.py), is what allows a legal reopen (I4). A child's callback grants membership of the
  parent only under the jid the child's BATCH NEW gave it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable
from dataclasses import dataclass

from ..config import Mode
from ..decisions import Client, Decision, Forward, ReplyHandler
from ..protocol import DOLLAR, Command, Reply
from ..store import BatchStore, StoreError
from . import jobs, policy
from .engine.counting import Counting
from .holdings import Holdings, holder
from .learning import Learner
from .outcomes import Outcomes
from .policy import Malformed
from .settings import RuleSettings
from .status import ask as ask_status

log = logging.getLogger("gateway.guard")

MEMBER_BID = re.compile(rb'"bid"\s*:\s*"([A-Za-z0-9_.:-]{1,128})"')


@dataclass(eq=False)
class Workers:
    store: BatchStore
    holdings: Holdings
    outcomes: Outcomes
    learner: Learner
    settings: RuleSettings
    counting: Counting | None = None  # batches: gateway, where the ledger counts what ran

    # ------------------------------------------------------------------------------------------
    # The handshake line and what each verb decides

    def hello(self, command: Command, client: Client, quiet: bool) -> Decision:
        """HELLO is relayed as it is (I7); the rules only note the worker id."""
        try:
            hello = jobs.decode(command.args)
        except Malformed:
            return None  # the server answers it; the rules only have no wid
        wid = hello.get("wid") if isinstance(hello, dict) else None
        if isinstance(wid, str) and 0 < len(wid) <= 128 and wid.isprintable():
            client.wid = wid
        return None

    def fetch(self, command: Command, client: Client, quiet: bool) -> Decision:
        return Forward(command.raw, self.reply_handler(client))

    def finishing(self, command: Command, client: Client, quiet: bool) -> Decision:
        """ACK or FAIL: a job this gateway saw a worker fetch is no longer held by it (and with
        batches: gateway, the ledger counts it once the server took the ACK or FAIL)."""
        if self.holdings.holds_any(holder(client)):
            self._finished(command, client)
        if self.counting is not None and (counted := self.counting.finishing(command.verb, command.args)):
            return Forward(command.raw, counted)
        return None

    def holds_any(self, client: Client) -> bool:
        if self.counting is not None and self.counting.holds_any():
            return True
        return self.holdings.holds_any(holder(client))

    def reply_handler(self, client: Client) -> ReplyHandler:
        """The handler of a FETCH's reply."""
        return lambda reply: self._fetched(reply, client)

    @staticmethod
    def reply_needs_rules(data: bytes) -> bool:
        """False when no FETCH reply within `data` can be seen by the handler: it reads only jobs
        whose bytes name a batch (`bid"` also finds `"_bid"`); for the rest it returns the reply."""
        return b'bid"' in data

    # ------------------------------------------------------------------------------------------
    # FETCH replies

    def _fetched(self, reply: Reply, client: Client) -> bytes | Awaitable[bytes]:
        payload = reply.payload
        if not payload or reply.kind != DOLLAR:
            return reply.raw
        if self.counting is not None:
            return self._engine_fetched(reply, payload, client) if b'bid"' in payload else reply.raw
        if b'"_bid"' in payload or (self.settings.mode == Mode.MEMBER_REOPEN and b'bid"' in payload):
            return self._learn_from_job(reply, client)
        if b'"bid"' in payload:
            # A member job fetched again (a retry, say): its batch is alive, and if committed it
            # must stay sealed. Found without decoding: a wrong guess only refreshes a record.
            member = MEMBER_BID.search(payload)
            if member is not None and self.learner.touch_due(bid := member.group(1).decode()):
                return self._refreshed(bid, reply)
        return reply.raw

    async def _refreshed(self, bid: str, reply: Reply) -> bytes:
        await self.outcomes.quietly("touch", self.store.touch(bid))
        return reply.raw

    async def _learn_from_job(self, reply: Reply, client: Client) -> bytes:
        try:
            job = jobs.decode(reply.payload or b"")
        except Malformed:
            return reply.raw
        custom = job.get("custom") if isinstance(job, dict) else None
        if not isinstance(job, dict) or not isinstance(custom, dict):
            return reply.raw
        member_mode = self.settings.mode == Mode.MEMBER_REOPEN
        callback_of = _valid(custom.get("_bid"))
        jid = job.get("jid")
        member_of: list[str] = []
        if callback_of:
            # Anyone can push a job that looks like a callback straight to the server: only the
            # server's own BATCH STATUS says whether the callback was enqueued and who the parent
            # is, and only the jid its BATCH NEW gave the callback tells the real job from a copy.
            _, status = await ask_status(client, callback_of)
            if await self.learner.fired(callback_of, status):
                parent = _valid(custom.get("_pbid"))
                if (
                    member_mode
                    and parent
                    and status is not None
                    and parent == status.parent
                    and isinstance(jid, str)
                    and await self._is_callback(callback_of, jid)
                ):
                    member_of.append(parent)
        bid = _valid(custom.get("bid"))
        if bid:
            member_of.append(bid)
            await self.learner.touch(bid)
        worker = holder(client)
        if member_mode and worker and member_of and isinstance(jid, str):
            reserve = job.get("reserve_for")
            reserve = float(reserve) if isinstance(reserve, (int, float)) and reserve > 0 else None
            await self.outcomes.quietly("hold", self.holdings.fetched(worker, jid, member_of, reserve))
        return reply.raw

    def _engine_fetched(self, reply: Reply, payload: bytes, client: Client) -> bytes | Awaitable[bytes]:
        """batches: gateway: the ledger is the authority, so nothing is asked of the server. A
        batch job is remembered until its ACK or FAIL; in member-reopen mode its worker holds
        it (a member: its batch; a child's callback: the parent, as `_pbid` says: a job carrying
        `_pbid` can only have been pushed by the engine, since the gateway refuses them from
        clients, RESERVED_KEY)."""
        assert self.counting is not None
        try:
            job = jobs.decode(payload)
        except Malformed:
            return reply.raw
        if not isinstance(job, dict):
            return reply.raw
        self.counting.fetched(job)
        custom = job.get("custom")
        jid = job.get("jid")
        worker = holder(client)
        if self.settings.mode != Mode.MEMBER_REOPEN or not worker or not isinstance(custom, dict):
            return reply.raw
        member_of = [bid for bid in (_valid(custom.get("bid")), _valid(custom.get("_pbid"))) if bid]
        if not member_of or not isinstance(jid, str):
            return reply.raw
        reserve = job.get("reserve_for")
        reserve = float(reserve) if isinstance(reserve, (int, float)) and reserve > 0 else None
        return self._held(worker, jid, member_of, reserve, reply)

    async def _held(
        self, worker: str, jid: str, bids: list[str], reserve: float | None, reply: Reply
    ) -> bytes:
        await self.outcomes.quietly("hold", self.holdings.fetched(worker, jid, bids, reserve))
        return reply.raw

    async def _is_callback(self, bid: str, jid: str) -> bool:
        try:
            return await self.outcomes.call("is_callback", self.store.is_callback(bid, jid))
        except StoreError as exc:  # not proven: no membership (the worker can retry its reopen later)
            log.warning("store call failed", extra={"operation": "is_callback", "error": str(exc)})
            return False

    # ------------------------------------------------------------------------------------------
    # ACK, FAIL

    def _finished(self, command: Command, client: Client) -> None:
        try:
            body = jobs.decode(command.args)
        except Malformed:
            return  # the server answers its own error
        jid = body.get("jid") if isinstance(body, dict) else None
        worker = holder(client)
        if isinstance(jid, str) and worker and self.holdings.finished(worker, jid):
            self.outcomes.detach(self.outcomes.quietly("unhold", self.store.unhold(worker, jid)))


def _valid(bid: object) -> str | None:
    return bid if isinstance(bid, str) and policy.BID.fullmatch(bid) else None
