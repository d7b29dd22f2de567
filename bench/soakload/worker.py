"""The workers: FETCH from the callback and job queues, a few ms of "work", ACK (or now and then
FAIL: jobs carry `retry: 3`), a BEAT every 15 s; until the workers stop, after the drain."""

from __future__ import annotations

import asyncio
import time

from bench.lib.resp import ERROR, JID
from bench.soakload.client import Client
from bench.soakload.context import Context
from bench.soakload.jobs import ACKED, CB_QUEUE, FAILED_LAST, FETCHED, PLAIN_QUEUE
from bench.soakload.tally import Kind

perf_counter = time.perf_counter


class Worker:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cb_fetched = 0
        self.cb_acked = 0
        self.duplicates = 0  # jobs fetched again after their ACK
        self.foreign = 0  # fetched jobs that are neither ours nor callbacks
        self.last_job_at = perf_counter()  # the drain waits until the queues have been quiet a while

    async def run(self, conn: Client) -> None:
        ctx = self.ctx
        tally, flags, rng = ctx.tally, ctx.jobs.flags, ctx.rng
        fetch = b"FETCH %s %s\r\n" % (CB_QUEUE.encode(), PLAIN_QUEUE.encode())
        beat = b'BEAT {"wid":"%s"}\r\n' % conn.wid.encode()
        work = ctx.spec.work_ms / 1000.0
        fail_rate = ctx.spec.fail_rate
        last_beat = perf_counter()
        while not ctx.stop_workers:
            if perf_counter() - last_beat > 15:
                last_beat = perf_counter()
                reply, payload, _, dt = await conn.timed(beat)
                tally.record(Kind.BEAT, dt)
                tally.legal_reply(Kind.BEAT, reply, payload)
            reply, payload, _, dt = await conn.timed(fetch)
            if reply == ERROR:
                tally.record(Kind.FETCH, dt)
                tally.legal_reply(Kind.FETCH, reply, payload)
                await asyncio.sleep(1)
                continue
            if payload is None:
                tally.record(Kind.FETCH_EMPTY, dt)
                continue
            tally.record(Kind.FETCH, dt)
            self.last_job_at = perf_counter()
            match = JID.search(payload)
            jid = match.group(1) if match else b""
            seq = None
            if b'"_cb"' in payload:
                self.cb_fetched += 1
            elif (seq := ctx.jobs.seq_of(jid)) is not None:
                if flags[seq] & ACKED:
                    self.duplicates += 1
                flags[seq] |= FETCHED
            else:
                self.foreign += 1
            if work:
                await asyncio.sleep(rng.expovariate(1 / work))
            if seq is not None and rng.random() < fail_rate:
                line = (
                    b'FAIL {"jid":"%s","errtype":"SoakError","message":"deliberate failure","backtrace":[]}\r\n'
                    % jid
                )
                reply, payload, _, dt = await conn.timed(line)
                tally.record(Kind.FAIL, dt)
                if tally.legal_reply(Kind.FAIL, reply, payload):
                    flags[seq] |= FAILED_LAST
            else:
                reply, payload, _, dt = await conn.timed(b'ACK {"jid":"%s"}\r\n' % jid)
                tally.record(Kind.ACK, dt)
                if tally.legal_reply(Kind.ACK, reply, payload):
                    if seq is None:
                        self.cb_acked += 1
                    else:
                        flags[seq] = (flags[seq] | ACKED) & ~FAILED_LAST

    def audit(self, faktory: dict) -> dict:
        """The callbacks run and the deliveries that were not ours, for the jobs' audit."""
        return {
            "callback_queue": faktory["queues"].get(CB_QUEUE, 0),
            "callbacks_fetched": self.cb_fetched,
            "callbacks_acked": self.cb_acked,
            "duplicate_deliveries": self.duplicates,
            "foreign_jobs": self.foreign,
        }
