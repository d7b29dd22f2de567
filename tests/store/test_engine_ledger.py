"""The batch engine's ledger (mode `batches: gateway`): one suite, three ledgers.

Every test runs on the in-process store (on a clock the test moves), on a real redis-server and on
a real three-master Redis Cluster (whose scripts must stay on one slot while they walk from a batch
up to its root), unless it truly cannot apply to one of them (slots, for the memory store).
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from redis.crc import key_slot

from gateway.store import COMMITTED, COMMITTING, FIRED, OPEN, UNKNOWN
from gateway.store.engine import (
    ENGINE_OPEN_TTL,
    TREE_LENGTH,
    BatchSpec,
    BatchStatus,
    Claim,
    Kind,
    Stage,
    new_bid,
    tree_of,
)
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.support.client import uid
from tests.support.ledgers import FakeClock, Ledger

COMMITTED_RETENTION, FIRED_RETENTION = 1.2, 0.6
COMPLETE, SUCCESS = Kind.COMPLETE, Kind.SUCCESS


async def open_ledger(request, backend: str):
    if backend == "memory":
        clock = FakeClock()
        store = MemoryStore(COMMITTED_RETENTION, FIRED_RETENTION, clock=clock, engine=True)
        return Ledger(store, clock)
    server = request.getfixturevalue("redis_server" if backend == "redis" else "redis_cluster")
    store = RedisStore(server.url, f"test-{uid()}:", COMMITTED_RETENTION, FIRED_RETENTION, engine=True)
    return Ledger(store, None)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def ledger(request):
    ledger = await open_ledger(request, request.param)
    yield ledger
    await ledger.store.close()


@pytest.fixture(params=["redis", "cluster"])
async def redis_ledger(request):
    ledger = await open_ledger(request, request.param)
    yield ledger
    await ledger.store.close()


# ----------------------------------------------------------------------------------------------
# Helpers


def callback_job(kind: Kind) -> str:
    return json.dumps({"jid": f"cb-{kind}-{uid()}", "jobtype": "Callback", "args": [], "queue": "cb"})


def spec(parent: str | None = None, kinds: tuple[Kind, ...] = (COMPLETE, SUCCESS)) -> BatchSpec:
    return BatchSpec(
        parent, "a test batch", "2024-05-01T12:00:00Z", {kind: callback_job(kind) for kind in kinds}
    )


async def batch(store, parent: str | None = None, kinds: tuple[Kind, ...] = (COMPLETE, SUCCESS)) -> str:
    bid = new_bid(parent)
    assert await store.new_batch(bid, spec(parent, kinds)) == OPEN
    return bid


async def commit(store, bid: str) -> None:
    """The existing lifecycle, as a commit runs it; the engine then settles the batch."""
    await store.begin_commit(bid, "c")
    assert (await store.commit_go(bid, "c", {})).go
    assert await store.finish_commit(bid, "c", committed=True) == COMMITTED


def fired(claims: list[Claim]) -> list[tuple[str, Kind]]:
    return [(claim.bid, claim.kind) for claim in claims]


async def counts(store, bid: str) -> tuple[int, int, int]:
    status = await store.batch_status(bid)
    return status.total, status.pending, status.failed


async def progress(store, bid: str) -> int:
    return (await store.inspect([bid]))[bid].progress


async def stages(store, bid: str) -> tuple[Stage, Stage]:
    status = await store.batch_status(bid)
    return status.complete_st, status.success_st


async def lifetimes(store, bid: str) -> dict[str, int]:
    """Milliseconds left of bid's state, meta and jobs (-2: absent, as Redis's PTTL says). The
    memory store keeps meta and jobs in one object beside the record: theirs is the record's."""
    names = ("state", "meta", "jobs")
    if isinstance(store, RedisStore):
        return {name: await store.conn.call("PTTL", store._key(bid, name)) for name in names}
    packed = store._batches.get(bid)
    left = -2 if packed is None else (packed >> 2) - store._now()
    data = store._engine.get(bid)
    return {"state": left, "meta": left if data else -2, "jobs": left if data and data.jobs else -2}


