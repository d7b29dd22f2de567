"""The batch producers: BATCH NEW (a success callback, half of them a complete callback too), 2 to
15 member PUSHes, BATCH COMMIT; now and then a legal BATCH OPEN or STATUS of their own open batch,
or STATUS of a committed one; and after a share of commits a deliberate violation of a batch
committed earlier, through whichever gateway the connection uses. Then the audits of what they
did: the stand-in's report of every batch, and every violation refused for the right reason."""

from __future__ import annotations

import json
import random
import time
from collections import Counter, deque

from bench.lib.resp import BULK, ERROR
from bench.soakload.client import Client
from bench.soakload.context import Context
from bench.soakload.jobs import CB_QUEUE, OK, REFUSED, SENT, VIOLATION
from bench.soakload.producer import Producer
from bench.soakload.tally import Kind

perf_counter = time.perf_counter

# What a deliberate violation may legitimately be refused with.
LEGIT = {
    Kind.PUSH_VIOLATION: {"BATCH_COMMITTED", "BATCH_CALLBACK_FIRED"},
    Kind.OPEN_VIOLATION: {"BATCH_COMMITTED", "BATCH_CALLBACK_FIRED"},
    Kind.CHILD_VIOLATION: {"PARENT_SEALED"},
}
# The stand-in's counts of what joined a batch it should not have.
JOINED = (
    "joined_while_committed",
    "joined_after_callback",
    "children_while_committed",
    "children_after_callback",
)


class BatchRec:
    __slots__ = ("committed_at", "gw", "members_ok", "members_sent")

    def __init__(self, gw: int):
        self.gw = gw  # the gateway it was created through
        self.committed_at: float | None = None  # when its BATCH COMMIT +OK arrived
        self.members_ok = 0
        self.members_sent = 0


