"""The soak's load process: opens the connections (each to gateway i mod 2, in a shuffled order so
the roles ramp up together), runs each one's role, watches for stalls, paces, reports every
period (a `TICK` line), and at the end stops the producers, lets the workers drain the queues,
stops them, and audits (the `RESULT` line)."""

from __future__ import annotations

import asyncio
import json
import os
import time

from bench.lib.process import CpuSnapshot, Tag, emit, memory_and_fds, raise_nofile, rss_kib
from bench.lib.report import log
from bench.lib.resp import ERROR, Connection
from bench.soakload.batches import BatchProducer
from bench.soakload.client import Client, Role
from bench.soakload.context import Context
from bench.soakload.jobs import CB_QUEUE, PLAIN_QUEUE, UNANSWERED
from bench.soakload.producer import Producer
from bench.soakload.spec import SoakSpec
from bench.soakload.worker import Worker

perf_counter = time.perf_counter
STALL_S = 30.0  # a command with no reply for this long is a stall: the connection is aborted
# What a broken connection raises: the role ends, the connection is counted lost and reopened.
BROKEN = (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


class Load:
    def __init__(self, spec: SoakSpec):
        self.spec = spec
        self.ctx = Context(spec)
        self.producer = Producer(self.ctx)
        self.batcher = BatchProducer(self.ctx)
        self.worker = Worker(self.ctx)
        self.conns: list[Client] = []
        self.open_conns = 0
        self.ticks: list[dict] = []
        self.tick_start: CpuSnapshot | None = None  # the current period's start

    # ------------------------------------------------------------------ connections
    async def run_role(self, conn: Client, opener: asyncio.Semaphore) -> None:
        """Open the connection and run its role; reopen it (after a second) if it breaks, until its
        role is told to stop."""
        ctx = self.ctx
        role = {Role.PRODUCER: self.producer.run, Role.BATCH: self.batcher.run, Role.WORKER: self.worker.run}
        while True:
            try:
                if conn.reader is None:
                    async with opener:
                        await conn.open()
                    self.open_conns += 1
                await role[conn.role](conn)
                return
            except BROKEN as exc:
                if conn.reader is not None:
                    self.open_conns -= 1
                ctx.tally.lost_connection(conn.role, conn.index, exc)
                if conn.inflight_seq:
                    ctx.jobs.flags[conn.inflight_seq] |= UNANSWERED
                    conn.inflight_seq = 0
                conn.close()
                done = ctx.stop_workers if conn.role == Role.WORKER else ctx.stop_producers
                if done:
                    return
                await asyncio.sleep(1.0)

    async def watchdog(self) -> None:
        while True:
            await asyncio.sleep(5)
            now = perf_counter()
            for conn in self.conns:
                if conn.sent_at and now - conn.sent_at > STALL_S and conn.writer is not None:
                    self.ctx.tally.stalls += 1
                    self.ctx.tally.problem(
                        "stall", f"{conn.role} #{conn.index}: no reply for {now - conn.sent_at:.0f} s"
                    )
                    conn.writer.transport.abort()

    # ------------------------------------------------------------------ reports
    def gateway_state(self) -> dict:
        return {name: memory_and_fds(pid) for name, pid in self.spec.gateway_pids.items()}

    def tick(self, start: CpuSnapshot, started_at: float, final: bool = False) -> tuple[dict, CpuSnapshot]:
        """The report of the period since `start`, and the snapshot that starts the next one."""
        now = CpuSnapshot.take(self.spec.watch)
        cpu = now.since(start)
        wall = cpu.wall_s
        tally = self.ctx.tally
        kinds, refusals = tally.period(wall)
        cores = {name: s / wall for name, s in cpu.procs_s.items()}
        cores["loadgen"] = cpu.own_s / wall
        if cpu.busy_fraction is not None:
            # Busy time no watched process accounts for: kernel work charged to no one, and whatever
            # else runs on the machine (other jobs would show here).
            cores["other"] = max(0.0, cpu.busy_fraction * os.cpu_count() - sum(cores.values()))
        tick = {
            "t_s": round(now.t - started_at, 1),
            "wall_s": wall,
            "final": final,
            "scale": self.ctx.scale,
            "machine_busy_pct": None if cpu.busy_fraction is None else 100 * cpu.busy_fraction,
            "cores": cores,
            "kinds": kinds,
            "commands_per_s": sum(k["n"] for k in kinds.values()) / wall,
            "refusals": refusals,
            "refusals_total": sum(tally.refusals.values()),
            "server_errors_total": sum(tally.server_errors.values()),
            "problems_total": sum(tally.problems.values()),
            "lost_total": sum(tally.lost.values()),
            "open_conns": self.open_conns,
            "jobs_pushed": self.ctx.jobs.seq,
            "gateways": self.gateway_state(),
            "loadgen_rss_kib": rss_kib(os.getpid()),
        }
        return tick, now

    async def ticker(self, started_at: float) -> None:
        while True:
            await asyncio.sleep(self.spec.report_every)
            tick, self.tick_start = self.tick(self.tick_start, started_at)
            self.ticks.append(tick)
            emit(Tag.TICK, tick)

    # ------------------------------------------------------------------ control connections
    async def control(self, url: str, line: bytes) -> bytes | None:
        """One command on a connection of its own (INFO, STANDIN REPORT): not a role's, not timed."""
        conn = Connection(url)
        await conn.open()
        try:
            kind, payload = await conn.call(line)
        finally:
            conn.close(polite=True)
        if kind == ERROR:
            raise RuntimeError(f"{line!r}: {payload!r}")
        return payload

    async def faktory_info(self) -> dict:
        return json.loads(await self.control(self.spec.faktory_url, b"INFO\r\n"))

    # ------------------------------------------------------------------ main
    async def run(self) -> dict:
        spec, ctx = self.spec, self.ctx
        loop = asyncio.get_running_loop()
        counts = spec.roles
        roles = (
            [Role.WORKER] * counts[Role.WORKER]
            + [Role.BATCH] * counts[Role.BATCH]
            + [Role.PRODUCER] * counts[Role.PRODUCER]
        )
        # Consecutive connections go to alternate gateways, so each role is split evenly between them.
        self.conns = [Client(i, role, i % 2, spec.gateways[i % 2]) for i, role in enumerate(roles)]
        opener = asyncio.Semaphore(32)
        order = list(self.conns)
        ctx.rng.shuffle(order)  # roles ramp up together
        t0 = perf_counter()
        log(f"load: opening {len(order)} connections ({counts}) over {len(spec.gateways)} gateways")
        baseline = self.gateway_state()
        tasks = {conn: loop.create_task(self.run_role(conn, opener)) for conn in order}
        while self.open_conns < len(order) and perf_counter() - t0 < 60:
            await asyncio.sleep(0.1)
        log(
            f"load: {self.open_conns} connections open in {perf_counter() - t0:.1f} s; running for "
            f"{spec.duration:.0f} s, pacing scale {ctx.scale:.2f}, target {100 * spec.target_cpu:.0f}% CPU"
        )
        started_at = perf_counter()
        start_state = self.gateway_state()
        background = [loop.create_task(c) for c in (self.watchdog(), ctx.pace(), self.ticker(started_at))]
        self.tick_start = CpuSnapshot.take(spec.watch)
        end_at = t0 + spec.duration
        while perf_counter() < end_at:
            await asyncio.sleep(min(1.0, end_at - perf_counter()))
            if all(t.done() for t in tasks.values()):
                break

        # Stop: producers first (batch producers finish and commit the batch in hand), then drain.
        log("load: stopping producers")
        ctx.stop_producers = True
        producers = [t for c, t in tasks.items() if c.role != Role.WORKER]
        _, pending = await asyncio.wait(producers, timeout=60)
        if pending:
            ctx.tally.problem("producers did not stop", f"{len(pending)} still running after 60 s")
        drain_until = perf_counter() + spec.drain_s
        info = {}
        while perf_counter() < drain_until:
            info = await self.faktory_info()
            queues = info["faktory"]["queues"]
            if (
                not queues.get(PLAIN_QUEUE)
                and not queues.get(CB_QUEUE)
                and perf_counter() - self.worker.last_job_at > 1
            ):
                break
            await asyncio.sleep(1)
        queues = info.get("faktory", {}).get("queues", {})
        log(f"load: drained (queues {queues}); stopping workers")
        ctx.stop_workers = True
        workers = [t for c, t in tasks.items() if c.role == Role.WORKER]
        _, pending = await asyncio.wait(workers, timeout=30)
        if pending:
            ctx.tally.problem("workers did not stop", f"{len(pending)} still running after 30 s")
        for task in background:
            task.cancel()
        final_tick, _ = self.tick(self.tick_start, started_at, final=True)
        self.ticks.append(final_tick)
        emit(Tag.TICK, final_tick)
        end_state = self.gateway_state()
        run_seconds = perf_counter() - started_at
        for conn in self.conns:
            conn.close(polite=True)
        for task in tasks.values():
            task.cancel()
        await asyncio.sleep(0.5)
        audit = await self.audit()
        tally = ctx.tally
        return {
            "run_seconds": run_seconds,
            "roles": counts,
            "gateways": {"baseline": baseline, "start": start_state, "end": end_state},
            "kinds": tally.totals(run_seconds),
            "refusals": dict(tally.refusals),
            "refusals_by_kind": dict(tally.refusals_by_kind),
            "server_errors": dict(tally.server_errors),
            "problems": dict(tally.problems),
            "examples": tally.examples,
            "lost_connections": dict(tally.lost),
            "lost_examples": tally.lost_examples,
            "stalls": tally.stalls,
            "batches_left_uncommitted": self.batcher.uncommitted,
            "audit": audit,
        }

    async def audit(self) -> dict:
        fk = (await self.faktory_info())["faktory"]
        report = json.loads(await self.control(self.spec.standin_url, b"STANDIN REPORT\r\n"))["batches"]
        return {
            "jobs": self.ctx.jobs.audit(fk, self.worker.audit(fk)),
            "standin": self.batcher.audit_standin(report),
            "violations": self.batcher.audit_violations(),
            "faktory_info": fk,
        }


def main(spec: SoakSpec) -> None:
    raise_nofile(spec.conns + 200)
    import uvloop

    result = uvloop.run(Load(spec).run())
    emit(Tag.RESULT, result)
