"""Commands that keep a real Faktory 1.9.4 connection busy, for the fence's tests.

Faktory handles a connection's commands one at a time. `QUEUE REMOVE` filters the manager's list
of paused queues once per name it is given (manager/fetch.go `RemoveQueue` and `filter`), with no
context or deadline: with thousands of paused queues and many names it runs for as long as a
client likes. A command queued behind it on the same connection waits, and Faktory still handles
it after the connection was reset (faktory-protocol.md, section 11). The names need not exist.
"""

from __future__ import annotations

import json
import time

from tests.support.client import RawClient, job


class BusyServer:
    """Pauses `paused` queues of its own on one Faktory (the list every QUEUE REMOVE walks), and
    builds QUEUE REMOVE lines that run for a chosen time there."""

    PREFIX = "busy-paused-"

    def __init__(self, faktory_url: str, paused: int = 10_000):
        self.url = faktory_url
        self.paused = [f"{self.PREFIX}{n}" for n in range(paused)]
        with RawClient.connect(faktory_url, timeout=120) as client:
            jobs = [job(f"busy-job-{n:08d}", queue=queue) for n, queue in enumerate(self.paused)]
            assert client.call("PUSHB " + json.dumps(jobs, separators=(",", ":"))) == b"$2\r\n{}\r\n"
            assert client.call("QUEUE PAUSE " + " ".join(self.paused)) == b"+OK\r\n"
            # What one name costs here and now (the walk over the paused list dominates).
            names = 20_000
            started = time.perf_counter()
            assert client.call(self._remove(names)) == b"+OK\r\n"
            self.per_name = (time.perf_counter() - started) / names

    def _remove(self, names: int) -> str:
        return "QUEUE REMOVE " + " ".join(f"busy-none-{n}" for n in range(names))

    def slow_line(self, seconds: float) -> bytes:
        """A QUEUE REMOVE that keeps its connection busy for at least about `seconds` (more when
        the machine is loaded: the calibration ran on an idle connection)."""
        return (self._remove(int(seconds / self.per_name) + 1) + "\r\n").encode()

    def cleanup(self) -> None:
        with RawClient.connect(self.url, timeout=120) as client:
            client.call("QUEUE REMOVE " + " ".join(self.paused))
