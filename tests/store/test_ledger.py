"""One suite, both ledgers: the in-process store and Redis (a real redis-server) behave the same.

Time: the memory store runs on a clock the test moves; Redis on its own clock, so its tests use
short lifetimes and really wait. `ledger.wait(s)` does the right thing for each. Only record
lifetimes are measured by the ledger: leases and commit attempts carry beats, and no time of the
ledger's ends them (the Redis scripts never call TIME).
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.store import COMMITTED, COMMITTING, FIRED, OPEN, UNKNOWN, StoreError
from gateway.store.memory import DRAIN_EVERY, DRAIN_STEP, EXPIRE_PER_CALL, MemoryStore
from gateway.store.redis import RedisStore
from tests.support.client import uid
from tests.support.ledgers import FakeClock, Ledger
from tests.support.processes import free_port

COMMITTED_RETENTION, FIRED_RETENTION = 1.2, 0.6


@pytest.fixture(params=["memory", "redis"])
async def ledger(request):
    if request.param == "memory":
        clock = FakeClock()
        yield Ledger(MemoryStore(COMMITTED_RETENTION, FIRED_RETENTION, clock=clock), clock)
        return
    server = request.getfixturevalue("redis_server")
    store = RedisStore(server.url, f"test-{uid()}:", COMMITTED_RETENTION, FIRED_RETENTION)
    yield Ledger(store, None)
    await store.close()


def new_bid() -> str:
    return "b-" + uid()


async def committed_batch(store) -> str:
    bid = new_bid()
    await store.create(bid)
    await store.begin_commit(bid, "c")
    assert (await store.commit_go(bid, "c", {})).go
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
    assert (await store.acquire(bid, "g1")).state == UNKNOWN
    await store.create(bid)
    reply = await store.acquire(bid, "g1")
    assert (reply.state, reply.held) == (OPEN, True)
    assert await store.begin_commit(bid, "c1") == OPEN
    refused = await store.acquire(bid, "g2")
    assert (refused.state, refused.held) == (COMMITTING, False)
    # g1's lease, taken before the seal, is still held and reported as such.
    assert (await store.acquire(bid, "g1")).held


async def test_a_lease_holds_the_commit_until_released(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.acquire(bid, "g1")
    await store.begin_commit(bid, "c1")
    waiting = await store.commit_go(bid, "c1", {})
    assert not waiting.go and waiting.leases == {"g1": 1}
    renewed = await store.renew(bid, "g1")  # renewal works in any state, and beats the lease
    assert (renewed.state, renewed.held) == (COMMITTING, True)
    assert (await store.commit_go(bid, "c1", {})).leases == {"g1": 2}
    store.release(bid, "g1")
    await store.ping()  # the release is not awaited; a round trip after it orders it
    assert (await store.commit_go(bid, "c1", {})).go


async def test_only_the_committer_ends_a_lease_and_only_at_the_beat_it_saw_unchanged(ledger):
    """No time passes in the ledger's own reckoning: a lease stays until released, or until a
    committer that saw it at one beat for a whole lease life (on its own clock) ends it at that
    beat. A lease beaten since is not ended; an ended one is never revived."""
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.acquire(bid, "g1")
    await store.acquire(bid, "g2")
    await store.begin_commit(bid, "c1")
    await ledger.wait(1.0)  # the ledger's time passing ends nothing (v2 leases here lived 0.4 s)
    assert (await store.commit_go(bid, "c1", {})).leases == {"g1": 1, "g2": 1}
    await store.renew(bid, "g2")  # g2 is alive: beaten since the committer looked
    waiting = await store.commit_go(bid, "c1", {"g1": 1, "g2": 1})
    assert not waiting.go and waiting.leases == {"g2": 2}  # g1 ended, g2 not
    assert not (await store.renew(bid, "g1")).held  # never revived
    assert not (await store.acquire(bid, "g1")).held
    assert (await store.commit_go(bid, "c1", {"g2": 2})).go


async def test_a_lease_outlives_its_batch_record_and_ends_with_the_commit(ledger):
    """Only a lease's holder or a committer ends it: not the batch record's lifetime on the
    ledger's clock (a forward step of that clock longer than the record's 45 minutes must not
    erase a lease in use). Once the batch is committed, no lease matters: they go with it."""
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.acquire(bid, "g1")
    if isinstance(store, RedisStore):
        ttl = await store.conn.call("PTTL", f"{store.prefix}{{{bid}}}:leases")
        assert ttl > 44 * 60 * 1000  # longer than any record but a committed one, never shorter
    await store.begin_commit(bid, "c1")
    assert (await store.commit_go(bid, "c1", {})).leases == {"g1": 1}
    store.release(bid, "g1")
    assert (await store.commit_go(bid, "c1", {})).go
    await store.acquire(bid, "g2")  # refused (committing), so nothing is added
    await store.finish_commit(bid, "c1", committed=True)
    if isinstance(store, RedisStore):
        assert await store.conn.call("EXISTS", f"{store.prefix}{{{bid}}}:leases") == 0
    else:
        assert bid not in store._leases


async def test_overlapping_commits_a_timeout_does_not_reopen_what_another_attempt_finishes(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.acquire(bid, "g1")
    await store.begin_commit(bid, "c1")
    assert await store.begin_commit(bid, "c2") == COMMITTING  # joins
    assert await store.finish_commit(bid, "c1", committed=False) == COMMITTING  # c1 timed out
    assert (await store.acquire(bid, "g2")).state == COMMITTING  # still sealed
    store.release(bid, "g1")
    assert (await store.commit_go(bid, "c2", {})).go
    assert await store.finish_commit(bid, "c2", committed=True) == COMMITTED
    assert await store.state(bid) == COMMITTED


async def test_the_ledger_follows_the_servers_ok_whatever_state_it_is_in(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.begin_commit(bid, "c1")
    assert await store.finish_commit(bid, "c1", committed=False) == OPEN  # timed out, the only one
    assert await store.finish_commit(bid, "c2", committed=True) == COMMITTED  # but the server said +OK


async def test_an_abandoned_commit_never_sent_reopens_the_batch(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.acquire(bid, "g1")
    await store.begin_commit(bid, "dead")
    assert not (await store.commit_go(bid, "dead", {})).go  # waiting; then its gateway dies
    seen = await store.attempts(bid)
    assert seen == {"w:dead": 2}
    await ledger.wait(1.0)
    assert await store.state(bid) == COMMITTING  # nothing resolves by the ledger's time...
    assert await store.abandon(bid, seen) == OPEN  # ...only a gateway that saw it unchanged
    assert (await store.acquire(bid, "g2")).held


async def test_an_abandoned_commit_that_may_have_reached_the_server_stays_sealed(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.begin_commit(bid, "dead")
    assert (await store.commit_go(bid, "dead", {})).go  # sent; then its gateway dies before the reply
    seen = await store.attempts(bid)
    assert list(seen) == ["s:dead"]
    assert await store.abandon(bid, seen) == COMMITTED
    assert (await store.acquire(bid, "g2")).state == COMMITTED
    # A retried commit from any gateway is forwarded (the server answers it) and recorded.
    assert await store.begin_commit(bid, "retry") == COMMITTED
    assert await store.finish_commit(bid, "retry", committed=True) == COMMITTED


async def test_abandon_does_nothing_when_an_attempt_moved_since_it_was_seen(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.acquire(bid, "g1")
    await store.begin_commit(bid, "slow")
    seen = await store.attempts(bid)
    await store.commit_go(bid, "slow", {})  # the committer is alive: its attempt is beaten
    assert await store.abandon(bid, seen) == COMMITTING
    await store.begin_commit(bid, "other")
    assert await store.abandon(bid, {**(await store.attempts(bid)), "w:ghost": 1}) == COMMITTING


async def test_an_abandoned_attempt_that_finds_the_batch_reopened_seals_it_again(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.begin_commit(bid, "slow")
    assert await store.abandon(bid, await store.attempts(bid)) == OPEN  # it looked dead to someone
    assert (await store.acquire(bid, "g1")).held  # open: a lease taken
    assert not (await store.commit_go(bid, "slow", {})).go  # sealed again, waits for g1
    assert await store.state(bid) == COMMITTING


async def test_commit_of_an_unknown_batch_adopts_it(ledger):
    store, bid = ledger.store, new_bid()
    assert await store.begin_commit(bid, "c") == UNKNOWN
    assert await store.state(bid) == COMMITTING
    assert (await store.commit_go(bid, "c", {})).go
    await store.finish_commit(bid, "c", committed=True)
    assert await store.state(bid) == COMMITTED


async def test_reopen_moves_only_committed_back_to_open(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    assert await store.reopen(bid) == OPEN
    await store.begin_commit(bid, "c")
    assert await store.reopen(bid) == COMMITTING
    await store.finish_commit(bid, "c", committed=True)
    assert await store.reopen(bid) == COMMITTED
    assert await store.state(bid) == OPEN


async def test_fired_is_terminal(ledger):
    store, bid = ledger.store, new_bid()
    await store.create(bid)
    await store.mark_fired(bid)
    assert await store.reopen(bid) == FIRED
    assert await store.begin_commit(bid, "c") == FIRED
    assert await store.finish_commit(bid, "c", committed=True) == FIRED
    await store.create(bid)
    assert await store.state(bid) == FIRED
    assert (await store.acquire(bid, "g")).state == FIRED


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
    await store.begin_commit(bid, "c")
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
        *(store.acquire(bid, f"g{i}") for i in range(50)), store.begin_commit(bid, "c")
    )
    granted = [f"g{i}" for i, reply in enumerate(results[:-1]) if reply.held]
    assert all(reply.state in (OPEN, COMMITTING) for reply in results[:-1])
    for gateway in granted:
        assert gateway in (await store.commit_go(bid, "c", {})).leases
        store.release(bid, gateway)
    await store.ping()
    assert (await store.commit_go(bid, "c", {})).go


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
        await store.acquire(bid, "g")
        await store.begin_commit(bid, "c")
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
            await asyncio.wait_for(store.acquire("b-1", "g"), 5)
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
            assert (await after.acquire(sealed, "g")).state == COMMITTED
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
    assert await store.begin_commit(bid, "c", adopt=False) == UNKNOWN
    assert not (await store.commit_go(bid, "c", {}, adopt=False)).go
    assert await store.state(bid) == UNKNOWN
    await store.create(bid)
    assert await store.begin_commit(bid, "c", adopt=False) == OPEN  # a known batch: as always
    assert (await store.commit_go(bid, "c", {}, adopt=False)).go


async def test_a_burst_of_calls_on_a_redis_cluster_waits_for_connections_and_fails_none(redis_cluster):
    """redis-py opens a connection per concurrent command, up to a limit per node, and fails the
    rest (MaxConnectionsError): a burst of batch commands must queue instead (a spike of pushes
    into many batches, or the engine's sweep, reads hundreds at once)."""
    store = RedisStore(redis_cluster.url, f"test-{uid()}:", COMMITTED_RETENTION, FIRED_RETENTION)
    try:
        bids = [new_bid() for _ in range(400)]
        await asyncio.gather(*(store.create(bid) for bid in bids))
        assert set(await asyncio.gather(*(store.state(bid) for bid in bids))) == {OPEN}
    finally:
        await store.close()
