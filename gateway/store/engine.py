"""The batch engine's ledger types (mode `batches: gateway`): pure values, no I/O.

In engine mode the gateway itself answers BATCH NEW/OPEN/COMMIT/STATUS in front of Faktory OSS and
fires the callbacks. The ledger counts each batch's jobs and decides, atomically, when a callback
is due; both stores implement that (see the "engine" section of `BatchStore`), and these are the
values they take and give.

Bids are made here. Every batch of one tree (a root batch and all its descendants) shares the
first 18 characters of its bid, `tree_of(bid)`; Redis keys carry it as their hash tag, so one
script can walk from a batch up to its root on one Redis Cluster slot.
"""

from __future__ import annotations

import enum
import json
import secrets
import string
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from . import BatchState

# An uncommitted engine batch is dropped after 30 minutes: Ent's own rule, which the gateway now
# applies itself (in Ent mode the ledger's record outlives the server's by a margin instead).
ENGINE_OPEN_TTL = 30 * 60.0

_ALPHABET = string.ascii_letters + string.digits + "-_"  # url-safe, and no brace (a hash tag's end)
_ROOT = "b-"
_ROOT_RANDOM, _CHILD_RANDOM = 16, 10
TREE_LENGTH = len(_ROOT) + _ROOT_RANDOM  # 18: Ent's bid shape `b-xxxxxxxx`, a little longer


class Kind(enum.StrEnum):
    """A callback's kind, in firing order: complete is always claimed before success."""

    COMPLETE = "complete"
    SUCCESS = "success"


class Stage(enum.StrEnum):
    """Where a batch's callback of one kind is (Ent's `complete_st` / `success_st`)."""

    NONE = ""  # not enqueued yet (or the batch has no callback of that kind)
    ENQUEUED = "1"  # claimed: the callback job is being (or was) pushed to the server
    DONE = "2"  # the callback job was ACKed


class Mark(enum.StrEnum):
    """A job's mark in its batch's `jobs` hash (one letter: a 100,000-job batch has 100,000 of them)."""

    PENDING = "p"  # member, not run yet
    FAILED = "f"  # member, ran, its last run failed and it has not been ACKed since
    ACKED = "a"  # member, ACKed
    EARLY_ACK = "A"  # ACKed before the producer's count reached the ledger: not a member yet
    EARLY_FAIL = "F"  # failed before the producer's count reached the ledger: not a member yet


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def new_bid(parent: str | None) -> str:
    """A fresh bid: `b-` + 16 random url-safe characters for a root batch; for a child, its tree's
    18 characters + 10 more, so that every batch of a tree shares `tree_of`."""
    if parent is None:
        return _ROOT + _random(_ROOT_RANDOM)
    return tree_of(parent) + _random(_CHILD_RANDOM)


def tree_of(bid: str) -> str:
    """The tree a bid belongs to: its root's bid (the first 18 characters of any bid of the tree)."""
    return bid[:TREE_LENGTH]


def is_settled(
    callbacks: Iterable[Kind],
    stages: Mapping[Kind, Stage],
    claims: Mapping[Kind, str],
    parent: str | None,
    told: Collection[Kind],
) -> bool:
    """Nothing is left to happen to a batch on its own account: every callback it has was enqueued,
    no claim waits for its confirmation, and (a child) every stage was told to the parent."""
    return (
        all(stages[kind] != Stage.NONE for kind in callbacks)
        and not claims
        and (parent is None or all(kind in told for kind in Kind))
    )


@dataclass(frozen=True, slots=True)
class BatchSpec:
    """What BATCH NEW asked for. `callbacks`: each kind's callback job as JSON text, jid already set."""

    parent: str | None
    description: str
    created_at: str  # RFC 3339 UTC, seconds, `Z`
    callbacks: dict[Kind, str]


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """BATCH STATUS's answer, in Ent's shape."""

    bid: str
    parent: str | None
    description: str
    created_at: str
    total: int
    pending: int  # members not ACKed yet
    failed: int  # members whose last run failed
    complete_st: Stage
    success_st: Stage

    def to_json(self) -> bytes:
        """Ent's JSON: its keys in its order; `parent_bid` only for a child batch."""
        body: dict[str, object] = {"bid": self.bid}
        if self.parent is not None:
            body["parent_bid"] = self.parent
        body.update(
            description=self.description,
            created_at=self.created_at,
            total=self.total,
            pending=self.pending,
            failed=self.failed,
            complete_st=self.complete_st.value,
            success_st=self.success_st.value,
        )
        return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Claim:
    """A callback that is due: its claimant (the holder of `token`) pushes `job` to the server and
    then confirms; if it dies first, another gateway takes the claim over."""

    bid: str
    kind: Kind
    token: str
    job: str  # the callback job's JSON text


@dataclass(frozen=True, slots=True)
class Watched:
    """What a watcher needs to know of a batch it watches (`inspect`)."""

    bid: str
    state: BatchState
    claims: dict[Kind, str]  # kind -> token of a claim not confirmed yet
    progress: int  # bumped by every count that changed something: unchanged means stuck or idle
    pending: int  # members not ACKed yet
    settled: bool  # nothing left to fire, confirm or tell the parent: the watch can end
