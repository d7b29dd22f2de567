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

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from loadgen import percentiles  # noqa: E402 (bench/ is this script's own folder)
from run import loadgen, log  # noqa: E402

from tests.support.client import RawClient  # noqa: E402
from tests.support.processes import FaktoryServer, GatewayProcess, RedisServer  # noqa: E402
from tests.support.standin import StandinProcess  # noqa: E402

SPEC = '{"success":{"jobtype":"Done","args":[],"queue":"bench-commit-cb"}}'


def commit_times(direct: RawClient, through: RawClient, commits: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    for i in range(commits):
        for label, client in (("direct", direct), ("gateway", through))[:: 1 if i % 2 == 0 else -1]:
            bid = client.value("BATCH NEW " + SPEC).decode()
            started = time.perf_counter()
            reply = client.call(f"BATCH COMMIT {bid}")
            times[label].append(time.perf_counter() - started)
            assert reply == b"+OK\r\n", reply
    return times


def load_spec(gateway: GatewayProcess, duration: float) -> dict:
    """8 producers pushing into batches of their own through `gateway`, at full speed."""
    return {
        "mode": "batchpush",
        "url": gateway.url,
        "conns": 8,
        "warmup": 0.5,
        "duration": duration,
        "payload": 100,
        "wid": None,
        "queue": "bench-commit",
        "watch": {"gateway": [gateway.proc.pid]},
    }


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
                    threading.Thread(target=lambda g=g: load_out.append(loadgen(load_spec(g, duration))))
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
        for gateway in gateways:
            gateway.stop()
        redis.cleanup()
        standin.stop()
        faktory.cleanup()
    stats = {label: percentiles(values) for label, values in times.items()}
    d, g = stats["direct"], stats["gateway"]
    print(f"BATCH COMMIT, nothing in flight, {args.commits} each way"
          + ("" if args.no_load else f"; two gateways admitting into other batches at "
             f"{sum(o['ops_per_s'] for o in load_out):.0f} PUSH/s in all"))  # fmt: skip
    print(f"{'':8} {'p50 µs':>8} {'p90 µs':>8} {'p99 µs':>8} {'max µs':>8}")
    for label, s in stats.items():
        print(f"{label:8} {s['p50_us']:8.0f} {s['p90_us']:8.0f} {s['p99_us']:8.0f} {s['max_us']:8.0f}")
    added = g["p99_us"] - d["p99_us"]
    print(f"added by the gateway: p50 {g['p50_us'] - d['p50_us']:.0f} µs, p99 {added:.0f} µs "
          f"(target: p99 <= 5000 µs): {'PASS' if added <= 5000 else 'MISS'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
