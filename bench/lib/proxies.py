"""The reference proxies the benchmark runs beside the gateway, each in front of the same Faktory.

- `RelayProcess`: bench/relay.py, a bare uvloop relay: the floor for any Python proxy here.
- `HAProxyProcess`: Debian's haproxy in `mode tcp`, one thread: what a mature C proxy costs.

Both are `tests.support.processes.Process`es (started in their own session, output collected,
stopped by signalling their pid's group), listen on a free loopback port and have `.url`.
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from tests.support.processes import Process, free_port

RELAY = Path(__file__).resolve().parents[1] / "relay.py"


class LoopbackProxy(Process):
    """A proxy in front of Faktory, listening on `port` on loopback."""

    port: int

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"


class RelayProcess(LoopbackProxy):
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.port = free_port()
        super().__init__([sys.executable, str(RELAY), str(self.port), upstream_host, str(upstream_port)])

    def start(self) -> RelayProcess:
        super().start()
        self.wait_for_line("relay listening")
        return self


def haproxy_config(port: int, upstream_host: str, upstream_port: int) -> str:
    """A plain TCP forwarder: one thread, no logging, no health checks, no stickiness.

    The client and server timeouts only have to outlast FETCH's 2 s wait on an empty queue and the
    gaps between windows; a minute is far more than either.
    """
    return f"""\
global
    nbthread 1
    maxconn 4000

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend bench
    bind 127.0.0.1:{port}
    default_backend faktory

backend faktory
    server faktory {upstream_host}:{upstream_port}
"""


class HAProxyProcess(LoopbackProxy):
    """Debian's haproxy in the foreground (`-db`: no daemon, no master-worker), one process, one thread."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="haproxy-")
        self.config = Path(self.dir) / "haproxy.cfg"
        self.config.write_text(haproxy_config(self.port, upstream_host, upstream_port))
        super().__init__([shutil.which("haproxy") or "haproxy", "-db", "-f", str(self.config)])

    @staticmethod
    def available() -> bool:
        return shutil.which("haproxy") is not None

    def start(self, timeout: float = 10.0) -> HAProxyProcess:
        super().start()
        deadline = time.monotonic() + timeout
        while True:  # haproxy prints nothing when it is ready: wait until the port accepts
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited ({self.proc.returncode}):\n" + self.text())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("haproxy did not listen:\n" + self.text()) from None
                time.sleep(0.05)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