def assert_lifetimes(found: dict[str, int], expected_s: float) -> None:
    """state lives `expected_s` (give or take the test's own time), meta and jobs exactly as long."""
    assert abs(found["state"] - expected_s * 1000) < 500, found
    assert abs(found["meta"] - found["state"]) <= 5 and abs(found["jobs"] - found["state"]) <= 5, found


# ----------------------------------------------------------------------------------------------
# Bids and the status document (pure)


def test_bids_of_one_tree_share_its_roots_first_18_characters():
    root = new_bid(None)
    child = new_bid(root)
    grandchild = new_bid(child)
    assert re.fullmatch(r"b-[A-Za-z0-9_-]{16}", root)
    assert len(child) == len(grandchild) == TREE_LENGTH + 10
    assert re.fullmatch(r"[A-Za-z0-9_-]+", child + grandchild)
    assert tree_of(root) == tree_of(child) == tree_of(grandchild) == root
    assert child.startswith(root) and grandchild.startswith(root) and child != grandchild
    assert len({new_bid(None) for _ in range(1000)}) == 1000


def test_batch_status_json_is_ents_shape():
    root = BatchStatus("b-1", None, "d", "2024-05-01T12:00:00Z", 3, 2, 1, Stage.ENQUEUED, Stage.NONE)
    assert root.to_json() == (
        b'{"bid":"b-1","description":"d","created_at":"2024-05-01T12:00:00Z","total":3,"pending":2,'
        b'"failed":1,"complete_st":"1","success_st":""}'
    )
    child = BatchStatus("b-2", "b-1", "", "2024-05-01T12:00:00Z", 0, 0, 0, Stage.DONE, Stage.DONE)
    assert list(json.loads(child.to_json())) == [
        "bid", "parent_bid", "description", "created_at", "total", "pending", "failed", "complete_st", "success_st",
    ]  # fmt: skip
    assert json.loads(child.to_json())["parent_bid"] == "b-1"


# ----------------------------------------------------------------------------------------------
# Creating batches


async def test_a_batch_is_created_open_with_its_counts_at_zero(ledger):
    store = ledger.store
    bid = new_bid(None)
    assert await store.batch_status(bid) is None
    assert await store.new_batch(bid, spec()) == OPEN
    assert await store.state(bid) == OPEN
    status = await store.batch_status(bid)
    assert status == BatchStatus(
        bid, None, "a test batch", "2024-05-01T12:00:00Z", 0, 0, 0, Stage.NONE, Stage.NONE
    )
    await commit(store, bid)
    assert await store.new_batch(bid, spec()) == COMMITTED  # a record exists: nothing changes
    assert await store.state(bid) == COMMITTED


async def test_a_child_is_counted_in_its_open_or_committed_parent_and_refused_by_any_other(ledger):
    store = ledger.store
    parent = await batch(store)
    child = await batch(store, parent)
    assert (await store.batch_status(child)).parent == parent
    sealed = await batch(store)
    await store.begin_commit(sealed, "c")
    late = new_bid(sealed)
    assert await store.new_batch(late, spec(sealed)) == COMMITTING  # the parent's state
    assert await store.batch_status(late) is None  # nothing created
    orphan = new_bid(new_bid(None))
    assert await store.new_batch(orphan, spec(tree_of(orphan))) == UNKNOWN  # no such parent
    assert await store.batch_status(orphan) is None
    # The parent counts one child, not two: once that one's complete stage is over, it fires.
    await commit(store, parent)
    assert await store.settle(parent, "t") == []
    await commit(store, child)
    assert fired(await store.settle(child, "t")) == [(child, COMPLETE)]
    assert fired(await store.callback_ran(child, COMPLETE, "t")) == [(child, SUCCESS), (parent, COMPLETE)]


