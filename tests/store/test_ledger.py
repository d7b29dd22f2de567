"""One suite, both ledgers: the in-process store and Redis (a real redis-server) behave the same.

Time: the memory store runs on a clock the test moves; Redis on its own clock, so its tests use
short lifetimes and really wait. `ledger.wait(s)` does the right thing for each.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.store import COMMITTED, COMMITTING, FIRED, OPEN, UNKNOWN, StoreError
from gateway.store.memory import DRAIN_EVERY, DRAIN_STEP, EXPIRE_PER_CALL, MemoryStore
from gateway.store.redis import RedisStore
from tests.support.processes import free_port

LEASE = 0.4  # seconds: leases and commit attempts in these tests
COMMITTED_RETENTION, FIRED_RETENTION = 1.2, 0.6


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Ledger:
    """A store under test and a way to let its time pass."""

    def __init__(self, store, clock: FakeClock | None):
        self.store = store
        self.clock = clock

    async def wait(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["memory", "redis"])
async def ledger(request):
    if request.param == "memory":
        clock = FakeClock()
        yield Ledger(MemoryStore(COMMITTED_RETENTION, FIRED_RETENTION, clock=clock), clock)
        return
    server = request.getfixturevalue("redis_server")
    store = RedisStore(server.url, f"test-{uuid.uuid4().hex[:6]}:", COMMITTED_RETENTION, FIRED_RETENTION)
    yield Ledger(store, None)
    await store.close()


def new_bid() -> str:
    return "b-" + uuid.uuid4().hex[:14]


async def committed_batch(store) -> str:
    bid = new_bid()
    await store.create(bid)
    await store.begin_commit(bid, "c", LEASE)
    assert await store.commit_go(bid, "c", LEASE)
    await store.finish_commit(bid, "c", committed=True)
    return bid


async def test_unknown_until_created(ledger):
    store, bid = ledger.store, new_bid()
    assert await store.state(bid) == UNKNOWN
    await store.create(bid)
    assert await store.state(bid) == OPEN


async def test_create_never_overwrites_a_record(ledger):
    store = ledger.store
    bid = await committed_batch(store)
    await store.create(bid)
    assert await store.state(bid) == COMMITTED


async def test_only_an_open_batch_grants_a_lease(ledger):
    store, bid = ledger.store, new_bid()
    assert (await store.acquire(bid, "g1", LEASE)).state == UNKNOWN
    await store.create(bid)
    reply = await store.acquire(bid, "g1", LEASE)
    assert (reply.state, reply.held) == (OPEN, True)
    assert await store.begin_commit(bid, "c1", LEASE) == OPEN
    refused = await store.acquire(bid, "g2", LEASE)
    assert (refused.state, refused.held) == (COMMITTING, False)
    # g1's lease, taken before the seal, is still live and reported as such.
    assert (await store.acquire(bid, "g1", LEASE)).held


async def test_a_live_lease_holds_the_commit_until_released(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.acquire(bid, "g1", LEASE)
    await store.begin_commit(bid, "c1", 5 * LEASE)
    assert not await store.commit_go(bid, "c1", 5 * LEASE)
    renewed = await store.renew(bid, "g1", LEASE)  # renewal works in any state
    assert (renewed.state, renewed.held) == (COMMITTING, True)
    assert not await store.commit_go(bid, "c1", 5 * LEASE)
    store.release(bid, "g1")
    await store.ping()  # the release is not awaited; a round trip after it orders it
    assert await store.commit_go(bid, "c1", 5 * LEASE)


async def test_renewal_keeps_a_lease_past_its_first_expiry_and_a_lapsed_one_is_never_revived(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.acquire(bid, "g1", LEASE)
    await store.begin_commit(bid, "c1", 10 * LEASE)
    for _ in range(3):
        await ledger.wait(LEASE / 2)
        assert (await store.renew(bid, "g1", LEASE)).held
    assert not await store.commit_go(bid, "c1", 10 * LEASE)
    await ledger.wait(LEASE * 1.5)
    assert not (await store.renew(bid, "g1", LEASE)).held
    assert await store.commit_go(bid, "c1", 10 * LEASE)  # an expired lease does not block


async def test_overlapping_commits_a_timeout_does_not_reopen_what_another_attempt_finishes(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.acquire(bid, "g1", 10 * LEASE)
    await store.begin_commit(bid, "c1", 10 * LEASE)
    assert await store.begin_commit(bid, "c2", 10 * LEASE) == COMMITTING  # joins
    assert await store.finish_commit(bid, "c1", committed=False) == COMMITTING  # c1 timed out
    assert (await store.acquire(bid, "g2", LEASE)).state == COMMITTING  # still sealed
    store.release(bid, "g1")
    assert await store.commit_go(bid, "c2", 10 * LEASE)
    assert await store.finish_commit(bid, "c2", committed=True) == COMMITTED
    assert await store.state(bid) == COMMITTED


async def test_the_ledger_follows_the_servers_ok_whatever_state_it_is_in(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.begin_commit(bid, "c1", LEASE)
    assert await store.finish_commit(bid, "c1", committed=False) == OPEN  # timed out, the only one
    assert await store.finish_commit(bid, "c2", committed=True) == COMMITTED  # but the server said +OK


async def test_an_abandoned_commit_never_sent_reopens_the_batch(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.acquire(bid, "g1", 10 * LEASE)
    await store.begin_commit(bid, "dead", LEASE)
    assert not await store.commit_go(bid, "dead", LEASE)  # waiting; then its gateway dies
    await ledger.wait(LEASE * 1.5)
    assert await store.state(bid) == OPEN
    assert (await store.acquire(bid, "g2", LEASE)).held


async def test_an_abandoned_commit_that_may_have_reached_the_server_stays_sealed(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.begin_commit(bid, "dead", LEASE)
    assert await store.commit_go(bid, "dead", LEASE)  # sent; then its gateway dies before the reply
    await ledger.wait(LEASE * 1.5)
    assert await store.state(bid) == COMMITTED
    assert (await store.acquire(bid, "g2", LEASE)).state == COMMITTED
    # A retried commit from any gateway is forwarded (the server answers it) and recorded.
    assert await store.begin_commit(bid, "retry", LEASE) == COMMITTED
    assert await store.finish_commit(bid, "retry", committed=True) == COMMITTED


async def test_a_lapsed_attempt_that_finds_the_batch_reopened_seals_it_again(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.begin_commit(bid, "slow", LEASE)
    await ledger.wait(LEASE * 1.5)
    assert (await store.acquire(bid, "g1", LEASE)).held  # the attempt lapsed: open, a lease taken
    assert not await store.commit_go(bid, "slow", LEASE)  # sealed again, waits for g1
    assert await store.state(bid) == COMMITTING


async def test_commit_of_an_unknown_batch_adopts_it(ledger):
    store, bid = ledger.store, new_bid()
    assert await store.begin_commit(bid, "c", LEASE) == UNKNOWN
    assert await store.state(bid) == COMMITTING
    assert await store.commit_go(bid, "c", LEASE)
    await store.finish_commit(bid, "c", committed=True)
    assert await store.state(bid) == COMMITTED


async def test_reopen_moves_only_committed_back_to_open(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    assert await store.reopen(bid) == OPEN
    await store.begin_commit(bid, "c", LEASE)
    assert await store.reopen(bid) == COMMITTING
    await store.finish_commit(bid, "c", committed=True)
    assert await store.reopen(bid) == COMMITTED
    assert await store.state(bid) == OPEN


async def test_fired_is_terminal(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.mark_fired(bid)
    assert await store.reopen(bid) == FIRED
    assert await store.begin_commit(bid, "c", LEASE) == FIRED
    assert await store.finish_commit(bid, "c", committed=True) == FIRED
    await store.create(bid)
    assert await store.state(bid) == FIRED
    assert (await store.acquire(bid, "g", LEASE)).state == FIRED


async def test_a_committed_batch_seen_again_outlives_its_retention_and_a_fired_one_ages_out(ledger):
    store = ledger.store
    bid = await committed_batch(store)
    fired = await committed_batch(store)
    await store.mark_fired(fired)
    for _ in range(4):  # 4 x 0.5 retention: well past the first retention
        await ledger.wait(COMMITTED_RETENTION / 2)
        assert await store.state(bid) == COMMITTED
        await store.touch(bid)
    assert await store.state(fired) == UNKNOWN
    await ledger.wait(COMMITTED_RETENTION * 1.2)
    assert await store.state(bid) == UNKNOWN  # not seen for a whole retention: it ages out too


async def test_touch_revives_nothing(ledger):
    store, bid = ledger.store, new_bid()
    await store.touch(bid)
    assert await store.state(bid) == UNKNOWN
    await store.create(bid)
    await store.touch(bid)
    assert await store.state(bid) == OPEN


async def test_a_seal_reaches_every_listener(ledger):
    store, bid = ledger.store, new_bid()
    heard = asyncio.Queue()
    store.on_seal(heard.put_nowait)
    await asyncio.sleep(0.2)  # Redis: let the subscription start
    await store.create(bid)
    await store.begin_commit(bid, "c", LEASE)
    assert await asyncio.wait_for(heard.get(), 2) == bid


async def test_worker_holdings(ledger):
    store = ledger.store
    bid, other = new_bid(), new_bid()
    await store.hold("w1", "jid-1", [bid], ttl=60)
    assert await store.holds("w1", bid)
    assert not await store.holds("w1", other)
    assert not await store.holds("w2", bid)
    await store.unhold("w1", "jid-1")
    assert not await store.holds("w1", bid)
    await store.hold("w1", "jid-2", [bid], ttl=0.2)
    await ledger.wait(0.4)
    assert not await store.holds("w1", bid)


async def test_concurrent_admissions_and_commit_see_one_order(ledger):
    """Whatever the interleaving, a lease granted before the seal holds the commit back."""
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    results = await asyncio.gather(
        *(store.acquire(bid, f"g{i}", 10 * LEASE) for i in range(50)), store.begin_commit(bid, "c", LEASE)
    )
    granted = [f"g{i}" for i, reply in enumerate(results[:-1]) if reply.held]
    assert all(reply.state in (OPEN, COMMITTING) for reply in results[:-1])
    for gateway in granted:
        assert not await store.commit_go(bid, "c", LEASE)
        store.release(bid, gateway)
    await store.ping()
    assert await store.commit_go(bid, "c", LEASE)


async def test_memory_expiry_is_incremental():
    clock = FakeClock()
    store = MemoryStore(60, 60, clock=clock)
    for i in range(10_000):
        await store.create(f"b-{i}")
    clock.now += 3600
    await store.state("b-x")
    assert len(store) == 10_000 - EXPIRE_PER_CALL  # one call expired a bounded number...
    await asyncio.sleep(DRAIN_EVERY * 3)
    assert 0 < 10_000 - EXPIRE_PER_CALL - len(store) <= 3 * DRAIN_STEP  # ...the rest drain in steps
    for _ in range(10_000 // DRAIN_STEP + 5):
        await asyncio.sleep(DRAIN_EVERY * 1.5)
    assert len(store) == 0
    await store.close()


async def test_redis_keys_share_one_hash_tag_per_batch(redis_server):
    store = RedisStore(redis_server.url, "fgw-tag:", 60, 60)
    try:
        bid = new_bid()
        await store.create(bid)
        await store.acquire(bid, "g", 5)
        await store.begin_commit(bid, "c", 5)
        keys = sorted(await store.conn.call("KEYS", f"fgw-tag:*{bid}*"))
        tag = f"fgw-tag:{{{bid}}}"
        assert keys == [f"{tag}:attempts", f"{tag}:leases", f"{tag}:state"]
        assert 0 < await store.conn.call("PTTL", f"{tag}:state") <= 45 * 60 * 1000
    finally:
        await store.close()


async def test_redis_down_raises_store_error_quickly():
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", "x:", 60, 60)
    try:
        with pytest.raises(StoreError):
            await asyncio.wait_for(store.acquire("b-1", "g", 5), 5)
        assert not await store.ping()
    finally:
        await store.close()


async def test_redis_keeps_committed_batches_across_restarts_of_redis_and_the_gateway():
    """A restarted Redis (with its append-only file, as in production) and a new gateway process
    still know a committed batch, with its retention running; a fired one still ages out."""
    from tests.support.processes import RedisServer

    server = RedisServer(persistent=True).start()
    try:
        before = RedisStore(server.url, "fgw:", 60, FIRED_RETENTION)
        sealed = await committed_batch(before)
        fired = await committed_batch(before)
        await before.mark_fired(fired)
        await before.close()
        server.stop()
        server.start()
        after = RedisStore(server.url, "fgw:", 60, FIRED_RETENTION)
        try:
            assert await after.state(sealed) == COMMITTED
            assert 50_000 < await after.conn.call("PTTL", f"fgw:{{{sealed}}}:state") <= 60_000
            assert (await after.acquire(sealed, "g", LEASE)).state == COMMITTED
            await asyncio.sleep(FIRED_RETENTION)
            assert await after.state(fired) == UNKNOWN
        finally:
            await after.close()
    finally:
        server.cleanup()


async def test_callback_jids_are_remembered_with_their_batch(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.add_callbacks(bid, ["cb-1", "cb-2"])
    assert await store.is_callback(bid, "cb-1") and await store.is_callback(bid, "cb-2")
    assert not await store.is_callback(bid, "copy")
    assert not await store.is_callback(new_bid(), "cb-1")


async def test_a_commit_that_does_not_adopt_leaves_an_unknown_batch_alone(ledger):
    """Under unknown_batch: verify the gateway asks the server before it records anything."""
    store, bid = ledger.store, new_bid()
    assert await store.begin_commit(bid, "c", LEASE, adopt=False) == UNKNOWN
    assert not await store.commit_go(bid, "c", LEASE, adopt=False)
    assert await store.state(bid) == UNKNOWN
    await store.create(bid)
    assert await store.begin_commit(bid, "c", LEASE, adopt=False) == OPEN  # a known batch: as always
    assert await store.commit_go(bid, "c", LEASE, adopt=False)
