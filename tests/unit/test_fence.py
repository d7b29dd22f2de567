"""The commit fence without sockets: the lapse watch, and fences over the in-process ledger.

Times are a scaled-down `Timing` (a lease life of 0.2 s), so that a test waits what a real
gateway would wait, in proportion. Each test names the rule of docs/fence.md it checks.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.batches.fence import CommitStart, Fence, LapseWatch, Timing
from gateway.metrics import Metrics
from gateway.store import COMMITTING, OPEN
from gateway.store.memory import MemoryStore

DAY = 86400.0
SHORT = Timing(
    lease_life=0.2, margin=0.02, server_bound=0.05, pause=0.02, renew_every=0.03, idle=0.05, attempt_life=0.3
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- the lapse watch (pure) ---------------------------------------------------------------------


def test_an_entry_lapses_only_after_a_whole_life_at_one_beat():
    clock = Clock()
    watch = LapseWatch(10.0, clock)
    assert watch.saw("b", {"g1": 1, "g2": 1}) == {}
    clock.now += 6
    assert watch.saw("b", {"g1": 1, "g2": 2}) == {}  # g2 was beaten: its clock starts again
    clock.now += 4
    assert watch.saw("b", {"g1": 1, "g2": 2}) == {"g1": 1}
    assert watch.lapsed("b") == {"g1": 1}
    clock.now += 6
    assert watch.lapsed("b") == {"g1": 1, "g2": 2}


def test_an_entry_that_disappears_is_forgotten_and_a_new_one_starts_from_its_first_sighting():
    clock = Clock()
    watch = LapseWatch(10.0, clock)
    watch.saw("b", {"g1": 1})
    clock.now += 20
    assert watch.saw("b", {"g2": 1}) == {}  # g1 is gone (released); g2 was never seen before
    assert watch.lapsed("b") == {}
    watch.forget("b")
    clock.now += 20
    assert watch.lapsed("b") == {}


def test_the_watch_is_bounded():
    clock = Clock()
    watch = LapseWatch(1.0, clock)
    for n in range(10_005):
        watch.saw(f"b-{n}", {"g": 1})
    assert len(watch._seen) <= 10_000
    clock.now += 2
    assert watch.lapsed("b-10004") == {"g": 1}  # the newest are kept


# --- fences over one ledger ---------------------------------------------------------------------


@pytest.fixture
async def fences():
    """Two gateways' fences over one in-process ledger (as two gateways over one Redis)."""
    store = MemoryStore(45 * DAY, 7 * DAY)
    made: list[Fence] = []

    def fence(running: bool = True) -> Fence:
        made.append(Fence(store, Metrics(), timing=SHORT))
        if running:
            made[-1].start()
        return made[-1]

    yield store, fence
    for fence_ in made:
        await fence_.close()


async def test_a_dead_gateways_lease_is_ended_by_the_committer_after_a_lease_life_of_its_own_clock(fences):
    store, fence = fences
    await store.create("b-1")
    dead, committer = fence(running=False), fence()  # `dead` never renews: it died after admitting
    _, ticket = await dead.admit("b-1")
    assert ticket is not None
    started = time.monotonic()
    outcomes = []
    while (
        outcome := await committer.begin_commit("b-1", committer.new_attempt(), SHORT.lease_life / 4)
    ) != CommitStart.GO:
        outcomes.append(outcome)  # refused with COMMIT_FENCE_TIMEOUT, retried
    elapsed = time.monotonic() - started
    assert outcomes and set(outcomes) == {CommitStart.TIMED_OUT}
    # The watch spans the attempts: ended one lease life after the first sighting, not earlier.
    assert SHORT.lease_life <= elapsed < SHORT.lease_life * 2, elapsed
    assert not (await store.renew("b-1", ticket.lease.token)).held  # never revived


async def test_a_lease_its_gateway_renews_is_never_ended_however_long_the_commit_waits(fences):
    store, fence = fences
    await store.create("b-1")
    holder, committer = fence(), fence()
    _, ticket = await holder.admit("b-1")
    ticket.written(lambda: None)  # on its way to the server, and not answered (a stalled link)
    waited = await committer.begin_commit("b-1", committer.new_attempt(), 3 * SHORT.lease_life)
    assert waited == CommitStart.TIMED_OUT
    assert await store.state("b-1") == OPEN  # the only attempt withdrew: open again
    ticket.answered()
    assert await committer.begin_commit("b-1", committer.new_attempt(), SHORT.lease_life) == CommitStart.GO