async def test_a_child_added_to_a_committed_parent_holds_the_parent_back_and_a_fired_one_refuses(ledger):
    """Mode member-reopen lets a worker holding a job of a committed batch add a child to it (the
    rules check the holding): the parent then waits for that child too. A fired parent refuses."""
    store = ledger.store
    parent = await batch(store, kinds=(COMPLETE,))
    await commit(store, parent)
    await store.joined(parent, ["held"])
    child = await batch(store, parent, kinds=(COMPLETE,))  # added while "held" runs
    assert await store.ran(parent, "held", True, "t") == []  # the child is not complete yet
    await commit(store, child)
    assert fired(await store.settle(child, "t")) == [(child, COMPLETE)]
    assert fired(await store.callback_ran(child, COMPLETE, "t")) == [(parent, COMPLETE)]
    assert await store.state(parent) == FIRED
    assert await store.new_batch(new_bid(parent), spec(parent)) == FIRED


async def test_an_empty_batch_fires_on_settle_and_nothing_fires_before_commit(ledger):
    store = ledger.store
    bid, empty = new_bid(None), spec()
    await store.new_batch(bid, empty)
    assert await store.settle(bid, "t0") == []  # open
    await store.begin_commit(bid, "c")
    assert await store.settle(bid, "t0") == []  # committing: the server may still refuse it
    assert (await store.commit_go(bid, "c", {})).go
    assert await store.settle(bid, "t0") == []
    await store.finish_commit(bid, "c", committed=True)
    assert await store.settle(bid, "t1") == [Claim(bid, COMPLETE, "t1", empty.callbacks[COMPLETE])]
    assert await store.settle(bid, "t2") == []  # claimed once


# ----------------------------------------------------------------------------------------------
# Counting


async def test_joined_counts_each_job_once(ledger):
    store = ledger.store
    bid = await batch(store)
    await store.joined(bid, ["j1", "j2"])
    await store.joined(bid, ["j2", "j3", "j3"])
    await store.joined(bid, [])
    assert await counts(store, bid) == (3, 3, 0)
    assert sorted(await store.pending_jobs(bid, 10)) == ["j1", "j2", "j3"]
    assert await progress(store, bid) == 2
    await store.joined(bid, ["j1", "j2", "j3"])  # all counted already: nothing changes
    assert await progress(store, bid) == 2


async def test_every_move_of_a_jobs_mark(ledger):
    """Spec (2) and (3): each mark, each outcome. (total, pending, failed), and whether progress moved."""
    store = ledger.store
    bid = await batch(store)
    await store.joined(bid, ["p1", "p2"])
    steps = [
        # what happens              counts after   changed
        (("ran", "p1", True), (2, 1, 0), True),  # p -> a
        (("ran", "p1", True), (2, 1, 0), False),  # a: nothing
        (("ran", "p1", False), (2, 1, 0), False),  # a: nothing
        (("ran", "p2", False), (2, 1, 1), True),  # p -> f
        (("ran", "p2", False), (2, 1, 1), False),  # f, failed again: nothing
        (("ran", "p2", True), (2, 0, 0), True),  # f -> a: the retry succeeded
        (("ran", "e1", True), (2, 0, 0), True),  # absent -> A: not a member yet
        (("ran", "e1", True), (2, 0, 0), False),  # A: nothing
        (("ran", "e1", False), (2, 0, 0), False),  # A: nothing (its ACK came first)
        (("ran", "e2", False), (2, 0, 0), True),  # absent -> F
        (("ran", "e2", False), (2, 0, 0), False),  # F: nothing
        (("joined", "e2"), (3, 1, 1), True),  # F -> f: a member, ran, failing
        (("ran", "e3", False), (3, 1, 1), True),  # absent -> F
        (("ran", "e3", True), (3, 1, 1), True),  # F -> A
        (("joined", "e3"), (4, 1, 1), True),  # A -> a: a member, ran, ACKed
        (("joined", "e1"), (5, 1, 1), True),  # A -> a
        (("joined", "n1"), (6, 2, 1), True),  # absent -> p
        (("joined", "n1"), (6, 2, 1), False),  # a member: counted once
        (("ran", "e2", True), (6, 1, 0), True),  # f -> a
    ]
    for (op, jid, *ok), expected, changed in steps:
        before = await progress(store, bid)
        if op == "ran":
            assert await store.ran(bid, jid, ok[0], "t") == []  # open: nothing fires
        else:
            await store.joined(bid, [jid])
        assert await counts(store, bid) == expected, (op, jid, ok)
        assert await progress(store, bid) == before + changed, (op, jid, ok)
    assert await store.pending_jobs(bid, 10) == ["n1"]


