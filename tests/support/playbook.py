"""Playbooks, in the manner of mitmproxy's proxy tests: events in, exact bytes and decisions out.

- `Harness` plays the session for a Pipeline: it feeds client and server bytes in and collects
  exactly what goes out to either side (`server`, `client`) and what was counted (`done`).
- `decide` and `answer` play the session for the batch rules: a command in, its decision out
  (a `Later` worked out, its barrier taken as passed), and for a forwarded command, the bytes the
  client gets once the server answered.
"""

from __future__ import annotations

import asyncio
import inspect

from gateway import tally
from gateway.batches.guard import BatchGuard
from gateway.decisions import Decision, Forward, Later, Respond
from gateway.pipeline import Pipeline
from gateway.protocol import Command, Reply
from tests.support.fakes import OK, reply_of

HI = b'+HI {"v":2}\r\n'
HELLO = b'HELLO {"v":2,"wid":"w1"}\r\n'


class Harness:
    """A Pipeline and what it sent to either side. `rules` is the real guard or ScriptedRules."""

    def __init__(self, rules, max_line: int = 1 << 20, max_pipeline: int = 1000):
        self.rules = rules
        self.wid = None
        self.peer = "10.0.0.1:4000"
        self.done: list[tuple[str, str]] = []
        self.tasks: list[asyncio.Task] = []
        self.aborted = 0
        self.failed = 0
        self.server = b""
        self.client = b""
        self.pipeline = Pipeline(
            rules,
            self,
            max_line=max_line,
            max_bulk=1 << 20,
            max_pipeline=max_pipeline,
            spawn=lambda coroutine: self.tasks.append(asyncio.ensure_future(coroutine)),
            wake=self.collect,
            abort=self.abort,
            fail=self.fail,
        )

    async def ask_upstream(self, line: bytes) -> Reply:  # decisions.Client
        future = asyncio.get_running_loop().create_future()
        self.pipeline.ask(line, future.set_result, future.cancel)
        self.collect()
        return await future

    def abort(self) -> None:
        self.aborted += 1

    def fail(self) -> None:
        self.failed += 1

    def collect(self) -> None:
        self.server += b"".join(self.pipeline.server_out)
        self.pipeline.server_out.clear()
        self.client += b"".join(self.pipeline.client_out)
        self.pipeline.client_out.clear()
        done, at = self.pipeline.take_done()
        tally.count(done, at, lambda verb, result, *_: self.done.append((verb, result)))

    def from_client(self, data: bytes) -> None:
        self.pipeline.on_client_data(data)
        self.collect()

    def from_server(self, data: bytes) -> None:
        self.pipeline.on_server_data(data)
        self.collect()

    def sent(self) -> tuple[bytes, bytes]:
        """(to the server, to the client) since the last call, and start afresh."""
        out = self.server, self.client
        self.server = self.client = b""
        return out


def greeted(rules) -> Harness:
    """A Harness past the handshake, nothing sent yet."""
    harness = Harness(rules)
    harness.from_server(HI)
    harness.from_client(HELLO)
    harness.from_server(b"+OK\r\n")
    assert harness.sent() == (HELLO, HI + b"+OK\r\n")
    return harness


async def decide(guard: BatchGuard, line: str | bytes, client, quiet: bool = True) -> Decision:
    """The guard's decision on one command line, a Later worked out (its barrier passed)."""
    raw = line if isinstance(line, bytes) else line.encode()
    decision = guard.decide(Command.parse(raw + b"\r\n"), client, quiet)
    if type(decision) is Later:
        decision = await decision.work()
    return decision


async def answer(decision: Decision, reply: bytes = OK) -> bytes:
    """The server answered a forwarded command (`reply`): the reply handler runs, then the ticket
    ends, and the bytes the client then gets come back. A Respond is its own answer."""
    if type(decision) is Respond:
        return decision.data
    assert decision is None or type(decision) is Forward, decision
    if decision is None:
        return reply
    if decision.ticket is not None:
        decision.ticket.written(lambda: None)
    try:
        if decision.on_reply is None:
            return reply
        outcome = decision.on_reply(reply_of(reply))
        raw = await outcome if inspect.isawaitable(outcome) else outcome
    finally:  # as order.py does: the admission ends once the reply handler is done
        if decision.ticket is not None:
            decision.ticket.answered()
    for _ in range(3):  # store updates the handler left running (a commit's record) get their turn
        await asyncio.sleep(0)
    return raw


async def committed(guard: BatchGuard, store, bid: str, client) -> None:
    """Record bid and commit it through the guard, as a client's BATCH COMMIT would."""
    from gateway.store import COMMITTED

    await store.create(bid)
    assert await answer(await decide(guard, f"BATCH COMMIT {bid}", client)) == OK
    assert await store.state(bid) == COMMITTED
