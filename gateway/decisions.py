"""What the batch rules decide about a command, and what they may know of the client that sent it.

The rules return a decision; the pipeline carries it out. Nothing here does I/O, so the rules
can be driven in tests by a fake client and the pipeline by fake decisions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, final

from .protocol import Command, Reply

ReplyHandler = Callable[[Reply], "bytes | Awaitable[bytes]"]


class Ticket(Protocol):
    """An admitted command's hold on its batch's commit fence (batches.fence.Ticket).

    The pipeline asks `writable()` right before writing the command upstream (a lease whose local
    deadline passed must not reach the server), says `written(abort)` once it is written (the
    fence calls `abort()` if it can no longer keep the lease, which resets the upstream
    connection), and `answered()` or `lost()` when the server replied or the connection died.
    """

    def writable(self) -> bool: ...
    def unwritable_reply(self) -> bytes: ...
    def written(self, abort: Callable[[], None]) -> None: ...
    def answered(self) -> None: ...
    def lost(self) -> None: ...


# Final, so that `type(x) is Forward` (faster than isinstance on the hot path) narrows types too.


@final
class Forward:
    """Send `data` upstream; `on_reply` (if any) turns the server's reply into the client's.

    With a `ticket` (or `linger`), the session keeps the upstream open for the reply even if the
    client leaves: the fence must hear that the command was answered, or the handler must run.
    """

    __slots__ = ("data", "linger", "on_reply", "ticket")

    def __init__(
        self,
        data: bytes,
        on_reply: ReplyHandler | None = None,
        ticket: Ticket | None = None,
        linger: bool = False,
    ):
        self.data = data
        self.on_reply = on_reply
        self.ticket = ticket
        self.linger = linger or ticket is not None


@final
class Respond:
    """Answer the client with `data` and send nothing upstream."""

    __slots__ = ("data", "result")

    def __init__(self, data: bytes, result: str = "refused"):
        self.data = data
        self.result = result


@final
class Later:
    """A decision that needs the store or the server first. The pipeline holds the connection's
    later commands back, in order, until `work()` gives the decision.

    With `barrier`, `work` starts only once every command sent upstream before this one was
    answered: the commit fence admits a command only when nothing is ahead of it at the server
    (docs/fence.md). `work` is called, not given as a coroutine, so that a connection that closes
    first leaves nothing unawaited."""

    __slots__ = ("barrier", "work")

    def __init__(self, work: Callable[[], Awaitable[Settled]], barrier: bool = False):
        self.work = work
        self.barrier = barrier


# None: forward the command as it came, with no reply handler.
Settled = Forward | Respond | None
Decision = Settled | Later


@final
class Admitted:
    """The fast lane's answer for a one-line batch PUSH that this gateway's lease admits without
    asking anyone: forward the chunk as it is, the ticket ended by its reply."""

    __slots__ = ("ticket",)

    def __init__(self, ticket: Ticket):
        self.ticket = ticket


@final
class Decided:
    """The fast lane read the chunk's one command and decided it already: carry `decision` out
    (nothing is read twice, and local admission is tried once)."""

    __slots__ = ("command", "decision")

    def __init__(self, command: Command, decision: Decision):
        self.command = command
        self.decision = decision


@final
class Lane:
    """The fast lane's two other answers, as named constants."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"Lane.{self.name}"


UNCHECKED = Lane("UNCHECKED")  # no command of the chunk needs the rules: forward it as it is
FULL_PATH = Lane("FULL_PATH")  # decide each command of the chunk on its own
Route = Admitted | Decided | Lane


class Client(Protocol):
    """What the batch rules may know and ask of one client connection (the session)."""

    wid: str | None  # the worker id its HELLO gave (set by the rules when they read the HELLO)
    peer: str

    async def ask_upstream(self, line: bytes) -> Reply:
        """Send a command of the gateway's own on this client's upstream connection."""