async def test_a_retried_job_counts_as_run_once(ledger):
    """complete waits for every member to have run: a job that failed and then succeeded is one
    of them, not two (else the batch would look complete while another job never ran)."""
    store = ledger.store
    bid = await batch(store, kinds=(COMPLETE,))
    await store.joined(bid, ["retried", "slow"])
    await store.ran(bid, "retried", False, "t")
    await store.ran(bid, "retried", False, "t")
    await store.ran(bid, "retried", True, "t")
    await commit(store, bid)
    assert await store.settle(bid, "t") == []  # "slow" has not run
    assert fired(await store.ran(bid, "slow", True, "t")) == [(bid, COMPLETE)]


async def test_an_early_ack_or_fail_counts_as_run_when_the_job_joins(ledger):
    """A worker's ACK or FAIL can reach the ledger before the producer's count: the outcome waits
    for the count, and the batch then fires as if they had come in order."""
    store = ledger.store
    bid = await batch(store, kinds=(COMPLETE,))
    assert await store.ran(bid, "j1", True, "t") == []
    assert await store.ran(bid, "j2", False, "t") == []
    assert await counts(store, bid) == (0, 0, 0)
    await store.joined(bid, ["j1", "j2"])
    assert await counts(store, bid) == (2, 1, 1)
    await commit(store, bid)
    assert fired(await store.settle(bid, "t")) == [(bid, COMPLETE)]  # both ran: complete


async def test_counts_are_taken_in_any_state_and_never_without_a_record(ledger):
    store = ledger.store
    bid = await batch(store)
    await store.joined(bid, ["j1"])
    await commit(store, bid)
    await store.joined(bid, ["j2"])  # a count that arrives after the commit is not lost
    assert await counts(store, bid) == (2, 2, 0)
    nobody = new_bid(None)
    await store.joined(nobody, ["j1"])
    assert await store.ran(nobody, "j1", True, "t") == []
    assert await store.callback_ran(nobody, COMPLETE, "t") == []
    assert await store.settle(nobody, "t") == []
    assert await store.batch_status(nobody) is None
    assert await store.pending_jobs(nobody, 10) == []
    assert await lifetimes(store, nobody) == {"state": -2, "meta": -2, "jobs": -2}  # nothing written


async def test_pending_jobs_are_the_members_not_acked(ledger):
    store = ledger.store
    bid = await batch(store)
    jids = [f"j{i}" for i in range(300)]  # past Redis's small-hash encoding: HSCAN takes steps
    await store.joined(bid, jids)
    for jid in jids[:100]:
        await store.ran(bid, jid, True, "t")
    await store.ran(bid, jids[100], False, "t")  # failing is pending too
    some = await store.pending_jobs(bid, 50)
    assert len(some) == len(set(some)) == 50 and set(some) <= set(jids[100:])
    assert sorted(await store.pending_jobs(bid, 1000)) == sorted(jids[100:])


# ----------------------------------------------------------------------------------------------
# Firing


async def test_complete_fires_first_and_success_waits_for_the_complete_callbacks_ack(ledger):
    store = ledger.store
    bid = await batch(store)
    await store.joined(bid, ["j1", "j2"])
    await commit(store, bid)
    assert await store.settle(bid, "t0") == []
    assert await store.ran(bid, "j1", True, "t1") == []
    claims = await store.ran(bid, "j2", True, "t2")
    assert fired(claims) == [(bid, COMPLETE)] and claims[0].token == "t2"  # not success yet
    assert await stages(store, bid) == (Stage.ENQUEUED, Stage.NONE)
    assert await store.state(bid) == FIRED
    assert await store.settle(bid, "t3") == []  # still waiting for the ACK
    claims = await store.callback_ran(bid, COMPLETE, "t4")
    assert fired(claims) == [(bid, SUCCESS)] and claims[0].token == "t4"
    assert await stages(store, bid) == (Stage.DONE, Stage.ENQUEUED)
    assert await store.callback_ran(bid, SUCCESS, "t5") == []
    assert await stages(store, bid) == (Stage.DONE, Stage.DONE)


