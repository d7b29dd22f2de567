"""The producers (most connections): a PUSH now and then, until the producers stop."""

from __future__ import annotations

from bench.lib.resp import SIMPLE
from bench.soakload.client import Client
from bench.soakload.context import Context
from bench.soakload.jobs import OK, REFUSED, SENT
from bench.soakload.tally import Kind


class Producer:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    async def run(self, conn: Client) -> None:
        ctx = self.ctx
        mean = ctx.spec.push_interval
        while not ctx.stop_producers:
            await ctx.sleep_unless_stopping(ctx.interval(mean))
            if ctx.stop_producers:
                return
            seq = ctx.jobs.next_seq()
            if seq is None:
                return
            await self.push(conn, seq, Kind.PUSH)

    async def push(self, conn: Client, seq: int, kind: Kind, bid: str | None = None) -> bool:
        """PUSH job `seq` (into batch `bid`), flagged as it goes; True when it got +OK."""
        flags = self.ctx.jobs.flags
        flags[seq] |= SENT
        conn.inflight_seq = seq
        reply, payload, _, dt = await conn.timed(self.ctx.jobs.push_line(seq, bid))
        conn.inflight_seq = 0
        self.ctx.tally.record(kind, dt)
        if reply == SIMPLE:
            flags[seq] |= OK
            return True
        flags[seq] |= REFUSED
        self.ctx.tally.legal_reply(kind, reply, payload)
        return False
