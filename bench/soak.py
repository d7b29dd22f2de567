"""Soak: two gateways sharing one Redis, 1000 mixed client connections for 10 minutes, then an audit.

    python bench/soak.py                                  # 10 minutes, 1000 connections
    python bench/soak.py --minutes 1 --connections 200    # a quick run

It starts real Faktory, the Ent stand-in in front of it, one Redis and two gateways (`--redis`, the
same store) in front of the stand-in, all on free loopback ports. A separate load process (this
file with `--load`, asyncio + uvloop, raw sockets, no Faktory library, nothing from gateway/) opens
the connections, split evenly across the two gateways:

- producers (most of them): a PUSH every few seconds each;
- workers: FETCH, a few ms of "work", ACK (some FAIL), a BEAT every 15 s;
- batch producers: BATCH NEW, PUSH members, BATCH COMMIT, now and then a legal BATCH STATUS or
  BATCH OPEN of their own open batch, and deliberate violations of a batch committed earlier
  (through either gateway): a PUSH into it, BATCH OPEN of it, BATCH NEW with it as parent.

The load is paced: every 5 s the pacing scale is nudged so the machine is about --target-cpu busy.
Every 30 s it reports throughput and latency per command kind, refusals by code and each gateway's
RSS and open fds. At the end the producers stop, the workers drain the queue, and the audit runs:
every job that got +OK is acked or still in Faktory; every refusal hit a batch committed earlier;
no violation was admitted; the stand-in saw nothing join a committed or fired batch; the gateways'
own refusal counters agree; fds return to their baseline. See bench/README.md, section "Soak".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from array import array
from collections import Counter, deque
from pathlib import Path
from urllib.parse import urlsplit

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from loadgen import JID, hello_line, machine_cpu, percentiles, proc_cpu, redis_replies  # noqa: E402

from tests.support.processes import rss_kib  # noqa: E402 (loadgen put the repository on sys.path)

perf_counter = time.perf_counter
RESULTS = BENCH / "results"

# The gateway's refusal codes (gateway/policy.py); any other -ERR is the server's.
GATEWAY_CODES = {
    "BATCH_COMMITTED",
    "BATCH_CALLBACK_FIRED",
    "BATCH_UNKNOWN",
    "PARENT_SEALED",
    "COMMIT_FENCE_TIMEOUT",
    "STATE_UNAVAILABLE",
    "MALFORMED",
}
# What a deliberate violation may legitimately be refused with.
LEGIT = {
    "PUSH-violation": {"BATCH_COMMITTED", "BATCH_CALLBACK_FIRED"},
    "OPEN-violation": {"BATCH_COMMITTED", "BATCH_CALLBACK_FIRED"},
    "CHILD-violation": {"PARENT_SEALED"},
}
# Order of the kinds in the tables.
KINDS = (
    "PUSH",
    "PUSH-member",
    "BATCH NEW",
    "BATCH COMMIT",
    "BATCH STATUS",
    "BATCH OPEN",
    "FETCH",
    "FETCH-empty",
    "ACK",
    "FAIL",
    "BEAT",
    "PUSH-violation",
    "OPEN-violation",
    "CHILD-violation",
)

# Per-job flags, one byte per job sequence number.
SENT, OK, REFUSED, FETCHED, ACKED, FAILED_LAST, UNANSWERED, VIOLATION = (1 << i for i in range(8))

PLAIN_QUEUE, CB_QUEUE = "soak", "soak-cb"
STALL_S = 30.0  # a command with no reply for this long is a stall: the connection is aborted


def proc_state(pid: int) -> dict:
    """A gateway's resident memory and open fds; None for both once the process is gone."""
    try:
        return {"rss_kib": rss_kib(pid), "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    except (OSError, StopIteration):  # gone, or a zombie (no VmRSS line)
        return {"rss_kib": None, "fds": None}


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else need, hard))


# ================================================================================================
# The load process


class Stall(ConnectionError):
    pass


class Conn:
    """One client connection: a stream pair, one command in flight at a time."""

    __slots__ = ("gw", "index", "inflight_seq", "load", "reader", "role", "sent_at", "url", "wid", "writer")

    def __init__(self, load: Load | None, index: int, role: str, gw: int, url: str | None = None):
        self.load = load
        self.index = index
        self.role = role
        self.gw = gw
        self.url = url or load.spec["gateways"][gw]
        self.wid = f"soak-{os.getpid()}-{index}" if role == "worker" else None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sent_at = 0.0  # 0 when nothing is in flight
        self.inflight_seq = 0

    async def open(self) -> None:
        parts = urlsplit(self.url)
        self.reader, self.writer = await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 20)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        kind, payload = await self.read()
        if kind != 43 or not payload.startswith(b"HI"):
            raise ConnectionError(f"bad greeting {payload!r}")
        self.writer.write(hello_line(self.wid))
        kind, payload = await self.read()
        if kind != 43:
            raise ConnectionError(f"handshake refused: {payload!r}")

    async def read(self) -> tuple[int, bytes | None]:
        line = await self.reader.readuntil(b"\r\n")
        kind = line[0]
        if kind == 36:  # $ bulk
            length = int(line[1:-2])
            if length < 0:
                return kind, None
            data = await self.reader.readexactly(length + 2)
            return kind, data[:-2]
        if kind not in (43, 45):
            raise ConnectionError(f"unexpected reply {line[:80]!r}")
        return kind, line[1:-2]

    async def call(self, line: bytes) -> tuple[int, bytes | None, float, float]:
        """Send one command, wait for its reply: (kind, payload, sent_at, seconds)."""
        t0 = perf_counter()
        self.sent_at = t0
        self.writer.write(line)
        kind, payload = await self.read()
        self.sent_at = 0.0
        return kind, payload, t0, perf_counter() - t0

    def close(self, polite: bool = False) -> None:
        if self.writer is not None:
            try:
                if polite:
                    self.writer.write(b"END\r\n")
                self.writer.close()
            except Exception:
                pass
        self.reader = self.writer = None
        self.sent_at = 0.0


class BatchRec:
    __slots__ = ("committed_at", "gw", "members_ok", "members_sent")

    def __init__(self, gw: int):
        self.gw = gw
        self.committed_at: float | None = None
        self.members_ok = 0
        self.members_sent = 0


