"""The listener, the registry of sessions, and the drain.

State is explicit: `starting` until the listener is bound, `serving`, then `draining` after a
shutdown request, `stopped` at the end. Readiness is derived from it (ops.py).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import cast

from .config import Config
from .metrics import Metrics
from .pipeline import Rules
from .protocol import error_reply
from .session import Session, SessionContext

log = logging.getLogger("gateway.server")


def upstream_ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.faktory.tls:
        return None
    context = ssl.create_default_context(cafile=config.upstream_tls.ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not config.upstream_tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def client_ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.tls.cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    return context


class _Refuse(asyncio.Protocol):
    """Answers a connection the gateway cannot take with one Faktory-style error, then closes it."""

    def __init__(self, reply: bytes):
        self.reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's connection (uvloop's transports do not subclass asyncio.Transport).
        stream = cast(asyncio.Transport, transport)
        stream.write(self.reply)
        transport.close()


class Server:
    def __init__(self, config: Config, metrics: Metrics, rules: Rules):
        self.metrics = metrics
        self.rules = rules
        self.config = config  # also builds the sessions' context
        self.sessions: set[Session] = set()
        self.state = "starting"
        self.upstream_ssl = upstream_ssl_context(config)
        self._client_ssl = client_ssl_context(config)
        self._listener: asyncio.Server | None = None
        self._all_closed = asyncio.Event()
        self._sweeper: asyncio.Task | None = None

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """A reload (app.py) takes effect for sessions opened from now on."""
        self._config = config
        self._context = SessionContext(
            limits=config.limits,
            metrics=self.metrics,
            rules=self.rules,
            upstream=str(config.upstream),
            dial=self._dial,
            opened=self.session_opened,
            closed=self.session_closed,
        )

    async def _dial(self, protocol_factory) -> asyncio.Transport:
        upstream = self.config.faktory
        transport, _ = await asyncio.wait_for(
            asyncio.get_running_loop().create_connection(
                protocol_factory,
                upstream.host,
                upstream.port,
                ssl=self.upstream_ssl,
                server_hostname=upstream.host if self.upstream_ssl else None,
            ),
            self.config.limits.upstream_connect_timeout,
        )
        return transport

    async def start(self) -> None:
        listen = self.config.listen
        self._listener = await asyncio.get_running_loop().create_server(
            self._accept, listen.host, listen.port, ssl=self._client_ssl, backlog=1024, reuse_address=True
        )
        if self.config.limits.idle_timeout > 0:
            self._sweeper = asyncio.create_task(self._sweep_idle())
        self.state = "serving"

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("the server has not started")
        return self._listener.sockets[0].getsockname()[:2]

    def _accept(self) -> asyncio.Protocol:
        if len(self.sessions) >= self.config.limits.max_connections:
            self.metrics.connections_refused.labels("max_connections").inc()
            limit = self.config.limits.max_connections
            return _Refuse(
                error_reply("TOO_MANY_CONNECTIONS", f"the gateway's limit of {limit} connections is reached")
            )
        return Session(self._context)

    def session_opened(self, session: Session) -> None:
        self.sessions.add(session)
        self._all_closed.clear()
        self.metrics.connections.inc()
        self.metrics.connections_active.inc()

    def session_closed(self, session: Session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.metrics.connections_active.dec()
        if not self.sessions:
            self._all_closed.set()

    @property
    def at_capacity(self) -> bool:
        return len(self.sessions) >= self.config.limits.max_connections

    async def _sweep_idle(self) -> None:
        timeout = self.config.limits.idle_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 2))
            cutoff = time.monotonic() - timeout
            for session in [s for s in self.sessions if s.last_activity < cutoff and not s.busy]:
                log.info("closing idle connection", extra={"peer": session.peer, "code": "IDLE_TIMEOUT"})
                session.close()

    def begin_drain(self) -> None:
        """Readiness turns false; connections keep being accepted until stop_accepting()."""
        self.state = "draining"
        self.metrics.draining.set(1)

    async def drain(self, deadline: float) -> bool:
        """Stop accepting, let every session finish its in-flight commands, close idle ones.

        Returns True when every connection ended by itself before `deadline` (a monotonic time).
        """
        self.begin_drain()
        if self._listener is not None:
            self._listener.close()
        if self._sweeper:
            self._sweeper.cancel()
        for session in list(self.sessions):
            session.drain()
        left = deadline - time.monotonic()
        clean = True
        if self.sessions:
            try:
                await asyncio.wait_for(self._all_closed.wait(), max(left, 0))
            except TimeoutError:
                clean = False
                log.warning(
                    "drain deadline reached; closing connections", extra={"connections": len(self.sessions)}
                )
                for session in list(self.sessions):
                    session.close()
        self.state = "stopped"
        return clean
