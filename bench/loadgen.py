"""The load generator: a separate process, raw sockets, no Faktory client library.

`python bench/loadgen.py '<json spec>'` runs one measurement (a `LoadSpec` of bench/lib/load.py,
which also starts it: `load.run(spec)`) and prints one `RESULT {json}` line on stdout. It does not
import the gateway, so the benchmark never measures the gateway against itself; replies are read
with bench/lib/resp.py's `parse()`, the bench's one RESP parser.

Modes (`LoadSpec.mode`):

- `push`, `fetchack`, `batchpush`: `conns` connections (asyncio + uvloop, one Protocol each), each
  sends one command, waits for its reply, sends the next: nothing is pipelined. After `warmup`
  seconds the window of `duration` seconds opens; only replies inside it are counted and timed.
- `latency`: one blocking connection per target (tests/support/client.py's RawClient), serial,
  alternating between the targets in blocks of `block` commands so that drift hits every target
  alike; per-command times in the window.
- `idle`: open `conns` connections, complete the handshake on each, print `READY n`, wait for a
  line on stdin, close them all.

At the window's edges the generator samples its own CPU time (getrusage), the CPU time of the
processes named in `watch` (utime+stime from /proc/<pid>/stat), the machine's idle time
(/proc/stat), and Redis's `INFO commandstats` when `watch_redis` is set.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from array import array
from itertools import count
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository: bench.lib, tests.support

from bench.lib.load import LoadSpec, Mode, abba, save_latencies
from bench.lib.process import CpuSnapshot, Tag, emit, raise_nofile
from bench.lib.report import percentiles
from bench.lib.resp import BULK, ERROR, JID, SIMPLE, Connection, hello_line, parse, redis_info
from tests.support.client import RawClient

perf_counter = time.perf_counter


# ------------------------------------------------------------------------------------------------
# Sampling


def redis_commandstats(url: str) -> dict[str, int]:
    """Calls so far by Redis command: {"evalsha": n, ...}."""
    stats = {}
    for name, fields in redis_info(url, "commandstats").items():
        if name.startswith("cmdstat_"):
            calls = dict(kv.split("=", 1) for kv in fields.split(","))["calls"]
            stats[name[len("cmdstat_") :]] = int(calls)
    return stats


class Sample:
    """The CPU of this process, of the watched ones and of the machine, and the watched Redis's
    calls, at one edge of the window."""

    def __init__(self, spec: LoadSpec):
        self.cpu = CpuSnapshot.take(spec.watch)
        self.t = self.cpu.t
        self.redis_stats = redis_commandstats(spec.watch_redis) if spec.watch_redis else None

    def delta(self, start: Sample) -> dict:
        cpu = self.cpu.since(start.cpu)
        out = {
            "wall_s": cpu.wall_s,
            "loadgen_cpu_s": cpu.own_s,
            "proc_cpu_s": cpu.procs_s,
            "machine_busy_cores": cpu.busy_cores,
        }
        if self.redis_stats is not None:
            calls = {
                name: self.redis_stats.get(name, 0) - start.redis_stats.get(name, 0)
                for name in set(self.redis_stats) | set(start.redis_stats)
            }
            # Our own INFO calls are not the gateway's.
            out["redis_calls"] = {k: v for k, v in calls.items() if v and k != "info"}
        return out


# ------------------------------------------------------------------------------------------------
# Throughput: push, fetchack, batchpush


HI, HELLO, SETUP, RUN, DONE = range(5)


class Gen:
    def __init__(self, spec: LoadSpec):
        self.spec = spec
        # Booleans, not the mode compared per reply: the hot path tests them once per command.
        self.fetchack = spec.mode == Mode.FETCHACK
        self.batchpush = spec.mode == Mode.BATCHPUSH
        self.measuring = False
        self.stopping = False
        self.count = 0  # replies counted in the window (commands)
        self.jobs = 0  # jobs completed in the window (fetchack: FETCH+ACK pairs)
        self.errors = 0
        self.first_error: str | None = None
        self.dry = 0  # FETCH answered with no job
        self.lat = array("d")
        self.ready = 0
        self.done = 0
        self.all_ready: asyncio.Future | None = None
        self.all_done: asyncio.Future | None = None
        queue = spec.queue
        pad = "x" * spec.payload
        self.push_tmpl = (
            b'PUSH {"jid":"%s-%%d","jobtype":"bench","queue":"' + queue.encode() + b'","args":[%%d,"' + pad.encode()
            + b'"]%s}\r\n'
        )  # fmt: skip
        self.fetch_line = b"FETCH " + queue.encode() + b"\r\n"
        batch_new = (
            spec.batch_new
            or 'BATCH NEW {"description":"bench","success":{"jobtype":"cb","args":[],"queue":"cb"}}'
        )
        self.batch_new = batch_new.encode().removesuffix(b"\r\n") + b"\r\n"

    def error(self, payload: bytes) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = payload.decode("utf-8", "replace")[:300]

    def conn_ready(self) -> None:
        self.ready += 1
        if self.ready == self.spec.conns and not self.all_ready.done():
            self.all_ready.set_result(None)

    def conn_done(self) -> None:
        self.done += 1
        if self.done == self.spec.conns and not self.all_done.done():
            self.all_done.set_result(None)


class Conn(asyncio.Protocol):
    def __init__(self, gen: Gen, index: int):
        self.gen = gen
        self.index = index
        self.buf = b""
        self.state = HI
        self.transport: asyncio.Transport | None = None
        self.seq = 0
        self.t0 = 0.0
        self.acking = False
        self.bid: bytes | None = None
        self.tmpl: bytes = b""
        self.lost = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc) -> None:
        self.lost = True
        if self.state != DONE:
            self.gen.error(f"connection lost in state {self.state}: {exc}".encode())
            self.state = DONE
            if self.gen.all_ready and not self.gen.all_ready.done():
                self.gen.all_ready.set_exception(ConnectionError(self.gen.first_error))
            self.gen.conn_done()

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        # One call of the bench's parser per reply, and none past the last (the `pos < size` test):
        # about 60 ns a reply over the parser this class had inline, 1% of the generator's CPU.
        pos, size = 0, len(data)
        while pos < size:
            reply = parse(data, pos)
            if reply is None:
                break
            kind, payload, pos = reply
            self.reply(kind, payload)
        if pos < size:
            self.buf = data[pos:]

    def send_next(self) -> None:
        gen = self.gen
        # A worker finishes the job it holds (its ACK, after the window) before it closes: a job
        # left reserved would stay pending for its whole reservation (bench/engine.py's scale).
        if gen.stopping and not (gen.fetchack and self.acking):
            self.state = DONE
            self.transport.close()
            gen.conn_done()
            return
        self.t0 = perf_counter()
        if gen.fetchack:
            if self.acking:
                self.transport.write(b'ACK {"jid":"%s"}\r\n' % self.jid)
            else:
                self.transport.write(gen.fetch_line)
        else:
            self.seq += 1
            self.transport.write(self.tmpl % (self.seq, self.seq))

    def reply(self, kind: int, payload: bytes | None) -> None:
        gen = self.gen
        state = self.state
        if state == RUN:
            if gen.measuring:
                gen.lat.append(perf_counter() - self.t0)
                gen.count += 1
                if kind == ERROR:
                    gen.error(payload)
            elif kind == ERROR and gen.first_error is None:
                gen.error(payload)
            if gen.fetchack:
                if self.acking:
                    self.acking = False
                    if gen.measuring:
                        gen.jobs += 1
                elif payload is None or kind != BULK:
                    gen.dry += 1
                else:
                    match = JID.search(payload)
                    self.jid = match.group(1)
                    self.acking = True
            elif gen.measuring:
                gen.jobs += 1
            self.send_next()
        elif state == HI:
            self.state = HELLO
            self.transport.write(hello_line(gen.spec.wid))
        elif state == HELLO:
            if kind != SIMPLE:
                gen.error(payload or b"")
                self.transport.close()
                return
            if gen.batchpush:
                self.state = SETUP
                self.transport.write(gen.batch_new)
            else:
                self.start()
        elif state == SETUP:
            if kind == ERROR or payload is None:
                gen.error(payload or b"BATCH NEW returned null")
                self.transport.close()
                return
            self.bid = payload.decode().strip('"').encode() if payload.startswith(b'"') else payload
            self.start()

    def start(self) -> None:
        gen = self.gen
        custom = b',"custom":{"bid":"%s"}' % self.bid if self.bid else b""
        prefix = b"bench-%d-%x" % (os.getpid(), self.index)  # Faktory refuses jids under 8 characters
        self.tmpl = gen.push_tmpl % (prefix, custom)
        self.state = RUN
        gen.conn_ready()
        if gen.spec.go_together:
            gen.all_ready.add_done_callback(lambda fut: None if fut.exception() else self.send_next())
        else:
            self.send_next()


async def run_throughput(spec: LoadSpec) -> dict:
    loop = asyncio.get_running_loop()
    gen = Gen(spec)
    gen.all_ready = loop.create_future()
    gen.all_done = loop.create_future()
    parts = urlsplit(spec.url)
    conns = []
    for i in range(spec.conns):
        _, conn = await loop.create_connection(lambda i=i: Conn(gen, i), parts.hostname, parts.port)
        conns.append(conn)
    await asyncio.wait_for(gen.all_ready, 20)
    await asyncio.sleep(spec.warmup)
    start = Sample(spec)
    gen.measuring = True
    await asyncio.sleep(spec.duration)
    gen.measuring = False
    end = Sample(spec)
    gen.stopping = True
    try:
        await asyncio.wait_for(gen.all_done, 10)
    except TimeoutError:
        gen.error(b"connections did not finish within 10 s after the window")
    if spec.mode == Mode.BATCHPUSH and spec.commit:
        await commit_batches(spec, [c.bid for c in conns if c.bid])
    if spec.lat_file:
        save_latencies(spec.lat_file, gen.lat)
    out = end.delta(start)
    wall = out["wall_s"]
    out.update(
        commands=gen.count,
        jobs=gen.jobs,
        ops_per_s=gen.jobs / wall,
        commands_per_s=gen.count / wall,
        errors=gen.errors,
        first_error=gen.first_error,
        dry_fetches=gen.dry,
        latency=percentiles(gen.lat),
    )
    return out


async def commit_batches(spec: LoadSpec, bids: list[bytes]) -> None:
    """Commit the bench's batches after the window, so they end like real ones (not timed)."""
    conn = Connection(spec.url)
    await conn.open()
    for bid in bids:
        await conn.call(b"BATCH COMMIT %s\r\n" % bid)
    conn.close(polite=True)


