"""The process: builds the parts from the configuration, runs them, and shuts them down.

Exit codes: 0 after a clean drain (or any SIGTERM with shutdown.exit_zero_on_sigterm), 1 when the
gateway could not start, 2 for a configuration error, 3 when the drain hit shutdown.max_delay and
connections had to be cut, 130 when a second signal cut the drain short.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from . import __version__
from .batches.engine import Engine
from .batches.engine.callbacks import Callbacks
from .batches.fence import TIMING
from .batches.guard import BatchGuard
from .batches.settings import RuleSettings
from .config import Batches, Config, ConfigError, Invocation, reload_policy
from .metrics import Metrics
from .ops import Ops
from .producer import Producer
from .server import Server, upstream_ssl_context
from .store import BatchStore
from .store.memory import MemoryStore
from .urls import redact_url

log = logging.getLogger("gateway")

# A callback push waits this long for the server (the fence's own bound on one command's handling).
PRODUCER_TIMEOUT = TIMING.server_bound
EXIT_OK, EXIT_START_FAILED, EXIT_CONFIG, EXIT_DRAIN_CUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class Gateway:
    def __init__(self, config: Config, invocation: Invocation):
        self.config = config
        self.invocation = invocation
        self.metrics = Metrics()
        self.store = open_store(config)
        self.engine = open_engine(config, self.store, self.metrics)
        self.guard = BatchGuard(self.store, RuleSettings.of(config), self.metrics, engine=self.engine)
        self.server = Server(config, self.metrics, self.guard)
        self.ops = Ops(
            config,
            self.metrics,
            self.server,
            self.store.ping,
            self.request_shutdown,
            self.engine.view if self.engine is not None else None,
        )
        self._shutdown = asyncio.Event()
        self._shutdown_reason = ""
        self._signals = 0

    def request_shutdown(self, reason: str) -> None:
        self._shutdown_reason = reason
        self._shutdown.set()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting at once", extra={"signal": signal.Signals(signum).name})
            os._exit(EXIT_INTERRUPTED)
        self.request_shutdown(signal.Signals(signum).name)

    def _on_reload(self) -> None:
        try:
            config = reload_policy(self.config, self.invocation, dict(os.environ))
        except ConfigError as exc:
            log.error("reload refused; the running settings stay", extra={"error": str(exc)})
            return
        self.apply(config)
        log.info("configuration reloaded", extra={"mode": config.mode, "unknown_batch": config.unknown_batch})

    def apply(self, config: Config) -> None:
        self.config = config
        self.server.config = config
        self.guard.reconfigure(RuleSettings.of(config))
        self.ops.config = config

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            await self.server.start()
            await self.ops.start()
        except OSError as exc:
            log.error("cannot start", extra={"error": str(exc)})
            return EXIT_START_FAILED
        self.guard.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        host, port = self.server.address
        if isinstance(self.store, MemoryStore):
            log.warning(
                "no redis configured: batch state lives in this process only; run a single gateway "
                "per Faktory server, or set redis to share state between gateways"
                + ("; with batches: gateway the batches are lost when it stops" if self.engine else "")
            )
        log.info(
            f"gateway listening on {host}:{port}",
            extra={"version": __version__, "settings": self.config.describe()},
        )
        await self._shutdown.wait()
        return await self._drain()

    async def _drain(self) -> int:
        shutdown = self.config.shutdown
        started = time.monotonic()
        log.info(
            "shutting down", extra={"reason": self._shutdown_reason, "connections": len(self.server.sessions)}
        )
        self.server.begin_drain()
        await asyncio.sleep(shutdown.min_delay)
        clean = await self.server.drain(started + shutdown.max_delay)
        await self.ops.stop()
        await self.guard.close()
        await self.store.close()
        log.info("stopped", extra={"clean": clean, "seconds": round(time.monotonic() - started, 3)})
        if clean or shutdown.exit_zero_on_sigterm:
            return EXIT_OK
        return EXIT_DRAIN_CUT


def open_store(config: Config) -> BatchStore:
    engine = config.batches == Batches.GATEWAY
    if not config.redis:
        return MemoryStore(config.committed_retention, config.batch_retention, engine=engine)
    from .store.redis import RedisStore  # imported only when used: redis-py takes a while to load

    log.info("batch store: redis", extra={"url": redact_url(config.redis), "prefix": config.redis_key_prefix})
    return RedisStore(
        config.redis,
        config.redis_key_prefix,
        config.committed_retention,
        config.batch_retention,
        engine=engine,
    )


def open_engine(config: Config, store: BatchStore, metrics: Metrics) -> Engine | None:
    """batches: gateway: the parts that push callbacks, on a connection of the gateway's own."""
    if config.batches != Batches.GATEWAY:
        return None
    producer = Producer(config.faktory, upstream_ssl_context(config), PRODUCER_TIMEOUT)
    return Engine(store, Callbacks(store, producer, metrics, TIMING, config.batch_stall_after))