async def test_a_batch_with_one_callback_kind_fires_it_alone(ledger):
    store = ledger.store
    success_only = await batch(store, kinds=(SUCCESS,))
    complete_only = await batch(store, kinds=(COMPLETE,))
    for bid in (success_only, complete_only):
        await store.joined(bid, ["j1"])
        await commit(store, bid)
    # success needs no complete callback's ACK when there is no complete callback
    assert fired(await store.ran(success_only, "j1", True, "t")) == [(success_only, SUCCESS)]
    assert await stages(store, success_only) == (Stage.NONE, Stage.ENQUEUED)
    # complete fires on a failure too (every job ran); there is no success callback to wait for
    assert fired(await store.ran(complete_only, "j1", False, "t")) == [(complete_only, COMPLETE)]
    assert await store.callback_ran(complete_only, COMPLETE, "t") == []
    assert await stages(store, complete_only) == (Stage.DONE, Stage.NONE)


async def test_a_failing_job_fires_complete_and_success_only_after_its_retry_acks(ledger):
    store = ledger.store
    bid = await batch(store)
    await store.joined(bid, ["ok", "flaky"])
    await commit(store, bid)
    assert await store.ran(bid, "ok", True, "t") == []
    assert fired(await store.ran(bid, "flaky", False, "t")) == [(bid, COMPLETE)]
    assert await store.callback_ran(bid, COMPLETE, "t") == []  # success: one job is failing
    assert await counts(store, bid) == (2, 1, 1)
    assert await store.ran(bid, "flaky", False, "t") == []  # failed again
    assert fired(await store.ran(bid, "flaky", True, "t")) == [(bid, SUCCESS)]
    assert await counts(store, bid) == (2, 0, 0)


async def test_a_batch_without_callbacks_is_never_fired(ledger):
    store = ledger.store
    bid = await batch(store, kinds=())
    await store.joined(bid, ["j1"])
    await commit(store, bid)
    assert await store.ran(bid, "j1", True, "t") == []
    assert await store.state(bid) == COMMITTED


async def test_three_levels_a_parent_fires_each_stage_after_its_childrens_callbacks_were_acked(ledger):
    store = ledger.store
    root = await batch(store)
    child = await batch(store, root)
    grandchild = await batch(store, child)
    for bid in (root, child, grandchild):
        await store.joined(bid, [f"{bid}-job"])
    for bid in (grandchild, child, root):
        await commit(store, bid)
        assert await store.settle(bid, "t") == []
    assert await store.ran(root, f"{root}-job", True, "t") == []  # its child is not over
    assert await store.ran(child, f"{child}-job", True, "t") == []  # nor is the grandchild
    # Each stage of a batch waits for that stage's callbacks of its children to be ACKed (and
    # success for its own complete callback's ACK); each ACK fires what it makes due, up the tree,
    # in the same step.
    steps = [
        (store.ran(grandchild, f"{grandchild}-job", True, "t"), [(grandchild, COMPLETE)]),
        (store.callback_ran(grandchild, COMPLETE, "t"), [(grandchild, SUCCESS), (child, COMPLETE)]),
        (store.callback_ran(grandchild, SUCCESS, "t"), []),  # the child's complete is not ACKed yet
        (store.callback_ran(child, COMPLETE, "t"), [(child, SUCCESS), (root, COMPLETE)]),
        (store.callback_ran(child, SUCCESS, "t"), []),  # the root's complete is not ACKed yet
        (store.callback_ran(root, COMPLETE, "t"), [(root, SUCCESS)]),
        (store.callback_ran(root, SUCCESS, "t"), []),
    ]
    for call, expected in steps:
        assert fired(await call) == expected
    for bid in (root, child, grandchild):
        assert await stages(store, bid) == (Stage.DONE, Stage.DONE)
        assert (await store.inspect([bid]))[bid].settled


