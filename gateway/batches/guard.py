"""The batch guard: sees each command before it is forwarded, and some replies before the client.

It is a table from verb to the module that owns the rule (admission.py: PUSH, PUSHB; commands.py:
BATCH; workers.py: HELLO, FETCH, ACK, FAIL; the shield for the lines the server crashes on), and
the fast lane's one reading of a chunk (`route`). Each handler returns a decision
(decisions.py): None (forward unchanged), Forward, Respond, or Later when the store or the server
must be asked first.

Invariants (docs/invariants.md has each with its test) and where they are kept:
- I1, I2: a PUSH / PUSHB job with `custom.bid` is admitted only into an open batch, under a lease
  of the commit fence (admission.py, fence.py).
- I3: BATCH NEW with `parent_bid` is admitted like a job of the parent (commands.py).
- I4: BATCH OPEN is judged by policy.refusal_to_open; in member-reopen mode the server's own
  BATCH STATUS is checked before a committed batch is reopened (commands.py).
- I8: BATCH COMMIT goes to the server only after the fence saw nothing admitted in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .. import shield
from ..decisions import (
    FULL_PATH,
    UNCHECKED,
    Admitted,
    Client,
    Decided,
    Decision,
    Forward,
    ReplyHandler,
    Route,
)
from ..metrics import Metrics
from ..protocol import Command
from ..store import BatchStore
from . import jobs
from .admission import Admission
from .commands import BatchCommands
from .engine import Engine
from .engine.commands import EngineCommands
from .engine.counting import Counting
from .fence import Fence
from .holdings import Holdings
from .learning import Learner
from .outcomes import Outcomes
from .settings import RuleSettings
from .workers import Workers

Handler = Callable[[Command, Client, bool], Decision]

# Verbs decide() may answer whatever their bytes say (the others only when they may name a batch).
ALWAYS_DECIDED = frozenset((b"BATCH", b"QUEUE"))
FINISHING = frozenset((b"ACK", b"FAIL"))  # decided only while this gateway holds jobs for the worker


class BatchGuard:
    def __init__(
        self,
        store: BatchStore,
        settings: RuleSettings,
        metrics: Metrics,
        fence: Fence | None = None,
        clock: Callable[[], float] = time.monotonic,
        engine: Engine | None = None,
    ):
        self.store = store
        self.metrics = metrics
        self.fence = fence or Fence(store, metrics)
        self.outcomes = Outcomes(metrics, settings)
        learner = Learner(store, self.outcomes, clock)
        holdings = Holdings(store, clock)
        # batches: gateway: the ledger counts and fires (engine/); else Enterprise does.
        self.engine = engine
        counting = None
        if engine is not None:
            counting = Counting(store, self.outcomes, engine.callbacks, clock)
        self.admission = Admission(store, self.fence, self.outcomes, learner, settings, holdings, counting)
        self.commands: BatchCommands | EngineCommands
        if engine is None:
            self.commands = BatchCommands(
                store, self.fence, self.admission, holdings, self.outcomes, learner, settings
            )
        else:
            self.commands = EngineCommands(
                store, self.fence, self.admission, holdings, self.outcomes, engine.callbacks, settings
            )
        self.workers = Workers(store, holdings, self.outcomes, learner, settings, counting)
        self.settings = settings
        self._verbs: dict[bytes, Handler] = {
            b"PUSH": self.admission.push,
            b"PUSHB": self.admission.push_bulk,
            b"BATCH": self.commands.decide,
            b"FETCH": self.workers.fetch,
            b"ACK": self.workers.finishing,
            b"FAIL": self.workers.finishing,
            b"HELLO": self.workers.hello,
            b"QUEUE": self._queue,
        }

    def start(self) -> None:
        self.fence.start()
        if self.engine is not None:
            self.engine.callbacks.start()

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.callbacks.close()
        await self.fence.close()

    def reconfigure(self, settings: RuleSettings) -> None:
        """New settings (SIGHUP), for every part of the rules at once."""
        self.settings = settings
        for part in (self.outcomes, self.admission, self.commands, self.workers):
            part.settings = settings

    # ------------------------------------------------------------------------------------------
    # The full path: one command at a time

    def decide(self, command: Command, client: Client, quiet: bool) -> Decision:
        """What to do with `command`; `quiet`: nothing is unanswered upstream on its connection."""
        if not command.args and (shielded := shield.judge(command)) is not None:
            return self.outcomes.shielded(shielded, client)
        handler = self._verbs.get(command.verb)
        return None if handler is None else handler(command, client, quiet)

    def _queue(self, command: Command, client: Client, quiet: bool) -> Decision:
        shielded = shield.judge(command)
        return None if shielded is None else self.outcomes.shielded(shielded, client)

    # ------------------------------------------------------------------------------------------
    # The fast lane (pipeline.py): one reading of a chunk of whole lines

    def route(self, verbs: list[bytes], chunk: bytes, client: Client, quiet: bool) -> Route:
        """UNCHECKED when decide() would forward every command of `chunk` unchanged and touch no
        state (a FETCH's decision only concerns its reply: `fetch_reply_handler`, needed only
        where `fetch_reply_needs_rules`); for a chunk that is one PUSH naming a batch, that PUSH
        read and decided (Admitted: forward it as it is under this ticket; Decided: anything
        else); FULL_PATH for the rest, decided command by command. A cheap superset check: a
        chunk in doubt takes the full path."""
        if ALWAYS_DECIDED.isdisjoint(verbs) and not jobs.may_name_a_batch(chunk):
            if FINISHING.isdisjoint(verbs) or not self.workers.holds_any(client):
                return UNCHECKED
            return FULL_PATH
        if len(verbs) != 1 or verbs[0] != b"PUSH":
            return FULL_PATH
        command = Command.parse(chunk)
        decision = self.admission.push_naming(command, client, quiet)  # may_name_a_batch(chunk) held
        if type(decision) is Forward and decision.on_reply is None and decision.ticket is not None:
            return Admitted(decision.ticket)
        return Decided(command, decision)

    def fetch_reply_handler(self, client: Client) -> ReplyHandler:
        return self.workers.reply_handler(client)

    @staticmethod
    def fetch_reply_needs_rules(data: bytes) -> bool:
        return Workers.reply_needs_rules(data)
