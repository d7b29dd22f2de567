"""Reply ordering for one client connection, without sockets: commands in, bytes out.

`Session` (session.py) is the asyncio driver, as uvicorn's protocols are over h11: it feeds what
it reads to `on_client_data` and `on_server_data`, writes what `to_server()` and `to_client()`
return, and runs the awaitables the pipeline hands to `spawn`. Nothing here touches a socket, so
every ordering rule can be replayed in unit tests (tests/unit/test_pipeline.py).

Two queues keep the order:

- `slots`, one entry per client command that expects a reply, in command order (`Slot`), or one
  per chunk of commands that took the fast lane (`Run`). Only the head is written: a refusal or a
  slow reply handler never overtakes an earlier command's reply (I5, I6).
- `waiting`, one entry per line sent upstream that expects a reply, in send order: `Owed` (fills
  a slot, after its reply handler), `Run` (its replies are relayed as framed, unread), or
  `Question` (the gateway's own command: the reply goes to the gateway, never the client).

The command side is in one `Phase`: HANDSHAKE until the first line; READY while decisions are
synchronous; DECIDING while one is awaited (later commands are `held`, in order, and decided when
it resolved); CLOSED once the client is gone.

**The fast lane.** In READY, a chunk of whole lines is scanned once with C-speed primitives (one
regex for the verbs, `in` for the guard's markers). If the guard says no command in it needs a
decision (`guard.unchecked`), the chunk goes upstream unchanged as one write and one `Run` owes
its replies: no Command, Slot or Reply object per command. Server replies owed to a Run are
framed by offsets only (`frame_end`) and relayed as received. A Run that holds a FETCH falls back
to the full path (`_demote`) as soon as the server's bytes may hold a job the guard must see. Any
other chunk goes through the full path, command by command, in order.
"""

from __future__ import annotations

import enum
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from .decisions import Client, Decision, Forward, ReplyHandler, Respond, Ticket
from .metrics import VERB_LABELS, verb_label
from .policy import Malformed, decode
from .protocol import COLON, MINUS, PLUS, Command, CommandReader, Reply, frame_end, reply_at
from .shield import BARE_VERBS

log = logging.getLogger("gateway.session")
perf_counter = time.perf_counter

# One match per whole line, capturing its verb exactly as Command.parse splits it (up to the first
# space, without the line end), except a line the server crashes on (one of shield.BARE_VERBS
# alone on its line), whose capture keeps its line end: FULL_PATH holds those, so such a chunk
# goes through decide(), which answers the line (the shield) instead of forwarding it. The
# capture is a lookahead, and the match then takes the whole line; verbs followed by a space
# (most lines) are tried first.
_BARE = b"|".join(sorted(BARE_VERBS))
_VERB = rb"[^ \r\n]*(?:\r(?!\n)[^ \r\n]*)*"  # up to a space or the line end; a lone \r is in the verb
LINE = re.compile(rb"(?=(%s(?= )|(?:%s)\r?\n|%s))[^\n]*\n" % (_VERB, _BARE, _VERB))
# Verbs (or, for the shield, whole lines) that never take the fast lane: END (the server closes),
# every QUEUE line and the bare lines the server crashes on (decide() answers them itself).
FULL_PATH = frozenset((b"END", b"QUEUE", *(verb + end for verb in BARE_VERBS for end in (b"\n", b"\r\n"))))


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
    DECIDING = "deciding"  # a decision is awaited: later commands are held, in order
    CLOSED = "closed"  # the client is gone: nothing more is written to it


# The members as module constants: an Enum attribute lookup costs more than the rest of a test.
HANDSHAKE, READY, DECIDING, CLOSED = Phase.HANDSHAKE, Phase.READY, Phase.DECIDING, Phase.CLOSED


class Rules(Protocol):
    """What the pipeline asks of the batch guard (guard.BatchGuard)."""

    def decide(self, command: Command, client: Client) -> Decision | Awaitable[Decision]: ...
    def unchecked(self, verbs: list[bytes], chunk: bytes, client: Client) -> bool: ...
    def admitted_push(self, verbs: list[bytes], chunk: bytes, client: Client) -> Ticket | None: ...
    def fetch_reply_handler(self, client: Client) -> ReplyHandler: ...
    def fetch_reply_needs_rules(self, data: bytes) -> bool: ...


