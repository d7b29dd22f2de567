"""Asking the server `BATCH STATUS`, and what its answer tells the ledger: one helper for every place.

The server is the only authority on whether a batch exists and whether its callbacks were
enqueued (`complete_st`/`success_st` not empty). It does not say whether a batch was committed.
"""

from __future__ import annotations

import json

from ..decisions import Client
from ..protocol import DOLLAR, MINUS, Reply


class Status:
    """A parsed `BATCH STATUS` reply: None from `parse` when the server has no such batch."""

    __slots__ = ("fired", "parent")

    def __init__(self, fired: bool, parent: str | None):
        self.fired = fired
        self.parent = parent

    @classmethod
    def parse(cls, reply: Reply) -> Status | None:
        if reply.kind != DOLLAR or reply.payload is None:
            return None
        try:
            body = json.loads(reply.payload)
        except (ValueError, RecursionError):
            return None
        if not isinstance(body, dict):
            return None
        fired = bool(body.get("complete_st") or body.get("success_st"))
        parent = body.get("parent_bid")
        return cls(fired, parent if isinstance(parent, str) and parent else None)


def absent(reply: Reply) -> bool:
    """The server's own "no such batch" (Ent writes "No such batch" before 1.9.2). Any other error
    (Faktory OSS has no batches at all; a failure) proves nothing about the batch."""
    return reply.kind == MINUS and b"no such batch" in (reply.payload or b"").lower()


def status_line(bid: str) -> bytes:
    return b"BATCH STATUS " + bid.encode() + b"\r\n"


async def ask(client: Client, bid: str) -> tuple[Reply, Status | None]:
    """The server's own reply to `BATCH STATUS bid` on the client's connection (its HELLO
    authenticated it: the gateway holds no credentials), and what it says."""
    reply = await client.ask_upstream(status_line(bid))
    return reply, Status.parse(reply)