# ------------------------------------------------------------------------------------------------
# Latency: serial, blocking sockets, alternating targets


def blocking_client(url: str, wid: str | None) -> RawClient:
    """A handshaken blocking connection for the latency scenarios, Nagle off like the async ones."""
    client = RawClient.connect(url, wid=wid)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def run_latency(spec: LoadSpec) -> dict:
    command = spec.command
    wid = f"bench-lat-{os.getpid()}"
    targets = spec.targets  # {name: url}
    conns = {name: blocking_client(url, wid) for name, url in targets.items()}
    pad = "x" * spec.payload
    lines = {
        "push": lambda n: (
            b'PUSH {"jid":"lat-%d-%d","jobtype":"bench","queue":"%s","args":[%d,"%s"]}\r\n'
            % (os.getpid(), n, spec.queue.encode(), n, pad.encode())
        ),
        "beat": lambda n: b'BEAT {"wid":"%s"}\r\n' % wid.encode(),
        "info": lambda n: b"INFO\r\n",
    }
    make = lines[command]
    block = spec.block
    lat = {name: array("d") for name in targets}
    counts = {name: 0 for name in targets}
    errors = {name: 0 for name in targets}
    names = list(targets)
    seq = 0
    warm_until = perf_counter() + spec.warmup
    start = None
    end_at = None
    for sweep in count():
        now = perf_counter()
        if start is None and now >= warm_until:
            start = Sample(spec)
            end_at = start.t + spec.duration
        if end_at is not None and now >= end_at:
            break
        for name in abba(names, sweep):
            conn = conns[name]
            sendall = conn.sock.sendall
            read = conn.read_raw
            record = lat[name].append if start is not None else None
            for _ in range(block):
                seq += 1
                line = make(seq)
                t0 = perf_counter()
                sendall(line)
                reply = read()
                t1 = perf_counter()
                if record:
                    record(t1 - t0)
                    counts[name] += 1
                if reply[0] == ERROR:
                    errors[name] += 1
    end = Sample(spec)
    for conn in conns.values():
        conn.close()
    out = end.delta(start)
    out.update(
        commands={name: counts[name] for name in names},
        errors=errors,
        latency={name: percentiles(lat[name]) for name in names},
    )
    return out


# ------------------------------------------------------------------------------------------------
# Idle connections


async def run_idle(spec: LoadSpec) -> dict:
    limit = asyncio.Semaphore(spec.concurrency)
    conns = []

    async def one() -> None:
        async with limit:
            conn = Connection(spec.url)
            await conn.open(spec.wid)
            conns.append(conn)

    started = perf_counter()
    await asyncio.gather(*(one() for _ in range(spec.conns)))
    print(f"READY {len(conns)} {perf_counter() - started:.3f}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for conn in conns:
        conn.close()
    await asyncio.sleep(0.2)
    return {"conns": len(conns)}


def main() -> None:
    spec = LoadSpec.from_json(sys.argv[1])
    raise_nofile()
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    if spec.mode == Mode.LATENCY:
        result = run_latency(spec)
    else:
        import uvloop

        runner = run_idle if spec.mode == Mode.IDLE else run_throughput
        result = uvloop.run(runner(spec))
    emit(Tag.RESULT, result)


if __name__ == "__main__":
    main()