class Slot:
    """A client command waiting for its reply (the full path). `verb` None: not a command's
    reply (the greeting, or an error the server sends unasked)."""

    __slots__ = ("data", "pending", "received", "result", "sent", "upstream_time", "verb")

    def __init__(self, verb: str | None, received: float):
        self.verb = verb
        self.data: bytes | None = None
        self.result = "ok"
        self.received = received
        self.sent = received
        self.upstream_time = 0.0
        self.pending = False  # a reply handler is still working on it


class Run:
    """A chunk of `owed` commands forwarded unread (the fast lane); `answered` replies came, and
    `data` holds those not written to the client yet. Both a slot and an owed entry. `tickets`:
    one per command, for a batch PUSH admitted in the fast lane (the reply ends its admission)."""

    __slots__ = (
        "answered", "data", "errors", "fetches", "owed", "received", "tickets", "upstream_time", "verbs",
        "written",
    )  # fmt: skip

    def __init__(self, verbs: list[bytes], received: float, tickets: list[Ticket] | None = None):
        self.verbs = verbs
        self.tickets = tickets
        self.owed = len(verbs)
        self.fetches = b"FETCH" in verbs
        self.answered = 0
        self.written = 0  # replies moved to the client's output
        self.data: list[bytes] = []
        self.errors: list[int] | None = None  # indexes of commands answered with an error
        self.received = received
        self.upstream_time = 0.0


class Owed:
    """A line sent upstream whose reply fills `slot`, seen first by `on_reply`, ending `ticket`."""

    __slots__ = ("linger", "on_reply", "slot", "ticket")

    def __init__(
        self,
        slot: Slot,
        on_reply: ReplyHandler | None = None,
        ticket: Ticket | None = None,
        linger: bool = False,
    ):
        self.slot = slot
        self.on_reply = on_reply
        self.ticket = ticket
        self.linger = linger


class Question:
    """A command of the gateway's own (`ask`): the reply goes to `answer`; `lost` if none comes."""

    __slots__ = ("answer", "lost")

    def __init__(self, answer: Callable[[Reply], None], lost: Callable[[], None]):
        self.answer = answer
        self.lost = lost


