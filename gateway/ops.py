"""The operations port: Prometheus metrics and health probes, over HTTP, never on the data port.

- `/liveness`: the event loop answers. Restarting the container is the only cure for a no here.
- `/startup`: the listener is bound and, when a store is configured, it answered once.
- `/readiness`: 503 while draining, at the connection limit, or when the upstream cannot be dialled.
- `/metrics`: prometheus-client's own exposition of the gateway's registry.
- `POST /quitquitquit`: start a graceful shutdown; off by default and loopback clients only.
- `GET /batches/<bid>` (batches: gateway): a batch's status, state and pending jids, as JSON.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .config import Config
from .metrics import Metrics
from .server import Server
from .store import StoreError

log = logging.getLogger("gateway.ops")

UPSTREAM_CHECK_INTERVAL = 1.0  # seconds a dial result is reused, so probes cannot hammer the server


class Ops:
    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        server: Server,
        store_ready: Callable[[], Awaitable[bool]] | None,
        request_shutdown: Callable[[str], None],
        batch_view: Callable[[str], Awaitable[dict | None]] | None = None,
    ):
        self.config = config
        self.metrics = metrics
        self.server = server
        self.store_ready = store_ready
        self.request_shutdown = request_shutdown
        self.batch_view = batch_view  # batches: gateway
        self.started = False
        self._upstream_checked = 0.0
        self._upstream_ok = False
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/liveness", self.liveness)
        app.router.add_get("/startup", self.startup)
        app.router.add_get("/readiness", self.readiness)
        if self.config.http.quitquitquit:
            app.router.add_post("/quitquitquit", self.quitquitquit)
        if self.batch_view is not None:
            app.router.add_get("/batches/{bid}", self.batch)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        listen = self.config.http.listen
        await web.TCPSite(self._runner, listen.host, listen.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def metrics_page(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def batch(self, request: web.Request) -> web.Response:
        """batches: gateway: one batch as the ledger has it (docs/engine.md)."""
        assert self.batch_view is not None
        bid = request.match_info["bid"]
        try:
            view = await self.batch_view(bid)
        except StoreError as exc:
            return web.json_response({"error": f"the batch ledger is unavailable: {exc}"}, status=503)
        if view is None:
            return web.json_response({"error": f"no such batch {bid}"}, status=404)
        return web.json_response(view)

    async def liveness(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def startup(self, request: web.Request) -> web.Response:
        if not self.started:
            if self.server.state == "starting":
                return web.Response(status=503, text="not listening yet\n")
            if self.store_ready is not None and not await self.store_ready():
                return web.Response(status=503, text="store not answering yet\n")
            self.started = True
        return web.Response(text="ok\n")

    async def readiness(self, request: web.Request) -> web.Response:
        if self.server.state != "serving":
            return web.Response(status=503, text=f"{self.server.state}\n")
        if self.server.at_capacity:
            return web.Response(status=503, text="at the connection limit\n")
        if not await self._upstream_reachable():
            return web.Response(status=503, text="upstream cannot be dialled\n")
        return web.Response(text="ok\n")

    async def _upstream_reachable(self) -> bool:
        if time.monotonic() - self._upstream_checked < UPSTREAM_CHECK_INTERVAL:
            return self._upstream_ok
        upstream = self.config.faktory
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(upstream.host, upstream.port),
                self.config.limits.upstream_connect_timeout,
            )
            writer.close()
            self._upstream_ok = True
        except (TimeoutError, OSError):
            self._upstream_ok = False
        self._upstream_checked = time.monotonic()
        return self._upstream_ok

    async def quitquitquit(self, request: web.Request) -> web.Response:
        peer = request.remote or ""
        try:
            loopback = ipaddress.ip_address(peer.split("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            return web.Response(status=403, text="only loopback clients may stop the gateway\n")
        self.request_shutdown("POST /quitquitquit")
        return web.Response(text="shutting down\n")