async def test_a_child_without_callbacks_passes_its_stages_to_its_parent(ledger):
    """A child without callbacks is over when its stage is reached: complete when its jobs all ran,
    success when they were all ACKed; its parent waits for each."""
    store = ledger.store
    root = await batch(store)
    child = await batch(store, root, kinds=())
    await store.joined(child, ["flaky"])
    await commit(store, root)
    assert await store.settle(root, "t") == []  # the child is not even committed
    assert await store.ran(child, "flaky", False, "t") == []
    await commit(store, child)
    # settling the child walks up to the root: the child's complete stage is over, the root fires
    assert fired(await store.settle(child, "t")) == [(root, COMPLETE)]
    assert await store.callback_ran(root, COMPLETE, "t") == []  # the child's success is not over
    assert fired(await store.ran(child, "flaky", True, "t")) == [(root, SUCCESS)]
    assert await store.state(child) == COMMITTED  # nothing of its own to fire


async def test_concurrent_acks_claim_each_callback_once(ledger):
    store = ledger.store
    bid = await batch(store, kinds=(COMPLETE,))
    jids = [f"j{i}" for i in range(40)]
    await store.joined(bid, jids)
    await commit(store, bid)
    replies = await asyncio.gather(*(store.ran(bid, jid, True, f"t-{jid}") for jid in jids))
    claims = [claim for reply in replies for claim in reply]
    assert fired(claims) == [(bid, COMPLETE)]
    assert claims[0].token in {f"t-{jid}" for jid in jids}


# ----------------------------------------------------------------------------------------------
# Claims


async def test_a_claim_carries_its_token_until_confirmed_and_passes_on_only_from_the_token_seen(ledger):
    store = ledger.store
    bid = await batch(store, kinds=(COMPLETE,))
    await commit(store, bid)
    [claim] = await store.settle(bid, "t1")
    assert (await store.inspect([bid]))[bid].claims == {COMPLETE: "t1"}
    assert await store.take_over(bid, COMPLETE, "stale", "t2") is None
    taken = await store.take_over(bid, COMPLETE, "t1", "t2")
    assert taken == Claim(bid, COMPLETE, "t2", claim.job)  # the same callback job, its new holder
    assert await store.take_over(bid, COMPLETE, "t1", "t3") is None  # taken already
    await store.confirm(bid, COMPLETE, "t1")  # the first claimant came back late: not its claim now
    assert (await store.inspect([bid]))[bid].claims == {COMPLETE: "t2"}
    await store.confirm(bid, COMPLETE, "t2")
    assert (await store.inspect([bid]))[bid].claims == {}
    assert await store.take_over(bid, COMPLETE, "t2", "t4") is None  # confirmed: nothing to take
    assert await store.take_over(bid, COMPLETE, "", "t4") is None


async def test_a_claim_fires_the_batch(ledger):
    store = ledger.store
    bid = await batch(store)
    await store.joined(bid, ["j1"])
    await commit(store, bid)
    await store.ran(bid, "j1", True, "t")
    assert await store.state(bid) == FIRED
    assert (await store.acquire(bid, "g2")).state == FIRED  # nothing joins a fired batch
    assert await store.begin_commit(bid, "again") == FIRED


