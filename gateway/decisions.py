"""What the batch rules decide about a command, and what they may know of the client that sent it.

The guard returns a decision; the session carries it out. Nothing here does I/O, so the guard
can be driven in tests by a fake client and the session by fake decisions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from .protocol import Reply

ReplyHandler = Callable[[Reply], "bytes | Awaitable[bytes]"]


class Ticket(Protocol):
    """An admitted command's hold on its batch's commit fence (fence.Ticket).

    The session asks `writable()` right before writing the command upstream (a lease whose local
    deadline passed must not reach the server), says `written(abort)` once it is written (the
    fence calls `abort()` if it can no longer keep the lease, which resets the upstream
    connection), and `answered()` or `lost()` when the server replied or the connection died.
    """

    def writable(self) -> bool: ...
    def unwritable_reply(self) -> bytes: ...
    def written(self, abort: Callable[[], None]) -> None: ...
    def answered(self) -> None: ...
    def lost(self) -> None: ...


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


class Respond:
    """Answer the client with `data` and send nothing upstream."""

    __slots__ = ("data", "result")

    def __init__(self, data: bytes, result: str = "refused"):
        self.data = data
        self.result = result


# None: forward the command as it came, with no reply handler.
Decision = Forward | Respond | None


class Client(Protocol):
    """What the batch rules may know and ask of one client connection (the session)."""

    wid: str | None
    peer: str

    def unanswered(self) -> bool:
        """Something written upstream on this connection is not answered yet (a command, or a
        question of the gateway's own): a command written now would wait behind it at the
        server, for as long as the server or the client likes (a slow QUEUE command, a reply the
        client does not read)."""

    async def all_answered(self) -> None:
        """Wait until every command sent upstream so far was answered."""

    async def ask_upstream(self, line: bytes) -> Reply:
        """Send a command of the gateway's own on this client's upstream connection."""
