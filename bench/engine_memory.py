"""The batch engine's ledger memory per batch job, on a real Redis.

    python bench/engine_memory.py                    # a 100,000-job batch on a Redis of its own
    python bench/engine_memory.py --jobs 20000 --redis redis://127.0.0.1:6379/0

One batch is made and filled through the gateway's own RedisStore (engine mode), so the bytes are
those of the layout the gateway writes: `joined` in PUSHB-sized chunks, then every job ACKed (`ran`).
At each point it reads `MEMORY USAGE <key> SAMPLES 0` (exact: every field counted) of the batch's
`jobs` and `meta` hashes, and the growth of the server's `used_memory` as a cross-check.

This is the one script in bench/ besides ledger_gateway.py that imports gateway/: it measures the
store's data layout, not the gateway's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.lib, gateway, tests

from bench.lib.resp import redis_info
from gateway.store.engine import BatchSpec, Kind, new_bid
from gateway.store.redis import RedisStore
from tests.support.processes import RedisServer

CHUNK = 1000  # jobs per joined call (a PUSHB's worth), and ACKs in flight at once
CALLBACK = '{"jid":"%s","jobtype":"BatchDone","args":[],"queue":"default"}'


@dataclass(frozen=True)
class Footprint:
    """A batch's ledger bytes at one point: its jobs and meta hashes, and the server's growth."""

    jobs: int
    jobs_bytes: int
    meta_bytes: int
    used_memory_growth: int

    @property
    def per_job(self) -> float:
        return (self.jobs_bytes + self.meta_bytes) / self.jobs

    def line(self, label: str) -> str:
        return (
            f"{label}: {self.per_job:.1f} bytes per job (jobs {self.jobs_bytes:,} B + meta "
            f"{self.meta_bytes:,} B over {self.jobs:,} jobs; used_memory grew "
            f"{self.used_memory_growth / self.jobs:.1f} B per job)"
        )


async def measure(url: str, jobs: int = 100_000, jid_length: int = 24) -> tuple[Footprint, Footprint]:
    """Fill one engine batch of `jobs` jobs on the Redis at `url`; its footprint once every job
    joined, and once every job was ACKed. The batch's keys are deleted afterwards."""
    store = RedisStore(url, f"bench-{secrets.token_hex(4)}:", 3600, 3600, engine=True)
    try:
        before = int(redis_info(url, "memory")["used_memory"])
        bid = new_bid(None)
        callbacks = {kind: CALLBACK % secrets.token_hex(12) for kind in Kind}
        await store.new_batch(bid, BatchSpec(None, "bench", "2024-05-01T12:00:00Z", callbacks))
        jids = [secrets.token_hex(jid_length // 2 + 1)[:jid_length] for _ in range(jobs)]
        for i in range(0, jobs, CHUNK):
            await store.joined(bid, jids[i : i + CHUNK])

        async def footprint() -> Footprint:
            jobs_bytes, meta_bytes = await asyncio.gather(
                *(
                    store.conn.call("MEMORY", "USAGE", store._key(bid, name), "SAMPLES", 0)
                    for name in ("jobs", "meta")
                )
            )
            growth = int(redis_info(url, "memory")["used_memory"]) - before
            return Footprint(jobs, jobs_bytes, meta_bytes, growth)

        joined = await footprint()
        for i in range(0, jobs, CHUNK):  # sent together: the connection pipelines them
            await asyncio.gather(*(store.ran(bid, jid, True, "bench") for jid in jids[i : i + CHUNK]))
        acked = await footprint()
        await store.conn.call("DEL", *store._keys(bid))
        return joined, acked
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument(
        "--jid-length", type=int, default=24, help="Faktory clients' usual: 24 hex characters"
    )
    parser.add_argument("--redis", help="a standalone Redis to use (default: start one of its own)")
    args = parser.parse_args()
    server = None if args.redis else RedisServer().start()
    try:
        url = args.redis or server.url
        joined, acked = asyncio.run(measure(url, args.jobs, args.jid_length))
    finally:
        if server is not None:
            server.cleanup()
    print(joined.line("every job joined"))
    print(acked.line("every job ACKed"))


if __name__ == "__main__":
    main()
