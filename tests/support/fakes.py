"""Stand-ins for the parts around the one under test, shared by the unit tests (no sockets).

- `FakeClient`: the session as the batch rules see it (decisions.Client): a wid, a peer, and the
  server's answers to the gateway's own `BATCH STATUS` questions, from a script.
- `ScriptedRules`: the batch rules as the pipeline sees them (pipeline.Rules), with decisions the
  test gives per verb.
- `FakeTicket`: an admission ticket that records the calls made on it.
- `Clock`: a monotonic clock the test moves.
"""

from __future__ import annotations

import json

from gateway.batches.settings import RuleSettings
from gateway.config import build
from gateway.decisions import FULL_PATH, UNCHECKED, Admitted, Client, Decided, Route
from gateway.protocol import Command, Reply, ReplyStream, bulk_reply

OK = b"+OK\r\n"


def reply_of(raw: bytes) -> Reply:
    """The one whole reply in `raw`, framed as the pipeline frames it."""
    (reply,) = ReplyStream().replies(raw)
    return reply


def settings(**values: str) -> RuleSettings:
    """The rules' settings as a configuration with these values gives them (parsed and checked)."""
    return RuleSettings.of(build([("test", {"upstream": "tcp://faktory:7419", **values})]))


class Clock:
    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeClient:
    def __init__(self, wid: str | None = None, peer: str = "10.0.0.7:5000"):
        self.wid = wid
        self.peer = peer
        self.statuses: dict[str, bytes] = {}  # bid -> the server's raw reply to BATCH STATUS
        self.asked: list[bytes] = []
        self.aborted = 0

    async def ask_upstream(self, line: bytes) -> Reply:
        self.asked.append(line)
        bid = line.split()[-1].decode()
        return reply_of(self.statuses.get(bid, b"-ERR no such batch " + bid.encode() + b"\r\n"))

    def status(self, bid: str, complete_st: str = "", parent: str | None = None) -> None:
        body = {"bid": bid, "total": 1, "pending": 1, "complete_st": complete_st, "success_st": ""}
        if parent:
            body["parent_bid"] = parent
        self.statuses[bid] = bulk_reply(json.dumps(body).encode())

    def abort(self) -> None:
        self.aborted += 1


class FakeTicket:
    def __init__(self, writable: bool = True):
        self.calls: list[str] = []
        self._writable = writable
        self.abort = None

    def writable(self) -> bool:
        self.calls.append("writable")
        return self._writable

    def unwritable_reply(self) -> bytes:
        self.calls.append("unwritable_reply")
        return b"-ERR STATE_UNAVAILABLE lease lost\r\n"

    def written(self, abort) -> None:
        self.calls.append("written")
        self.abort = abort

    def answered(self) -> None:
        self.calls.append("answered")

    def lost(self) -> None:
        self.calls.append("lost")


class ScriptedRules:
    """Rules whose decisions are given per verb (a decision, or a function of the command); every
    decided command is recorded. A verb with a decision takes the full path; `fast_tickets` are
    handed out, in order, to one-line PUSH chunks, as a lease admitting locally would."""

    def __init__(self, decisions=None):
        self.decisions = decisions or {}
        self.fast_tickets: list = []
        self.decided: list[bytes] = []
        self.fetched: list[bytes] = []

    def decide(self, command: Command, client: Client, quiet: bool):
        self.decided.append(command.raw)
        decision = self.decisions.get(command.verb)
        return decision(command) if callable(decision) else decision

    def route(self, verbs: list[bytes], chunk: bytes, client: Client, quiet: bool) -> Route:
        if self.fast_tickets and verbs == [b"PUSH"]:
            return Admitted(self.fast_tickets.pop(0))
        if any(verb in self.decisions for verb in verbs):
            if len(verbs) == 1:
                command = Command.parse(chunk)
                return Decided(command, self.decide(command, client, quiet))
            return FULL_PATH
        return UNCHECKED

    def fetch_reply_handler(self, client: Client):
        def handler(reply: Reply) -> bytes:
            self.fetched.append(reply.raw)
            return reply.raw

        return handler

    @staticmethod
    def fetch_reply_needs_rules(data: bytes) -> bool:
        return b'bid"' in data
