"""`BATCH NEW/OPEN/COMMIT/STATUS` with `batches: gateway`: answered from the ledger, never
forwarded (Faktory OSS has no batches). Replies have Enterprise's shapes, which the clients parse:
`NEW` and `OPEN` answer the bid as a bulk string, `COMMIT` `+OK`, `STATUS` Enterprise's JSON, and
a bid the ledger does not have gets `-ERR No such batch <bid>`: Enterprise up to 1.9.1 wrote
"No", 1.9.2 and later "no"; faktory-rs 0.13 (the release on crates.io) matches "No such batch"
exactly and later versions match either case, so "No" is the text every client that looks
understands.

The #465 rules are the same as in front of Enterprise, with the same code: a child batch is
admitted like a job of its parent, under the parent's fence lease (I3); `OPEN` of a committed
batch is refused, or in `member-reopen` allowed to a worker holding one of its jobs (I4); a fired
batch takes nothing (I2). What differs is what a legal reopen does: the batch stays committed
(the reopening worker's own job keeps it from completing until that job is done, and that
worker may add to it meanwhile), because a worker that reopens from inside a job (Go's
`help.Batch`) never commits again.
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from ... import gotext
from ...config import Mode
from ...decisions import Client, Decision, Later, Respond, Settled
from ...protocol import Command, bulk_reply, error_reply
from ...store import COMMITTED, OPEN, UNKNOWN, BatchStore, StoreError
from ...store.engine import BatchSpec, Kind, new_bid
from .. import jobs, policy
from ..admission import Admission
from ..fence import CommitStart, Fence
from ..holdings import Holdings, holder
from ..outcomes import Outcomes
from ..policy import Malformed
from ..settings import RuleSettings
from .callbacks import Callbacks

OK = b"+OK\r\n"


def no_such_batch(bid: str) -> Respond:
    return Respond(error_reply("", f"No such batch {bid}"))


def created_at() -> str:
    """Now, as Faktory writes times (Go's RFC3339Nano: UTC, the fraction without trailing zeros)."""
    now = datetime.now(UTC)
    fraction = f"{now.microsecond:06d}".rstrip("0")
    return now.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


@dataclass(eq=False)
class EngineCommands:
    store: BatchStore
    fence: Fence
    admission: Admission
    holdings: Holdings
    outcomes: Outcomes
    callbacks: Callbacks
    settings: RuleSettings

    def decide(self, command: Command, client: Client, quiet: bool) -> Decision:
        word, _, rest = command.args.partition(b" ")
        sub = gotext.upper(word)
        if sub == b"NEW":
            return self._new(command, rest, client, quiet)
        if sub not in (b"OPEN", b"COMMIT", b"STATUS"):
            shown = word[:16].decode("ascii", "replace")
            return Respond(error_reply("", f"unknown BATCH subcommand {shown!r}"))
        try:
            bid = policy.valid_bid(rest.decode("utf-8", "replace").strip())
        except Malformed as exc:
            return self.outcomes.malformed(command, client, str(exc))
        if sub == b"OPEN":
            return Later(functools.partial(self._open, bid, command, client))
        if sub == b"COMMIT":
            return Later(functools.partial(self._commit, bid, command, client))
        return Later(functools.partial(self._status, bid, command, client))

    # ------------------------------------------------------------------------------------------
    # NEW

    def _new(self, command: Command, payload: bytes, client: Client, quiet: bool) -> Decision:
        try:
            spec = jobs.decode(payload)
            if not isinstance(spec, dict):
                raise Malformed("BATCH NEW needs a JSON object")
            parent = jobs.field(spec, "parent_bid")
            parent = policy.valid_bid(parent) if parent else None
            description = jobs.field(spec, "description")
            callbacks = {kind: jobs.field(spec, kind.value) for kind in Kind}
        except Malformed as exc:
            return self.outcomes.malformed(command, client, str(exc))
        given = {kind: job for kind, job in callbacks.items() if job}
        if not given:
            return Respond(error_reply("", "batch must have a success or complete callback"))
        jobs_given = {kind: job for kind, job in given.items() if isinstance(job, dict) and _jobtype(job)}
        if len(jobs_given) != len(given):
            return Respond(error_reply("", "batch callbacks must be job objects with a jobtype"))
        description = description if isinstance(description, str) else ""
        create = functools.partial(self._create, parent, description, jobs_given, command, client)
        if parent is None:
            return Later(create)
        return Later(functools.partial(self._new_child, parent, create, command, client), barrier=True)

    async def _new_child(
        self, parent: str, create: Callable[[], Awaitable[Settled]], command: Command, client: Client
    ) -> Settled:
        """Admitted like a job of the parent (I3): under the parent's lease, so a commit of the
        parent waits until the child is recorded."""
        try:
            state, ticket = await self.admission.admit(parent, client)
        except StoreError as exc:
            return self.outcomes.store_down(parent, command, client, exc)
        if state == UNKNOWN or state is None:
            return no_such_batch(parent)
        if state != OPEN:
            return self.outcomes.refuse(
                self.outcomes.sealed(parent, state, nest=True), command, client, parent
            )
        try:
            return await create()
        finally:
            if ticket is not None:
                ticket.answered()

    async def _create(
        self,
        parent: str | None,
        description: str,
        callbacks: dict[Kind, dict],
        command: Command,
        client: Client,
    ) -> Settled:
        bid = new_bid(parent)
        jobs_json = {kind: _callback_job(job, kind, bid, parent) for kind, job in callbacks.items()}
        spec = BatchSpec(parent, description, created_at(), jobs_json)
        try:
            state = await self.outcomes.call("new_batch", self.store.new_batch(bid, spec))
        except StoreError as exc:
            return self.outcomes.store_down(parent or bid, command, client, exc)
        if state != OPEN:  # the parent was sealed between the admission and the record
            assert parent is not None
            return Respond(self.outcomes.sealed(parent, state, nest=True).reply())
        return Respond(bulk_reply(bid.encode()))

    # ------------------------------------------------------------------------------------------
    # OPEN

    async def _open(self, bid: str, command: Command, client: Client) -> Settled:
        outcomes, mode = self.outcomes, self.settings.mode
        try:
            state = await self.fence.state(bid)
            if state == UNKNOWN:
                return no_such_batch(bid)
            member = False
            worker = holder(client)
            if state == COMMITTED and mode == Mode.MEMBER_REOPEN and worker:
                member = await outcomes.call("holds", self.holdings.holds(worker, bid))
        except StoreError as exc:
            return outcomes.store_down(bid, command, client, exc)
        refusal = policy.refusal_to_open(bid, state, mode, member)
        if refusal is not None:
            return outcomes.refuse(refusal, command, client, bid)
        return Respond(bulk_reply(bid.encode()))  # a committed batch stays committed (see above)

    # ------------------------------------------------------------------------------------------
    # COMMIT

    async def _commit(self, bid: str, command: Command, client: Client) -> Settled:
        attempt = self.fence.new_attempt()
        timeout = self.settings.commit_fence_timeout
        try:
            if await self.fence.state(bid) == UNKNOWN:
                return no_such_batch(bid)
            # Watched before anything can fire, so that a claim left by a crash is found.
            await self.outcomes.call("watch", self.store.watch(bid))
            start = await self.fence.begin_commit(bid, attempt, timeout, adopt=False)
            if start == CommitStart.UNKNOWN:  # expired meanwhile
                return no_such_batch(bid)
            if start == CommitStart.TIMED_OUT:
                return self.outcomes.refuse(policy.refusal_fence_timeout(bid, timeout), command, client, bid)
            if start == CommitStart.GO:
                await self.fence.finish_commit(bid, attempt, committed=True)
            # Due callbacks are claimed before the client hears +OK: a BATCH STATUS right after
            # the commit already shows an empty batch's callbacks enqueued, as Enterprise does.
            claimed_at = self.fence.clock()
            claims = await self.outcomes.call("settle", self.store.settle(bid, self.callbacks.new_token()))
        except StoreError as exc:
            return self.outcomes.store_down(bid, command, client, exc)
        if claims:
            self.callbacks.fire(claims, claimed_at)
        return Respond(OK)

    # ------------------------------------------------------------------------------------------
    # STATUS

    async def _status(self, bid: str, command: Command, client: Client) -> Settled:
        try:
            status = await self.outcomes.call("batch_status", self.store.batch_status(bid))
        except StoreError as exc:
            return self.outcomes.store_down(bid, command, client, exc)
        if status is None:
            return no_such_batch(bid)
        return Respond(bulk_reply(status.to_json()))


def _jobtype(job: dict) -> bool:
    jobtype = job.get("jobtype")
    return isinstance(jobtype, str) and bool(jobtype)


def _callback_job(job: dict, kind: Kind, bid: str, parent: str | None) -> str:
    """The callback job as it will be pushed: the client's job, with a jid (the one it gave, so
    the client can recognise it, else a new one), Faktory's defaults, and `_bid`, `_cb` and (for a
    child's callbacks) `_pbid` in its custom, where Enterprise puts them. No `bid`: a callback is
    not a member of any batch."""
    given = job.get("custom")
    custom = {key: value for key, value in (given if isinstance(given, dict) else {}).items()
              if key not in ("bid", "_bid", "_pbid", "_cb")}  # fmt: skip
    custom |= {"_bid": bid, "_cb": kind.value} | ({"_pbid": parent} if parent else {})
    jid = job.get("jid")
    full = job | {
        "jid": jid if isinstance(jid, str) and jid else secrets.token_hex(12),
        "args": job.get("args") if isinstance(job.get("args"), list) else [],
        "queue": job.get("queue") or "default",
        "custom": custom,
    }
    return json.dumps(full, separators=(",", ":"))
