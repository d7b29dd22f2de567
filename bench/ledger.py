"""The ledger at scale: a million batches in each store, against an empty one, in the same run.

    python bench/ledger.py                          # 1,000,000 batches, both stores, ~4 minutes
    python bench/ledger.py --batches 200000 --stores memory --duration 2

For each store it runs gateways in front of the Ent stand-in (real Faktory behind it):

- memory: `empty` (nothing recorded), `full` (N committed batches, kept), and `expiring` (N
  committed batches whose retention runs out while it is measured, so the whole ledger expires
  at once under load: the housekeeping's worst case). Memory per batch = (RSS full - RSS empty) / N.
- redis: `empty` and `full` each on a Redis of its own; `full` holds N committed batch records
  written as the gateway writes them. Memory per batch: `MEMORY USAGE` of one batch's key and
  (used_memory full - empty) / N. Time to the first reply after start: a gateway started on the
  full Redis, timed from spawn to the `+OK` of a PUSH.

Loads: 16 producers of plain PUSHes (`push16`) and of PUSHes into open batches (`batch16`, each
producer its own batch, through the fence), in ABBA rounds over the targets. During every window
bench/lag.py probes the target gateway's event loop every millisecond: a stall shows there; a
second prober on a bare aiohttp server at the same time (`ctl`) shows what the machine alone
does to a probe (on 2 shared cores, tens of milliseconds now and then).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.lib, tests.support

from bench.lag import ControlServer, LagSampler
from bench.lib import load
from bench.lib.load import LoadSpec, Mode, abba, take_latencies
from bench.lib.process import rss_kib, stop_all
from bench.lib.report import RESULTS, log, percentiles, write_json
from bench.lib.resp import redis_info, redis_value
from tests.support.client import RawClient
from tests.support.processes import FaktoryServer, GatewayProcess, RedisServer
from tests.support.standin import StandinProcess

BENCH = Path(__file__).resolve().parent
LAUNCHER = str(BENCH / "ledger_gateway.py")
LOADS = {"push16": Mode.PUSH, "batch16": Mode.BATCHPUSH}


class FilledGateway(GatewayProcess):
    """A gateway whose in-process ledger is filled before it serves (bench/ledger_gateway.py)."""

    def __init__(self, upstream: str, batches: int, retention: str):
        env = {"BENCH_LEDGER_BATCHES": str(batches), "FAKTORY_GATEWAY_COMMITTED_RETENTION": retention}
        super().__init__(upstream, "--log-level", "warning", env=env)
        self.argv[1:3] = [LAUNCHER]  # the launcher instead of `-m gateway`, same flags

    def start(self, timeout: float = 300.0) -> FilledGateway:
        return super().start(timeout)


def fill_redis(redis: RedisServer, batches: int, prefix: str = "fgw:") -> float:
    """N committed batch records, as the gateway writes them, through redis-cli --pipe."""
    retention_ms = 45 * 86400 * 1000
    lines = []
    for i in range(batches):
        key = f"{prefix}{{b-bench{i:011d}}}:state"
        lines.append(f"*5\r\n$3\r\nSET\r\n${len(key)}\r\n{key}\r\n$9\r\ncommitted\r\n$2\r\nPX\r\n"
                     f"${len(str(retention_ms))}\r\n{retention_ms}\r\n")  # fmt: skip
    started = time.perf_counter()
    subprocess.run(["redis-cli", "-p", str(redis.port), "--pipe"], input="".join(lines).encode(),
                   check=True, capture_output=True)  # fmt: skip
    return time.perf_counter() - started


def used_memory(redis: RedisServer) -> int:
    return int(redis_info(redis.url, "memory")["used_memory"])


def first_reply_seconds(upstream: str, redis_url: str) -> float:
    """Spawn a gateway on that ledger and time until a batch PUSH through it is answered."""
    started = time.perf_counter()
    gateway = GatewayProcess(upstream, "--redis", redis_url, "--log-level", "warning").start()
    try:
        with RawClient.connect(gateway.url) as client:
            bid = client.value('BATCH NEW {"success":{"jobtype":"Done","args":[]}}').decode()
            job = {"jid": "first-reply-1", "jobtype": "x", "args": [], "custom": {"bid": bid}}
            assert client.call("PUSH " + json.dumps(job)) == b"+OK\r\n"
        return time.perf_counter() - started
    finally:
        gateway.stop()


def measure(name: str, target: GatewayProcess, upstream_pids: list[int], args, tmp: Path) -> dict:
    """One window of one load on one target, with the loop-lag sampler on the target, and one on
    the control (a bare aiohttp server: what the machine alone does to a probe at that moment)."""
    lat_file = tmp / (name.replace("/", "-") + ".lat")
    spec = LoadSpec(LOADS[name.split("/")[0]], url=target.url, conns=16, warmup=args.warmup, duration=args.duration,
                    payload=100, lat_file=str(lat_file), watch={"gateway": [target.proc.pid], "faktory": upstream_pids})  # fmt: skip
    sampler = LagSampler(target.http_port, args.warmup + args.duration + 1).start()
    control = LagSampler(args.control_port, args.warmup + args.duration + 1).start()
    out = load.run(spec)
    lag, control_lag = sampler.result(), control.result()
    lat = take_latencies(lat_file)
    return {"ops_per_s": out["ops_per_s"], "errors": out["errors"], "latency": percentiles(lat), "lag": lag,
            "control_lag": control_lag,
            "cpu_us_per_cmd": out["proc_cpu_s"]["gateway"] / max(out["commands"], 1) * 1e6}  # fmt: skip


def rounds(targets: dict[str, GatewayProcess], upstream_pids: list[int], args, tmp: Path) -> dict:
    results: dict[str, dict[str, list[dict]]] = {}
    labels = list(targets)
    for name in LOADS:
        for r in range(args.rounds):
            for label in abba(labels, r):
                log(f"  {name} {label} round {r + 1}")
                one = measure(f"{name}/{label}", targets[label], upstream_pids, args, tmp)
                results.setdefault(name, {}).setdefault(label, []).append(one)
    return results


def run_memory(args, upstream: str, upstream_pids: list[int], tmp: Path) -> dict:
    log(f"memory store: filling {args.batches} batches")
    empty = FilledGateway(upstream, 0, "45d").start()
    full = FilledGateway(upstream, args.batches, "45d").start()
    # Its whole ledger expires a few seconds after it is ready: during the first windows on it.
    expiring = FilledGateway(upstream, args.batches, f"{args.expire_after}s").start()
    try:
        per_batch = (rss_kib(full.proc.pid) - rss_kib(empty.proc.pid)) * 1024 / max(args.batches, 1)
        results = rounds({"empty": empty, "full": full, "expiring": expiring}, upstream_pids, args, tmp)
        return {"store": "memory", "bytes_per_batch": per_batch, "results": results,
                "fill_log": [line for line in full.output if "ledger filled" in line]}  # fmt: skip
    finally:
        stop_all(empty, full, expiring)


def run_redis(args, upstream: str, upstream_pids: list[int], tmp: Path) -> dict:
    empty_redis, full_redis = RedisServer().start(), RedisServer().start()
    try:
        log(f"redis store: filling {args.batches} batch records")
        base = used_memory(full_redis)
        fill_s = fill_redis(full_redis, args.batches)
        per_batch_used = (used_memory(full_redis) - base) / max(args.batches, 1)
        key_usage = int(redis_value(full_redis.url, "MEMORY USAGE fgw:{b-bench00000000000}:state"))
        first_empty = first_reply_seconds(upstream, empty_redis.url)
        first_full = first_reply_seconds(upstream, full_redis.url)
        empty = GatewayProcess(upstream, "--redis", empty_redis.url, "--log-level", "warning").start()
        full = GatewayProcess(upstream, "--redis", full_redis.url, "--log-level", "warning").start()
        try:
            results = rounds({"empty": empty, "full": full}, upstream_pids, args, tmp)
        finally:
            stop_all(empty, full)
        return {"store": "redis", "fill_s": fill_s, "bytes_per_batch": per_batch_used, "key_usage": key_usage,
                "first_reply_s": {"empty": first_empty, "full": first_full}, "results": results}  # fmt: skip
    finally:
        stop_all(empty_redis, full_redis)


def report(outcomes: list[dict], args) -> str:
    lines = [f"Ledger at scale: {args.batches} batches; 16 producers; {args.rounds} windows of {args.duration:g} s "
             "per target and load, ABBA; loop lag probed every 1 ms on the target gateway", ""]  # fmt: skip
    header = (f"{'store':7} {'load':8} {'target':9} {'ops/s':>8} {'p50 µs':>8} {'p99 µs':>8} {'CPU µs/cmd':>10} "
              f"{'lag p99 µs':>10} {'lag max µs':>10} {'probes>5ms':>10} {'ctl max µs':>10}")  # fmt: skip
    lines += [header, "-" * len(header)]
    for outcome in outcomes:
        for name, per_target in outcome["results"].items():
            for label, windows in per_target.items():
                ops = sum(w["ops_per_s"] for w in windows) / len(windows)
                p50 = max(w["latency"]["p50_us"] for w in windows if w["latency"])
                p99 = max(w["latency"]["p99_us"] for w in windows if w["latency"])
                cpu = sum(w["cpu_us_per_cmd"] for w in windows) / len(windows)
                lag99 = max(w["lag"]["p99_us"] for w in windows)
                lagmax = max(w["lag"]["max_us"] for w in windows)
                over5 = sum(w["lag"]["over_5ms"] for w in windows)
                ctl = max(w["control_lag"]["max_us"] for w in windows)
                lines.append(f"{outcome['store']:7} {name:8} {label:9} {ops:8.0f} {p50:8.0f} {p99:8.0f} {cpu:10.1f} "
                             f"{lag99:10.0f} {lagmax:10.0f} {over5:10d} {ctl:10.0f}")  # fmt: skip
    lines.append("")
    for outcome in outcomes:
        if outcome["store"] == "memory":
            lines.append(f"memory store: {outcome['bytes_per_batch']:.0f} bytes per committed batch (gateway RSS, "
                         f"full - empty) = {2**30 / outcome['bytes_per_batch'] / 1e6:.1f} M batches per GiB; "
                         + "; ".join(outcome["fill_log"]))  # fmt: skip
        else:
            lines.append(f"redis: MEMORY USAGE of a committed batch's state key {outcome['key_usage']} B; used_memory "
                         f"{outcome['bytes_per_batch']:.0f} B per batch = "
                         f"{2**30 / outcome['bytes_per_batch'] / 1e6:.1f} M batches per GiB; filled in "
                         f"{outcome['fill_s']:.1f} s; first reply after start: "
                         f"{outcome['first_reply_s']['empty']:.2f} s (empty) / "
                         f"{outcome['first_reply_s']['full']:.2f} s (full)")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1_000_000)
    parser.add_argument("--stores", default="memory,redis")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--expire-after", type=float, default=5.0,
                        help="the 'expiring' memory ledger's retention, counted from its fill")  # fmt: skip
    parser.add_argument("--json", default=str(RESULTS / "ledger.json"))
    args = parser.parse_args()
    control = ControlServer().start()
    args.control_port = control.port
    faktory = FaktoryServer().start()
    standin = StandinProcess(faktory.url).start()
    upstream_pids = [standin.proc.pid, faktory.proc.pid]
    outcomes = []
    try:
        with tempfile.TemporaryDirectory(prefix="fgw-ledger-") as tmp:
            for store in args.stores.split(","):
                run = run_memory if store == "memory" else run_redis
                outcomes.append(run(args, standin.url, upstream_pids, Path(tmp)))
    finally:
        stop_all(standin, faktory, control)
    text = report(outcomes, args)
    print(text)
    write_json(args.json, {"args": vars(args), "outcomes": outcomes})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
