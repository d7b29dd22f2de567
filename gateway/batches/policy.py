"""Pure decisions about batches: whether a batch's state allows a command, and the refusals.

No I/O here. The rules (guard.py and the modules it dispatches to) gather the facts (what a
payload adds to, read by jobs.py; a state from the store; whether the worker holds a job of the
batch) and ask these functions; the tests ask them directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import Mode, OnStoreError, UnknownBatch
from ..protocol import error_reply
from ..store import COMMITTING, FIRED, OPEN, BatchState

# Ent's bids are `b-` and a url-safe token; be generous, but never let a brace (a Redis hash tag),
# a space or a line break from a client reach a key or a log line.
BID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


class Malformed(ValueError):
    """A payload the gateway cannot judge safely; refused rather than guessed at."""


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str

    def reply(self) -> bytes:
        return error_reply(self.code, self.message)


def valid_bid(bid: object) -> str:
    if not isinstance(bid, str) or not BID.fullmatch(bid):
        shown = repr(bid)[:40] if isinstance(bid, str) else _json_type(bid)
        raise Malformed(f"invalid batch id {shown}: expected 1-128 letters, digits, '_', '-', '.', ':'")
    return bid


def _json_type(value: object) -> str:
    if isinstance(value, dict | tuple):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return getattr(value, "json_name", type(value).__name__)  # jobs.py's stand-in for a deep value


def _in_force(message: str, setting: str, value: object) -> str:
    """A refusal's message, naming the setting that made it."""
    return f"{message} ({setting}: {value})"


def refusal_to_add(bid: str, state: BatchState, mode: Mode) -> Refusal | None:
    """A job joining batch `bid` (PUSH, each job of PUSHB). Invariants I1 and I2."""
    if state == OPEN:
        return None
    if state == FIRED:
        message = f"batch {bid} has enqueued its callback; nothing may join it"
        return Refusal("BATCH_CALLBACK_FIRED", _in_force(message, "mode", mode))
    if state == COMMITTING:
        message = f"batch {bid} is being committed; jobs may not join it"
    elif mode == Mode.MEMBER_REOPEN:
        message = f"batch {bid} is committed; only a job of the batch may reopen it"
    else:
        message = f"batch {bid} is committed; committed batches are sealed"
    return Refusal("BATCH_COMMITTED", _in_force(message, "mode", mode))


def refusal_to_nest(parent: str, state: BatchState, mode: Mode) -> Refusal | None:
    """`BATCH NEW` with `parent_bid`: judged exactly like adding to the parent (I3)."""
    refusal = refusal_to_add(parent, state, mode)
    if refusal is None:
        return None
    reason = refusal.message.split("; ")[0].replace(f"batch {parent}", f"parent batch {parent}")
    return Refusal("PARENT_SEALED", _in_force(f"{reason}; no child batch may be added to it", "mode", mode))


def refusal_to_open(bid: str, state: BatchState, mode: Mode, holds_member_job: bool) -> Refusal | None:
    """`BATCH OPEN` (I4). For a committed batch in member-reopen mode, None still means
    "allowed if its callbacks have not fired": the guard checks that with the server."""
    if state == OPEN:
        return None
    if state == FIRED:
        message = f"batch {bid} has enqueued its callback; it may not be reopened"
        return Refusal("BATCH_CALLBACK_FIRED", _in_force(message, "mode", mode))
    if state == COMMITTING:
        message = f"batch {bid} is being committed; it may not be reopened now"
    elif mode == Mode.MEMBER_REOPEN:
        if holds_member_job:
            return None
        message = f"batch {bid} is committed; only a worker holding one of its jobs may reopen it"
    else:
        message = f"batch {bid} is committed; committed batches are sealed"
    return Refusal("BATCH_COMMITTED", _in_force(message, "mode", mode))


def refusal_unknown(bid: str, unknown_batch: UnknownBatch) -> Refusal:
    """A batch with no record, refused: always under `unknown_batch: reject`; under `verify`
    when the server's answer to BATCH STATUS could not be read (a batch the server lacks gets
    the server's own reply instead)."""
    if unknown_batch == UnknownBatch.REJECT:
        message = f"batch {bid} has no record at the gateway"
    else:
        message = f"batch {bid} has no record at the gateway, and the server's BATCH STATUS could not be read"
    return Refusal("BATCH_UNKNOWN", _in_force(message, "unknown_batch", unknown_batch))


def refusal_no_such_batch(bid: str) -> Refusal:
    """batches: gateway: the ledger is the only authority, and it has no such batch."""
    return Refusal("BATCH_UNKNOWN", _in_force(f"no such batch {bid}", "batches", "gateway"))


def refusal_store_down(bid: str, on_store_error: OnStoreError) -> Refusal:
    message = f"the batch store is unavailable; batch {bid} cannot be checked; retry"
    return Refusal("STATE_UNAVAILABLE", _in_force(message, "on_store_error", on_store_error))


def refusal_fence_timeout(bid: str, seconds: float) -> Refusal:
    message = f"pushes into batch {bid} were still in flight after {seconds:g}s; the batch stays open, retry the commit"
    return Refusal("COMMIT_FENCE_TIMEOUT", _in_force(message, "commit_fence_timeout", f"{seconds:g}s"))


def refusal_lease_lost(bid: str) -> Refusal:
    return Refusal(
        "STATE_UNAVAILABLE",
        f"the gateway could not renew its lease on batch {bid} in time; the command was not sent; retry",
    )


def refusal_too_large(size: int, limit: int) -> Refusal:
    """A batch command longer than the commit fence's measured bound on the server's handling."""
    return Refusal(
        "BATCH_COMMAND_TOO_LARGE",
        f"a command adding to a batch may be at most {limit} bytes (the commit fence bounds how long"
        f" the server takes to handle it); this one is {size} bytes: split it",
    )


def refusal_reserved(keys: list[str]) -> Refusal:
    return Refusal(
        "RESERVED_KEY",
        f"custom.{', custom.'.join(keys)} may only be set by the server on the callback jobs it enqueues",
    )


def refusal_malformed(verb: str, problem: str) -> Refusal:
    return Refusal("MALFORMED", f"{verb}: {problem}")
