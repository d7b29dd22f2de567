"""Event-loop stalls of the gateway, measured from outside, without touching its code.

The gateway serves its HTTP probes on the same event loop as the Faktory traffic, so a `GET
/liveness` cannot be answered before the loop finishes what it is doing. A separate process asks
for it every `interval` (1 ms by default) over one keep-alive connection and times each request
(send to full response). On an idle gateway that is the floor: loopback plus aiohttp's own work for
one request. Under load, the excess over that floor is the time the request waited for the loop:
the loop lag, as a client of the gateway would feel it. A stall of S ms shows as a probe of about
S ms; the probes that fall in it queue behind one another, so count the stalls by `over_*`, not by
probe count.

    python bench/lag.py PORT SECONDS [INTERVAL_S]     # one JSON line on stdout
    python bench/lag.py --serve PORT                  # a bare aiohttp /liveness on uvloop: the control

or from Python (what bench/run.py's `loop-lag` scenario does):

    from bench.lag import ControlServer, LagSampler
    sampler = LagSampler(gateway.http_port, seconds=5).start()
    ...                      # the load whose stalls you want to see
    stats = sampler.result()  # {"probes", "p50_us", "p99_us", "p999_us", "max_us", "over_1ms", ...}

The prober costs the gateway one small HTTP request per interval (about 1000 a second) and costs
the machine one more busy process; on 2 cores that takes a little from the load being measured.
A probe can also be slow because the prober itself was not scheduled: `late_max_us` is the worst
delay between a probe's planned and actual start, the prober's own lag, for judging that. And a
busy 2-core machine delays any process's wake-up: `--serve` runs a bare aiohttp server on uvloop
with nothing else on its loop, the same stack as the gateway's probes, so probing it at the same
time of the same load tells the machine's share of the probe times from the gateway's.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository: bench.lib, tests.support

from bench.lib.report import percentiles
from tests.support.processes import Process, free_port

perf_counter = time.perf_counter
THRESHOLDS_MS = (1, 5, 20, 100)


def probe(port: int, seconds: float, interval: float = 0.001, host: str = "127.0.0.1",
          path: str = "/liveness") -> dict:  # fmt: skip
    """Ask `path` every `interval` for `seconds`, serially, on one keep-alive connection; return stats."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    times: list[float] = []
    late_max = 0.0
    failures = 0
    sock = None
    buf = b""
    started = perf_counter()
    due = started
    end = started + seconds
    while True:
        now = perf_counter()
        if now >= end:
            break
        if due > now:
            time.sleep(due - now)
            now = perf_counter()
        late_max = max(late_max, now - due)
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = b""
            t0 = perf_counter()
            sock.sendall(request)
            buf = read_response(sock, buf)
            times.append(perf_counter() - t0)
        except OSError:
            failures += 1
            if sock is not None:
                sock.close()
            sock = None
            time.sleep(0.01)
        # The next probe is due one interval after this one was due; a late probe does not make the
        # following ones hurry to catch up (that would measure the prober's backlog, not the loop).
        due = max(due + interval, perf_counter())
    if sock is not None:
        sock.close()
    stats = percentiles(times) or {"n": 0}
    out = {
        "probes": stats.pop("n"),
        "seconds": perf_counter() - started,
        "interval_ms": interval * 1e3,
        "failures": failures,
        "late_max_us": late_max * 1e6,
        **stats,
    }
    for ms in THRESHOLDS_MS:
        out[f"over_{ms}ms"] = sum(t > ms / 1e3 for t in times)
    return out


def read_response(sock: socket.socket, buf: bytes) -> bytes:
    """Read one HTTP/1.1 response with a Content-Length body; return what was read past it."""
    while True:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            length = 0
            for line in buf[:head_end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            stop = head_end + 4 + length
            if len(buf) >= stop:
                if not buf.startswith(b"HTTP/1.1 200"):
                    raise ConnectionError(f"probe answered {buf[:40]!r}")
                return buf[stop:]
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk


class LagSampler:
    """`probe()` in a process of its own (so the caller's work does not delay the probes)."""

    def __init__(self, port: int, seconds: float, interval: float = 0.001, host: str = "127.0.0.1"):
        self.argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            str(port),
            str(seconds),
            str(interval),
            host,
        ]
        self.seconds = seconds
        self.proc: subprocess.Popen | None = None

    def start(self) -> LagSampler:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    def result(self) -> dict:
        out, err = self.proc.communicate(timeout=self.seconds + 60)
        for line in out.splitlines():
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"lag sampler failed ({self.proc.returncode}): {err[-2000:]}")


class ControlServer(Process):
    """`lag.py --serve` on a free port: the control to probe beside the gateway."""

    def __init__(self):
        self.port = free_port()
        super().__init__([sys.executable, str(Path(__file__).resolve()), "--serve", str(self.port)])

    def start(self) -> ControlServer:
        super().start()
        self.wait_for_line("serving /liveness")
        return self


def serve(port: int) -> None:
    """A bare aiohttp `/liveness` on uvloop, nothing else on its loop: the control for `probe()`."""
    import asyncio

    import uvloop
    from aiohttp import web

    async def liveness(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/liveness", liveness)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print(f"serving /liveness on 127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


def main() -> None:
    if sys.argv[1] == "--serve":
        serve(int(sys.argv[2]))
        return
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.001
    host = sys.argv[4] if len(sys.argv) > 4 else "127.0.0.1"
    print(json.dumps(probe(port, seconds, interval, host)), flush=True)


if __name__ == "__main__":
    main()