async def test_a_callbacks_ack_moves_only_an_enqueued_stage_and_ends_its_claim(ledger):
    store = ledger.store
    bid = await batch(store)
    await store.joined(bid, ["j1"])
    await commit(store, bid)
    assert await store.callback_ran(bid, COMPLETE, "t") == []  # not enqueued: a stray ACK
    assert await stages(store, bid) == (Stage.NONE, Stage.NONE)
    assert fired(await store.ran(bid, "j1", True, "t1")) == [(bid, COMPLETE)]
    # The claimant's confirmation was lost, but the callback ran: nobody may push it again.
    assert fired(await store.callback_ran(bid, COMPLETE, "t2")) == [(bid, SUCCESS)]
    assert await store.take_over(bid, COMPLETE, "t1", "t3") is None
    assert (await store.inspect([bid]))[bid].claims == {SUCCESS: "t2"}
    assert await store.callback_ran(bid, COMPLETE, "t") == []  # ACKed twice: counted once
    assert await stages(store, bid) == (Stage.DONE, Stage.ENQUEUED)


# ----------------------------------------------------------------------------------------------
# Lifetimes


async def test_meta_and_jobs_live_exactly_as_long_as_the_state(ledger):
    store = ledger.store
    parent = await batch(store)
    bid = await batch(store, parent, kinds=(COMPLETE,))
    await store.joined(parent, ["p1"])
    await store.joined(bid, ["j1"])
    assert_lifetimes(await lifetimes(store, bid), ENGINE_OPEN_TTL)  # Ent's 30 minutes
    assert_lifetimes(await lifetimes(store, parent), ENGINE_OPEN_TTL)
    await store.begin_commit(bid, "c")
    assert (await store.commit_go(bid, "c", {})).go  # sent: it may be committed from here
    assert_lifetimes(await lifetimes(store, bid), COMMITTED_RETENTION)
    await store.finish_commit(bid, "c", committed=True)
    await ledger.wait(0.3)
    await store.touch(bid)  # seen again: the retention starts anew, for all three
    assert_lifetimes(await lifetimes(store, bid), COMMITTED_RETENTION)
    assert fired(await store.ran(bid, "j1", True, "t")) == [(bid, COMPLETE)]
    assert_lifetimes(await lifetimes(store, bid), FIRED_RETENTION)
    await ledger.wait(FIRED_RETENTION + 0.1)
    assert await store.batch_status(bid) is None
    assert await lifetimes(store, bid) == {"state": -2, "meta": -2, "jobs": -2}
    assert_lifetimes(await lifetimes(store, parent), ENGINE_OPEN_TTL - FIRED_RETENTION - 0.4)


async def test_an_uncommitted_batch_is_dropped_after_thirty_minutes(ledger):
    store = ledger.store
    bid = await batch(store)
    await store.joined(bid, ["j1"])
    assert_lifetimes(await lifetimes(store, bid), ENGINE_OPEN_TTL)
    if ledger.clock is not None:  # only the memory store's clock can be moved that far
        await ledger.wait(ENGINE_OPEN_TTL - 1)
        assert await store.state(bid) == OPEN
        await ledger.wait(2)
        assert await store.batch_status(bid) is None
        assert await store.new_batch(bid, spec()) == OPEN  # made anew: nothing of the old one
        assert await counts(store, bid) == (0, 0, 0)


# ----------------------------------------------------------------------------------------------
# Watching


async def test_the_watch_index_returns_every_bid_watched_for_the_whole_walk(ledger):
    store = ledger.store
    bids = [f"b-w{i}" for i in range(250)]
    for bid in bids:
        await store.watch(bid)
    await store.watch(bids[0])  # a set: once
    for bid in bids[200:]:
        await store.unwatch(bid)
    seen: list[str] = []
    cursor, pages = 0, 0
    while True:
        cursor, page = await store.watched(cursor, 20)
        seen += page
        pages += 1
        if pages == 2:  # changes during the walk do not hide a bid watched throughout
            await store.unwatch(bids[199])
            await store.watch("b-late")
        if cursor == 0:
            break
    assert pages > 2
    assert set(bids[:199]) <= set(seen) <= {*bids[:200], "b-late"}
    _, page = await store.watched(0, 1000)
    assert bids[199] not in page and "b-late" in page


