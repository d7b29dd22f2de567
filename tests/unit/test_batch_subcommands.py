"""BATCH subcommands fail closed, without sockets.

Faktory upper-cases QUEUE's subcommand with Go's strings.ToUpper; were Enterprise to read BATCH's
the same way, `BATCH commit` would reach it as COMMIT. So the gateway matches BATCH subcommands
that way (gotext.upper), and lets an unknown one through only when it cannot name a batch.
"""

from __future__ import annotations

import pytest

from gateway.batches.guard import BatchGuard
from gateway.decisions import Forward, Respond
from gateway.metrics import Metrics
from gateway.store import COMMITTING
from gateway.store.memory import MemoryStore
from tests.support.fakes import FakeClient, settings
from tests.support.playbook import committed, decide

DAY = 86400.0


@pytest.mark.parametrize("spelling", ["OPEN", "open", "Open", "oPeN"])
async def test_batch_open_in_any_spelling_gets_the_rules(spelling):
    store = MemoryStore(45 * DAY, 7 * DAY)
    guard = BatchGuard(store, settings(), Metrics())
    client = FakeClient()
    await committed(guard, store, "b-1", client)
    refused = await decide(guard, f"BATCH {spelling} b-1", client)
    assert isinstance(refused, Respond) and refused.data.startswith(b"-ERR BATCH_COMMITTED batch b-1 ")


async def test_batch_subcommands_are_matched_as_go_upper_cases_them():
    store = MemoryStore(45 * DAY, 7 * DAY)
    guard = BatchGuard(store, settings(), Metrics())
    client = FakeClient()
    await committed(guard, store, "b-1", client)
    child = await decide(guard, 'BATCH new {"parent_bid":"b-1"}', client)
    assert child.data.startswith(b"-ERR PARENT_SEALED parent batch b-1 ")
    status = await decide(guard, "BATCH \u017ftatus b-1", client)  # long s: STATUS
    assert isinstance(status, Forward) and status.on_reply is not None  # read as a status
    await store.create("b-2")
    commit = await decide(guard, "BATCH comm\u0131t b-2", client)  # dotless i: COMMIT
    assert isinstance(commit, Forward) and commit.linger  # the fence's commit, not a plain forward
    assert await store.state("b-2") == COMMITTING


@pytest.mark.parametrize(
    "text, forwarded",
    [
        ("BATCH", True),
        ("BATCH ", True),
        ("BATCH DETAILS", True),  # no argument: nothing to name
        ('BATCH DETAILS {"x":[1,2]}', True),
        ("BATCH PAU\u00dfE !", True),
        ("BATCH DETAILS b-1", False),
        ("BATCH  OPEN b-1", False),  # two spaces: the subcommand is "", and "b-1" is bid-like
        ('BATCH CHILD {"parent_bid":"b-1"}', False),
        ('BATCH CHILD {"PARENT_BID":"b-1"}', False),
        ('BATCH CHILD {"p\\u0061rent_bid":"b-1"}', False),
    ],
)
async def test_an_unknown_batch_subcommand_goes_on_only_without_a_bid_like_argument(text, forwarded):
    store = MemoryStore(45 * DAY, 7 * DAY)
    guard = BatchGuard(store, settings(), Metrics())
    decision = await decide(guard, text, FakeClient())
    if forwarded:
        assert decision is None  # the client's bytes, unchanged
    else:
        assert isinstance(decision, Respond) and decision.data.startswith(
            b"-ERR MALFORMED BATCH: unknown subcommand"
        )