class Pipeline:
    """See the module docstring. `spawn` runs a coroutine (the driver's task), `wake` tells the
    driver that output is ready outside an on_* call, `abort` resets the upstream (the fence's
    abort), `fail` closes the connection after an internal error."""

    def __init__(
        self,
        guard: Rules,
        client: Client,
        *,
        max_line: int,
        max_bulk: int,
        command_done: Callable[[str, str, float, float], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        wake: Callable[[], None],
        abort: Callable[[], None],
        fail: Callable[[], None],
    ):
        self.guard = guard
        self.client = client
        self.max_bulk = max_bulk
        self.max_line = max_line
        self.command_done = command_done
        self.spawn = spawn
        self.wake = wake
        self.abort = abort
        self.fail = fail
        self.phase = HANDSHAKE
        self.upstream_open = True  # False once the upstream connection is lost
        self.wid: str | None = None
        self.commands = CommandReader(max_line)
        self.slots: deque[Slot | Run] = deque()
        self.waiting: deque[Owed | Run | Question] = deque()
        self.held: deque[tuple[Command, float]] | None = None  # made on the first DECIDING
        self.in_flight = 0  # client commands received and not yet answered to the client
        self.reset_on_close = False  # a ticketed command went upstream: close must reset (fence)
        # What is to be written to either side, in order (to_server() and to_client() take it);
        # the driver may test them for emptiness directly.
        self.server_out: list[bytes] = []
        self.client_out: list[bytes] = []
        self.done: list[Slot | Run] = []  # answered to client_out, not counted yet (count_done)
        self._done_at = 0.0
        self._tail = bytearray()  # an incomplete reply frame
        self._need = 0  # bytes the incomplete frame needs before it is worth framing again
        self._when_answered: list[tuple[Callable[[], None], Callable[[], None]]] = []
        # The server speaks first (`+HI`), possibly before the driver's dial returned.
        greeting = Slot(None, perf_counter())
        self.slots.append(greeting)
        self.waiting.append(Owed(greeting))

    # ------------------------------------------------------------------------------------------
    # Output

    def to_server(self) -> bytes:
        return take(self.server_out)

    def to_client(self) -> bytes:
        return take(self.client_out)

    # ------------------------------------------------------------------------------------------
    # Client commands

    def on_client_data(self, data: bytes) -> None:
        """Raises FrameTooLarge for a line longer than `max_line`."""
        now = perf_counter()
        if self.phase is READY and self.upstream_open and (end := data.rfind(b"\n") + 1):
            if self.commands._buffer:  # the chunk starts with the rest of a line read before
                start = self.commands.take()
                data = start + data
                end += len(start)
            if end <= self.max_line:
                chunk = data if end == len(data) else data[:end]
                if chunk.find(b"\n") == end - 1:  # one line, the common case: no regex
                    verb = chunk.partition(b" ")[0]
                    if verb[-1:] == b"\n":  # no space: the verb is the line without its end,
                        bare = verb[:-2] if verb[-2:] == b"\r\n" else verb[:-1]
                        if bare not in BARE_VERBS:  # unless the server crashes on it (LINE's rule)
                            verb = bare
                    verbs = [verb]
                else:
                    verbs = LINE.findall(chunk)
                # FULL_PATH holds the bare lines kept whole above; admitted_push takes only a PUSH with a payload.
                if FULL_PATH.isdisjoint(verbs) and self.guard.unchecked(verbs, chunk, self.client):
                    if end < len(data):
                        self.commands.feed(data[end:])  # no line end in it: only held (or too long)
                    run = Run(verbs, now)
                    self.slots.append(run)
                    self.waiting.append(run)
                    self.in_flight += run.owed
                    self.server_out.append(chunk)
                    return
                # A batch PUSH that this gateway's lease admits without asking anyone: the fast
                # lane too, its ticket ended by the reply (decide() would forward it unchanged).
                ticket = self.guard.admitted_push(verbs, chunk, self.client)
                if ticket is not None:
                    if not ticket.writable():  # checked right before the write, as on the full path
                        ticket.answered()  # not sent: decide() takes it from here
                    else:
                        if end < len(data):
                            self.commands.feed(data[end:])
                        run = Run(verbs, now, [ticket])
                        self.slots.append(run)
                        self.waiting.append(run)
                        self.in_flight += 1
                        self.reset_on_close = True
                        self.server_out.append(chunk)
                        ticket.written(self.abort)
                        return
        commands = self.commands.feed(data)
        for command in commands:
            self._on_command(command, now)

    def _on_command(self, command: Command, now: float) -> None:
        phase = self.phase
        if phase is DECIDING:
            self.held.append((command, now))
            self.in_flight += 1
            return
        if phase is HANDSHAKE:
            self._on_first_line(command)
        decision = self.guard.decide(command, self.client)
        if decision is None or type(decision) is Forward or type(decision) is Respond:
            self._apply(command, now, decision)
        else:
            self.phase = DECIDING
            if self.held is None:
                self.held = deque()
            self.spawn(self._decide_in_order(command, now, decision))

    def _on_first_line(self, command: Command) -> None:
        """The handshake line is relayed as it is; the gateway only notes the worker id."""
        self.phase = READY
        if command.verb == b"HELLO":
            try:
                hello = decode(command.args)
            except Malformed:
                hello = None  # the server answers it; the gateway only has no wid
            wid = hello.get("wid") if isinstance(hello, dict) else None
            if isinstance(wid, str) and 0 < len(wid) <= 128 and wid.isprintable():
                self.wid = wid

    async def _decide_in_order(self, command: Command, received: float, decision: Awaitable) -> None:
        """Apply a slow decision, then everything held behind it, in order."""
        try:
            self._apply(command, received, await decision)
            self.wake()
            held = self.held
            while held and self.phase is DECIDING:
                command, received = held.popleft()
                self.in_flight -= 1
                decision = self.guard.decide(command, self.client)
                if not (decision is None or type(decision) is Forward or type(decision) is Respond):
                    decision = await decision
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

    def _apply(self, command: Command, received: float, decision: Decision) -> None:
        """Carry out the guard's decision; None means forward the command as it came."""
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
            self.in_flight += 1
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
        if self.phase is CLOSED or not self.upstream_open:
            if ticket is not None:
                ticket.answered()  # never written: the admission ends here
            return
        if command.verb == b"END":  # the one command with no reply: the server just closes
            self.server_out.append(data)
            return
        slot = Slot(verb_label(command.verb), received)
        self.in_flight += 1
        if ticket is not None:
            # Checked right before the write: the driver writes to_server() before it returns
            # to the event loop, with SO_LINGER set first (reset_on_close).
            if not ticket.writable():  # the lease's local deadline passed: it must not be sent
                slot.data = ticket.unwritable_reply()
                slot.result = "refused"
                self.slots.append(slot)
                self._flush()
                return
            self.reset_on_close = True
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
    # Server replies

    def on_server_data(self, data: bytes) -> None:
        """Raises ProtocolError for bytes that are not RESP."""
        tail = self._tail
        if tail:
            tail += data
            if len(tail) < self._need:
                return
            data = bytes(tail)
            tail.clear()
        now = perf_counter()
        size = len(data)
        pos = 0
        waiting = self.waiting
        max_bulk = self.max_bulk
        while pos < size:
            head = waiting[0] if waiting else None
            if type(head) is Run:
                if head.fetches and self.guard.fetch_reply_needs_rules(data):
                    self._demote(head)
                    continue
                start = pos
                left = head.owed - head.answered
                while left:
                    kind = data[pos]
                    if kind == PLUS or kind == COLON:  # a line (frame_end's checks, inlined)
                        end = data.find(b"\r\n", pos) + 2
                        if end == 1:
                            break
                    else:
                        end = frame_end(data, pos, max_bulk)
                        if end > size:
                            break
                        if kind == MINUS:
                            if head.errors is None:
                                head.errors = []
                            head.errors.append(head.answered)
                    if head.tickets is not None:
                        head.tickets[head.answered].answered()
                    head.answered += 1
                    left -= 1
                    pos = end
                    if pos == size:
                        break
                if pos > start:
                    head.upstream_time = now - head.received
                    head.data.append(data if start == 0 and pos == size else data[start:pos])
                    if not left:
                        waiting.popleft()
                if left and pos < size:
                    break  # an incomplete frame: kept in the tail
            else:
                end = frame_end(data, pos, max_bulk)
                if end > size:
                    break
                self._on_reply(reply_at(data, pos, end), now)
                pos = end
        if pos < size:
            self._tail += data[pos:] if pos else data
            self._need = frame_end(self._tail, 0, max_bulk)
        if not waiting and self._when_answered:
            callbacks, self._when_answered = self._when_answered, []
            for answered, _ in callbacks:
                answered()
        self._flush()

    def _on_reply(self, reply: Reply, now: float) -> None:
        waiting = self.waiting
        if not waiting:
            # An error the server sends before closing (too many connections, shutdown in
            # progress): relayed in order, as it came.
            slot = Slot(None, now)
            slot.data = reply.raw
            self.slots.append(slot)
            return
        owed = waiting.popleft()
        if type(owed) is Question:
            owed.answer(reply)
            return
        if owed.ticket is not None:
            owed.ticket.answered()
        slot = owed.slot
        slot.upstream_time = now - slot.sent
        if reply.kind == MINUS:
            slot.result = "error"
        if owed.on_reply is None:
            slot.data = reply.raw
            return
        outcome = owed.on_reply(reply)
        if type(outcome) is bytes:
            slot.data = outcome
        else:
            slot.pending = True
            self.spawn(self._finish_reply(slot, outcome))

    async def _finish_reply(self, slot: Slot, outcome: Awaitable[bytes]) -> None:
        try:
            slot.data = await outcome
        except Exception:
            log.exception(
                "internal error handling a reply; closing the connection", extra={"peer": self.client.peer}
            )
            self.fail()
            return
        slot.pending = False
        self._flush()
        self.wake()

    def _demote(self, run: Run) -> None:
        """Back to the full path for the unanswered commands of `run` (the head of `waiting`): one
        slot each, right after it in the client order, and a FETCH's reply through the guard."""
        self.waiting.popleft()
        rest = run.verbs[run.answered : run.owed]
        run.owed = run.answered  # the run keeps what it already relayed
        index = self.slots.index(run)
        on_fetched = self.guard.fetch_reply_handler(self.client)
        owed = []
        tickets = run.tickets[run.answered :] if run.tickets is not None else [None] * len(rest)
        for offset, (verb, ticket) in enumerate(zip(rest, tickets, strict=True)):
            slot = Slot(verb_label(verb), run.received)
            self.slots.insert(index + 1 + offset, slot)
            owed.append(Owed(slot, on_fetched if verb == b"FETCH" else None, ticket, ticket is not None))
        self.waiting.extendleft(reversed(owed))

    def upstream_lost(self) -> None:
        """Commands still waiting will never be answered: the client must see the connection
        close after the replies it did get, never a reply the server did not send (I6)."""
        self.upstream_open = False
        waiting, self.waiting = self.waiting, deque()
        for owed in waiting:
            if type(owed) is Question:
                owed.lost()
            elif type(owed) is Owed and owed.ticket is not None:
                owed.ticket.lost()
            elif type(owed) is Run and owed.tickets is not None:
                for ticket in owed.tickets[owed.answered : owed.owed]:
                    ticket.lost()
        callbacks, self._when_answered = self._when_answered, []
        for _, lost in callbacks:
            lost()
        self._flush()

    # ------------------------------------------------------------------------------------------
    # Writing to the client, in order

    def _flush(self) -> None:
        """Move the replies at the head of `slots` to client_out, in order. What they answered is
        counted (metrics) by count_done(), which the driver calls after writing them."""
        if self.phase is CLOSED:
            return
        slots = self.slots
        out = self.client_out
        done = self.done
        while slots:
            head = slots[0]
            if type(head) is Run:
                if head.data:
                    out += head.data
                    head.data.clear()
                    self.in_flight -= head.answered - head.written
                    head.written = head.answered
                if head.answered < head.owed:
                    break
                slots.popleft()
                if head.owed:
                    done.append(head)
            else:
                if head.data is None:
                    break
                slots.popleft()
                out.append(head.data)
                if head.verb is not None:  # None: not the reply to a command
                    self.in_flight -= 1
                    done.append(head)
        if done and not self._done_at:
            self._done_at = perf_counter()

    def count_done(self) -> None:
        """Per-command metrics for the replies moved to client_out, once they were written."""
        done, self.done = self.done, []
        now, self._done_at = self._done_at, 0.0
        for entry in done:
            if type(entry) is Run:
                if entry.owed == 1:  # the common run: one command
                    elapsed = now - entry.received
                    verb = VERB_LABELS.get(entry.verbs[0], "other")
                    result = "ok" if entry.errors is None else "error"
                    self.command_done(verb, result, elapsed, elapsed - entry.upstream_time)
                else:
                    self._count_run(entry, now)
            else:
                elapsed = now - entry.received
                self.command_done(entry.verb, entry.result, elapsed, elapsed - entry.upstream_time)

    def _count_run(self, run: Run, now: float) -> None:
        elapsed = now - run.received
        added = elapsed - run.upstream_time
        errors = run.errors
        verbs = run.verbs if run.owed == len(run.verbs) else run.verbs[: run.owed]
        for index, verb in enumerate(verbs):
            result = "error" if errors is not None and index in errors else "ok"
            self.command_done(verb_label(verb), result, elapsed, added)

    # ------------------------------------------------------------------------------------------
    # What the driver and the guard ask

    def unanswered(self) -> bool:
        """Something sent upstream is not answered yet (the barrier of the commit fence)."""
        return bool(self.waiting)

    def when_all_answered(self, answered: Callable[[], None], lost: Callable[[], None]) -> bool:
        """Call `answered` once nothing is owed by the server, or `lost` if the upstream is lost
        first; False (and no call) if nothing is owed now."""
        if not self.waiting:
            return False
        self._when_answered.append((answered, lost))
        return True

    def owes_linger(self) -> bool:
        """A reply that must be handled (a lease release, a handler) is owed by the server."""
        return any(
            (type(owed) is Owed and owed.linger) or (type(owed) is Run and owed.tickets is not None)
            for owed in self.waiting
        )

    @property
    def handler_pending(self) -> bool:
        return any(type(slot) is Slot and slot.pending for slot in self.slots)

    @property
    def idle(self) -> bool:
        """Nothing received is unanswered, nothing is held back, no line is half read."""
        return not self.slots and self.phase is not DECIDING and not self.commands.buffered

    def close(self) -> None:
        self.phase = CLOSED