class BatchProducer(Producer):
    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.batches: dict[str, BatchRec] = {}
        self.committed: deque[str] = deque(maxlen=400)  # recently committed bids, for violations
        self.uncommitted = 0
        self.violations = Counter()  # kind -> sent
        self.violations_refused = Counter()  # kind -> refused legitimately
        self.violations_cross = 0  # violations sent through the gateway that did not commit the batch
        self.legit_refusals = 0

    async def run(self, conn: Client) -> None:
        ctx = self.ctx
        while not ctx.stop_producers:
            await ctx.sleep_unless_stopping(ctx.interval(ctx.spec.batch_interval))
            if ctx.stop_producers:
                return
            if ctx.jobs.seq + 40 >= ctx.jobs.max_jobs:
                return
            await self.one_batch(conn, ctx.rng)

    async def command(self, conn: Client, kind: Kind, line: bytes) -> tuple[int, bytes | None]:
        """A legal batch command, timed under `kind`; an -ERR reply is a problem."""
        reply, payload, _, dt = await conn.timed(line)
        self.ctx.tally.record(kind, dt)
        self.ctx.tally.legal_reply(kind, reply, payload)
        return reply, payload

    async def one_batch(self, conn: Client, rng: random.Random) -> None:
        new = {"description": "soak", "success": {"jobtype": "SoakCallback", "queue": CB_QUEUE, "args": []}}
        if rng.random() < 0.5:
            new["complete"] = {"jobtype": "SoakCallback", "queue": CB_QUEUE, "args": ["complete"]}
        reply, payload = await self.command(
            conn, Kind.BATCH_NEW, b"BATCH NEW " + json.dumps(new).encode() + b"\r\n"
        )
        if reply == ERROR:
            return
        if reply != BULK or not payload:
            self.ctx.tally.problem("bad BATCH NEW reply", repr(payload))
            return
        bid = payload.decode()
        rec = self.batches[bid] = BatchRec(conn.gw)
        self.uncommitted += 1
        members = rng.randint(2, 15)
        for i in range(members):
            rec.members_sent += 1
            if await self.push(conn, self.ctx.jobs.next_seq(), Kind.PUSH_MEMBER, bid):
                rec.members_ok += 1
            if i == 0 and rng.random() < 0.1:
                # Legal: reopening one's own open batch, and asking its status.
                line, kind = rng.choice(
                    ((b"BATCH OPEN %s\r\n", Kind.BATCH_OPEN), (b"BATCH STATUS %s\r\n", Kind.BATCH_STATUS))
                )
                await self.command(conn, kind, line % bid.encode())
        reply, _ = await self.command(conn, Kind.BATCH_COMMIT, b"BATCH COMMIT %s\r\n" % bid.encode())
        if reply == ERROR:
            return
        rec.committed_at = perf_counter()
        self.uncommitted -= 1
        self.committed.append(bid)
        if rng.random() < 0.1:
            # Legal: the status of some committed batch (a cheap way for the gateway to learn "fired").
            target = rng.choice(self.committed)
            await self.command(conn, Kind.BATCH_STATUS, b"BATCH STATUS %s\r\n" % target.encode())
        if rng.random() < self.ctx.spec.violation_rate:
            await self.violate(conn, rng)

    async def violate(self, conn: Client, rng: random.Random) -> None:
        """A deliberate violation against a batch committed earlier, through whichever gateway this is."""
        ctx = self.ctx
        target = rng.choice(self.committed)
        rec = self.batches[target]
        kind = rng.choice(
            (Kind.PUSH_VIOLATION, Kind.PUSH_VIOLATION, Kind.OPEN_VIOLATION, Kind.CHILD_VIOLATION)
        )
        self.violations[kind] += 1
        self.violations_cross += rec.gw != conn.gw
        seq = None
        if kind == Kind.PUSH_VIOLATION:
            seq = ctx.jobs.next_seq()
            if seq is None:
                return
            ctx.jobs.flags[seq] |= SENT | VIOLATION
            conn.inflight_seq = seq
            line = ctx.jobs.push_line(seq, target)
        elif kind == Kind.OPEN_VIOLATION:
            line = b"BATCH OPEN %s\r\n" % target.encode()
        else:
            child = {
                "parent_bid": target,
                "success": {"jobtype": "SoakCallback", "queue": CB_QUEUE, "args": []},
            }
            line = b"BATCH NEW " + json.dumps(child).encode() + b"\r\n"
        reply, payload, sent_at, dt = await conn.timed(line)
        conn.inflight_seq = 0
        ctx.tally.record(kind, dt)
        if reply == ERROR:
            code = ctx.tally.error_code(kind, payload)
            if seq is not None:
                ctx.jobs.flags[seq] |= REFUSED
            # Legitimate: the right code, for a batch this generator committed before sending.
            committed_before = rec.committed_at is not None and rec.committed_at < sent_at
            if code in LEGIT[kind] and committed_before:
                self.violations_refused[kind] += 1
                self.legit_refusals += 1
            elif code:
                ctx.tally.problem(
                    "refusal not legitimate", f"{kind} {target}: {payload.decode('utf-8', 'replace')}"
                )
            else:
                ctx.tally.problem("violation answered by a server error", f"{kind}: {payload!r}")
        else:
            if seq is not None:
                ctx.jobs.flags[seq] |= OK
            ctx.tally.problem("violation admitted", f"{kind} {target}: reply {chr(reply)}{payload!r}")

    def audit_standin(self, report: dict) -> dict:
        """The stand-in's `STANDIN REPORT` against what the generator did: nothing joined a committed
        or fired batch, each batch's members are the +OK ones, every committed batch still is."""
        joined = Counter()
        states = Counter()
        mismatched, not_committed, missing = [], [], []
        for b in report.values():
            for key in JOINED:
                joined[key] += b.get(key, 0)
            states[
                "success done"
                if b["success_st"] == "2"
                else "success enqueued"
                if b["success_st"]
                else "no callback yet"
            ] += 1
        for bid, rec in self.batches.items():
            b = report.get(bid)
            if b is None:
                missing.append(bid)
                continue
            if b["total"] != rec.members_ok:
                mismatched.append(f"{bid}: stand-in has {b['total']} members, +OK for {rec.members_ok}")
            if rec.committed_at is not None and not b["committed"]:
                not_committed.append(bid)  # a BATCH OPEN got through
        unknown = [bid for bid in report if bid not in self.batches]
        return {
            "batches_reported": len(report),
            "batches_created": len(self.batches),
            "batches_committed": sum(1 for r in self.batches.values() if r.committed_at is not None),
            "joined": dict(joined),
            "callback_states": dict(states),
            "member_count_mismatches": len(mismatched),
            "mismatch_examples": mismatched[:5],
            "committed_but_reopened": len(not_committed),
            "missing": len(missing),
            "unknown_to_loadgen": len(unknown),
            "unknown_examples": unknown[:5],
            "passed": not any(joined.values())
            and not mismatched
            and not not_committed
            and not missing
            and not unknown,
        }

    def audit_violations(self) -> dict:
        return {
            "sent": dict(self.violations),
            "refused_legitimately": dict(self.violations_refused),
            "cross_gateway": self.violations_cross,
            "legit_refusals": self.legit_refusals,
            "total_refusals": sum(self.ctx.tally.refusals.values()),
        }
