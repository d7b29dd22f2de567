"""What the pipeline's two queues hold (pipeline.py): a client command's place in the reply order,
and an upstream line's place in the order of the server's answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import final

from .decisions import ReplyHandler, Ticket
from .protocol import Reply

# Final, so that `type(x) is Slot` (faster than isinstance on the hot path) narrows types too.


@final
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


@final
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


@final
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


@final
class Question:
    """A command of the gateway's own (`ask`): the reply goes to `answer`; `lost` if none comes."""

    __slots__ = ("answer", "lost")

    def __init__(self, answer: Callable[[Reply], None], lost: Callable[[], None]):
        self.answer = answer
        self.lost = lost