class Load:
    def __init__(self, spec: dict):
        self.spec = spec
        self.rng = random.Random(spec["seed"])
        self.scale = spec["scale"]
        self.stop_producers = False
        self.stop_workers = False
        self.max_jobs = spec["max_jobs"]
        self.flags = bytearray(self.max_jobs + 1)
        self.seq = 0
        self.pad = ("x" * spec["payload"]).encode()
        self.conns: list[Conn] = []
        self.open_conns = 0
        # stats
        self.lat_tick: dict[str, array] = {}
        self.lat_all: dict[str, array] = {}
        self.refusals_tick: Counter = Counter()
        self.refusals: Counter = Counter()  # code -> n
        self.refusals_by_kind: Counter = Counter()  # "kind code" -> n
        self.server_errors: Counter = Counter()  # message prefix -> n (not the gateway's refusals)
        self.problems: Counter = Counter()  # audit failures seen during the run
        self.examples: list[str] = []
        self.lost: Counter = Counter()  # role -> connections lost
        self.lost_examples: list[str] = []
        self.stalls = 0
        # batches
        self.batches: dict[str, BatchRec] = {}
        self.committed: deque[str] = deque(maxlen=400)  # recently committed bids, for violations
        self.violations = Counter()  # kind -> sent
        self.violations_refused = Counter()  # kind -> refused legitimately
        self.violations_cross = 0  # violations sent through the gateway that did not commit the batch
        self.legit_refusals = 0
        self.uncommitted_batches = 0
        # callbacks and workers
        self.cb_fetched = 0
        self.cb_acked = 0
        self.duplicates = 0
        self.foreign = 0  # fetched jobs that are neither ours nor callbacks
        self.last_job_at = perf_counter()
        self.ticks: list[dict] = []

    # ------------------------------------------------------------------ recording
    def problem(self, what: str, detail: str) -> None:
        self.problems[what] += 1
        if len(self.examples) < 30:
            self.examples.append(f"{what}: {detail}"[:400])

    def record(self, kind: str, seconds: float) -> None:
        tick = self.lat_tick.get(kind)
        if tick is None:
            tick = self.lat_tick[kind] = array("d")
            self.lat_all.setdefault(kind, array("d"))
        tick.append(seconds)
        self.lat_all[kind].append(seconds)

    def error_code(self, kind: str, payload: bytes) -> str:
        """Classify an -ERR: the gateway's refusal code, or a server error (counted apart)."""
        words = payload.split(None, 2)
        code = words[1].decode() if len(words) > 1 and words[0] == b"ERR" else ""
        if code in GATEWAY_CODES:
            self.refusals[code] += 1
            self.refusals_tick[code] += 1
            self.refusals_by_kind[f"{kind} {code}"] += 1
            return code
        self.server_errors[payload[:60].decode("utf-8", "replace")] += 1
        return ""

    def legal_reply(self, kind: str, reply: int, payload: bytes | None) -> bool:
        """A legal command's reply: any -ERR is a problem (a refusal of a legal command, or a server error)."""
        if reply != 45:
            return True
        code = self.error_code(kind, payload)
        if code:
            self.problem("legal command refused", f"{kind}: {payload.decode('utf-8', 'replace')}")
        else:
            self.problem("server error", f"{kind}: {payload.decode('utf-8', 'replace')}")
        return False

    def next_seq(self) -> int | None:
        if self.seq >= self.max_jobs:
            return None
        self.seq += 1
        return self.seq

    def push_line(self, seq: int, bid: str | None = None) -> bytes:
        custom = b',"custom":{"bid":"%s"}' % bid.encode() if bid else b""
        return (
            b'PUSH {"jid":"soak-%010d","jobtype":"SoakJob","queue":"soak","retry":3,"args":[%d,"%s"]%s}\r\n'
            % (seq, seq, self.pad, custom)
        )

    def interval(self, mean: float) -> float:
        return self.rng.expovariate(self.scale / mean)

    # ------------------------------------------------------------------ roles
    async def producer(self, conn: Conn) -> None:
        mean = self.spec["push_interval"]
        while not self.stop_producers:
            await self.sleep_unless_stopping(self.interval(mean))
            if self.stop_producers:
                return
            seq = self.next_seq()
            if seq is None:
                return
            await self.push(conn, seq, "PUSH")

    async def push(self, conn: Conn, seq: int, kind: str, bid: str | None = None) -> bool:
        flags = self.flags
        flags[seq] |= SENT
        conn.inflight_seq = seq
        reply, payload, _, dt = await conn.call(self.push_line(seq, bid))
        conn.inflight_seq = 0
        self.record(kind, dt)
        if reply == 43:
            flags[seq] |= OK
            return True
        flags[seq] |= REFUSED
        self.legal_reply(kind, reply, payload)
        return False

    async def batch_producer(self, conn: Conn) -> None:
        spec = self.spec
        rng = self.rng
        while not self.stop_producers:
            await self.sleep_unless_stopping(self.interval(spec["batch_interval"]))
            if self.stop_producers:
                return
            if self.seq + 40 >= self.max_jobs:
                return
            await self.one_batch(conn, rng)

    async def one_batch(self, conn: Conn, rng: random.Random) -> None:
        new = {"description": "soak", "success": {"jobtype": "SoakCallback", "queue": CB_QUEUE, "args": []}}
        if rng.random() < 0.5:
            new["complete"] = {"jobtype": "SoakCallback", "queue": CB_QUEUE, "args": ["complete"]}
        reply, payload, _, dt = await conn.call(b"BATCH NEW " + json.dumps(new).encode() + b"\r\n")
        self.record("BATCH NEW", dt)
        if not self.legal_reply("BATCH NEW", reply, payload):
            return
        if reply != 36 or not payload:
            self.problem("bad BATCH NEW reply", repr(payload))
            return
        bid = payload.decode()
        rec = self.batches[bid] = BatchRec(conn.gw)
        self.uncommitted_batches += 1
        members = rng.randint(2, 15)
        for i in range(members):
            rec.members_sent += 1
            if await self.push(conn, self.next_seq(), "PUSH-member", bid):
                rec.members_ok += 1
            if i == 0 and rng.random() < 0.1:
                # Legal: reopening one's own open batch, and asking its status.
                line, kind = rng.choice(
                    ((b"BATCH OPEN %s\r\n", "BATCH OPEN"), (b"BATCH STATUS %s\r\n", "BATCH STATUS"))
                )
                reply, payload, _, dt = await conn.call(line % bid.encode())
                self.record(kind, dt)
                self.legal_reply(kind, reply, payload)
        reply, payload, _, dt = await conn.call(b"BATCH COMMIT %s\r\n" % bid.encode())
        self.record("BATCH COMMIT", dt)
        if not self.legal_reply("BATCH COMMIT", reply, payload):
            return
        rec.committed_at = perf_counter()
        self.uncommitted_batches -= 1
        self.committed.append(bid)
        if rng.random() < 0.1:
            # Legal: the status of some committed batch (a cheap way for the gateway to learn "fired").
            target = rng.choice(self.committed)
            reply, payload, _, dt = await conn.call(b"BATCH STATUS %s\r\n" % target.encode())
            self.record("BATCH STATUS", dt)
            self.legal_reply("BATCH STATUS", reply, payload)
        if rng.random() < self.spec["violation_rate"]:
            await self.violate(conn, rng)

    async def violate(self, conn: Conn, rng: random.Random) -> None:
        """A deliberate violation against a batch committed earlier, through whichever gateway this is."""
        target = rng.choice(self.committed)
        rec = self.batches[target]
        kind = rng.choice(("PUSH-violation", "PUSH-violation", "OPEN-violation", "CHILD-violation"))
        self.violations[kind] += 1
        self.violations_cross += rec.gw != conn.gw
        seq = None
        if kind == "PUSH-violation":
            seq = self.next_seq()
            if seq is None:
                return
            self.flags[seq] |= SENT | VIOLATION
            conn.inflight_seq = seq
            line = self.push_line(seq, target)
        elif kind == "OPEN-violation":
            line = b"BATCH OPEN %s\r\n" % target.encode()
        else:
            child = {
                "parent_bid": target,
                "success": {"jobtype": "SoakCallback", "queue": CB_QUEUE, "args": []},
            }
            line = b"BATCH NEW " + json.dumps(child).encode() + b"\r\n"
        reply, payload, sent_at, dt = await conn.call(line)
        conn.inflight_seq = 0
        self.record(kind, dt)
        if reply == 45:
            code = self.error_code(kind, payload)
            if seq is not None:
                self.flags[seq] |= REFUSED
            # Legitimate: the right code, for a batch this generator committed before sending.
            committed_before = rec.committed_at is not None and rec.committed_at < sent_at
            if code in LEGIT[kind] and committed_before:
                self.violations_refused[kind] += 1
                self.legit_refusals += 1
            elif code:
                self.problem(
                    "refusal not legitimate", f"{kind} {target}: {payload.decode('utf-8', 'replace')}"
                )
            else:
                self.problem("violation answered by a server error", f"{kind}: {payload!r}")
        else:
            if seq is not None:
                self.flags[seq] |= OK
            self.problem("violation admitted", f"{kind} {target}: reply {chr(reply)}{payload!r}")

    async def worker(self, conn: Conn) -> None:
        rng = self.rng
        fetch = b"FETCH %s %s\r\n" % (CB_QUEUE.encode(), PLAIN_QUEUE.encode())
        beat = b'BEAT {"wid":"%s"}\r\n' % conn.wid.encode()
        work = self.spec["work_ms"] / 1000.0
        fail_rate = self.spec["fail_rate"]
        flags = self.flags
        last_beat = perf_counter()
        while not self.stop_workers:
            if perf_counter() - last_beat > 15:
                last_beat = perf_counter()
                reply, payload, _, dt = await conn.call(beat)
                self.record("BEAT", dt)
                self.legal_reply("BEAT", reply, payload)
            reply, payload, _, dt = await conn.call(fetch)
            if reply == 45:
                self.record("FETCH", dt)
                self.legal_reply("FETCH", reply, payload)
                await asyncio.sleep(1)
                continue
            if payload is None:
                self.record("FETCH-empty", dt)
                continue
            self.record("FETCH", dt)
            self.last_job_at = perf_counter()
            match = JID.search(payload)
            jid = match.group(1) if match else b""
            seq = None
            if b'"_cb"' in payload:
                self.cb_fetched += 1
            elif jid.startswith(b"soak-"):
                seq = int(jid[5:])
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
                reply, payload, _, dt = await conn.call(line)
                self.record("FAIL", dt)
                if self.legal_reply("FAIL", reply, payload):
                    flags[seq] |= FAILED_LAST
            else:
                reply, payload, _, dt = await conn.call(b'ACK {"jid":"%s"}\r\n' % jid)
                self.record("ACK", dt)
                if self.legal_reply("ACK", reply, payload):
                    if seq is None:
                        self.cb_acked += 1
                    else:
                        flags[seq] = (flags[seq] | ACKED) & ~FAILED_LAST

    async def sleep_unless_stopping(self, seconds: float) -> None:
        end = perf_counter() + seconds
        while not self.stop_producers:
            left = end - perf_counter()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 1.0))

    async def run_role(self, conn: Conn, opener: asyncio.Semaphore) -> None:
        role = {"producer": self.producer, "batch": self.batch_producer, "worker": self.worker}[conn.role]
        while True:
            try:
                if conn.reader is None:
                    async with opener:
                        await conn.open()
                    self.open_conns += 1
                await role(conn)
                return
            except (
                OSError,
                EOFError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ValueError,
            ) as exc:
                if conn.reader is not None:
                    self.open_conns -= 1
                self.lost[conn.role] += 1
                if len(self.lost_examples) < 10:
                    self.lost_examples.append(f"{conn.role} #{conn.index}: {type(exc).__name__}: {exc}"[:300])
                if conn.inflight_seq:
                    self.flags[conn.inflight_seq] |= UNANSWERED
                    conn.inflight_seq = 0
                conn.close()
                done = self.stop_workers if conn.role == "worker" else self.stop_producers
                if done:
                    return
                await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ background
    async def watchdog(self) -> None:
        while True:
            await asyncio.sleep(5)
            now = perf_counter()
            for conn in self.conns:
                if conn.sent_at and now - conn.sent_at > STALL_S and conn.writer is not None:
                    self.stalls += 1
                    self.problem(
                        "stall", f"{conn.role} #{conn.index}: no reply for {now - conn.sent_at:.0f} s"
                    )
                    conn.writer.transport.abort()

    def cpu_snapshot(self) -> dict:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        procs = {name: sum(proc_cpu(pid) for pid in pids) for name, pids in self.spec["watch"].items()}
        procs["loadgen"] = usage.ru_utime + usage.ru_stime
        return {"t": perf_counter(), "machine": machine_cpu(), "procs": procs}

    def gateway_state(self) -> dict:
        return {name: proc_state(pid) for name, pid in self.spec["gateway_pids"].items()}

    async def pacer(self) -> None:
        """Every 5 s, nudge the pacing scale toward the target machine load."""
        target = self.spec["target_cpu"]
        last = machine_cpu()
        while not self.stop_producers:
            await asyncio.sleep(5)
            now = machine_cpu()
            busy, total = now[0] - last[0], now[1] - last[1]
            last = now
            if not target or not total or self.stop_producers:
                continue
            frac = busy / total
            step = 1 + 0.7 * (target - frac) / max(frac, 0.1)
            self.scale = min(max(self.scale * min(max(step, 0.7), 1.4), 0.02), self.spec["max_scale"])

    def tick(self, start: dict, started_at: float, final: bool = False) -> tuple[dict, dict]:
        now = self.cpu_snapshot()
        wall = now["t"] - start["t"]
        busy = now["machine"][0] - start["machine"][0]
        total = now["machine"][1] - start["machine"][1]
        kinds = {}
        for kind in KINDS:
            values = self.lat_tick.get(kind)
            if not values:
                continue
            p = percentiles(values)
            kinds[kind] = {
                "n": p["n"],
                "per_s": p["n"] / wall,
                "p50_us": p["p50_us"],
                "p99_us": p["p99_us"],
                "p999_us": p["p999_us"],
                "max_us": p["max_us"],
            }
        self.lat_tick = {}
        cores = {name: (now["procs"][name] - start["procs"].get(name, 0)) / wall for name in now["procs"]}
        if total:
            # Busy time no watched process accounts for: kernel work charged to no one, and whatever
            # else runs on the machine (other jobs would show here).
            cores["other"] = max(0.0, busy / total * os.cpu_count() - sum(cores.values()))
        tick = {
            "t_s": round(now["t"] - started_at, 1),
            "wall_s": wall,
            "final": final,
            "scale": self.scale,
            "machine_busy_pct": 100 * busy / total if total else None,
            "cores": cores,
            "kinds": kinds,
            "commands_per_s": sum(k["n"] for k in kinds.values()) / wall,
            "refusals": dict(self.refusals_tick),
            "refusals_total": sum(self.refusals.values()),
            "server_errors_total": sum(self.server_errors.values()),
            "problems_total": sum(self.problems.values()),
            "lost_total": sum(self.lost.values()),
            "open_conns": self.open_conns,
            "jobs_pushed": self.seq,
            "gateways": self.gateway_state(),
            "loadgen_rss_kib": rss_kib(os.getpid()),
        }
        self.refusals_tick = Counter()
        return tick, now

    async def ticker(self, started_at: float) -> None:
        start = self.cpu_snapshot()
        every = self.spec["report_every"]
        while True:
            await asyncio.sleep(every)
            tick, start = self.tick(start, started_at)
            self.ticks.append(tick)
            emit("TICK", tick)
            self._tick_start = start

    # ------------------------------------------------------------------ control connections
    async def control(self, url: str, line: bytes) -> bytes | None:
        conn = Conn(None, -1, "control", -1, url)
        await conn.open()
        try:
            kind, payload, _, _ = await conn.call(line)
        finally:
            conn.close(polite=True)
        if kind == 45:
            raise RuntimeError(f"{line!r}: {payload!r}")
        return payload

    async def faktory_info(self) -> dict:
        return json.loads(await self.control(self.spec["faktory_url"], b"INFO\r\n"))

    # ------------------------------------------------------------------ main
    async def run(self) -> dict:
        spec = self.spec
        loop = asyncio.get_running_loop()
        counts = spec["roles"]
        roles = (
            ["worker"] * counts["worker"] + ["batch"] * counts["batch"] + ["producer"] * counts["producer"]
        )
        # Consecutive connections go to alternate gateways, so each role is split evenly between them.
        self.conns = [Conn(self, i, role, i % 2) for i, role in enumerate(roles)]
        opener = asyncio.Semaphore(32)
        order = list(self.conns)
        self.rng.shuffle(order)  # roles ramp up together
        t0 = perf_counter()
        log(f"load: opening {len(order)} connections ({counts}) over {len(spec['gateways'])} gateways")
        baseline = self.gateway_state()
        tasks = {conn: loop.create_task(self.run_role(conn, opener)) for conn in order}
        while self.open_conns < len(order) and perf_counter() - t0 < 60:
            await asyncio.sleep(0.1)
        log(
            f"load: {self.open_conns} connections open in {perf_counter() - t0:.1f} s; running for "
            f"{spec['duration']:.0f} s, pacing scale {self.scale:.2f}, target {100 * spec['target_cpu']:.0f}% CPU"
        )
        started_at = perf_counter()
        start_state = self.gateway_state()
        background = [loop.create_task(c) for c in (self.watchdog(), self.pacer(), self.ticker(started_at))]
        self._tick_start = self.cpu_snapshot()
        end_at = t0 + spec["duration"]
        while perf_counter() < end_at:
            await asyncio.sleep(min(1.0, end_at - perf_counter()))
            if all(t.done() for t in tasks.values()):
                break

        # Stop: producers first (batch producers finish and commit the batch in hand), then drain.
        log("load: stopping producers")
        self.stop_producers = True
        producers = [t for c, t in tasks.items() if c.role != "worker"]
        _, pending = await asyncio.wait(producers, timeout=60)
        if pending:
            self.problem("producers did not stop", f"{len(pending)} still running after 60 s")
        drain_until = perf_counter() + spec["drain_s"]
        info = {}
        while perf_counter() < drain_until:
            info = await self.faktory_info()
            queues = info["faktory"]["queues"]
            if (
                not queues.get(PLAIN_QUEUE)
                and not queues.get(CB_QUEUE)
                and perf_counter() - self.last_job_at > 1
            ):
                break
            await asyncio.sleep(1)
        queues = info.get("faktory", {}).get("queues", {})
        log(f"load: drained (queues {queues}); stopping workers")
        self.stop_workers = True
        workers = [t for c, t in tasks.items() if c.role == "worker"]
        _, pending = await asyncio.wait(workers, timeout=30)
        if pending:
            self.problem("workers did not stop", f"{len(pending)} still running after 30 s")
        for task in background:
            task.cancel()
        final_tick, _ = self.tick(self._tick_start, started_at, final=True)
        self.ticks.append(final_tick)
        emit("TICK", final_tick)
        end_state = self.gateway_state()
        run_seconds = perf_counter() - started_at
        for conn in self.conns:
            conn.close(polite=True)
        for task in tasks.values():
            task.cancel()
        await asyncio.sleep(0.5)
        audit = await self.audit()
        totals = {}
        for kind in KINDS:
            values = self.lat_all.get(kind)
            if values:
                p = percentiles(values)
                p["per_s"] = p["n"] / run_seconds
                totals[kind] = p
        return {
            "run_seconds": run_seconds,
            "roles": counts,
            "gateways": {"baseline": baseline, "start": start_state, "end": end_state},
            "kinds": totals,
            "refusals": dict(self.refusals),
            "refusals_by_kind": dict(self.refusals_by_kind),
            "server_errors": dict(self.server_errors),
            "problems": dict(self.problems),
            "examples": self.examples,
            "lost_connections": dict(self.lost),
            "lost_examples": self.lost_examples,
            "stalls": self.stalls,
            "batches_left_uncommitted": self.uncommitted_batches,
            "audit": audit,
        }

    async def audit(self) -> dict:
        flags = self.flags
        counts = Counter()
        anomalies = []
        for seq in range(1, self.seq + 1):
            f = flags[seq]
            if not f & SENT:
                continue
            counts["sent"] += 1
            if f & OK:
                counts["ok"] += 1
                if f & ACKED:
                    counts["ok_acked"] += 1
                elif f & FAILED_LAST:
                    counts["ok_failed_last"] += 1
            if f & REFUSED:
                counts["refused"] += 1
                if f & (FETCHED | ACKED):
                    counts["refused_but_delivered"] += 1
                    if len(anomalies) < 10:
                        anomalies.append(f"soak-{seq:010d} was refused but a worker fetched it")
            if f & UNANSWERED and not f & OK:
                counts["unanswered"] += 1
                if f & ACKED:
                    counts["unanswered_acked"] += 1
            if f & (FETCHED | ACKED) and not f & (OK | UNANSWERED | REFUSED):
                counts["delivered_never_pushed"] += 1
            if f & VIOLATION:
                counts["violation_pushes"] += 1
        info = await self.faktory_info()
        fk = info["faktory"]
        sets = fk.get("sets", {})
        in_faktory = {
            "queue": fk["queues"].get(PLAIN_QUEUE, 0),
            "retries": sets.get("retries", 0),
            "dead": sets.get("dead", 0),
            "scheduled": sets.get("scheduled", 0),
            "working": sets.get("working", 0),
        }
        outstanding = counts["ok"] - counts["ok_acked"]
        slack = counts["unanswered"] - counts["unanswered_acked"]
        held = sum(in_faktory.values())
        jobs = {
            **counts,
            "outstanding_expected": outstanding,
            "outstanding_slack": slack,  # unanswered PUSHes may or may not have landed
            "in_faktory": in_faktory,
            "in_faktory_total": held,
            "callback_queue": fk["queues"].get(CB_QUEUE, 0),
            "callbacks_fetched": self.cb_fetched,
            "callbacks_acked": self.cb_acked,
            "duplicate_deliveries": self.duplicates,
            "foreign_jobs": self.foreign,
            "anomalies": anomalies,
            "passed": outstanding <= held <= outstanding + slack
            and not counts["refused_but_delivered"]
            and not counts["delivered_never_pushed"],
        }
        # The stand-in's own audit.
        report = json.loads(await self.control(self.spec["standin_url"], b"STANDIN REPORT\r\n"))["batches"]
        joined = Counter()
        states = Counter()
        mismatched, not_committed, missing = [], [], []
        for b in report.values():
            for key in (
                "joined_while_committed",
                "joined_after_callback",
                "children_while_committed",
                "children_after_callback",
            ):
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
        standin = {
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
        violations = {
            "sent": dict(self.violations),
            "refused_legitimately": dict(self.violations_refused),
            "cross_gateway": self.violations_cross,
            "legit_refusals": self.legit_refusals,
            "total_refusals": sum(self.refusals.values()),
        }
        return {"jobs": jobs, "standin": standin, "violations": violations, "faktory_info": fk}


def emit(tag: str, payload: dict) -> None:
    print(f"{tag} {json.dumps(payload)}", flush=True)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_main(spec: dict) -> None:
    raise_nofile(spec["conns"] + 200)
    import uvloop

    load = Load(spec)
    result = uvloop.run(load.run())
    emit("RESULT", result)


# ================================================================================================
# The orchestrator


def role_counts(conns: int, workers: float, batchers: float) -> dict:
    w = max(2, round(conns * workers))
    b = max(2, round(conns * batchers))
    return {"worker": w, "batch": b, "producer": conns - w - b}


def metric_values(text: str, name: str) -> dict[str, float]:
    """Samples of one metric from a Prometheus exposition: {labels: value}."""
    out = {}
    for match in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE):
        out[match.group(1) or ""] = float(match.group(2))
    return out


