"""Playbooks for the batch rules: the guard and the fence over the in-process ledger, no sockets.

Each test feeds commands and server replies to the guard as a session would (tests/support/
playbook.py: `decide`, `answer`), and asserts the decisions that come out (forward, with or
without an admission ticket; a refusal, byte for byte where it matters) and the ledger's state. A
`FakeClient` stands in for the session and answers the gateway's own `BATCH STATUS` questions
from a script.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.batches.fence import CommitStart, Fence, Timing
from gateway.batches.guard import BatchGuard
from gateway.decisions import Forward, Later, Respond
from gateway.metrics import Metrics
from gateway.protocol import Command, bulk_reply
from gateway.store import COMMITTED, FIRED, OPEN, UNKNOWN, StoreError
from gateway.store.memory import MemoryStore
from tests.support.fakes import Clock, FakeClient, settings
from tests.support.playbook import answer, committed, decide

DAY = 86400.0
SHORT = Timing(
    lease_life=0.2, margin=0.02, server_bound=0.03, pause=0.02, renew_every=0.05, idle=0.05, attempt_life=0.3
)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(clock):
    return MemoryStore(45 * DAY, 7 * DAY, clock=clock)


@pytest.fixture
async def guards(clock):
    """Makes started guards (over a store, with settings), and closes every one of them."""
    made: list[BatchGuard] = []

    def make(store, **values: str) -> BatchGuard:
        guard = BatchGuard(store, settings(**values), Metrics(), clock=clock)
        guard.start()
        made.append(guard)
        return guard

    yield make
    for guard in made:
        await guard.close()


@pytest.fixture
async def guard(guards, store):
    return guards(store)


def push(bid: str, jid: str = "j1") -> str:
    return "PUSH " + json.dumps({"jid": jid, "jobtype": "x", "args": [], "custom": {"bid": bid}})


def calls(guard: BatchGuard, operation: str) -> float:
    return guard.metrics.store_calls.labels(operation)._value.get()


async def test_plain_traffic_is_forwarded_untouched(guard):
    client = FakeClient()
    for line in ("PUSH " + json.dumps({"jid": "p", "jobtype": "x", "args": []}), "INFO", "BEAT {}"):
        assert guard.decide(Command.parse(line.encode() + b"\r\n"), client, True) is None


async def test_admission_takes_a_lease_once_then_admits_locally(guard, store):
    client = FakeClient()
    await store.create("b-1")
    first = await decide(guard, push("b-1"), client)
    assert isinstance(first, Forward) and first.ticket is not None
    for n in range(20):
        decision = guard.decide(Command.parse(push("b-1", f"j{n}").encode() + b"\r\n"), client, True)
        assert isinstance(decision, Forward) and decision.ticket is not None  # synchronous: no store call
        await answer(decision)
    await answer(first)
    assert calls(guard, "acquire") == 1


async def test_a_command_decided_before_the_lease_existed_is_admitted_under_it_and_a_seal_ends_it(
    guard, store
):
    """Two PUSHes decided while this gateway held no lease (both Later): the first takes one;
    the second, worked out after that, is admitted under the same lease. A second lease would
    not be the one a seal finds: the commit would wait for its next renewal (found by the race
    test, where it held 20 % of the commits for up to 2 s)."""
    await store.create("b-1")
    early, late = FakeClient(), FakeClient()
    first = guard.decide(Command.parse(push("b-1", "j1").encode() + b"\r\n"), early, True)
    second = guard.decide(Command.parse(push("b-1", "j2").encode() + b"\r\n"), late, True)
    assert type(first) is Later and type(second) is Later
    first, second = await first.work(), await second.work()
    assert isinstance(first, Forward) and isinstance(second, Forward)
    assert calls(guard, "acquire") == 1 and first.ticket.lease is second.ticket.lease
    await answer(first)
    await answer(second)
    commit = guard.fence.begin_commit("b-1", guard.fence.new_attempt(), timeout=1.0)
    assert await asyncio.wait_for(commit, 0.5) == CommitStart.GO  # released at the seal, not at a renewal


async def test_pushes_and_children_into_a_committed_batch_are_refused(guard, store):
    client = FakeClient()
    await committed(guard, store, "b-1", client)
    decision = await decide(guard, push("b-1"), client)
    assert isinstance(decision, Respond) and decision.data.startswith(b"-ERR BATCH_COMMITTED")
    child = await decide(guard, 'BATCH NEW {"parent_bid":"b-1","success":{"jobtype":"x"}}', client)
    assert child.data.startswith(b"-ERR PARENT_SEALED")


async def test_the_commit_waits_for_a_push_in_flight_and_goes_when_it_is_answered(guard, store):
    pusher, committer = FakeClient(), FakeClient()
    await store.create("b-1")
    admitted = await decide(guard, push("b-1"), pusher)
    admitted.ticket.written(pusher.abort)
    commit = asyncio.ensure_future(decide(guard, "BATCH COMMIT b-1", committer))
    await asyncio.sleep(0.05)
    assert not commit.done()  # the push is unanswered: the commit must not reach the server
    refused = await decide(guard, push("b-1", "late"), pusher)
    assert refused.data.startswith(b"-ERR BATCH_COMMITTED")  # sealed: no new admission
    admitted.ticket.answered()
    decision = await asyncio.wait_for(commit, 1)
    assert isinstance(decision, Forward)
    await answer(decision)
    assert await store.state("b-1") == COMMITTED


async def test_a_fence_timeout_refuses_the_commit_and_reopens_the_batch(guards, store):
    guard = guards(store, commit_fence_timeout="100ms")
    client = FakeClient()
    await store.create("b-1")
    stuck = await decide(guard, push("b-1"), client)  # never answered
    decision = await decide(guard, "BATCH COMMIT b-1", client)
    assert decision.data == (
        b"-ERR COMMIT_FENCE_TIMEOUT pushes into batch b-1 were still in flight after 0.1s; the batch stays"
        b" open, retry the commit (commit_fence_timeout: 0.1s)\r\n"
    )
    assert await store.state("b-1") == OPEN
    await answer(stuck)
    retry = await decide(guard, "BATCH COMMIT b-1", client)
    assert isinstance(retry, Forward)  # succeeds once the stalled command was answered


async def test_overlapping_commits_the_second_ones_ok_seals_the_batch(guards, store):
    guard = guards(store, commit_fence_timeout="200ms")
    pusher, c1, c2 = FakeClient(), FakeClient(), FakeClient()
    await store.create("b-1")
    stuck = await decide(guard, push("b-1"), pusher)
    first = asyncio.ensure_future(decide(guard, "BATCH COMMIT b-1", c1))
    await asyncio.sleep(0.1)
    guard.reconfigure(settings(commit_fence_timeout="2s"))
    second = asyncio.ensure_future(decide(guard, "BATCH COMMIT b-1", c2))
    assert (await first).data.startswith(b"-ERR COMMIT_FENCE_TIMEOUT")
    assert (await decide(guard, push("b-1", "j2"), pusher)).data.startswith(b"-ERR BATCH_COMMITTED")
    await answer(stuck)
    assert await answer(await second) == b"+OK\r\n"
    assert await store.state("b-1") == COMMITTED
    assert (await decide(guard, push("b-1", "j3"), pusher)).data.startswith(b"-ERR BATCH_COMMITTED")


async def test_admission_waits_until_the_connections_earlier_commands_are_answered(guard, store):
    """The fence's barrier: with something unanswered ahead on the connection (a slow QUEUE REMOVE,
    an INFO whose reply the client has not read), the PUSH is a Later that the pipeline starts only
    once all of it was answered; deciding it takes nothing from the ledger."""
    client = FakeClient()
    await store.create("b-1")
    decision = guard.decide(Command.parse(push("b-1").encode() + b"\r\n"), client, False)
    assert type(decision) is Later and decision.barrier
    assert calls(guard, "acquire") == 0  # not admitted yet
    admitted = await decision.work()  # what the pipeline does once everything ahead was answered
    assert admitted.ticket is not None and admitted.ticket.writable()
    assert calls(guard, "acquire") == 1


async def test_a_seal_from_another_gateway_stops_local_admission_at_once(store):
    ours, theirs = Fence(store, Metrics()), Fence(store, Metrics())
    ours.start()
    theirs.start()
    try:
        await store.create("b-1")
        _, ticket = await ours.admit("b-1")
        ticket.answered()
        held = ours.admit_locally("b-1")  # the lease admits locally...
        assert held is not None
        task = asyncio.ensure_future(theirs.begin_commit("b-1", theirs.new_attempt(), 1.0))
        await asyncio.sleep(0.01)
        assert ours.admit_locally("b-1") is None  # ...until the seal is heard
        assert not task.done()  # the ticket taken before the seal still holds the commit
        held.answered()
        assert await asyncio.wait_for(task, 1) == CommitStart.GO
    finally:
        await ours.close()
        await theirs.close()


async def test_a_lease_that_cannot_be_renewed_resets_its_connections_before_the_deadline(store, monkeypatch):
    fence = Fence(store, Metrics(), timing=SHORT)  # never started: nothing renews behind the test's back
    await store.create("b-1")
    _, written = await fence.admit("b-1")
    client = FakeClient()
    written.written(client.abort)
    _, unwritten = await fence.admit("b-1")

    async def down(*args):
        raise StoreError("redis unreachable")

    monkeypatch.setattr(store, "renew", down)
    await fence.renew_all()
    await asyncio.sleep(SHORT.valid_for + 0.05)
    assert client.aborted == 1  # the connection carrying the written command was reset
    assert not unwritten.writable()  # and the one not yet written never will be
    assert unwritten.unwritable_reply().startswith(b"-ERR STATE_UNAVAILABLE")
    assert fence.metrics.lease_aborts._value.get() == 1


async def test_unknown_batches_are_verified_with_the_server(guard, store):
    client = FakeClient()
    client.status("b-old")
    client.status("b-done", complete_st="1")
    assert (await decide(guard, push("b-old"), client)).ticket is not None
    assert await store.state("b-old") == OPEN
    assert (await decide(guard, push("b-done"), client)).data.startswith(b"-ERR BATCH_CALLBACK_FIRED")
    assert await store.state("b-done") == FIRED
    # No such batch: the server answers (clients match on its own error text); nothing recorded.
    forwarded = await decide(guard, push("b-none"), client)
    assert isinstance(forwarded, Forward) and forwarded.ticket is None
    assert await store.state("b-none") == UNKNOWN


async def test_shadow_mode_forwards_what_it_would_refuse(guards, store):
    guard = guards(store, mode="shadow")
    client = FakeClient()
    await committed(guard, store, "b-1", client)
    decision = await decide(guard, push("b-1"), client)
    assert isinstance(decision, Forward) and decision.ticket is None
    assert guard.metrics.shadow_refusals.labels("BATCH_COMMITTED")._value.get() == 1


async def test_store_errors_follow_on_store_error(guards, store, monkeypatch):
    async def down(*args):
        raise StoreError("redis unreachable")

    monkeypatch.setattr(store, "acquire", down)
    client = FakeClient()
    refused = await decide(guards(store), push("b-1"), client)
    assert refused.data == (
        b"-ERR STATE_UNAVAILABLE the batch store is unavailable; batch b-1 cannot be checked; retry"
        b" (on_store_error: reject)\r\n"
    )
    assert isinstance(await decide(guards(store, on_store_error="allow"), push("b-1"), client), Forward)


async def test_a_committed_batch_with_a_failing_job_stays_sealed_for_weeks(guards, clock):
    """Faktory retries a failing job for about three weeks; the batch must stay sealed that long,
    even with a retention shorter than that (7 days here), because each retry is seen."""
    store = MemoryStore(7 * DAY, 7 * DAY, clock=clock)
    guard = guards(store)
    worker, outsider = FakeClient(), FakeClient()
    await committed(guard, store, "b-1", worker)
    retry = json.dumps({"jid": "j1", "jobtype": "x", "args": [], "custom": {"bid": "b-1"}}).encode()
    for _day in range(25):  # each retry of the failing member job is fetched again, and seen
        clock.now += DAY
        fetch = await decide(guard, "FETCH default", worker)
        await answer(fetch, bulk_reply(retry))
    assert await store.state("b-1") == COMMITTED
    refused = await decide(guard, push("b-1", "outsider"), outsider)
    assert refused.data.startswith(b"-ERR BATCH_COMMITTED")


async def test_a_fired_batch_ages_out_after_its_retention(guard, store, clock):
    client = FakeClient()
    await committed(guard, store, "b-1", client)
    client.status("b-1", complete_st="1")
    status = await decide(guard, "BATCH STATUS b-1", client)
    assert await answer(status, client.statuses["b-1"]) == client.statuses["b-1"]
    assert await store.state("b-1") == FIRED
    clock.now += 8 * DAY
    assert await store.state("b-1") == UNKNOWN


async def test_a_client_job_may_not_carry_the_servers_callback_keys(guard, store):
    client = FakeClient()
    forged = {"jid": "forge-1", "jobtype": "x", "args": [], "queue": "evilq", "custom": {"_pbid": "b-1"}}
    refused = await decide(guard, "PUSH " + json.dumps(forged), client)
    assert refused.data.startswith(b"-ERR RESERVED_KEY")
    await store.create("b-1")
    jobs = [
        {"jid": "ok", "jobtype": "x", "args": [], "custom": {"bid": "b-1"}},
        {"jid": "cb", "jobtype": "x", "args": [], "custom": {"_bid": "b-1"}},
    ]
    decision = await decide(guard, "PUSHB " + json.dumps(jobs), client)
    assert isinstance(decision, Forward) and b'"jid":"cb"' not in decision.data
    merged = await answer(decision, bulk_reply(b"{}"))
    assert b"RESERVED_KEY" in merged and b'"cb"' in merged


async def test_a_forged_callback_job_does_not_mark_a_batch_fired(guard, store):
    """Anyone can push a job that looks like a callback straight to the server: only BATCH STATUS
    says whether the callback was really enqueued."""
    client = FakeClient()
    await store.create("b-1")
    client.status("b-1")  # the server: no callback enqueued
    forged = json.dumps({"jid": "f", "jobtype": "x", "args": [], "custom": {"_bid": "b-1"}}).encode()
    await answer(await decide(guard, "FETCH evilq", client), bulk_reply(forged))
    assert client.asked == [b"BATCH STATUS b-1\r\n"]
    assert await store.state("b-1") == OPEN
    client.status("b-1", complete_st="1")  # the real callback
    await answer(await decide(guard, "FETCH default", client), bulk_reply(forged))
    assert await store.state("b-1") == FIRED


async def test_deep_json_is_judged_as_the_server_reads_it(guards, store):
    """Go decodes 10,000 levels, Python's decoder about 1,000: a job nested deeper than Python can
    go is still read where a batch key can be (its custom), and judged, never refused blind."""
    guard = guards(store, mode="member-reopen")
    client = FakeClient(wid="w1")
    deep = "[" * 5000 + "]" * 5000
    member = json.dumps({"jid": "j1", "jobtype": "x", "args": [], "custom": {"bid": "b-1"}}).encode()
    await store.create("b-1")
    await answer(await decide(guard, "FETCH default", client), bulk_reply(member))
    assert guard.decide(Command.parse(f"ACK {deep}\r\n".encode()), client, True) is None  # forwarded
    assert guard.decide(Command.parse(f"PUSH {deep}\r\n".encode()), client, True) is None  # names no batch
    naming = '{"jid":"d","args":' + deep + ',"custom":{"x":' + deep + ',"bid":"b-1"}}'
    admitted = await decide(guard, f"PUSH {naming}", client)
    assert isinstance(admitted, Forward) and admitted.ticket is not None  # b-1 is open
    await answer(admitted)
    await committed(guard, store, "b-1", client)
    refused = await decide(guard, f"PUSH {naming}", client)
    assert refused.data.startswith(b"-ERR BATCH_COMMITTED batch b-1 ")
    bulk = "PUSHB [" + naming + ',{"jid":"e","args":' + deep + "}]"
    refused = await decide(guard, bulk, client)
    assert (
        isinstance(refused, Forward)
        and refused.data == ('PUSHB [{"jid":"e","args":' + deep + "}]\r\n").encode()
    )
    fetched = await answer(await decide(guard, "FETCH default", client), bulk_reply(deep.encode()))
    assert fetched.startswith(b"$")


async def test_only_the_real_child_callback_lets_its_worker_reopen_the_parent(guards, store):
    """A copy of a fired child's callback, pushed straight to the server, carries the right _bid
    and _pbid; only the jid the child's BATCH NEW gave its callback tells the real one apart."""
    guard = guards(store, mode="member-reopen")
    creator, worker, attacker = FakeClient(), FakeClient(wid="w", peer="10.0.0.1:1"), FakeClient(wid="a")
    await committed(guard, store, "b-parent", creator)
    await store.reopen("b-parent")  # a member reopened the parent to add the child
    spec = {"parent_bid": "b-parent", "success": {"jid": "cb-real", "jobtype": "Step2"}}
    new = await decide(guard, "BATCH NEW " + json.dumps(spec), creator)
    await answer(new, bulk_reply(b"b-child"))
    await store.finish_commit("b-parent", "x", committed=True)
    for client in (worker, attacker):
        client.status("b-child", complete_st="1", parent="b-parent")
    callback = {
        "jobtype": "Step2",
        "args": [],
        "custom": {"_bid": "b-child", "_pbid": "b-parent", "_cb": "success"},
    }
    copy = json.dumps({**callback, "jid": "cb-copy"}).encode()
    await answer(await decide(guard, "FETCH q", attacker), bulk_reply(copy))
    refused = await decide(guard, "BATCH OPEN b-parent", attacker)
    assert refused.data.startswith(b"-ERR BATCH_COMMITTED")
    real = json.dumps({**callback, "jid": "cb-real"}).encode()
    await answer(await decide(guard, "FETCH q", worker), bulk_reply(real))
    worker.status("b-parent")  # the parent has not fired
    assert isinstance(await decide(guard, "BATCH OPEN b-parent", worker), Forward)


