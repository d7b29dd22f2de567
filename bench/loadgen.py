"""The load generator: a separate process, raw sockets, no Faktory client library.

`python bench/loadgen.py '<json spec>'` runs one measurement and prints one JSON line on stdout.
It does not import the gateway, so the benchmark never measures the gateway against itself.

Modes (spec["mode"]):

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
import json
import os
import re
import resource
import socket
import sys
import time
from array import array
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.support

from tests.support.client import RawClient

perf_counter = time.perf_counter
CLK_TCK = os.sysconf("SC_CLK_TCK")
JID = re.compile(rb'"jid":"([^"]*)"')


# ------------------------------------------------------------------------------------------------
# Sampling


def proc_cpu(pid: int) -> float:
    """utime+stime of one process, in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


def redis_replies(host: str, port: int, *commands: bytes) -> list[bytes]:
    """Send inline commands to a Redis server; one reply each (a bulk's body, or the line's text)."""
    replies: list[bytes] = []
    with socket.create_connection((host, port), timeout=5) as sock, sock.makefile("rb") as replies_in:
        sock.sendall(b"".join(c + b"\r\n" for c in commands))
        for _ in commands:
            line = replies_in.readline()
            if not line:
                raise ConnectionError("Redis closed the connection")
            if line.startswith(b"$"):
                length = int(line[1:])
                replies.append(replies_in.read(length + 2)[:-2] if length >= 0 else b"")
            else:
                replies.append(line[1:-2])
    return replies


def redis_commandstats(url: str) -> dict[str, int]:
    parts = urlsplit(url)
    (info,) = redis_replies(parts.hostname, parts.port or 6379, b"INFO commandstats")
    stats = {}
    for line in info.decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line.partition(":")
            calls = dict(kv.split("=", 1) for kv in fields.split(","))["calls"]
            stats[name[len("cmdstat_") :]] = int(calls)
    return stats


class Sample:
    def __init__(self, spec: dict):
        self.watch: dict[str, list[int]] = spec.get("watch", {})
        self.redis = spec.get("watch_redis")
        self.t = perf_counter()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.self_cpu = usage.ru_utime + usage.ru_stime
        self.procs = {name: sum(proc_cpu(pid) for pid in pids) for name, pids in self.watch.items()}
        self.machine = machine_cpu()
        self.redis_stats = redis_commandstats(self.redis) if self.redis else None

    def delta(self, start: Sample) -> dict:
        wall = self.t - start.t
        busy = self.machine[0] - start.machine[0]
        total = self.machine[1] - start.machine[1]
        out = {
            "wall_s": wall,
            "loadgen_cpu_s": self.self_cpu - start.self_cpu,
            "proc_cpu_s": {name: self.procs[name] - start.procs[name] for name in self.procs},
            "machine_busy_cores": (busy / total) * os.cpu_count() if total else None,
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


def hello_line(wid: str | None) -> bytes:
    hello = {"v": 2, "hostname": "bench", "pid": os.getpid()}
    if wid:
        hello.update(wid=wid, labels=["bench"])
    return b"HELLO " + json.dumps(hello, separators=(",", ":")).encode() + b"\r\n"


class Gen:
    def __init__(self, spec: dict):
        self.spec = spec
        self.mode = spec["mode"]
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
        queue = spec.get("queue", "bench")
        pad = "x" * spec.get("payload", 100)
        self.push_tmpl = (
            b'PUSH {"jid":"%s-%%d","jobtype":"bench","queue":"' + queue.encode() + b'","args":[%%d,"' + pad.encode()
            + b'"]%s}\r\n'
        )  # fmt: skip
        self.fetch_line = b"FETCH " + queue.encode() + b"\r\n"
        self.batch_new = spec.get(
            "batch_new",
            b'BATCH NEW {"description":"bench","success":{"jobtype":"cb","args":[],"queue":"cb"}}',
        )
        if isinstance(self.batch_new, str):
            self.batch_new = self.batch_new.encode()
        if not self.batch_new.endswith(b"\r\n"):
            self.batch_new += b"\r\n"

    def error(self, payload: bytes) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = payload.decode("utf-8", "replace")[:300]

    def conn_ready(self) -> None:
        self.ready += 1
        if self.ready == self.spec["conns"] and not self.all_ready.done():
            self.all_ready.set_result(None)

    def conn_done(self) -> None:
        self.done += 1
        if self.done == self.spec["conns"] and not self.all_done.done():
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
        pos, size = 0, len(data)
        while pos < size:
            end = data.find(b"\r\n", pos)
            if end < 0:
                break
            kind = data[pos]
            if kind == 36:  # $ bulk
                length = int(data[pos + 1 : end])
                if length < 0:
                    payload, nxt = None, end + 2
                else:
                    nxt = end + 4 + length
                    if nxt > size:
                        break
                    payload = data[end + 2 : nxt - 2]
            else:
                payload, nxt = data[pos + 1 : end], end + 2
            pos = nxt
            self.reply(kind, payload)
        if pos < size:
            self.buf = data[pos:]

    def send_next(self) -> None:
        gen = self.gen
        if gen.stopping:
            self.state = DONE
            self.transport.close()
            gen.conn_done()
            return
        self.t0 = perf_counter()
        if gen.mode == "fetchack":
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
                if kind == 45:  # -
                    gen.error(payload)
            elif kind == 45 and gen.first_error is None:
                gen.error(payload)
            if gen.mode == "fetchack":
                if self.acking:
                    self.acking = False
                    if gen.measuring:
                        gen.jobs += 1
                elif payload is None or kind != 36:
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
            self.transport.write(hello_line(gen.spec.get("wid")))
        elif state == HELLO:
            if kind != 43:  # +
                gen.error(payload or b"")
                self.transport.close()
                return
            if gen.mode == "batchpush":
                self.state = SETUP
                self.transport.write(gen.batch_new)
            else:
                self.start()
        elif state == SETUP:
            if kind == 45 or payload is None:
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
        if gen.spec.get("go_together", True):
            gen.all_ready.add_done_callback(lambda fut: None if fut.exception() else self.send_next())
        else:
            self.send_next()


async def run_throughput(spec: dict) -> dict:
    loop = asyncio.get_running_loop()
    gen = Gen(spec)
    gen.all_ready = loop.create_future()
    gen.all_done = loop.create_future()
    parts = urlsplit(spec["url"])
    conns = []
    for i in range(spec["conns"]):
        _, conn = await loop.create_connection(lambda i=i: Conn(gen, i), parts.hostname, parts.port)
        conns.append(conn)
    await asyncio.wait_for(gen.all_ready, 20)
    await asyncio.sleep(spec.get("warmup", 1.0))
    start = Sample(spec)
    gen.measuring = True
    await asyncio.sleep(spec["duration"])
    gen.measuring = False
    end = Sample(spec)
    gen.stopping = True
    try:
        await asyncio.wait_for(gen.all_done, 10)
    except TimeoutError:
        gen.error(b"connections did not finish within 10 s after the window")
    if spec["mode"] == "batchpush" and spec.get("commit", True):
        await commit_batches(spec, [c.bid for c in conns if c.bid])
    if spec.get("lat_file"):
        save_latencies(spec["lat_file"], gen.lat)
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


async def commit_batches(spec: dict, bids: list[bytes]) -> None:
    """Commit the bench's batches after the window, so they end like real ones (not timed)."""
    parts = urlsplit(spec["url"])
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    await reader.readline()
    writer.write(hello_line(None))
    await reader.readline()
    for bid in bids:
        writer.write(b"BATCH COMMIT %s\r\n" % bid)
        await reader.readline()
    writer.write(b"END\r\n")
    writer.close()


def save_latencies(path: str, lat: array) -> None:
    """Raw per-command times (seconds, native doubles) for run.py to merge across rounds."""
    with open(path, "wb") as f:
        lat.tofile(f)


def percentiles(values) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] * 1e6

    return {
        "n": n,
        "mean_us": sum(ordered) / n * 1e6,
        "p50_us": at(0.50),
        "p90_us": at(0.90),
        "p99_us": at(0.99),
        "p999_us": at(0.999),
        "max_us": ordered[-1] * 1e6,
    }