async def test_the_ledgers_clock_ends_nothing():
    """A step of the ledger's clock (the memory store's clock stands for Redis's) moves only record
    lifetimes: a lease in use still holds the commit."""
    ledger_clock = Clock()
    store = MemoryStore(45 * DAY, 7 * DAY, clock=ledger_clock)
    holder, committer = Fence(store, Metrics(), timing=SHORT), Fence(store, Metrics(), timing=SHORT)
    holder.start()
    committer.start()
    try:
        await store.create("b-1")
        _, ticket = await holder.admit("b-1")
        ticket.written(lambda: None)
        ledger_clock.now += 30 * 60  # the ledger's clock steps half an hour
        outcome = await committer.begin_commit("b-1", committer.new_attempt(), 2 * SHORT.lease_life)
        assert outcome == CommitStart.TIMED_OUT
        ledger_clock.now -= 60 * 60  # and an hour back
        ticket.answered()
        assert (
            await committer.begin_commit("b-1", committer.new_attempt(), SHORT.lease_life) == CommitStart.GO
        )
    finally:
        await holder.close()
        await committer.close()


async def test_a_command_whose_connection_died_counts_for_margin_plus_server_bound(fences):
    """Bytes already at the server's host are handled even after a reset (A2, A3)."""
    store, fence = fences
    await store.create("b-1")
    holder, committer = fence(), fence()
    _, ticket = await holder.admit("b-1")
    ticket.written(lambda: None)
    ticket.lost()  # the upstream connection died with the command unanswered
    lost_at = time.monotonic()
    outcome = await committer.begin_commit("b-1", committer.new_attempt(), 4 * SHORT.after_reset)
    assert outcome == CommitStart.GO
    assert time.monotonic() - lost_at >= SHORT.after_reset


async def test_a_lease_past_its_deadline_resets_and_is_never_released(fences):
    store, fence = fences
    await store.create("b-1")
    holder = fence(running=False)  # cut from the ledger: no renewal
    _, ticket = await holder.admit("b-1")
    aborted = []
    ticket.written(lambda: aborted.append(True))
    await asyncio.sleep(SHORT.valid_for + 0.02)
    assert aborted == [True] and not ticket.writable()
    ticket.lost()  # the reset connection reports itself lost
    await asyncio.sleep(SHORT.after_reset + 0.02)
    assert ticket.lease.token in store._leases.get("b-1", {})  # still there: only a committer ends it


async def test_an_abandoned_commit_is_resolved_after_an_attempt_life_of_watching(fences):
    store, fence = fences
    await store.create("b-1")
    await store.begin_commit("b-1", "dead")  # a committer that died while waiting in the fence
    pusher = fence()
    watched = time.monotonic()
    assert await pusher.admit("b-1") == (COMMITTING, None)
    while (admitted := await pusher.admit("b-1"))[1] is None:
        assert admitted[0] == COMMITTING
        await asyncio.sleep(SHORT.attempt_life / 10)
    assert time.monotonic() - watched >= SHORT.attempt_life
    admitted[1].answered()


async def test_a_sent_commit_whose_gateway_died_reads_committed():
    store = MemoryStore(45 * DAY, 7 * DAY)
    await store.create("b-1")
    await store.begin_commit("b-1", "dead")
    assert (await store.commit_go("b-1", "dead", {})).go  # sent; then the gateway died
    fence = Fence(store, Metrics(), timing=SHORT)
    assert await fence.state("b-1") == COMMITTING
    await asyncio.sleep(SHORT.attempt_life)
    assert str(await fence.state("b-1")) == "committed"


async def test_concurrent_admissions_share_one_acquire(fences):
    store, fence = fences
    await store.create("b-1")
    holder = fence()
    results = await asyncio.gather(*(holder.admit("b-1") for _ in range(20)))
    assert all(state == OPEN and ticket is not None for state, ticket in results)
    assert holder.metrics.store_calls.labels("acquire")._value.get() == 1
    assert len(store._leases["b-1"]) == 1
    for _, ticket in results:
        ticket.answered()