def redis_memory(port: int) -> dict | None:
    """Keys and used_memory of the ledger Redis."""
    try:
        dbsize, info = redis_replies("127.0.0.1", port, b"DBSIZE", b"INFO memory")
    except OSError:
        return None
    used = int(re.search(rb"used_memory:(\d+)", info).group(1))
    return {"keys": int(dbsize), "used_memory": used}


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:.2f}" if us < 100_000 else f"{us / 1000:.0f}"


def format_tick(tick: dict) -> str:
    lines = []
    head = (
        f"[{time.strftime('%H:%M:%S')}] t={tick['t_s']:.0f}s{' (final, drain)' if tick['final'] else ''}: "
        f"{tick['commands_per_s']:.0f} cmd/s, machine {tick['machine_busy_pct']:.0f}% busy, "
        f"pacing x{tick['scale']:.2f}, {tick['open_conns']} conns open, {tick['jobs_pushed']} jobs sent"
    )
    lines.append(head)
    lines.append(f"  {'kind':16} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8}")
    for kind, k in tick["kinds"].items():
        lines.append(
            f"  {kind:16} {k['per_s']:8.1f} {fmt_us(k['p50_us']):>8} {fmt_us(k['p99_us']):>8} "
            f"{fmt_us(k['p999_us']):>9} {fmt_us(k['max_us']):>8}"
        )
    refused = ", ".join(f"{c} {n}" for c, n in sorted(tick["refusals"].items())) or "none"
    lines.append(
        f"  refusals this period: {refused} (run total {tick['refusals_total']}); "
        f"server errors {tick['server_errors_total']}, problems {tick['problems_total']}, "
        f"lost connections {tick['lost_total']}"
    )
    gws = "; ".join(
        f"{name} RSS {g['rss_kib'] / 1024:.1f} MiB, {g['fds']} fds, {tick['cores'].get(name, 0):.2f} cores"
        for name, g in tick["gateways"].items()
        if g["rss_kib"] is not None
    )
    lines.append(f"  {gws}")
    others = ", ".join(f"{n} {c:.2f}" for n, c in tick["cores"].items() if not n.startswith("gw-"))
    lines.append(f"  cores: {others}")
    return "\n".join(lines)


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.faktory = self.standin = self.redis = None
        self.gateways: list = []

    def start(self) -> None:
        sys.path.insert(0, str(REPO))
        from run import children_of  # bench/run.py

        from tests.support.processes import FaktoryServer, GatewayProcess, RedisServer
        from tests.support.standin import StandinProcess

        log("starting Faktory, the Ent stand-in, Redis and two gateways (--redis)")
        self.faktory = FaktoryServer().start()
        self.faktory_pids = [self.faktory.proc.pid, *children_of(self.faktory.proc.pid)]
        self.standin = StandinProcess(self.faktory.url).start()
        self.redis = RedisServer().start()
        for _ in range(2):
            self.gateways.append(
                GatewayProcess(self.standin.url, "--redis", self.redis.url, *self.args.gateway_flag).start()
            )
        log(
            "pids: faktory %s, stand-in %d, redis %d, gateways %s"
            % (
                self.faktory_pids,
                self.standin.proc.pid,
                self.redis.proc.pid,
                [g.proc.pid for g in self.gateways],
            )
        )

    def stop(self) -> None:
        for process in (*self.gateways, self.standin, self.redis, self.faktory):
            if process is not None:
                try:
                    process.cleanup() if hasattr(process, "cleanup") else process.stop()
                except Exception as exc:
                    log(f"stopping {process.argv[0]}: {exc}")

    def gateway_names(self) -> dict[str, int]:
        return {f"gw-{'ab'[i]}": g.proc.pid for i, g in enumerate(self.gateways)}

    def gateway_metrics(self) -> dict:
        out = {}
        for name, gateway in zip(self.gateway_names(), self.gateways, strict=True):
            _, text = gateway.http("/metrics")
            refusals = {
                re.search(r'code="([^"]+)"', k).group(1): v
                for k, v in metric_values(text, "faktory_gateway_refusals_total").items()
            }
            out[name] = {
                "refusals": refusals,
                "connections_active": metric_values(text, "faktory_gateway_connections_active").get(""),
                "store_errors": sum(metric_values(text, "faktory_gateway_store_errors_total").values()),
                "protocol_errors": sum(metric_values(text, "faktory_gateway_protocol_errors_total").values()),
                "refused_log_lines": sum('"message":"refused"' in line for line in gateway.output),
                "alive": gateway.proc.poll() is None,
            }
        return out

    def run(self) -> dict:
        args = self.args
        roles = role_counts(args.connections, args.workers, args.batchers)
        time.sleep(1.0)
        names = self.gateway_names()
        baseline = {n: proc_state(p) for n, p in names.items()}
        spec = {
            "gateways": [g.url for g in self.gateways],
            "faktory_url": self.faktory.url,
            "standin_url": self.standin.url,
            "conns": args.connections,
            "roles": roles,
            "duration": args.minutes * 60,
            "report_every": args.report_every,
            "target_cpu": args.target_cpu / 100,
            "scale": args.scale,
            "max_scale": args.max_scale,
            "push_interval": args.push_interval,
            "batch_interval": args.batch_interval,
            "violation_rate": args.violation_rate,
            "fail_rate": args.fail_rate,
            "work_ms": args.work_ms,
            "payload": args.payload,
            "max_jobs": args.max_jobs,
            "drain_s": args.drain,
            "seed": args.seed,
            "gateway_pids": names,
            "watch": {
                **{n: [p] for n, p in names.items()},
                "standin": [self.standin.proc.pid],
                "faktory+redis": self.faktory_pids,
                "ledger-redis": [self.redis.proc.pid],
            },
        }
        proc = subprocess.Popen(
            [sys.executable, __file__, "--load", json.dumps(spec)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        limit = args.minutes * 60 + args.drain + 240
        timer = threading.Timer(limit, proc.kill)  # bounded: the load process cannot outlive this
        timer.start()
        ticks, result = [], None
        try:
            for line in proc.stdout:
                if line.startswith("TICK "):
                    tick = json.loads(line[5:])
                    ticks.append(tick)
                    print(format_tick(tick), flush=True)
                elif line.startswith("RESULT "):
                    result = json.loads(line[7:])
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if result is None:
            raise RuntimeError(f"the load process ended without a result (exit {proc.returncode})")
        time.sleep(2.0)  # let the gateways close the upstream sides
        result["gateways"]["baseline"] = baseline
        result["gateways"]["after_close"] = {n: proc_state(p) for n, p in names.items()}
        result["gateway_metrics"] = self.gateway_metrics()
        result["ledger_redis"] = redis_memory(self.redis.port)
        result["processes_alive"] = {
            "faktory": self.faktory.proc.poll() is None,
            "standin": self.standin.proc.poll() is None,
            "redis": self.redis.proc.poll() is None,
            **{n: g.proc.poll() is None for n, g in zip(names, self.gateways, strict=True)},
        }
        result["ticks"] = ticks
        return result


def checks(result: dict) -> list[tuple[str, bool | None, str]]:
    """(what, passed, detail); passed None means informational."""
    out = []
    audit = result["audit"]
    jobs = audit["jobs"]
    fk = jobs["in_faktory"]
    out.append(
        (
            "every +OK job accounted for",
            jobs["passed"],
            f"{jobs.get('ok', 0)} PUSHes answered +OK = {jobs.get('ok_acked', 0)} acked by the workers + "
            f"{jobs['outstanding_expected']} outstanding; Faktory holds {jobs['in_faktory_total']} (queue "
            f"{fk['queue']}, retries {fk['retries']}, dead {fk['dead']}, scheduled {fk['scheduled']}, working "
            f"{fk['working']}); refused but delivered {jobs.get('refused_but_delivered', 0)}, delivered but "
            f"never pushed {jobs.get('delivered_never_pushed', 0)}, unanswered {jobs.get('unanswered', 0)}",
        )
    )
    v = audit["violations"]
    problems = result["problems"]
    illegit = problems.get("refusal not legitimate", 0) + problems.get("legal command refused", 0)
    out.append(
        (
            "every refusal legitimate",
            illegit == 0 and v["legit_refusals"] == v["total_refusals"],
            f"{v['total_refusals']} refusals, {v['legit_refusals']} of them violations aimed at a batch the "
            f"generator had committed before sending; legal commands refused: "
            f"{problems.get('legal command refused', 0)}; wrong code or target: "
            f"{problems.get('refusal not legitimate', 0)}",
        )
    )
    sent = sum(v["sent"].values())
    refused = sum(v["refused_legitimately"].values())
    detail = ", ".join(f"{k} {v['refused_legitimately'].get(k, 0)}/{n}" for k, n in sorted(v["sent"].items()))
    out.append(
        (
            "every violation refused",
            problems.get("violation admitted", 0) == 0 and refused == sent,
            f"{refused} of {sent} refused ({detail}); {v['cross_gateway']} sent through the other gateway than "
            f"the one that committed the batch; admitted: {problems.get('violation admitted', 0)}",
        )
    )
    s = audit["standin"]
    joined = s["joined"]
    out.append(
        (
            "stand-in: nothing joined a committed or fired batch",
            s["passed"],
            f"{s['batches_reported']} batches ({s['batches_committed']} committed by the generator); joined "
            f"while committed {joined.get('joined_while_committed', 0)}, after callback "
            f"{joined.get('joined_after_callback', 0)}, child batches while committed "
            f"{joined.get('children_while_committed', 0)} / after callback "
            f"{joined.get('children_after_callback', 0)}; member totals differing from the +OK count "
            f"{s['member_count_mismatches']}; committed batches reopened {s['committed_but_reopened']}; "
            f"callbacks {s['callback_states']}",
        )
    )
    gm = result["gateway_metrics"]
    metric_refusals = Counter()
    for g in gm.values():
        metric_refusals.update(g["refusals"])
    metric_refusals = {k: int(n) for k, n in metric_refusals.items() if n}
    logged = sum(g["refused_log_lines"] for g in gm.values())
    agree = metric_refusals == result["refusals"] and logged == sum(result["refusals"].values())
    out.append(
        (
            "gateway counters agree with the client",
            agree,
            f"faktory_gateway_refusals_total {metric_refusals}, 'refused' log lines {logged}; client saw "
            f"{result['refusals']}",
        )
    )
    errors = sum(result["server_errors"].values())
    lost = sum(result["lost_connections"].values())
    other = {
        k: n
        for k, n in problems.items()
        if k not in ("refusal not legitimate", "legal command refused", "violation admitted")
    }
    store = sum(g["store_errors"] for g in gm.values())
    alive = result["processes_alive"]
    out.append(
        (
            "no errors, stalls or lost connections",
            not errors
            and not lost
            and not result["stalls"]
            and not other
            and not store
            and all(alive.values()),
            f"server errors {errors}, lost connections {lost}, stalls {result['stalls']}, store errors {store}, "
            f"other problems {other or 0}, processes alive {all(alive.values())}",
        )
    )
    g = result["gateways"]
    fd_ok = True
    parts = []
    for name in g["baseline"]:
        b, st, e, a = (g[k][name]["fds"] for k in ("baseline", "start", "end", "after_close"))
        fd_ok &= a is not None and b is not None and a <= b + 2 and abs(e - st) <= 4
        parts.append(f"{name} {b} idle, {st} at start, {e} at end, {a} after close")
    out.append(("gateway fds: steady under load, back to baseline", fd_ok, "; ".join(parts)))
    # RSS: warm = at the first report, after 30 s of load (allocator pools and caches filled).
    first = next((t for t in result["ticks"] if not t["final"]), None)
    rss_ok = True
    parts = []
    for name in g["baseline"]:
        b, st, e, a = (g[k][name]["rss_kib"] for k in ("baseline", "start", "end", "after_close"))
        warm = first["gateways"][name]["rss_kib"] if first else st
        rss_ok &= e - warm <= max(0.10 * warm, 5 * 1024)
        parts.append(
            f"{name} {b / 1024:.1f} MiB idle, {st / 1024:.1f} with the connections open, {warm / 1024:.1f} "
            f"at the first report, {e / 1024:.1f} at the end ({100 * (e - warm) / warm:+.1f}% from the first "
            f"report), {a / 1024:.1f} after close"
        )
    out.append(("gateway RSS: growth under load <= 10% (or 5 MiB)", rss_ok, "; ".join(parts)))
    ledger = result.get("ledger_redis")
    if ledger:
        batches = result["audit"]["standin"]["batches_reported"]
        out.append(
            (
                "ledger Redis",
                None,
                f"{ledger['keys']} keys, {ledger['used_memory'] / 2**20:.1f} MiB used for {batches} batches "
                "(records are kept for batch_retention, 7 days by default)",
            )
        )
    return out


def summary(result: dict, meta: dict) -> str:
    lines = []
    roles = result["roles"]
    ticks = [t for t in result["ticks"] if not t["final"]]
    busy = [t["machine_busy_pct"] for t in ticks if t["machine_busy_pct"] is not None]
    lines.append("=" * 100)
    lines.append(
        f"SOAK SUMMARY  {meta['when']}  {result['run_seconds'] / 60:.1f} min of load, "
        f"{sum(roles.values())} connections over 2 gateways sharing one Redis"
    )
    lines.append(
        f"  roles: {roles['producer']} producers, {roles['worker']} workers, {roles['batch']} batch producers; "
        f"machine {meta['cpus']} CPUs"
    )
    if busy:
        lines.append(
            f"  machine busy per report: mean {sum(busy) / len(busy):.0f}%, min {min(busy):.0f}%, "
            f"max {max(busy):.0f}%; pacing scale {ticks[0]['scale']:.2f} -> {ticks[-1]['scale']:.2f}"
        )
        cores = Counter()
        for t in ticks:
            cores.update(t["cores"])
        lines.append("  mean cores busy: " + ", ".join(f"{n} {c / len(ticks):.2f}" for n, c in cores.items()))
    kinds = result["kinds"]
    total = sum(k["n"] for k in kinds.values())
    lines.append(f"  {total} commands, {total / result['run_seconds']:.0f}/s over the run (drain included)")
    lines.append("")
    lines.append(
        f"  {'kind':16} {'count':>9} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8}"
    )
    for kind, k in kinds.items():
        lines.append(
            f"  {kind:16} {k['n']:9d} {k['per_s']:8.1f} {fmt_us(k['p50_us']):>8} {fmt_us(k['p99_us']):>8} "
            f"{fmt_us(k['p999_us']):>9} {fmt_us(k['max_us']):>8}"
        )
    lines.append("  (FETCH-empty is a FETCH that found no job: the server holds it about 2 s by design)")
    lines.append("")
    by_kind = ", ".join(f"{k} {n}" for k, n in sorted(result["refusals_by_kind"].items())) or "none"
    lines.append(f"  refusals by code: {result['refusals'] or 'none'}")
    lines.append(f"  refusals by command and code: {by_kind}")
    if result["server_errors"]:
        lines.append(f"  server errors: {result['server_errors']}")
    jobs = result["audit"]["jobs"]
    lines.append(
        f"  callbacks: {jobs['callbacks_fetched']} fetched, {jobs['callbacks_acked']} acked, "
        f"{jobs['callback_queue']} left in {CB_QUEUE}; duplicate deliveries {jobs['duplicate_deliveries']}"
    )
    lines.append("")
    lines.append("  AUDIT")
    verdict = True
    for what, passed, detail in checks(result):
        mark = "info" if passed is None else "PASS" if passed else "FAIL"
        verdict &= passed is not False
        lines.append(f"  {mark}  {what}")
        lines.append(f"        {detail}")
    for example in result["examples"][:10] + result["lost_examples"][:5] + jobs["anomalies"][:5]:
        lines.append(f"  note: {example}")
    lines.append("")
    lines.append(f"  RESULT: {'PASS' if verdict else 'FAIL'}")
    lines.append("=" * 100)
    result["passed"] = verdict
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--load":
        load_main(json.loads(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of load (default 10)")
    parser.add_argument("--connections", type=int, default=1000, help="client connections (default 1000)")
    parser.add_argument(
        "--workers", type=float, default=0.15, help="fraction of connections that are workers"
    )
    parser.add_argument("--batchers", type=float, default=0.10, help="fraction that are batch producers")
    parser.add_argument(
        "--target-cpu",
        type=float,
        default=65.0,
        help="machine busy %% the pacing aims at (0: fixed pacing at --scale)",
    )
    parser.add_argument(
        "--scale", type=float, default=2.0, help="initial pacing scale (rates multiply by it; default 2)"
    )
    parser.add_argument("--max-scale", type=float, default=40.0, help="upper bound of the pacing scale")
    parser.add_argument(
        "--push-interval",
        type=float,
        default=5.0,
        help="mean seconds between a producer's PUSHes at scale 1 (default 5)",
    )
    parser.add_argument(
        "--batch-interval",
        type=float,
        default=5.0,
        help="mean seconds between a batch producer's batches at scale 1 (default 5)",
    )
    parser.add_argument(
        "--violation-rate",
        type=float,
        default=0.3,
        help="chance that a batch producer follows a commit with a violation (default 0.3)",
    )
    parser.add_argument(
        "--fail-rate", type=float, default=0.03, help="chance a worker FAILs a job (default 0.03)"
    )
    parser.add_argument(
        "--work-ms", type=float, default=5.0, help="mean simulated work per job, ms (default 5)"
    )
    parser.add_argument("--payload", type=int, default=100, help="bytes of padding in each job's args")
    parser.add_argument("--max-jobs", type=int, default=5_000_000, help="stop pushing after this many jobs")
    parser.add_argument(
        "--drain", type=float, default=30.0, help="max seconds for the workers to drain at the end"
    )
    parser.add_argument(
        "--report-every", type=float, default=30.0, help="seconds between reports (default 30)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--gateway-flag",
        action="append",
        default=[],
        help="extra gateway flag, repeatable (--gateway-flag=--mode=strict)",
    )
    parser.add_argument(
        "--json", default=str(RESULTS / "soak-latest.json"), help="where to write the results"
    )
    args = parser.parse_args()
    if not 10 <= args.connections <= 1800:
        parser.error(
            "--connections must be 10..1800 (Faktory OSS accepts 2000; the stand-in dials one per client)"
        )
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    raise_nofile(args.connections * 4 + 1000)  # the gateways and the stand-in inherit it
    soak = Soak(args)
    started = time.time()
    try:
        soak.start()
        result = soak.run()
    finally:
        soak.stop()
    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "cpus": os.cpu_count(),
        "args": vars(args),
    }
    text = summary(result, meta)
    print(text)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["checks"] = [{"what": w, "passed": p, "detail": d} for w, p, d in checks(result)]
    out.write_text(json.dumps({"meta": meta, **result, "summary": text}, indent=2) + "\n")
    log(f"written to {out} in {meta['seconds']} s")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
