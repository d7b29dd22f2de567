"""What the ledger suites share: a store under test and a way to let its time pass.

Time: the memory store runs on a clock the test moves; Redis on its own clock, so its tests use
short lifetimes and really wait. `Ledger.wait(s)` does the right thing for each.
"""

from __future__ import annotations

import asyncio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Ledger:
    """A store under test and a way to let its time pass."""

    def __init__(self, store, clock: FakeClock | None):
        self.store = store
        self.clock = clock

    async def wait(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)
