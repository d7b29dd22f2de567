"""One connection of the soak's load: its role, the gateway it goes to, and what it has in
flight (for the watchdog, and for the audit when the connection breaks)."""

from __future__ import annotations

import os
import time
from enum import StrEnum

from bench.lib.resp import Connection

perf_counter = time.perf_counter


class Role(StrEnum):
    PRODUCER = "producer"
    BATCH = "batch"  # a batch producer
    WORKER = "worker"


class Client(Connection):
    __slots__ = ("gw", "index", "inflight_seq", "role", "sent_at", "wid")

    def __init__(self, index: int, role: Role, gw: int, url: str):
        super().__init__(url)
        self.index = index
        self.role = role
        self.gw = gw  # 0 or 1: which gateway
        self.wid = f"soak-{os.getpid()}-{index}" if role == Role.WORKER else None
        self.sent_at = 0.0  # 0 when nothing is in flight
        self.inflight_seq = 0  # the job whose PUSH is in flight, 0 if none

    async def open(self) -> None:
        await super().open(self.wid)

    async def timed(self, line: bytes) -> tuple[int, bytes | None, float, float]:
        """Send one command, wait for its reply: (kind, payload, sent_at, seconds)."""
        t0 = perf_counter()
        self.sent_at = t0
        kind, payload = await self.call(line)
        self.sent_at = 0.0
        return kind, payload, t0, perf_counter() - t0

    def close(self, polite: bool = False) -> None:
        super().close(polite)
        self.sent_at = 0.0
