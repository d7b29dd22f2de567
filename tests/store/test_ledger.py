"""One suite, both ledgers: the in-process store and Redis (a real redis-server) behave the same."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.store import COMMITTED, COMMITTING, FIRED, OPEN, UNKNOWN
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore


@pytest.fixture(params=["memory", "redis"])
async def store(request):
    if request.param == "memory":
        yield MemoryStore(retention=3600, lease_ttl=0.5)
        return
    server = request.getfixturevalue("redis_server")
    store = RedisStore(server.url, f"test-{uuid.uuid4().hex[:6]}:", retention=3600, lease_ttl=0.5)
    yield store
    await store.close()


def new_bid() -> str:
    return "b-" + uuid.uuid4().hex[:14]


async def test_unknown_until_created(store):
    bid = new_bid()
    assert await store.state(bid) == UNKNOWN
    await store.create(bid)
    assert await store.state(bid) == OPEN


async def test_create_never_overwrites_a_record(store):
    bid = new_bid()
    await store.create(bid)
    await store.begin_commit(bid)
    await store.finish_commit(bid, committed=True)
    await store.create(bid)
    assert await store.state(bid) == COMMITTED


async def test_admission_only_into_open_batches_and_holds_a_lease(store):
    bid = new_bid()
    assert await store.admit(bid, "t0") == UNKNOWN
    await store.create(bid)
    assert await store.admit(bid, "t1") == OPEN
    assert await store.live_leases(bid) == 1
    assert await store.begin_commit(bid) == OPEN
    assert await store.admit(bid, "t2") == COMMITTING
    assert await store.live_leases(bid) == 1  # the refused admission took no lease
    store.release(bid, "t1")
    assert await store.live_leases(bid) == 0
    await store.finish_commit(bid, committed=True)
    assert await store.admit(bid, "t3") == COMMITTED


async def test_leases_expire(store):
    bid = new_bid()
    await store.create(bid)
    await store.admit(bid, "lost")
    assert await store.live_leases(bid) == 1
    await asyncio.sleep(0.7)
    assert await store.live_leases(bid) == 0


async def test_failed_commit_returns_to_open(store):
    bid = new_bid()
    await store.create(bid)
    await store.begin_commit(bid)
    await store.finish_commit(bid, committed=False)
    assert await store.state(bid) == OPEN


async def test_commit_of_an_unknown_batch_adopts_it(store):
    bid = new_bid()
    assert await store.begin_commit(bid) == UNKNOWN
    assert await store.state(bid) == COMMITTING
    await store.finish_commit(bid, committed=True)
    assert await store.state(bid) == COMMITTED


async def test_reopen_moves_only_committed_back_to_open(store):
    bid = new_bid()
    await store.create(bid)
    assert await store.reopen(bid) == OPEN
    await store.begin_commit(bid)
    assert await store.reopen(bid) == COMMITTING
    await store.finish_commit(bid, committed=True)
    assert await store.reopen(bid) == COMMITTED
    assert await store.state(bid) == OPEN


async def test_fired_is_terminal(store):
    bid = new_bid()
    await store.create(bid)
    await store.mark_fired(bid)
    assert await store.reopen(bid) == FIRED
    assert await store.begin_commit(bid) == FIRED
    await store.finish_commit(bid, committed=False)
    await store.create(bid)
    assert await store.state(bid) == FIRED
    assert await store.admit(bid, "t") == FIRED


async def test_worker_holdings(store):
    bid, other = new_bid(), new_bid()
    await store.hold("w1", "jid-1", [bid], ttl=60)
    assert await store.holds("w1", bid)
    assert not await store.holds("w1", other)
    assert not await store.holds("w2", bid)
    await store.unhold("w1", "jid-1")
    assert not await store.holds("w1", bid)
    await store.hold("w1", "jid-2", [bid], ttl=0.2)
    await asyncio.sleep(0.4)
    assert not await store.holds("w1", bid)


async def test_concurrent_admissions_and_commit_see_one_order(store):
    """Whatever interleaving: every lease granted before begin_commit is counted by live_leases."""
    bid = new_bid()
    await store.create(bid)
    results = await asyncio.gather(*(store.admit(bid, f"t{i}") for i in range(50)), store.begin_commit(bid))
    granted = sum(1 for r in results[:-1] if r == OPEN)
    assert await store.live_leases(bid) == granted
    assert all(r in (OPEN, COMMITTING) for r in results[:-1])


async def test_redis_keys_share_one_hash_tag_per_batch(redis_server):
    store = RedisStore(redis_server.url, "fgw-tag:", retention=60, lease_ttl=5)
    try:
        bid = new_bid()
        await store.create(bid)
        await store.admit(bid, "t")
        keys = sorted(await store.conn.call("KEYS", f"fgw-tag:*{bid}*"))
        assert keys == [f"fgw-tag:{{{bid}}}:leases", f"fgw-tag:{{{bid}}}:state"]
        assert 0 < await store.conn.call("PTTL", keys[1]) <= 45 * 60 * 1000
    finally:
        await store.close()


async def test_redis_down_raises_store_error_quickly():
    from gateway.store import StoreError
    from tests.support.processes import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", "x:", retention=60, lease_ttl=5)
    try:
        with pytest.raises(StoreError):
            await asyncio.wait_for(store.admit("b-1", "t"), 5)
        assert not await store.ping()
    finally:
        await store.close()
