"""`batches: gateway` without sockets: the guard with the engine over the in-process ledger, a
command in and its exact reply out; the callbacks' pushes go to a fake producer that records them.

The integration tests (tests/integration/test_engine.py) run the same rules against the real
server, Redis and Cluster; these pin the replies' exact bytes and the ledger calls made."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.batches.engine import Engine
from gateway.batches.engine.callbacks import Callbacks
from gateway.batches.fence import Timing
from gateway.batches.guard import BatchGuard
from gateway.decisions import Forward, Respond
from gateway.metrics import Metrics
from gateway.protocol import Command, Reply, bulk_reply
from gateway.store.memory import MemoryStore
from tests.support.engine import STATUS_KEYS
from tests.support.fakes import OK, Clock, FakeClient, reply_of, settings
from tests.support.playbook import answer, decide

DAY = 86400.0
SHORT = Timing(
    lease_life=0.2, margin=0.02, server_bound=0.03, pause=0.02, renew_every=0.05, idle=0.05, attempt_life=0.3
)


class FakeProducer:
    """The gateway's own connection to the server, as far as callbacks use it."""

    def __init__(self) -> None:
        self.pushed: list[dict] = []

    async def push(self, job: bytes, write_before: float | None = None) -> Reply:
        self.pushed.append(json.loads(job))
        return reply_of(OK)

    async def close(self) -> None:
        pass


@pytest.fixture
async def engine():
    """(guard, store, producer): a started guard with the engine, closed afterwards."""
    clock = Clock()
    store = MemoryStore(45 * DAY, 7 * DAY, clock=clock, engine=True)
    producer = FakeProducer()
    metrics = Metrics()
    callbacks = Callbacks(store, producer, metrics, SHORT, stall_after=3600.0)  # type: ignore[arg-type]
    guard = BatchGuard(
        store,
        settings(batches="gateway", mode="member-reopen"),
        metrics,
        clock=clock,
        engine=Engine(store, callbacks),
    )
    guard.start()
    yield guard, store, producer
    await guard.close()


async def respond(guard: BatchGuard, line: str, client: FakeClient) -> bytes:
    decision = await decide(guard, line, client)
    assert type(decision) is Respond, decision  # answered here, never forwarded
    return decision.data


def bulk_text(data: bytes) -> str:
    assert data.startswith(b"$"), data
    return data.split(b"\r\n")[1].decode()


async def test_batch_commands_are_answered_from_the_ledger_with_enterprises_shapes(engine):
    guard, _, _ = engine
    client = FakeClient()
    spec = {"bid": "", "description": "d", "success": {"jobtype": "Done"}}
    bid = bulk_text(await respond(guard, "BATCH NEW " + json.dumps(spec), client))
    assert bid.startswith("b-") and len(bid) == 18
    assert await respond(guard, f"BATCH OPEN {bid}", client) == f"${len(bid)}\r\n{bid}\r\n".encode()
    status = json.loads(bulk_text(await respond(guard, f"BATCH STATUS {bid}", client)))
    assert list(status) == STATUS_KEYS
    assert status["created_at"].endswith("Z") and "." in status["created_at"]  # RFC 3339, sub-second
    assert await respond(guard, f"BATCH COMMIT {bid}", client) == OK
    for sub in ("OPEN", "STATUS", "COMMIT"):
        assert await respond(guard, f"BATCH {sub} b-nope", client) == b"-ERR No such batch b-nope\r\n"


@pytest.mark.parametrize(
    ("spec", "reply"),
    [
        ({"description": "no callback"}, b"-ERR batch must have a success or complete callback\r\n"),
        ({"success": {"args": []}}, b"-ERR batch callbacks must be job objects with a jobtype\r\n"),
        ({"success": "Done"}, b"-ERR batch callbacks must be job objects with a jobtype\r\n"),
        ({"success": {"jobtype": "Done"}, "parent_bid": "b-none"}, b"-ERR No such batch b-none\r\n"),
    ],
)
async def test_a_batch_new_the_engine_cannot_take_gets_a_clear_error(engine, spec, reply):
    guard, store, _ = engine
    assert await respond(guard, "BATCH NEW " + json.dumps(spec), FakeClient()) == reply
    assert store._engine == {}  # nothing was created


