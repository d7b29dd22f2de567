"""Where the rules' verdicts are carried out, each kind in one place: refusals (audited once, or
forwarded in shadow mode), malformed commands, shielded lines, the `on_store_error` policy, and
the store updates whose failure changes no decision."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from .. import shield
from ..config import Mode, OnStoreError
from ..decisions import Client, Forward, Respond, Settled
from ..metrics import Metrics, counted
from ..protocol import Command
from ..store import UNKNOWN, BatchState, StoreError
from . import policy
from .policy import Refusal
from .settings import RuleSettings

log = logging.getLogger("gateway.guard")
T = TypeVar("T")


class Outcomes:
    def __init__(self, metrics: Metrics, settings: RuleSettings):
        self.metrics = metrics
        self.settings = settings
        self._background: set[asyncio.Task] = set()

    def refuse(self, refusal: Refusal, command: Command, client: Client, bid: str | None) -> Settled:
        """Refuse, or in shadow mode count and forward. Every refusal is logged once: the audit trail."""
        mode = self.settings.mode
        fields = {
            "code": refusal.code,
            "verb": command.verb.decode("ascii", "replace")[:16],
            "bid": bid,
            "wid": client.wid,
            "peer": client.peer,
            "mode": mode,
        }
        if mode == Mode.SHADOW:
            self.metrics.shadow_refusals.labels(refusal.code).inc()
            log.info("would refuse (shadow mode)", extra=fields)
            return Forward(command.raw)
        self.metrics.refusals.labels(refusal.code).inc()
        log.warning("refused", extra=fields)
        return Respond(refusal.reply())

    def malformed(self, command: Command, client: Client, problem: str) -> Settled:
        return self.refuse(policy.refusal_malformed(command.verb.decode(), problem), command, client, None)

    def shielded(self, shielded: shield.Shielded, client: Client) -> Settled:
        """A line the server would crash on: answered here, in every mode, never forwarded."""
        self.metrics.shielded.labels(shielded.verb).inc()
        log.warning(
            "shielded a line the server would crash on",
            extra={"verb": shielded.verb, "source": shielded.source, "wid": client.wid, "peer": client.peer},
        )
        return Respond(shielded.reply)

    def sealed(self, bid: str, state: BatchState, nest: bool) -> Refusal:
        """Why a batch in `state` takes no job (nest: no child batch)."""
        settings = self.settings
        if state == UNKNOWN:
            if settings.engine:
                return policy.refusal_no_such_batch(bid)
            return policy.refusal_unknown(bid, settings.unknown_batch)
        if nest:
            refusal = policy.refusal_to_nest(bid, state, settings.mode)
        else:
            refusal = policy.refusal_to_add(bid, state, settings.mode)
        assert refusal is not None, f"an open batch refuses nothing ({bid}: {state})"
        return refusal

    def store_failed(self, bid: str, client: Client, exc: StoreError) -> Refusal | None:
        """`on_store_error`: the refusal to give when the store cannot be asked, or None (allow)."""
        log.warning("store unavailable", extra={"bid": bid, "peer": client.peer, "error": str(exc)})
        if self.settings.on_store_error == OnStoreError.ALLOW:
            return None
        return policy.refusal_store_down(bid, self.settings.on_store_error)

    def store_down(self, bid: str, command: Command, client: Client, exc: StoreError) -> Settled:
        refusal = self.store_failed(bid, client, exc)
        return Forward(command.raw) if refusal is None else self.refuse(refusal, command, client, bid)

    def call(self, operation: str, awaitable: Awaitable[T]) -> Awaitable[T]:
        """A store call, counted by operation (and its errors)."""
        return counted(self.metrics, operation, awaitable)

    async def quietly(self, operation: str, awaitable: Awaitable[Any]) -> None:
        """A store update whose failure changes no decision (it is logged and counted)."""
        try:
            await self.call(operation, awaitable)
        except StoreError as exc:
            log.warning("store update failed", extra={"operation": operation, "error": str(exc)})

    def detach(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a store update nobody waits for, kept referenced until it ends."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
