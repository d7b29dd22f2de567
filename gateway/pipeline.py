"""Reply ordering for one client connection, without sockets: commands in, bytes out.

`Session` (session.py) is the asyncio driver, as uvicorn's protocols are over h11: it feeds what
it reads to `on_client_data` and `on_server_data`, writes `server_out` and `client_out`, runs the
coroutines the pipeline hands to `spawn`, and asks a few questions (`backlogged`,
`must_read_server`, `may_close`). Nothing here touches a socket, so every ordering rule can be
replayed in unit tests (tests/unit/test_pipeline.py).

This is the command side; the reply side, the two queues that keep the order (`slots`: what the
client is owed; `waiting`: what the server owes), is `ReplyOrder` (order.py).

The command side is in one `Phase`: HANDSHAKE until the first line; READY while decisions are
synchronous; DECIDING while a `Later` decision is worked out (later commands are `held`, in order,
and decided when it resolved); CLOSED once the client is gone. A `Later` with a barrier starts only
once nothing sent upstream is unanswered (the commit fence's barrier).

**The fast lane.** In READY, a chunk of whole lines is read once (chunks.verbs_of) and the rules
route it (`route`): a chunk no rule needs goes upstream unchanged as one write and one `Run` owes
its replies: no Command, Slot or Reply object per command; a one-line batch PUSH that the fence
admits locally does too, its ticket ended by the reply (order.py relays a Run's replies as framed). Any other chunk goes
through the full path, command by command, in order.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from .chunks import FULL_PATH_VERBS, verbs_of
from .decisions import (
    FULL_PATH,
    Admitted,
    Client,
    Decided,
    Decision,
    Forward,
    Later,
    ReplyHandler,
    Route,
    Settled,
    Ticket,
)
from .entries import Owed, Question, Run, Slot
from .metrics import verb_label
from .order import ReplyOrder
from .protocol import Command, CommandReader, Reply

log = logging.getLogger("gateway.session")
perf_counter = time.perf_counter


def take(out: list[bytes]) -> bytes:
    """Everything queued in `out`, as one bytes object (no copy for one chunk), emptying it."""
    if not out:
        return b""
    data = out[0] if len(out) == 1 else b"".join(out)
    out.clear()
    return data


class Phase(enum.Enum):
    HANDSHAKE = "handshake"  # the first line (HELLO) not seen yet
    READY = "ready"  # decisions are synchronous: the fast lane is open
    DECIDING = "deciding"  # a decision is worked out: later commands are held, in order
    CLOSED = "closed"  # the client is gone: nothing more is written to it


# The members as module constants: an Enum attribute lookup costs more than the rest of a test.
HANDSHAKE, READY, DECIDING, CLOSED = Phase.HANDSHAKE, Phase.READY, Phase.DECIDING, Phase.CLOSED


class Rules(Protocol):
    """What the pipeline asks of the batch rules (batches.guard.BatchGuard). `quiet`: nothing
    is unanswered upstream on this connection."""

    def decide(self, command: Command, client: Client, quiet: bool) -> Decision: ...
    def route(self, verbs: list[bytes], chunk: bytes, client: Client, quiet: bool) -> Route: ...
    def fetch_reply_handler(self, client: Client) -> ReplyHandler: ...
    def fetch_reply_needs_rules(self, data: bytes) -> bool: ...


class Pipeline:
    """See the module docstring. `spawn` runs a coroutine (the driver's task), `wake` tells the
    driver that output is ready outside an on_* call, `abort` resets the upstream (the fence's
    abort), `fail` closes the connection after an internal error."""

    def __init__(
        self,
        rules: Rules,
        client: Client,
        *,
        max_line: int,
        max_bulk: int,
        max_pipeline: int,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        wake: Callable[[], None],
        abort: Callable[[], None],
        fail: Callable[[], None],
    ):
        self.rules = rules
        self.client = client
        self.max_bulk = max_bulk
        self.max_line = max_line
        self.max_pipeline = max_pipeline
        self.spawn = spawn
        self.wake = wake
        self.abort = abort
        self.fail = fail
        self.phase = HANDSHAKE
        self.commands = CommandReader(max_line)
        self.held: deque[tuple[Command, float]] = deque()  # while DECIDING
        # The reply side: the two queues, the client's output, the server's replies framed.
        self.order = order = ReplyOrder(rules, client, max_bulk, spawn, wake, fail)
        self.slots, self.waiting = order.slots, order.waiting
        # What is to be written to either side, in order (the driver takes it: `take`), and
        # whether SO_LINGER 0 must be set before the next write upstream (a ticketed command
        # went upstream: closing must reset the connection, for the fence).
        self.server_out: list[bytes] = []
        self.client_out = order.client_out
        self.resets_on_close = False
        # The driver's calls on the reply side, as they are.
        self.on_server_data = order.on_server_data
        self.upstream_lost = order.upstream_lost
        self.take_done = order.take_done
        self.must_read_server = order.must_read_server
        # The server speaks first (`+HI`), possibly before the driver's dial returned.
        greeting = Slot(None, perf_counter())
        self.slots.append(greeting)
        self.waiting.append(Owed(greeting))

    @property
    def upstream_open(self) -> bool:
        return self.order.upstream_open

    @property
    def done(self) -> list[Slot | Run]:
        return self.order.done

    # ------------------------------------------------------------------------------------------
    # Client commands

    def on_client_data(self, data: bytes) -> None:
        """Raises FrameTooLarge for a line longer than `max_line`."""
        now = perf_counter()
        if self.phase is READY and self.upstream_open and (end := data.rfind(b"\n") + 1):
            if self.commands.buffered:  # the chunk starts with the rest of a line read before
                start = self.commands.take()
                data = start + data
                end += len(start)
            if end <= self.max_line:
                chunk = data if end == len(data) else data[:end]
                verbs = verbs_of(chunk)
                # END (no reply) and the lines the server crashes on never take the fast lane.
                route: Route = FULL_PATH
                if FULL_PATH_VERBS.isdisjoint(verbs):
                    route = self.rules.route(verbs, chunk, self.client, not self.waiting)
                if route is not FULL_PATH:
                    if end < len(data):
                        self.commands.feed(data[end:])  # no line end in it: only held (or too long)
                    self._routed(route, verbs, chunk, now)
                    return
        for command in self.commands.feed(data):
            self._on_command(command, now)

    def _routed(self, route: Route, verbs: list[bytes], chunk: bytes, now: float) -> None:
        if type(route) is Admitted:
            if route.ticket.writable():  # checked right before the write, as on the full path
                self._run(verbs, chunk, now, [route.ticket])
            else:  # its lease's deadline passed this very moment: not sent, decided afresh
                route.ticket.answered()
                self._on_command(Command.parse(chunk), now)
        elif type(route) is Decided:
            self._decided(route.command, now, route.decision)
        else:  # UNCHECKED
            self._run(verbs, chunk, now, None)

    def _run(self, verbs: list[bytes], chunk: bytes, now: float, tickets: list[Ticket] | None) -> None:
        """Forward a chunk as it came; one Run owes its replies."""
        run = Run(verbs, now, tickets)
        self.slots.append(run)
        self.waiting.append(run)
        self.order.in_flight += run.owed
        if tickets is not None:
            self.resets_on_close = True
        self.server_out.append(chunk)
        if tickets is not None:
            for ticket in tickets:
                ticket.written(self.abort)

    def _on_command(self, command: Command, now: float) -> None:
        phase = self.phase
        if phase is DECIDING:
            self.held.append((command, now))
            self.order.in_flight += 1
            return
        if phase is HANDSHAKE:
            self.phase = READY  # the handshake line is relayed as it is (the rules note its wid)
        self._decided(command, now, self.rules.decide(command, self.client, not self.waiting))

    def _decided(self, command: Command, now: float, decision: Decision) -> None:
        if type(decision) is Later:
            self.phase = DECIDING
            self.spawn(self._decide_in_order(command, now, decision))
        else:
            self._apply(command, now, decision)

    async def _decide_in_order(self, command: Command, received: float, later: Later) -> None:
        """Carry out a decision that needs working out, then everything held behind it, in order."""
        try:
            self._apply(command, received, await self._work_out(later))
            self.wake()
            held = self.held
            while held and self.phase is DECIDING:
                command, received = held.popleft()
                self.order.in_flight -= 1
                decision = self.rules.decide(command, self.client, not self.waiting)
                if type(decision) is Later:
                    decision = await self._work_out(decision)
                self._apply(command, received, decision)
                self.wake()
        except Exception:
            log.exception(
                "internal error deciding a command; closing the connection", extra={"peer": self.client.peer}
            )
            self.fail()
        finally:
            if self.phase is DECIDING:
                self.phase = READY
            self.wake()

    async def _work_out(self, later: Later) -> Settled:
        if later.barrier and self.waiting:
            # The fence's barrier: nothing sent upstream before this command may be unanswered.
            # If the upstream is lost first, the future is cancelled and so is this task.
            answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def done() -> None:
                if not answered.done():
                    answered.set_result(None)

            def lost() -> None:
                answered.cancel()

            self.order.when_answered(done, lost)
            await answered
        return await later.work()

    def _apply(self, command: Command, received: float, decision: Settled) -> None:
        """Carry out a decision; None means forward the command as it came."""
        if decision is None:
            self._forward(command, received, command.raw, None, None, False)
        elif type(decision) is Forward:
            self._forward(
                command, received, decision.data, decision.on_reply, decision.ticket, decision.linger
            )
        else:
            slot = Slot(verb_label(command.verb), received)
            slot.data = decision.data
            slot.result = decision.result
            self.slots.append(slot)
            self.order.in_flight += 1
            self.order.flush()

    def _forward(
        self,
        command: Command,
        received: float,
        data: bytes,
        on_reply: ReplyHandler | None,
        ticket: Ticket | None,
        linger: bool,
    ) -> None:
        if self.phase is CLOSED or not self.upstream_open:
            if ticket is not None:
                ticket.answered()  # never written: the admission ends here
            return
        if command.verb == b"END":  # the one command with no reply: the server just closes
            self.server_out.append(data)
            return
        slot = Slot(verb_label(command.verb), received)
        self.order.in_flight += 1
        if ticket is not None:
            # Checked right before the write: the driver writes server_out before it returns to
            # the event loop, with SO_LINGER set first (resets_on_close).
            if not ticket.writable():  # the lease's local deadline passed: it must not be sent
                slot.data = ticket.unwritable_reply()
                slot.result = "refused"
                self.slots.append(slot)
                self.order.flush()
                return
            self.resets_on_close = True
        slot.sent = perf_counter()
        self.slots.append(slot)
        self.waiting.append(Owed(slot, on_reply, ticket, linger))
        self.server_out.append(data)
        if ticket is not None:
            ticket.written(self.abort)

    def ask(self, line: bytes, answer: Callable[[Reply], None], lost: Callable[[], None]) -> None:
        """Send a command of the gateway's own; its reply goes to `answer`, not to the client."""
        self.waiting.append(Question(answer, lost))
        self.server_out.append(line)

    # ------------------------------------------------------------------------------------------
    # What the driver asks

    @property
    def handshaken(self) -> bool:
        return self.phase is not HANDSHAKE

    @property
    def busy(self) -> bool:
        """Commands are in flight (an idle sweep leaves the connection alone)."""
        return bool(self.slots)

    def backlogged(self) -> bool:
        """`max_pipeline` commands are in flight: the driver stops reading the client."""
        return self.order.in_flight >= self.max_pipeline

    def may_take_more(self) -> bool:
        """The driver may read the client again (not backlogged, no decision held back)."""
        return self.order.in_flight < self.max_pipeline and self.phase is not DECIDING

    def may_close(self, draining: bool) -> bool:
        """Draining: once nothing received is unanswered, nothing is held back, no line is half
        read. The upstream lost: once nothing more can be answered (no reply handler is working)."""
        if draining and self.upstream_open:
            return not self.slots and self.phase is not DECIDING and not self.commands.buffered
        return not self.slots or not self.order.handler_pending()

    def close(self) -> None:
        self.phase = CLOSED
        self.order.closed = True
