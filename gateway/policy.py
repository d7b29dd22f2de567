"""Pure decisions about batches: what a payload adds to, and whether a batch's state allows it.

No I/O here. The guard (guard.py) gathers the facts (a payload, a state from the store, whether the
worker holds a job of the batch) and asks these functions; the tests ask them directly.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass

from .protocol import error_reply
from .store import COMMITTING, FIRED, OPEN


class Mode(enum.StrEnum):
    STRICT = "strict"
    MEMBER_REOPEN = "member-reopen"
    SHADOW = "shadow"


STRICT, MEMBER_REOPEN, SHADOW = Mode.STRICT, Mode.MEMBER_REOPEN, Mode.SHADOW

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
        shown = repr(bid)[:40] if isinstance(bid, str) else type(bid).__name__
        raise Malformed(f"invalid batch id {shown}: expected 1-128 letters, digits, '_', '-', '.', ':'")
    return bid


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    # The Go server merges a repeated key's objects where Python keeps the last one; a payload
    # that the two would read differently is refused instead of being judged on one reading.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise Malformed("duplicate keys in JSON object")
    return result


def decode(payload: bytes) -> object:
    try:
        return json.loads(payload, object_pairs_hook=_unique_keys)
    except Malformed:
        raise
    except (ValueError, RecursionError) as exc:
        raise Malformed(f"invalid JSON: {str(exc)[:80]}") from None


def _go_fold(key: str) -> str:
    # Go's encoding/json matches struct fields with Unicode case folding: besides ASCII case,
    # the long s (U+017F) folds to "s" and the Kelvin sign to "k" (which str.lower() already does).
    return key.lower().replace("\u017f", "s")


def field(obj: dict, name: str) -> object:
    """A struct field as Go's encoding/json finds it: the key matched case-insensitively."""
    matches = [key for key in obj if _go_fold(key) == name]
    if len(matches) > 1:
        raise Malformed(f"ambiguous keys {', '.join(sorted(matches))}")
    return obj[matches[0]] if matches else None


def _custom(job: object) -> dict | None:
    """A job's `custom` as Go's encoding/json reads it (None when absent or not an object)."""
    custom = field(job, "custom") if isinstance(job, dict) else None
    return custom if isinstance(custom, dict) else None


def _bid_in(custom: dict | None) -> str | None:
    bid = custom.get("bid") if custom is not None else None
    if bid is None or bid == "":
        return None
    return valid_bid(bid)


# Only Faktory Enterprise puts these on the callback jobs it enqueues (`_bid` the batch, `_pbid` its
# parent, `_cb` which callback). A client's job carrying one could pass for a callback.
RESERVED_KEYS = ("_bid", "_pbid", "_cb")


def _reserved_in(custom: dict | None) -> list[str]:
    return [key for key in RESERVED_KEYS if key in custom] if custom is not None else []


def job_bid(job: object) -> str | None:
    """The batch a job joins: its `custom.bid`, validated; None for a job outside any batch."""
    return _bid_in(_custom(job))


def reserved_keys(job: object) -> list[str]:
    """The server-only keys a client's job carries in its `custom` (Go's reading of `custom`)."""
    return _reserved_in(_custom(job))


# Bytes after which a plain decode could read a key differently from Go: JSON escapes, and the
# two non-ASCII letters Go's case folding maps onto ASCII (long s, Kelvin sign).
_FOLD_TRAPS = (b"\\u", "\u017f".encode(), "\u212a".encode())


def read_push(payload: bytes) -> tuple[str | None, list[str]]:
    """A PUSH's (custom.bid, reserved keys), as the server would read them. Raises Malformed.

    The common batch PUSH names `custom` once and `bid` once and has nothing Go would fold: then
    no key that matters can be duplicated or ambiguous, and the plain C decoder reads what the
    server reads (duplicates of other keys do not change the decision). Anything else goes
    through the strict decoder, which refuses duplicate and ambiguous keys everywhere.
    """
    if (
        payload.count(b'"bid"') <= 1
        and payload.lower().count(b'"custom"') == 1
        and not any(trap in payload for trap in _FOLD_TRAPS)
    ):
        try:
            job = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            raise Malformed(f"invalid JSON: {str(exc)[:80]}") from None
    else:
        job = decode(payload)
    custom = _custom(job)
    return _bid_in(custom), _reserved_in(custom)


