"""The order of replies for one client connection, without sockets: what the server owes and what
the client is owed, in order (the pipeline's reply side; pipeline.py is its command side).

Two queues keep the order (their entries are in entries.py):

- `slots`, one entry per client command that expects a reply, in command order (`Slot`), or one
  per chunk of commands that took the fast lane (`Run`). Only the head is written: a refusal or a
  slow reply handler never overtakes an earlier command's reply (I5, I6).
- `waiting`, one entry per line sent upstream that expects a reply, in send order: `Owed` (fills
  a slot, after its reply handler), `Run` (its replies are relayed as framed, unread), or
  `Question` (the gateway's own command: the reply goes to the gateway, never the client).

The server's replies are framed by offsets (protocol.ReplyStream): a Run's are relayed as they
came (`frame_run`), one Reply object is made only for a reply that fills a slot or answers a
question. A Run that holds a FETCH falls back to slots (`_demote`) as soon as the server's bytes
may hold a job the rules must see.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, cast

from .decisions import Client, ReplyHandler, Ticket
from .entries import Owed, Question, Run, Slot
from .metrics import verb_label
from .protocol import Reply, ReplyStream, frame_end, frame_run, reply_at

log = logging.getLogger("gateway.session")
perf_counter = time.perf_counter


class FetchRules(Protocol):
    """What the reply side asks of the batch rules (batches.guard.BatchGuard)."""

    def fetch_reply_handler(self, client: Client) -> ReplyHandler: ...
    def fetch_reply_needs_rules(self, data: bytes) -> bool: ...


class ReplyOrder:
    """See the module docstring. `spawn` runs a coroutine (a reply handler still working), `wake`
    tells the driver that output is ready outside an on_* call, `fail` closes the connection after
    an internal error."""

    def __init__(
        self,
        rules: FetchRules,
        client: Client,
        max_bulk: int,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        wake: Callable[[], None],
        fail: Callable[[], None],
    ):
        self.rules = rules
        self.client = client
        self.max_bulk = max_bulk
        self.spawn = spawn
        self.wake = wake
        self.fail = fail
        self.replies = ReplyStream(max_bulk)
        self.slots: deque[Slot | Run] = deque()
        self.waiting: deque[Owed | Run | Question] = deque()
        self.in_flight = 0  # client commands received and not yet answered to the client
        self.upstream_open = True  # False once the upstream connection is lost
        self.closed = False  # the client is gone: nothing more is written to it
        self.client_out: list[bytes] = []  # what is to be written to the client, in order
        self.done: list[Slot | Run] = []  # answered to client_out, not counted yet (take_done)
        self._done_at = 0.0
        self._when_answered: list[tuple[Callable[[], None], Callable[[], None]]] = []

    def when_answered(self, answered: Callable[[], None], lost: Callable[[], None]) -> None:
        """Call `answered` once nothing sent upstream is unanswered (`lost` if the upstream is
        lost first). Only while something is: the caller checks `waiting`."""
        self._when_answered.append((answered, lost))

    # ------------------------------------------------------------------------------------------
    # Server replies

    def on_server_data(self, data: bytes) -> None:
        """Raises ProtocolError for bytes that are not RESP."""
        data = self.replies.feed(data)
        if not data:
            return  # the held frame is still incomplete
        now = perf_counter()
        size = len(data)
        pos = 0
        waiting = self.waiting
        while pos < size:
            head = waiting[0] if waiting else None
            if type(head) is Run:
                if head.fetches and self.rules.fetch_reply_needs_rules(data):
                    self._demote(head)
                    continue
                end, framed, errors = frame_run(data, pos, head.owed - head.answered, self.max_bulk)
                if framed:
                    answered = head.answered
                    if errors is not None:
                        head.errors = (head.errors or []) + [answered + index for index in errors]
                    if head.tickets is not None:
                        for ticket in head.tickets[answered : answered + framed]:
                            ticket.answered()
                    head.answered = answered + framed
                    head.upstream_time = now - head.received
                    head.data.append(data if pos == 0 and end == size else data[pos:end])
                    pos = end
                    if head.answered == head.owed:
                        waiting.popleft()
                        continue
                if pos < size:
                    break  # an incomplete frame: held by the stream
            else:
                end = frame_end(data, pos, self.max_bulk)
                if end > size:
                    break
                self._on_reply(reply_at(data, pos, end), now)
                pos = end
        self.replies.keep(data, pos)
        if not waiting and self._when_answered:
            callbacks, self._when_answered = self._when_answered, []
            for on_answered, _ in callbacks:
                on_answered()
        self.flush()

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
        # A Run is never answered here: on_server_data frames its replies where it heads the queue.
        owed = cast(Owed, owed)
        ticket = owed.ticket
        slot = owed.slot
        slot.upstream_time = now - slot.sent
        if reply.is_error:
            slot.result = "error"
        if owed.on_reply is None:
            slot.data = reply.raw
            if ticket is not None:
                ticket.answered()
            return
        # An admitted command's lease is held until its reply handler is done: what the handler
        # records (the engine counts a job the server took) is in the ledger before a commit
        # of its batch can pass the fence.
        try:
            outcome = owed.on_reply(reply)
        except BaseException:
            if ticket is not None:
                ticket.answered()
            raise
        if isinstance(outcome, bytes):
            slot.data = outcome
            if ticket is not None:
                ticket.answered()
        else:
            slot.pending = True
            self.spawn(self._finish_reply(slot, outcome, ticket))

    async def _finish_reply(self, slot: Slot, outcome: Awaitable[bytes], ticket: Ticket | None) -> None:
        try:
            slot.data = await outcome
        except Exception:
            log.exception(
                "internal error handling a reply; closing the connection", extra={"peer": self.client.peer}
            )
            self.fail()
            return
        finally:
            if ticket is not None:
                ticket.answered()
        slot.pending = False
        self.flush()
        self.wake()

    def _demote(self, run: Run) -> None:
        """Back to the full path for the unanswered commands of `run` (the head of `waiting`): one
        slot each, right after it in the client order, and a FETCH's reply through the rules."""
        self.waiting.popleft()
        rest = run.verbs[run.answered : run.owed]
        run.owed = run.answered  # the run keeps what it already relayed
        index = self.slots.index(run)
        on_fetched = self.rules.fetch_reply_handler(self.client)
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
        self.flush()

    # ------------------------------------------------------------------------------------------
    # Writing to the client, in order

    def flush(self) -> None:
        """Move the replies at the head of `slots` to client_out, in order. What they answered is
        counted (tally.py) once the driver has written them (take_done)."""
        if self.closed:
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

    def take_done(self) -> tuple[list[Slot | Run], float]:
        """The entries answered since the last call, and when they were moved to client_out."""
        done, self.done = self.done, []
        at, self._done_at = self._done_at, 0.0
        return done, at

    def handler_pending(self) -> bool:
        return any(type(slot) is Slot and slot.pending for slot in self.slots)

    def must_read_server(self) -> bool:
        """A reply the gateway itself must see is owed (an admitted command's: its lease ends
        when it is read; a commit's; a handler's): the server is read whatever the client does."""
        return any(
            (type(owed) is Owed and owed.linger) or (type(owed) is Run and owed.tickets is not None)
            for owed in self.waiting
        )