# ------------------------------------------------------------------------------------------------
# Latency: serial, blocking sockets, alternating targets


def blocking_client(url: str, wid: str | None) -> RawClient:
    """A handshaken blocking connection for the latency scenarios, Nagle off like the async ones."""
    client = RawClient.connect(url, wid=wid)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def run_latency(spec: dict) -> dict:
    command = spec["command"]
    wid = f"bench-lat-{os.getpid()}"
    targets = spec["targets"]  # {name: url}
    conns = {name: blocking_client(url, wid) for name, url in targets.items()}
    pad = "x" * spec.get("payload", 100)
    lines = {
        "push": lambda n: (
            b'PUSH {"jid":"lat-%d-%d","jobtype":"bench","queue":"%s","args":[%d,"%s"]}\r\n'
            % (os.getpid(), n, spec.get("queue", "bench").encode(), n, pad.encode())
        ),
        "beat": lambda n: b'BEAT {"wid":"%s"}\r\n' % wid.encode(),
        "info": lambda n: b"INFO\r\n",
    }
    make = lines[command]
    block = spec.get("block", 100)
    lat = {name: array("d") for name in targets}
    counts = {name: 0 for name in targets}
    errors = {name: 0 for name in targets}
    names = list(targets)
    seq = 0
    warm_until = perf_counter() + spec.get("warmup", 1.0)
    start = None
    end_at = None
    flip = 0
    while True:
        now = perf_counter()
        if start is None and now >= warm_until:
            start = Sample(spec)
            end_at = start.t + spec["duration"]
        if end_at is not None and now >= end_at:
            break
        order = names if flip == 0 else names[::-1]
        flip ^= 1
        for name in order:
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
                if reply[0] == 45:
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


async def run_idle(spec: dict) -> dict:
    parts = urlsplit(spec["url"])
    wid = spec.get("wid")
    limit = asyncio.Semaphore(spec.get("concurrency", 64))
    writers = []

    async def one() -> None:
        async with limit:
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            await reader.readline()
            writer.write(hello_line(wid))
            reply = await reader.readline()
            if reply != b"+OK\r\n":
                raise RuntimeError(f"handshake failed: {reply!r}")
            writers.append(writer)

    started = perf_counter()
    await asyncio.gather(*(one() for _ in range(spec["conns"])))
    print(f"READY {len(writers)} {perf_counter() - started:.3f}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for writer in writers:
        writer.close()
    await asyncio.sleep(0.2)
    return {"conns": len(writers)}


def main() -> None:
    spec = json.loads(sys.argv[1])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])
    mode = spec["mode"]
    if mode == "latency":
        result = run_latency(spec)
    else:
        import uvloop

        runner = run_idle if mode == "idle" else run_throughput
        result = uvloop.run(runner(spec))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
