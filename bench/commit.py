"""What the commit fence adds to `BATCH COMMIT`, while two gateways admit into other batches.

    python bench/commit.py                    # 400 commits each way, under load, ~1 minute
    python bench/commit.py --commits 1000 --no-load

Two gateways share one Redis ledger in front of the Ent stand-in (real Faktory behind it). Two load
generators push into their own open batches through each gateway at full speed (8 producers per
gateway, each with a batch of its own, through the fence). Meanwhile one client creates empty
batches and commits them, alternating direct to the stand-in and through gateway A, so both sides
see the same load; only the `BATCH COMMIT` round trip is timed. Nothing is in flight in the
committed batches, so the difference is the fence's own cost: the seal, the check that no lease is
live, and recording the answer (three ledger round trips), plus the gateway's hop.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.lib, tests.support

from bench.lib import load
from bench.lib.load import LoadSpec, Mode, abba
from bench.lib.process import stop_all
from bench.lib.report import Target, log, percentiles
from tests.support.client import RawClient
from tests.support.processes import FaktoryServer, GatewayProcess, RedisServer
from tests.support.standin import StandinProcess

SPEC = '{"success":{"jobtype":"Done","args":[],"queue":"bench-commit-cb"}}'


def commit_times(direct: RawClient, through: RawClient, commits: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    for i in range(commits):
        for label, client in abba((("direct", direct), ("gateway", through)), i):
            bid = client.value("BATCH NEW " + SPEC).decode()
            started = time.perf_counter()
            reply = client.call(f"BATCH COMMIT {bid}")
            times[label].append(time.perf_counter() - started)
            assert reply == b"+OK\r\n", reply
    return times


def load_spec(gateway: GatewayProcess, duration: float) -> LoadSpec:
    """8 producers pushing into batches of their own through `gateway`, at full speed."""
    return LoadSpec(Mode.BATCHPUSH, url=gateway.url, conns=8, warmup=0.5, duration=duration, payload=100,
                    queue="bench-commit", watch={"gateway": [gateway.proc.pid]})  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=400)
    parser.add_argument("--no-load", action="store_true", help="commits only, no background pushes")
    args = parser.parse_args()
    faktory = FaktoryServer().start()
    standin = StandinProcess(faktory.url).start()
    redis = RedisServer().start()
    gateways = [GatewayProcess(standin.url, "--redis", redis.url, "--log-level", "warning").start()
                for _ in range(2)]  # fmt: skip
    load_out: list[dict] = []
    try:
        with RawClient.connect(standin.url) as direct, RawClient.connect(gateways[0].url) as through:
            commit_times(direct, through, 20)  # warm-up
            duration = 0.0 if args.no_load else max(5.0, args.commits * 0.012)
            threads = (
                []
                if args.no_load
                else [
                    threading.Thread(target=lambda g=g: load_out.append(load.run(load_spec(g, duration))))
                    for g in gateways
                ]
            )
            for thread in threads:
                thread.start()
            time.sleep(1.0 if threads else 0)  # the load is running before the first timed commit
            log(f"timing {args.commits} commits each way" + ("" if args.no_load else " under load"))
            times = commit_times(direct, through, args.commits)
            for thread in threads:
                thread.join()
    finally:
        stop_all(*gateways, redis, standin, faktory)
    stats = {label: percentiles(values) for label, values in times.items()}
    d, g = stats["direct"], stats["gateway"]
    print(f"BATCH COMMIT, nothing in flight, {args.commits} each way"
          + ("" if args.no_load else f"; two gateways admitting into other batches at "
             f"{sum(o['ops_per_s'] for o in load_out):.0f} PUSH/s in all"))  # fmt: skip
    print(f"{'':8} {'p50 µs':>8} {'p90 µs':>8} {'p99 µs':>8} {'max µs':>8}")
    for label, s in stats.items():
        print(f"{label:8} {s['p50_us']:8.0f} {s['p90_us']:8.0f} {s['p99_us']:8.0f} {s['max_us']:8.0f}")
    added = g["p99_us"] - d["p99_us"]
    verdict = Target("BATCH COMMIT p99 added", "p99 <= 5000 µs", f"{added:.0f} µs", added <= 5000)
    print(f"added by the gateway: p50 {g['p50_us'] - d['p50_us']:.0f} µs, p99 {added:.0f} µs "
          f"(target: {verdict.target}): {verdict.mark}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
