"""One client connection and the upstream connection that serves it.

The session is the only place where bytes move. It frames what the client sends, asks the batch
guard about the few commands that need it, forwards everything else as the same bytes, and sends
replies back in the order of the commands:

- `slots` holds one entry per client command that expects a reply, in command order. A slot is
  filled by the server's reply, by the guard's refusal, or by a reply handler that finishes later;
  `_flush` writes filled slots from the head only, so a refusal or a slow handler never overtakes
  an earlier command's reply (I5, I6).
- `waiting` holds one entry per line sent upstream that expects a reply, in send order: the slot to
  fill and an optional handler that sees the reply first.
- While the guard decides a command asynchronously (a store round trip), later commands wait in
  `backlog` so that they reach the server after it, as the client sent them.

Back-pressure is explicit: the client's reads pause while the upstream's write buffer is full, while
too many commands are in flight, and before the upstream is dialled; the upstream's reads pause
while the client's write buffer is full.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from .decisions import Forward, ReplyHandler, Respond, Ticket
from .metrics import verb_label
from .policy import Malformed, decode
from .protocol import (
    MINUS,
    Command,
    CommandReader,
    FrameTooLarge,
    ProtocolError,
    Reply,
    ReplyReader,
    error_reply,
)

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("gateway.session")
perf_counter = time.perf_counter
LINGER_TIMEOUT = 10.0  # seconds a closed session keeps its upstream for owed lease releases
# SO_LINGER on, 0 s: closing the socket resets the connection and discards unsent bytes, also
# when the process is killed. Set on upstream connections that carry admitted batch commands, so
# that a command whose lease is gone cannot still be delivered after its batch was committed.
RESET_ON_CLOSE = struct.pack("ii", 1, 0)


class _Owed:
    """A line sent upstream that expects a reply: the client's slot to fill (None for the gateway's
    own question, answered through `future`), the handler that sees the reply first, and the
    admission ticket the reply ends."""

    __slots__ = ("future", "linger", "on_reply", "slot", "ticket")

    def __init__(self, slot, on_reply=None, ticket=None, linger=False, future=None):
        self.slot = slot
        self.on_reply = on_reply
        self.ticket = ticket
        self.linger = linger
        self.future = future


class _Slot:
    """A client command waiting for its reply."""

    __slots__ = ("data", "handler_pending", "received", "result", "sent", "upstream_time", "verb")

    def __init__(self, verb: str | None, received: float):
        self.verb = verb
        self.data: bytes | None = None
        self.result = "ok"
        self.received = received
        self.sent = received
        self.upstream_time = 0.0
        self.handler_pending = False


class _Upstream(asyncio.Protocol):
    """The upstream side of a session: hands everything to the session."""

    __slots__ = ("session",)

    def __init__(self, session: Session):
        self.session = session

    def data_received(self, data: bytes) -> None:
        self.session.upstream_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.session.pause_client("upstream-full")

    def resume_writing(self) -> None:
        self.session.resume_client("upstream-full")


class Session(asyncio.Protocol):
    def __init__(self, server: Server):
        self.server = server
        self.metrics = server.metrics
        self.hot = server.metrics.hot
        limits = server.config.limits
        self.max_pipeline = limits.max_pipeline
        self.commands = CommandReader(limits.max_line_bytes)
        self.replies = ReplyReader(max(limits.max_line_bytes, 64 * 2**20))
        self.slots: deque[_Slot] = deque()
        self.waiting: deque[_Owed] = deque()  # one per line sent upstream that expects a reply
        self._answered: asyncio.Future | None = None  # all_answered() waits on it
        self.backlog: deque[tuple[Command, float]] | None = None
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.peer = "?"
        self.wid: str | None = None
        self.hello_seen = False
        self.upstream_closed = False
        self.closed = False
        self.draining = False
        self.last_activity = time.monotonic()
        self._pauses: set[str] = set()
        self._early = bytearray()
        self._tasks: set[asyncio.Task] = set()
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._resets_on_close = False
        self._fetches_owed = 0  # FETCHes sent and unanswered: the server may hold each for seconds

    # ------------------------------------------------------------------------------------------
    # Client side

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.client = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.pause_client("dial")
        self.server.session_opened(self)
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(
            self.server.config.limits.handshake_timeout, self._handshake_expired
        )
        self._spawn(self._dial())

    async def _dial(self) -> None:
        server = self.server
        upstream = server.config.upstream
        # The server speaks first (`+HI`), possibly before create_connection returns here.
        greeting = _Slot(None, perf_counter())
        self.slots.append(greeting)
        self.waiting.append(_Owed(greeting))
        try:
            transport, _ = await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(
                    lambda: _Upstream(self),
                    upstream.host,
                    upstream.port,
                    ssl=server.upstream_ssl,
                    server_hostname=upstream.host if server.upstream_ssl else None,
                ),
                server.config.limits.upstream_connect_timeout,
            )
        except (TimeoutError, OSError) as exc:
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else exc.strerror or str(exc)
            self.metrics.upstream_dial_errors.inc()
            log.warning(
                "upstream dial failed", extra={"peer": self.peer, "upstream": str(upstream), "error": reason}
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
            early, self._early = bytes(self._early), b""
            self.data_received(early)
        self.resume_client("dial")

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:  # reads are paused until the dial ends, but a first read may beat it
            self._early += data
            return
        self.hot.bytes_received += len(data)
        try:
            commands = self.commands.feed(data)
        except FrameTooLarge:
            self.metrics.refusals.labels("LINE_TOO_LONG").inc()
            self.fail(
                error_reply("LINE_TOO_LONG", f"command longer than {self.commands.max_line} bytes; closing")
            )
            return
        self.last_activity = time.monotonic()
        now = perf_counter()
        for command in commands:
            self._on_command(command, now)

    def _on_command(self, command: Command, now: float) -> None:
        if self.backlog is not None:
            self.backlog.append((command, now))
            if len(self.slots) + len(self.backlog) >= self.max_pipeline:
                self.pause_client("pipeline")
            return
        if not self.hello_seen:
            self._on_first_line(command)
        decision = self.server.guard.decide(command, self)
        if inspect.isawaitable(decision):
            self.backlog = deque()
            self._spawn(self._decide_in_order(command, now, decision))
        else:
            self._apply(command, now, decision)

    def _on_first_line(self, command: Command) -> None:
        """The handshake line is relayed as it is; the gateway only notes the worker id."""
        self.hello_seen = True
        if self._handshake_timer:
            self._handshake_timer.cancel()
        if command.verb == b"HELLO":
            try:
                hello = decode(command.args)
            except Malformed:
                hello = None  # the server answers it; the gateway only has no wid
            wid = hello.get("wid") if isinstance(hello, dict) else None
            if isinstance(wid, str) and 0 < len(wid) <= 128 and wid.isprintable():
                self.wid = wid

    async def _decide_in_order(self, command: Command, received: float, decision: Awaitable) -> None:
        """Apply a slow decision, then everything that queued behind it, in order."""
        try:
            self._apply(command, received, await decision)
            while self.backlog and not self.closed:
                command, received = self.backlog.popleft()
                decision = self.server.guard.decide(command, self)
                if inspect.isawaitable(decision):
                    decision = await decision
                self._apply(command, received, decision)
        except Exception:
            log.exception(
                "internal error deciding a command; closing the connection", extra={"peer": self.peer}
            )
            self.close()
        finally:
            self.backlog = None
            if len(self.slots) < self.max_pipeline:
                self.resume_client("pipeline")

    def _apply(self, command: Command, received: float, decision: Forward | Respond | None) -> None:
        """Carry out the guard's decision; None means forward the command as it came."""
        if decision is None:
            self._forward(command, received, command.raw, None, None, False)
        elif isinstance(decision, Forward):
            self._forward(
                command, received, decision.data, decision.on_reply, decision.ticket, decision.linger
            )
        else:
            slot = _Slot(verb_label(command.verb), received)
            slot.data = decision.data
            slot.result = decision.result
            self.slots.append(slot)
            self._flush()

    def _forward(
        self,
        command: Command,
        received: float,
        data: bytes,
        on_reply: ReplyHandler | None,
        ticket: Ticket | None,
        linger: bool,
    ) -> None:
        if self.closed or self.upstream_closed:
            if ticket is not None:
                ticket.answered()  # never written: the admission ends here
            return
        if command.verb == b"END":  # the one command with no reply: the server just closes
            self.upstream.write(data)
            return
        slot = _Slot(verb_label(command.verb), received)
        if ticket is not None:
            if not ticket.writable():  # the lease's local deadline passed: it must not be sent
                slot.data = ticket.unwritable_reply()
                slot.result = "refused"
                self.slots.append(slot)
                self._flush()
                return
            if not self._resets_on_close:
                self._reset_on_close()
        slot.sent = perf_counter()
        self.slots.append(slot)
        self.waiting.append(_Owed(slot, on_reply, ticket, linger))
        if slot.verb == "FETCH":
            self._fetches_owed += 1
        self.upstream.write(data)
        if ticket is not None:
            ticket.written(self.abort_upstream)
        if len(self.slots) >= self.max_pipeline:
            self.pause_client("pipeline")

    def _reset_on_close(self) -> None:
        self._resets_on_close = True
        sock = self.upstream.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)

    def abort_upstream(self) -> None:
        """The fence lost a lease this connection carries a command of: reset the upstream (the
        command must not reach the server late) and close the client, which sees a broken
        connection, never a made-up reply."""
        if self.upstream is not None and not self.upstream_closed:
            self._reset_on_close()
            self.upstream.abort()
        self.close()

    def waits_on_server(self) -> bool:
        return self._fetches_owed > 0

    async def all_answered(self) -> None:
        if not self.waiting:
            return
        if self._answered is None or self._answered.done():
            self._answered = asyncio.get_running_loop().create_future()
        await self._answered

    async def ask_upstream(self, line: bytes) -> Reply:
        """Send a command of the gateway's own on this client's upstream connection and return the reply.

        Used to verify a batch with `BATCH STATUS` without holding any credentials (I7): the
        connection is already authenticated by the client's own HELLO.
        """
        if self.closed or self.upstream_closed or self.upstream is None:
            raise ConnectionError("upstream connection is closed")
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(_Owed(None, future=future))
        self.upstream.write(line)
        return await future

    # ------------------------------------------------------------------------------------------
    # Upstream side

    def upstream_data(self, data: bytes) -> None:
        try:
            replies = self.replies.feed(data)
        except ProtocolError as exc:
            self.metrics.protocol_errors.labels("upstream").inc()
            log.error(
                "upstream sent bytes that are not RESP; closing", extra={"peer": self.peer, "error": str(exc)}
            )
            self.close()
            return
        now = perf_counter()
        for reply in replies:
            if not self.waiting:
                # An error the server sends before closing (too many connections, shutdown in
                # progress): relayed in order, as it came.
                slot = _Slot(None, now)
                slot.data = reply.raw
                self.slots.append(slot)
                continue
            owed = self.waiting.popleft()
            slot, on_reply = owed.slot, owed.on_reply
            if owed.ticket is not None:
                owed.ticket.answered()
            if slot is None:
                if not owed.future.done():  # an answer to the gateway's own question
                    owed.future.set_result(reply)
                continue
            slot.upstream_time = now - slot.sent
            if slot.verb == "FETCH":
                self._fetches_owed -= 1
            if reply.kind == MINUS:
                slot.result = "error"
            if on_reply is None:
                slot.data = reply.raw
                continue
            outcome = on_reply(reply)
            if inspect.isawaitable(outcome):
                slot.handler_pending = True
                self._spawn(self._finish_reply(slot, outcome))
            else:
                slot.data = outcome
        if not self.waiting and self._answered is not None and not self._answered.done():
            self._answered.set_result(None)
        if self.closed:  # the client left; only owed lease releases kept the upstream open
            if not self._owes_linger():
                self.upstream.close()
            return
        self._flush()

    async def _finish_reply(self, slot: _Slot, outcome: Awaitable[bytes]) -> None:
        try:
            slot.data = await outcome
        except Exception:
            log.exception(
                "internal error handling a reply; closing the connection", extra={"peer": self.peer}
            )
            self.close()
            return
        slot.handler_pending = False
        self._flush()

    def upstream_lost(self, exc: Exception | None) -> None:
        self.upstream_closed = True
        # Commands still waiting will never be answered: the client must see the connection
        # close after the replies it did get, never a reply the server did not send (I6).
        for owed in self.waiting:
            if owed.future is not None:
                owed.future.cancel()
            if owed.ticket is not None:
                owed.ticket.lost()
        self.waiting.clear()
        if self._answered is not None:
            self._answered.cancel()
        if self.client is not None and not self.client.is_closing():
            self._flush()
            self._close_if_done()
        else:
            self.close()

    # ------------------------------------------------------------------------------------------
    # Writing to the client, in order

    def _flush(self) -> None:
        slots = self.slots
        if not slots or slots[0].data is None or self.closed:
            return
        now = perf_counter()
        command_done = self.metrics.command_done
        chunks = []
        while slots and slots[0].data is not None:
            slot = slots.popleft()
            chunks.append(slot.data)
            if slot.verb is not None:  # None: not the reply to a command
                elapsed = now - slot.received
                command_done(slot.verb, slot.result, elapsed, elapsed - slot.upstream_time)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.client.write(data)
        self.hot.bytes_sent += len(data)
        if "pipeline" in self._pauses and len(slots) < self.max_pipeline and self.backlog is None:
            self.resume_client("pipeline")
        if self.upstream_closed or self.draining:
            self._close_if_done()

    def _close_if_done(self) -> None:
        """After the upstream closed, or while draining: close once nothing more can be answered."""
        if self.draining and not self.upstream_closed:
            if not self.slots and self.backlog is None and not self.commands.buffered:
                self.close()
            return
        if not self.slots or not any(slot.handler_pending for slot in self.slots):
            self.close()

    # ------------------------------------------------------------------------------------------
    # Flow control and closing

    def pause_client(self, reason: str) -> None:
        if not self._pauses and self.client is not None and not self.closed:
            self.client.pause_reading()
        self._pauses.add(reason)

    def resume_client(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and not self.closed:
                self.client.resume_reading()

    def pause_writing(self) -> None:  # the client's write buffer is full
        if self.upstream is not None and not self.upstream_closed:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.upstream_closed:
            self.upstream.resume_reading()

    def _handshake_expired(self) -> None:
        if not self.hello_seen and not self.closed:
            self.metrics.refusals.labels("HANDSHAKE_TIMEOUT").inc()
            self.fail(error_reply("HANDSHAKE_TIMEOUT", "no HELLO in time; closing"))

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
        if self._handshake_timer:
            self._handshake_timer.cancel()
        if self.client is not None:
            self.client.close()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if self.upstream is not None and not self.upstream_closed:
            if self._owes_linger():
                # A reply that must be handled (a lease release) is owed: upstream_data closes the
                # upstream once it came; this timer resets it if it never comes.
                asyncio.get_running_loop().call_later(LINGER_TIMEOUT, self.upstream.abort)
            else:
                self.upstream.close()
        self.server.session_closed(self)

    def _owes_linger(self) -> bool:
        return any(owed.linger for owed in self.waiting)

    def _spawn(self, coroutine: Awaitable) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