async def test_a_push_is_counted_when_the_server_took_it_and_not_when_it_refused(engine):
    guard, store, _ = engine
    client = FakeClient()
    bid = bulk_text(await respond(guard, "BATCH NEW " + json.dumps({"success": {"jobtype": "Done"}}), client))
    taken = await decide(
        guard, 'PUSH {"jid":"a","jobtype":"x","args":[],"custom":{"bid":"%s"}}' % bid, client
    )
    refused = await decide(
        guard, 'PUSH {"jid":"b","jobtype":"x","args":[],"custom":{"bid":"%s"}}' % bid, client
    )
    assert isinstance(taken, Forward) and taken.on_reply is not None
    assert await answer(taken) == OK
    assert await answer(refused, b"-ERR some server error\r\n") == b"-ERR some server error\r\n"
    status = await store.batch_status(bid)
    assert (status.total, status.pending) == (1, 1)
    bulk = [{"jid": j, "jobtype": "x", "args": [], "custom": {"bid": bid}} for j in ("c", "d", "e")]
    pushb = await decide(guard, "PUSHB " + json.dumps(bulk), client)
    failed = bulk_reply(b'{"d":"invalid"}')  # the server's jid-to-error map
    assert await answer(pushb, failed) == failed
    assert (await store.batch_status(bid)).total == 3  # a, c, e
    unknown = await decide(
        guard, 'PUSH {"jid":"f","jobtype":"x","args":[],"custom":{"bid":"b-gone"}}', client
    )
    assert type(unknown) is Respond and unknown.data.startswith(b"-ERR BATCH_UNKNOWN no such batch b-gone")


async def test_an_ack_is_counted_for_a_fetched_batch_job_and_costs_no_ledger_call_for_others(engine):
    guard, store, producer = engine
    client, worker = FakeClient(), FakeClient(wid="w1")
    spec = {"complete": {"jobtype": "Complete", "queue": "cb"}}
    bid = bulk_text(await respond(guard, "BATCH NEW " + json.dumps(spec), client))
    push = 'PUSH {"jid":"j1","jobtype":"x","args":[],"custom":{"bid":"%s"}}' % bid
    assert await answer(await decide(guard, push, client)) == OK
    assert await respond(guard, f"BATCH COMMIT {bid}", client) == OK
    plain = guard.decide(Command.parse(b'ACK {"jid":"other"}\r\n'), worker, True)
    assert plain is None  # not a job this gateway handed out for a batch: forwarded, no ledger call
    fetch = guard.decide(Command.parse(b"FETCH q\r\n"), worker, True)
    job = json.dumps({"jid": "j1", "jobtype": "x", "args": [], "queue": "q", "custom": {"bid": bid}}).encode()
    assert await answer(fetch, b"$%d\r\n%s\r\n" % (len(job), job)) == b"$%d\r\n%s\r\n" % (len(job), job)
    ack = guard.decide(Command.parse(b'ACK {"jid":"j1"}\r\n'), worker, True)
    assert isinstance(ack, Forward) and ack.on_reply is not None
    assert await answer(ack) == OK
    status = await store.batch_status(bid)
    assert (status.pending, status.complete_st) == (0, "1")  # before the worker has its +OK
    await asyncio.sleep(0.01)  # the push runs beside the reply
    assert [(j["jobtype"], j["queue"], j["custom"]) for j in producer.pushed] == [
        ("Complete", "cb", {"_bid": bid, "_cb": "complete"})
    ]
    assert producer.pushed[0]["args"] == [] and producer.pushed[0]["jid"]


async def test_a_worker_holding_a_job_may_add_to_its_committed_batch_and_an_outsider_may_not(engine):
    guard, store, _ = engine
    producer, worker = FakeClient(), FakeClient(wid="w1", peer="10.0.0.8:6000")
    bid = bulk_text(
        await respond(guard, "BATCH NEW " + json.dumps({"success": {"jobtype": "Done"}}), producer)
    )
    push = 'PUSH {"jid":"j1","jobtype":"x","args":[],"custom":{"bid":"%s"}}' % bid
    assert await answer(await decide(guard, push, producer)) == OK
    assert await respond(guard, f"BATCH COMMIT {bid}", producer) == OK
    job = json.dumps({"jid": "j1", "jobtype": "x", "args": [], "custom": {"bid": bid}}).encode()
    await answer(
        guard.decide(Command.parse(b"FETCH q\r\n"), worker, True), b"$%d\r\n%s\r\n" % (len(job), job)
    )
    outsider = await respond(guard, f"BATCH OPEN {bid}", producer)
    assert outsider.startswith(b"-ERR BATCH_COMMITTED")
    assert bulk_text(await respond(guard, f"BATCH OPEN {bid}", worker)) == bid
    added = 'PUSH {"jid":"j2","jobtype":"x","args":[],"custom":{"bid":"%s"}}' % bid
    assert await answer(await decide(guard, added, worker)) == OK
    assert (await store.state(bid)).value == "committed"  # still committed: no COMMIT needed
    assert (await store.batch_status(bid)).total == 2
    assert await respond(guard, f"BATCH COMMIT {bid}", worker) == OK  # a second commit changes nothing
