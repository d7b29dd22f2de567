"""The gateway with its in-process ledger filled first: `bench/ledger.py` starts it like this.

    BENCH_LEDGER_BATCHES=1000000 python bench/ledger_gateway.py --upstream ... (the gateway's flags)

It is the gateway's own `main`, with one step before serving: `BENCH_LEDGER_BATCHES` committed
batches recorded through the store's own interface (bids of Ent's length, 18 characters). The
records then expire as configured (`committed_retention`), so a short retention makes the whole
ledger expire at once while the benchmark measures.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway import logs
from gateway.app import EXIT_CONFIG, Gateway
from gateway.config import ConfigError, load, parse_invocation
from gateway.store import COMMITTED


def main() -> int:
    environ = dict(os.environ)
    try:
        invocation = parse_invocation(sys.argv[1:], environ)
        config = load(invocation, environ)
    except ConfigError as exc:
        print(f"ledger_gateway: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(config.log.format, config.log.level)
    batches = int(environ.get("BENCH_LEDGER_BATCHES", "0"))

    async def fill_then_serve() -> int:
        gateway = Gateway(config, invocation)
        started = time.perf_counter()
        for i in range(batches):
            await gateway.store.create(f"b-bench{i:011d}", COMMITTED)
        print(f"ledger filled: {batches} batches in {time.perf_counter() - started:.1f} s", flush=True)
        return await gateway.run()

    return uvloop.run(fill_then_serve())


if __name__ == "__main__":
    sys.exit(main())
