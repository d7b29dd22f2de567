"""`batches: gateway`: the gateway keeps the batches itself, in front of Faktory OSS (docs/engine.md).

Faktory OSS answers every `BATCH` command with an error; Enterprise's batches do not keep the
rules its documentation states. Here the gateway is the batch server, speaking Enterprise's wire
protocol so that the clients' batch APIs work unchanged, and the #465 rules hold by construction:
the same admission, fence and policy as in front of Enterprise decide what may join a batch.

- commands.py  `BATCH NEW/OPEN/COMMIT/STATUS`, answered from the ledger, never forwarded.
- counting.py  what the ledger counts: a job the server took (+OK to its PUSH), a fetched job
               that was ACKed or FAILed, a callback job that was ACKed.
- callbacks.py pushing the callbacks the ledger decided to fire, on the gateway's own connection;
               taking over the claims of a gateway that died; spotting batches that stalled.

The ledger (gateway/store) decides everything that must happen once across gateways: counts are
idempotent per jid, and a callback is claimed by exactly one gateway in the same atomic step that
finds it due.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ...store import BatchStore
from .. import policy
from .callbacks import Callbacks

PENDING_SHOWN = 1000  # jids GET /batches/<bid> lists at most


@dataclass(frozen=True)
class Engine:
    """What `batches: gateway` adds to the rules: the part that pushes callbacks (built by the
    app, which knows the server's address), and the operations port's view of a batch."""

    store: BatchStore
    callbacks: Callbacks

    async def view(self, bid: str) -> dict | None:
        """`GET /batches/<bid>`: the status a client's BATCH STATUS gets, the batch's state in the
        ledger, and (some of) the jids still pending: what to look for when a batch stalls."""
        if not policy.BID.fullmatch(bid):
            return None
        status = await self.store.batch_status(bid)
        if status is None:
            return None
        pending = await self.store.pending_jobs(bid, PENDING_SHOWN + 1)
        return json.loads(status.to_json()) | {
            "state": (await self.store.state(bid)).value,
            "stalled": bid in self.callbacks.stalled,
            "pending_jids": pending[:PENDING_SHOWN],
            "pending_jids_truncated": len(pending) > PENDING_SHOWN,
        }