async def test_a_deadline_timer_that_fires_early_looks_again(store):
    """The event loop's clock is cached per iteration: its timer can fire before time.monotonic()
    reaches the deadline. Then the fence must look again, not give up (a lost abort is a late join)."""
    import time as real_time

    behind = 0.0
    fence = Fence(store, Metrics(), clock=lambda: real_time.monotonic() - behind, timing=SHORT)
    try:
        await store.create("b-1")
        _, ticket = await fence.admit("b-1")  # the timer is armed on one clock...
        client = FakeClient()
        ticket.written(client.abort)
        behind = 0.02  # ...and read on one that lags it
        await asyncio.sleep(SHORT.valid_for + 0.1)
        assert client.aborted == 1
    finally:
        await fence.close()


async def test_refusals_of_unknown_batches_name_the_setting_in_force(guards, store):
    push = "PUSH " + json.dumps({"jid": "j", "jobtype": "x", "args": [], "custom": {"bid": "b-9"}})
    verify = guards(store, unknown_batch="verify")
    client = FakeClient()
    client.statuses["b-9"] = b"-ERR batch subsystem is only available in Faktory Enterprise\r\n"  # unreadable
    refused = await decide(verify, push, client)
    assert refused.data.startswith(b"-ERR BATCH_UNKNOWN batch b-9 ")
    assert refused.data.endswith(b"(unknown_batch: verify)\r\n")
    reject = guards(store, unknown_batch="reject")
    refused = await decide(reject, push, FakeClient())
    assert refused.data.endswith(b"(unknown_batch: reject)\r\n")