async def test_inspect_reads_what_a_watcher_needs_of_many_batches_in_one_round_trip(ledger):
    store = ledger.store
    root = await batch(store)
    child = await batch(store, root, kinds=(SUCCESS,))
    await store.joined(child, ["j1", "j2"])
    await store.ran(child, "j1", True, "t")
    others = [await batch(store) for _ in range(20)]
    nobody = new_bid(None)
    bids = [root, child, nobody, *others]
    calls = _count_round_trips(store)
    found = await store.inspect(bids)
    if calls is not None:  # Redis: every read was sent before any reply came
        assert calls.peak == calls.total == 2 * len(bids)
    assert list(found) == bids and found[nobody] is None
    assert found[child].state == OPEN and found[child].pending == 1 and found[child].progress == 2
    assert not found[child].settled and found[child].claims == {}
    await commit(store, child)
    await store.ran(child, "j2", True, "t")
    watched = (await store.inspect([child]))[child]
    assert (watched.state, watched.claims, watched.pending, watched.settled) == (
        FIRED,
        {SUCCESS: "t"},
        0,
        False,
    )
    await store.confirm(child, SUCCESS, "t")
    assert not (await store.inspect([child]))[child].settled  # not told its parent yet: not ACKed
    await store.callback_ran(child, SUCCESS, "t")
    assert (await store.inspect([child]))[child].settled


async def test_inspect_reads_a_whole_sweep_page_at_once(ledger):
    """A sweep reads SWEEP_PAGE batches at once, two commands each, all in flight together: on a
    Cluster, more than redis-py's connections per node (they wait for one, never fail)."""
    from gateway.batches.engine.callbacks import SWEEP_PAGE

    store = ledger.store
    bids = [new_bid(None) for _ in range(SWEEP_PAGE)]
    for bid in bids[:10]:
        assert await store.new_batch(bid, spec()) == OPEN
    found = await store.inspect(bids)
    assert [bid for bid, watched in found.items() if watched is not None] == bids[:10]


class _RoundTrips:
    def __init__(self) -> None:
        self.total = self.peak = self.in_flight = 0


def _count_round_trips(store) -> _RoundTrips | None:
    """Count the Redis calls of `store` and the most ever in flight at once."""
    if not isinstance(store, RedisStore):
        return None
    calls, call = _RoundTrips(), store.conn.call

    async def counted(*args):
        calls.total += 1
        calls.in_flight += 1
        calls.peak = max(calls.peak, calls.in_flight)
        try:
            return await call(*args)
        finally:
            calls.in_flight -= 1

    store.conn.call = counted
    return calls


# ----------------------------------------------------------------------------------------------
# Redis only: the key layout and Cluster slots


async def test_the_keys_of_a_tree_share_one_cluster_slot(redis_ledger):
    store = redis_ledger.store
    root = await batch(store)
    child = await batch(store, root)
    grandchild = await batch(store, child)
    await store.joined(grandchild, ["j1"])
    tree = tree_of(root)
    keys = [
        f"{store.prefix}{{{tree}}}:{bid}:{name}"
        for bid in (root, child, grandchild)
        for name in ("state", "meta")
    ]
    keys.append(f"{store.prefix}{{{tree}}}:{grandchild}:jobs")
    assert store._key(grandchild, "jobs") == keys[-1]
    for key in keys:
        assert await store.conn.call("EXISTS", key) == 1, key
    assert len({key_slot(key.encode()) for key in keys}) == 1
    if "cluster" in store.url:  # the Cluster itself agrees, and the three-level walk above ran on it
        assert {await store.conn.call("CLUSTER", "KEYSLOT", key) for key in keys} == {
            key_slot(keys[0].encode())
        }


async def test_ent_mode_keeps_its_layout_and_refuses_the_engines_operations(redis_server):
    store = RedisStore(redis_server.url, f"test-{uid()}:", 60, 60)
    try:
        bid = new_bid(None)
        assert store._keys(bid) == [
            f"{store.prefix}{{{bid}}}:{name}" for name in ("state", "leases", "attempts")
        ]
        with pytest.raises(TypeError):
            await store.new_batch(bid, spec())
    finally:
        await store.close()
