"""What every role of the soak's load shares: the spec, one random stream (seeded by --seed), the
tally, the jobs, the pacing scale and the two stop switches (producers first, workers after the
drain)."""

from __future__ import annotations

import asyncio
import random
import time

from bench.lib.process import machine_cpu
from bench.soakload.jobs import Jobs
from bench.soakload.spec import SoakSpec
from bench.soakload.tally import Tally

perf_counter = time.perf_counter


class Context:
    def __init__(self, spec: SoakSpec):
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.tally = Tally()
        self.jobs = Jobs(spec.max_jobs, spec.payload)
        self.scale = spec.scale  # every interval divides by it; the pacing moves it
        self.stop_producers = False
        self.stop_workers = False

    def interval(self, mean: float) -> float:
        """A random wait of mean `mean` seconds at scale 1 (exponential: arrivals at random)."""
        return self.rng.expovariate(self.scale / mean)

    async def sleep_unless_stopping(self, seconds: float) -> None:
        """Sleep, but wake within a second once the producers are told to stop."""
        end = perf_counter() + seconds
        while not self.stop_producers:
            left = end - perf_counter()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 1.0))

    async def pace(self) -> None:
        """Every 5 s, nudge the pacing scale toward the target machine load."""
        target = self.spec.target_cpu
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
            self.scale = min(max(self.scale * min(max(step, 0.7), 1.4), 0.02), self.spec.max_scale)
