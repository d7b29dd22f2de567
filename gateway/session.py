"""One client connection and the upstream connection that serves it: the asyncio driver.

The ordering rules live in pipeline.py, which never touches a socket. The session moves bytes:
what the client sends goes to `Pipeline.on_client_data`, what the server sends to
`on_server_data`, and after each of them (and whenever the pipeline wakes it from a task) it
writes the pipeline's `server_out` upstream and `client_out` to the client, counts what was
answered (tally.py), then applies back-pressure and closes what is done, as the pipeline says.

Back-pressure is explicit: the client's reads pause while the upstream's write buffer is full, while
`max_pipeline` commands are in flight, and before the upstream is dialled; the upstream's reads
pause while the client's write buffer is full, except while a reply the gateway itself must see
is owed (an admitted batch command's, a commit's): a client that does not read must not keep a
lease alive, and so hold every commit of that batch (docs/fence.md). By the fence's barrier that
reply is the next one the server sends, so the extra buffering is about one read; a client whose
backlog still grows past `max_line_bytes` is closed.

The session knows nothing of the Server: it gets a `SessionContext` (limits, metrics, the guard,
how to dial the upstream, and the registry's open/close callbacks).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from . import tally
from .config import Limits
from .metrics import Metrics
from .pipeline import Pipeline, Rules, take
from .protocol import FrameTooLarge, ProtocolError, Reply, error_reply

log = logging.getLogger("gateway.session")
# How long a session whose client left keeps its upstream for replies the gateway must see (an
# admitted command's: its lease is released when it is answered; a commit's: the ledger records
# it). The server answers one command within the fence's SERVER_BOUND unless something is badly
# wrong; after this the upstream is reset, and the lease still counts the command for a while
# (fence.Ticket.lost).
LINGER_TIMEOUT = 120.0
# SO_LINGER on, 0 s: closing the socket resets the connection and discards unsent bytes, also
# when the process is killed. Set on upstream connections that carry admitted batch commands, so
# that a command whose lease is gone cannot still be delivered after its batch was committed.
RESET_ON_CLOSE = struct.pack("ii", 1, 0)


@dataclass
class SessionContext:
    """What a session needs from the gateway around it, and nothing more."""

    limits: Limits
    metrics: Metrics
    rules: Rules
    upstream: str  # the upstream's name, for logs and errors
    # Opens the upstream connection with a protocol from the factory (timeouts included);
    # raises TimeoutError or OSError.
    dial: Callable[[Callable[[], asyncio.Protocol]], Awaitable[asyncio.Transport]]
    opened: Callable[[Session], None]
    closed: Callable[[Session], None]


class _Upstream(asyncio.Protocol):
    """The upstream side of a session: hands everything to the session."""

    __slots__ = ("data_received", "session")
    # The session's own method, bound as this protocol's: one call less per read.
    data_received: Callable[[bytes], None]  # type: ignore[assignment]

    def __init__(self, session: Session):
        self.session = session
        self.data_received = session.upstream_data

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.session.pause_client("upstream-full")

    def resume_writing(self) -> None:
        self.session.resume_client("upstream-full")


class Session(asyncio.Protocol):
    """The client side's protocol, and the guard's view of the client (decisions.Client)."""

    def __init__(self, context: SessionContext):
        self.context = context
        self.metrics = context.metrics
        self.hot = context.metrics.hot
        limits = context.limits
        self.max_line = limits.max_line_bytes
        self.pipeline = Pipeline(
            context.rules,
            self,
            max_line=limits.max_line_bytes,
            max_bulk=max(limits.max_line_bytes, 64 * 2**20),
            max_pipeline=limits.max_pipeline,
            spawn=self._spawn,
            wake=self._pump,
            abort=self.abort_upstream,
            fail=self.close,
        )
        self.client: asyncio.Transport  # set by connection_made, which asyncio calls first
        self.upstream: asyncio.Transport | None = None
        self.peer = "?"
        self.wid: str | None = None  # what the client's HELLO said (the rules note it)
        self.closed = False
        self.draining = False
        self.last_activity = time.monotonic()
        self._pauses: set[str] = set()
        self._early = bytearray()
        self._tasks: set[asyncio.Task] = set()
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._resets_on_close = False
        self._client_full = False  # the client's write buffer is over its high-water mark
        self._upstream_paused = False  # we paused the upstream's reads (the client is full)
        self.backlog_limit = limits.max_line_bytes

    # ------------------------------------------------------------------------------------------
    # decisions.Client (with `wid` and `peer`)

    async def ask_upstream(self, line: bytes) -> Reply:
        """Send a command of the gateway's own on this client's upstream connection and return the reply.

        Used to verify a batch with `BATCH STATUS` without holding any credentials (I7): the
        connection is already authenticated by the client's own HELLO.
        """
        if self.closed or not self.pipeline.upstream_open or self.upstream is None:
            raise ConnectionError("upstream connection is closed")
        future = asyncio.get_running_loop().create_future()

        def answer(reply: Reply) -> None:
            if not future.done():
                future.set_result(reply)

        def lost() -> None:
            future.cancel()

        self.pipeline.ask(line, answer, lost)
        self._pump()
        return await future

    # ------------------------------------------------------------------------------------------
    # Client side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's connection (uvloop's transports do not subclass asyncio.Transport).
        self.client = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.pause_client("dial")
        self.context.opened(self)
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(
            self.context.limits.handshake_timeout, self._handshake_expired
        )
        self._spawn(self._dial())

    async def _dial(self) -> None:
        # The pipeline owes the server's greeting from the start: it may be read before the dial returns.
        try:
            transport = await self.context.dial(lambda: _Upstream(self))
        except (TimeoutError, OSError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            upstream = self.context.upstream
            self.metrics.upstream_dial_errors.inc()
            log.warning(
                "upstream dial failed", extra={"peer": self.peer, "upstream": upstream, "error": reason}
            )
            self.fail(
                error_reply("UPSTREAM_UNAVAILABLE", f"cannot reach the Faktory server {upstream}: {reason}")
            )
            return
        if self.closed:
            transport.close()
            return
        self.upstream = transport
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            self.data_received(early)
        self.resume_client("dial")

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:  # reads are paused until the dial ends, but a first read may beat it
            self._early += data
            return
        self.hot.bytes_received += len(data)
        self.last_activity = time.monotonic()
        try:
            self.pipeline.on_client_data(data)
        except FrameTooLarge:
            self.metrics.refusals.labels("LINE_TOO_LONG").inc()
            self.fail(error_reply("LINE_TOO_LONG", f"command longer than {self.max_line} bytes; closing"))
            return
        if self._handshake_timer is not None and self.pipeline.handshaken:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._pump()

    def _pump(self) -> None:
        """Write what the pipeline has for either side, then apply back-pressure and closing."""
        pipeline = self.pipeline
        out = pipeline.server_out
        if out:
            data = take(out)
            upstream = self.upstream
            if upstream is not None and pipeline.upstream_open:
                if pipeline.resets_on_close and not self._resets_on_close:
                    self._reset_on_close(upstream)  # before the first ticketed command is written
                upstream.write(data)
                if self._upstream_paused and pipeline.must_read_server():
                    self._resume_upstream()  # an admitted command's reply must be read, whatever the client does
        out = pipeline.client_out
        if out:
            data = take(out)
            if not self.closed:
                self.client.write(data)
                self.hot.bytes_sent += len(data)
            if pipeline.done:  # counted after the write: metrics stay off the reply's path
                done, at = pipeline.take_done()
                tally.count(done, at, self.metrics.command_done)
        if pipeline.backlogged():
            self.pause_client("pipeline")
        elif "pipeline" in self._pauses and pipeline.may_take_more():
            self.resume_client("pipeline")
        if self.draining or not pipeline.upstream_open:
            self._close_if_done()

    def _reset_on_close(self, upstream: asyncio.Transport) -> None:
        self._resets_on_close = True
        sock = upstream.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)

    def abort_upstream(self) -> None:
        """The fence lost a lease this connection carries a command of: reset the upstream (the
        command must not reach the server late) and close the client, which sees a broken
        connection, never a made-up reply."""
        if self.upstream is not None and self.pipeline.upstream_open:
            self._reset_on_close(self.upstream)
            self.upstream.abort()
        self.close()

    # ------------------------------------------------------------------------------------------
    # Upstream side

    def upstream_data(self, data: bytes) -> None:
        try:
            self.pipeline.on_server_data(data)
        except ProtocolError as exc:
            self.metrics.protocol_errors.labels("upstream").inc()
            log.error(
                "upstream sent bytes that are not RESP; closing", extra={"peer": self.peer, "error": str(exc)}
            )
            self.close()
            return
        if self.closed:  # the client left; only owed lease releases kept the upstream open
            if self.upstream is not None and not self.pipeline.must_read_server():
                self.upstream.close()
            return
        self._pump()
        if self._client_full and not self.closed:
            if self.client.get_write_buffer_size() > self.backlog_limit:
                log.warning("client does not read its replies; closing", extra={"peer": self.peer})
                self.close()  # the upstream stays until what the gateway must see is answered
            else:
                self._pause_upstream_if_free()

    def upstream_lost(self, exc: Exception | None) -> None:
        self.pipeline.upstream_lost()
        if not self.client.is_closing():
            self._pump()
            self._close_if_done()
        else:
            self.close()

    def _close_if_done(self) -> None:
        """After the upstream closed, or while draining: close once the pipeline says so."""
        if not self.closed and self.pipeline.may_close(self.draining):
            self.close()

    # ------------------------------------------------------------------------------------------
    # Flow control and closing

    def pause_client(self, reason: str) -> None:
        if not self._pauses and not self.closed:
            self.client.pause_reading()
        self._pauses.add(reason)

    def resume_client(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and not self.closed:
                self.client.resume_reading()

    def pause_writing(self) -> None:  # the client's write buffer is full
        self._client_full = True
        self._pause_upstream_if_free()

    def resume_writing(self) -> None:
        self._client_full = False
        self._resume_upstream()

    def _pause_upstream_if_free(self) -> None:
        """Stop reading the server for a client that does not read, unless a reply the gateway
        must see is owed (an admitted command's lease ends only when its reply is read)."""
        if self._upstream_paused or self.upstream is None or not self.pipeline.upstream_open:
            return
        if not self.pipeline.must_read_server():
            self.upstream.pause_reading()
            self._upstream_paused = True

    def _resume_upstream(self) -> None:
        if self._upstream_paused:
            self._upstream_paused = False
            if self.upstream is not None and self.pipeline.upstream_open:
                self.upstream.resume_reading()

    def _handshake_expired(self) -> None:
        if not self.pipeline.handshaken and not self.closed:
            self.metrics.refusals.labels("HANDSHAKE_TIMEOUT").inc()
            self.fail(error_reply("HANDSHAKE_TIMEOUT", "no HELLO in time; closing"))

    @property
    def busy(self) -> bool:
        """Commands are in flight (the idle sweep leaves the connection alone)."""
        return self.pipeline.busy

    def fail(self, reply: bytes) -> None:
        """Send the gateway's own last word, after any replies still owed, and close."""
        if self.closed:
            return
        self.client.write(reply)
        self.close()

    def drain(self) -> None:
        """Finish the commands in flight, then close (graceful shutdown)."""
        self.draining = True
        self._close_if_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pipeline.close()
        if self._handshake_timer:
            self._handshake_timer.cancel()
        self.client.close()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if self.upstream is not None and self.pipeline.upstream_open:
            if self.pipeline.must_read_server():
                # A reply that must be handled (a lease release) is owed: upstream_data closes the
                # upstream once it came; this timer resets it if it never comes.
                self._resume_upstream()
                asyncio.get_running_loop().call_later(LINGER_TIMEOUT, self.upstream.abort)
            else:
                self.upstream.close()
        self.context.closed(self)

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