JID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no space: it only names a set member


def callback_jids(spec: dict) -> list[str]:
    """The jids a BATCH NEW gives its callback jobs (`success`, `complete`), where it gives any."""
    jids = []
    for kind in ("success", "complete"):
        job = field(spec, kind)
        jid = job.get("jid") if isinstance(job, dict) else None
        if isinstance(jid, str) and JID.fullmatch(jid):
            jids.append(jid)
    return jids


def may_name_a_batch(payload: bytes) -> bool:
    """The fast-path filter: False only when the payload certainly names no batch and carries no
    reserved key (`bid"` also finds `"_bid"`, `"_pbid"`).

    A key can be spelt with JSON escapes (`"b\\u0069d"`), so any escape sends the payload to the
    full decoder too.
    """
    return b'bid"' in payload or b'_cb"' in payload or b"\\u" in payload


def refusal_to_add(bid: str, state: str) -> Refusal | None:
    """A job joining batch `bid` (PUSH, each job of PUSHB). Invariants I1 and I2."""
    if state == OPEN:
        return None
    if state == FIRED:
        return Refusal("BATCH_CALLBACK_FIRED", f"batch {bid} has enqueued its callback; nothing may join it")
    if state == COMMITTING:
        return Refusal("BATCH_COMMITTED", f"batch {bid} is being committed; jobs may not join it")
    return Refusal("BATCH_COMMITTED", f"batch {bid} is committed; only a job of the batch may reopen it")


def refusal_to_nest(parent: str, state: str) -> Refusal | None:
    """`BATCH NEW` with `parent_bid`: judged exactly like adding to the parent (I3)."""
    refusal = refusal_to_add(parent, state)
    if refusal is None:
        return None
    reason = refusal.message.split("; ")[0].replace(f"batch {parent}", f"parent batch {parent}")
    return Refusal("PARENT_SEALED", f"{reason}; no child batch may be added to it")


def refusal_to_open(bid: str, state: str, mode: str, holds_member_job: bool) -> Refusal | None:
    """`BATCH OPEN` (I4). For a committed batch in member-reopen mode, None still means
    "allowed if its callbacks have not fired": the guard checks that with the server."""
    if state == OPEN:
        return None
    if state == FIRED:
        return Refusal(
            "BATCH_CALLBACK_FIRED", f"batch {bid} has enqueued its callback; it may not be reopened"
        )
    if state == COMMITTING:
        return Refusal("BATCH_COMMITTED", f"batch {bid} is being committed; it may not be reopened now")
    if mode == MEMBER_REOPEN:
        if holds_member_job:
            return None
        return Refusal(
            "BATCH_COMMITTED",
            f"batch {bid} is committed; only a worker holding one of its jobs may reopen it",
        )
    return Refusal("BATCH_COMMITTED", f"batch {bid} is committed; committed batches are sealed (mode {mode})")


def status_fired(status: object) -> bool:
    """A BATCH STATUS reply shows a callback enqueued: `complete_st` or `success_st` not empty."""
    return isinstance(status, dict) and bool(status.get("complete_st") or status.get("success_st"))


def refusal_unknown(bid: str) -> Refusal:
    """`unknown_batch: reject` (under `verify`, a batch the server lacks gets the server's reply)."""
    return Refusal("BATCH_UNKNOWN", f"batch {bid} has no record at the gateway (unknown_batch: reject)")


def refusal_store_down(bid: str) -> Refusal:
    return Refusal(
        "STATE_UNAVAILABLE", f"the batch store is unavailable; batch {bid} cannot be checked; retry"
    )


def refusal_fence_timeout(bid: str, seconds: float) -> Refusal:
    return Refusal(
        "COMMIT_FENCE_TIMEOUT",
        f"pushes into batch {bid} were still in flight after {seconds:g}s; the batch stays open, retry the commit",
    )


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
