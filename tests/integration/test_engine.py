"""`batches: gateway`: the gateway as the batch engine in front of the real Faktory OSS server, no
stand-in. Producers on one gateway, workers on another (sharing Redis, standalone or Cluster), or
one gateway with the embedded store. Every step's BATCH STATUS is checked against what Enterprise
documents (docs/engine.md)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from typing import NamedTuple

import pytest

from tests.support.client import RawClient, job, push_line, uid
from tests.support.engine import (
    STATUS_KEYS,
    counts,
    fetch,
    new_batch,
    push_into,
    requeue_retries,
    run_one,
    status,
)
from tests.support.faultproxy import FaultProxy
from tests.support.fence import wait_until
from tests.support.processes import FaktoryServer, GatewayProcess

ENGINE = ("--batches", "gateway", "--log-level", "warning")


@pytest.fixture(scope="module")
def oss():
    """A Faktory OSS server of this module's own (the kill test leaves jobs in queues)."""
    server = FaktoryServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module", params=["memory", "redis", "cluster"])
def pair(request, oss):
    """(producer's gateway, worker's gateway): one gateway with the embedded store, or two
    sharing Redis (standalone or a 3-master Cluster)."""
    if request.param == "memory":
        gateway = GatewayProcess(oss.url, *ENGINE, "--mode", "member-reopen").start()
        yield gateway, gateway
        gateway.stop()
        return
    store = request.getfixturevalue("redis_server" if request.param == "redis" else "redis_cluster")
    ledger = {"FAKTORY_GATEWAY_REDIS_KEY_PREFIX": f"engine-{uid()}:"}  # this pair's own keys
    producers = GatewayProcess(oss.url, *ENGINE, "--redis", store.url, "--mode", "member-reopen", env=ledger)
    workers = GatewayProcess(oss.url, *ENGINE, "--redis", store.url, "--mode", "member-reopen", env=ledger)
    producers.start()
    workers.start()
    yield producers, workers
    producers.stop()
    workers.stop()


class Clients(NamedTuple):
    producer: RawClient  # on the producers' gateway
    worker: RawClient  # on the workers' gateway, with a wid
    worker_url: str
    wid: str


@pytest.fixture
def clients(pair):
    producers, workers = pair
    wid = "w-" + uid()
    with RawClient.connect(producers.url) as producer, RawClient.connect(workers.url, wid=wid) as worker:
        yield Clients(producer, worker, workers.url, wid)


def test_complete_then_success_in_order_with_the_status_at_every_step(clients):
    producer, worker = clients.producer, clients.worker
    queue, callbacks = "q-" + uid(), "cb-" + uid()
    bid = new_batch(producer, complete=callbacks, success=callbacks)
    assert bid.startswith("b-") and len(bid) == 18
    first = status(producer, bid)
    assert list(first) == STATUS_KEYS
    assert counts(producer, bid) == (0, 0, 0, "", "")
    jids = [push_into(producer, bid, queue) for _ in range(3)]
    assert counts(producer, bid) == (3, 3, 0, "", "")  # counted when the server said +OK
    assert producer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
    for done in range(1, 4):
        ran = run_one(worker, queue)
        assert ran["jid"] in jids
        # Visible as soon as the ACK's +OK came back, on another connection (as Ent does).
        assert counts(producer, bid)[:3] == (3, 3 - done, 0)
    assert counts(producer, bid)[3:] == ("1", "")  # complete enqueued; success waits for its ACK
    complete = run_one(worker, callbacks)
    assert complete["jobtype"] == "Complete"
    assert complete["custom"] == {"_bid": bid, "_cb": "complete"}  # no custom.bid: no member
    assert counts(producer, bid)[3:] == ("2", "1")
    success = run_one(worker, callbacks)
    assert success["custom"] == {"_bid": bid, "_cb": "success"}
    assert counts(producer, bid) == (3, 0, 0, "2", "2")
    assert fetch(worker, callbacks, wait=0) is None  # each fired once
    # Sealed: nothing joins, nothing reopens it (I2).
    late = producer.call(push_line(job("late-" + uid(), queue=queue, custom={"bid": bid})))
    assert late.startswith(b"-ERR BATCH_CALLBACK_FIRED"), late
    assert producer.call(f"BATCH OPEN {bid}").startswith(b"-ERR BATCH_CALLBACK_FIRED")


def test_a_job_failing_once_then_succeeding(clients):
    producer, worker = clients.producer, clients.worker
    queue, callbacks = "q-" + uid(), "cb-" + uid()
    bid = new_batch(producer, complete=callbacks, success=callbacks)
    flaky = push_into(producer, bid, queue)
    push_into(producer, bid, queue)
    assert producer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
    assert run_one(worker, queue, ok=False)["jid"] == flaky  # a queue hands out in push order
    run_one(worker, queue)
    # Every job ran once: complete fires; the failed one is pending and failed.
    assert counts(producer, bid) == (2, 1, 1, "1", "")
    assert run_one(worker, callbacks)["jobtype"] == "Complete"
    assert counts(producer, bid) == (2, 1, 1, "2", "")  # success waits for the retry
    requeue_retries(producer, flaky)
    retried = run_one(worker, queue)
    assert retried["jid"] == flaky
    assert counts(producer, bid) == (2, 0, 0, "2", "1")
    assert run_one(worker, callbacks)["jobtype"] == "Success"


def in_retries(server: FaktoryServer, jid: str) -> bool:
    """Is jid in the server's retry set (its own Redis)?"""
    sock = os.path.join(server.storage, "redis.sock")
    listed = subprocess.run(
        ["redis-cli", "-s", sock, "ZRANGE", "retries", "0", "-1"], capture_output=True, text=True
    )
    return f'"jid":"{jid}"' in listed.stdout


def test_faktory_takes_a_pushed_retry_as_every_later_jobs_default():
    """What the server does (1.9.4, server/commands.go `push`: the job's `Retry` points at the
    process-wide `client.RetryPolicyDefault` while the PUSH's JSON is read into it): a job pushed
    with `"retry":0` makes every later job without `retry` ephemeral, its failure discarded, until
    a job with another `retry` comes. So the tests' pushes carry `retry` (engine.push_into)."""
    server = FaktoryServer().start()  # its own: this test changes the server's default
    try:
        queue, kept = "q-" + uid(), []
        with (
            RawClient.connect(server.url) as producer,
            RawClient.connect(server.url, wid="w-" + uid()) as worker,
        ):
            for fields in ({"retry": 0}, {}, {"retry": 25}, {}):
                jid = "j-" + uid()
                assert producer.call(push_line(job(jid, queue=queue, **fields))) == b"+OK\r\n"
                assert run_one(worker, queue, ok=False)["jid"] == jid
                kept.append(in_retries(server, jid))
        assert kept == [False, False, True, True]  # a server without the bug: [False, True, True, True]
    finally:
        server.cleanup()


def test_a_job_that_dies_fires_complete_and_never_success(clients):
    producer, worker = clients.producer, clients.worker
    queue, callbacks = "q-" + uid(), "cb-" + uid()
    bid = new_batch(producer, complete=callbacks, success=callbacks)
    push_into(producer, bid, queue, retry=0)  # no retries: its first failure sends it to the dead set
    assert producer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
    run_one(worker, queue, ok=False)
    assert run_one(worker, callbacks)["jobtype"] == "Complete"
    assert counts(producer, bid) == (1, 1, 1, "2", "")
    assert fetch(worker, callbacks, wait=2) is None


def test_an_empty_batch_fires_at_commit(clients):
    producer, worker = clients.producer, clients.worker
    callbacks = "cb-" + uid()
    bid = new_batch(producer, complete=callbacks, success=callbacks)
    assert producer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
    assert counts(producer, bid) == (0, 0, 0, "1", "")  # enqueued before the commit's +OK
    assert run_one(worker, callbacks)["jobtype"] == "Complete"
    assert counts(producer, bid)[3:] == ("2", "1")
    success = fetch(worker, callbacks)
    assert success is not None and success["jobtype"] == "Success"
    fail = json.dumps({"jid": success["jid"], "errtype": "Boom", "message": "no"})
    assert worker.call("FAIL " + fail) == b"+OK\r\n"
    assert counts(producer, bid)[3:] == ("2", "1")  # a failed callback stays enqueued


def test_nothing_fires_before_the_commit(clients):
    producer, worker = clients.producer, clients.worker
    queue, callbacks = "q-" + uid(), "cb-" + uid()
    bid = new_batch(producer, success=callbacks)
    push_into(producer, bid, queue)
    run_one(worker, queue)
    assert counts(producer, bid) == (1, 0, 0, "", "")
    assert fetch(worker, callbacks, wait=0) is None
    assert producer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
    assert counts(producer, bid)[4] == "1"
    assert run_one(worker, callbacks)["jobtype"] == "Success"


def test_parent_child_and_grandchild_fire_from_the_bottom_up(clients):
    """A parent's callbacks wait until its children's callbacks of the same kind were ACKed."""
    producer, worker = clients.producer, clients.worker
    queue, callbacks = "q-" + uid(), "cb-" + uid()
    parent = new_batch(producer, complete=callbacks, success=callbacks)
    child = new_batch(producer, parent=parent, complete=callbacks, success=callbacks)
    grandchild = new_batch(producer, parent=child, complete=callbacks, success=callbacks)
    assert child[:18] == parent[:18] == grandchild[:18]  # one tree, one Redis Cluster slot
    assert status(producer, child)["parent_bid"] == parent and "parent_bid" not in status(producer, parent)
    for bid in (parent, child, grandchild):
        push_into(producer, bid, queue)
    for bid in (grandchild, child, parent):
        assert producer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
    for _ in range(3):
        run_one(worker, queue)
    assert counts(producer, parent)[1:] == (0, 0, "", "")  # children (not counted in total) first
    order = []
    while (callback := fetch(worker, callbacks, wait=3)) is not None:
        order.append((callback["custom"]["_bid"], callback["custom"]["_cb"]))
        if callback["custom"]["_bid"] != parent:
            assert callback["custom"]["_pbid"] == (parent if callback["custom"]["_bid"] == child else child)
        assert worker.call("ACK " + json.dumps({"jid": callback["jid"]})) == b"+OK\r\n"
    position = {entry: index for index, entry in enumerate(order)}
    assert len(order) == len(position) == 6, order  # each callback once
    for kind in ("complete", "success"):
        assert position[grandchild, kind] < position[child, kind] < position[parent, kind]
    for bid in (parent, child, grandchild):
        assert position[bid, "complete"] < position[bid, "success"]
        assert counts(producer, bid)[3:] == ("2", "2")


def test_a_worker_holding_a_job_adds_to_its_committed_batch_without_committing_again(clients):
    """member-reopen, as Go's help.Batch does it: OPEN from inside a job, push, no COMMIT. The
    batch stays committed and completes once the reopening job and what it added are done."""
    producer, worker = clients.producer, clients.worker
    queue, callbacks = "q-" + uid(), "cb-" + uid()
    bid = new_batch(producer, success=callbacks)
    push_into(producer, bid, queue)
    assert producer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
    held = fetch(worker, queue)
    # From outside the batch: refused.
    assert producer.call(f"BATCH OPEN {bid}").startswith(b"-ERR BATCH_COMMITTED")
    # From the worker that holds its job (another connection, same wid, as a pool does it).
    with RawClient.connect(clients.worker_url, wid=clients.wid) as helper:
        assert helper.value(f"BATCH OPEN {bid}").decode() == bid
        added = "added-" + uid()
        assert helper.call(push_line(job(added, queue=queue, custom={"bid": bid}))) == b"+OK\r\n"
        child = new_batch(helper, parent=bid, success=callbacks)
        assert helper.call(f"BATCH COMMIT {child}") == b"+OK\r\n"
    assert worker.call("ACK " + json.dumps({"jid": held["jid"]})) == b"+OK\r\n"
    assert counts(producer, bid)[:2] == (2, 1) and status(producer, bid)["success_st"] == ""
    assert run_one(worker, queue)["jid"] == added
    assert run_one(worker, callbacks)["custom"]["_bid"] == child  # the child's success first
    assert run_one(worker, callbacks)["custom"]["_bid"] == bid


# ---------------------------------------------------------------------------------------------
# Commits racing pushes over two gateways

ROUNDS, PUSHERS = 1000, 2


@pytest.mark.parametrize("ledger", ["redis_server", "redis_cluster"])
def test_commits_racing_pushes_over_two_gateways(oss, ledger, request):
    """Pushers on both gateways race a commit sent through the second. Whatever the interleaving:
    every job the server took into a batch is counted before the commit's +OK (the count never
    changes after it), no job joins after it, each batch fires once, and only once every job the
    server holds for it ran (the server's own queue is the witness)."""
    url = request.getfixturevalue(ledger).url
    ledger_env = {"FAKTORY_GATEWAY_REDIS_KEY_PREFIX": f"race-{uid()}:"}
    gateways = [GatewayProcess(oss.url, *ENGINE, "--redis", url, env=ledger_env) for _ in range(2)]
    queue, callbacks = "race-" + uid(), "race-cb-" + uid()
    accepted: dict[str, int] = {}
    committed_total: dict[str, int] = {}
    refused = 0
    unexpected: list[bytes] = []  # replies a pusher got that are neither +OK nor a sealed batch's refusal
    lock = threading.Lock()
    try:
        for gateway in gateways:
            gateway.start()
        pushers = [RawClient.connect(gateways[n % 2].url) for n in range(PUSHERS)]
        committer = RawClient.connect(gateways[1].url)
        for _ in range(ROUNDS):
            bid = new_batch(pushers[0], complete=callbacks)
            accepted[bid] = 0
            start = threading.Barrier(PUSHERS + 1)

            def push(client: RawClient, bid: str = bid, start=start) -> None:
                nonlocal refused
                start.wait()
                for _ in range(3):
                    reply = client.call(push_line(job("r-" + uid(), queue=queue, custom={"bid": bid})))
                    with lock:
                        if reply == b"+OK\r\n":
                            accepted[bid] += 1
                        elif reply.startswith((b"-ERR BATCH_COMMITTED", b"-ERR BATCH_CALLBACK_FIRED")):
                            refused += 1  # fired: a batch no push reached fires at its commit
                        else:
                            unexpected.append(reply)  # asserted below: a thread's assert is lost

            threads = [threading.Thread(target=push, args=(client,)) for client in pushers]
            for thread in threads:
                thread.start()
            start.wait()
            time.sleep(random.uniform(0, 0.002))
            assert committer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
            committed_total[bid] = status(committer, bid)["total"]
            for thread in threads:
                thread.join()
        assert unexpected == []
        # No job counted after its commit: the totals read right after each commit still hold,
        # and they are every job the server took.
        finals = {bid: status(committer, bid)["total"] for bid in accepted}
        assert finals == committed_total == accepted
        assert refused > ROUNDS / 4 and sum(accepted.values()) > ROUNDS, (refused, sum(accepted.values()))
        # The server's queue is the witness: it holds exactly the counted jobs, none of whose
        # batches fired before all of them ran.
        with RawClient.connect(gateways[0].url, wid="race-" + uid()) as worker:
            held: dict[str, int] = {}
            while (fetched := worker.value(f"FETCH {queue}")) is not None:
                member = json.loads(fetched)
                bid = member["custom"]["bid"]
                held[bid] = held.get(bid, 0) + 1
                assert status(worker, bid)["complete_st"] == "", f"{bid} fired with a job not run"
                assert worker.call("ACK " + json.dumps({"jid": member["jid"]})) == b"+OK\r\n"
            assert held == {bid: n for bid, n in accepted.items() if n}
            fired: dict[str, int] = {}
            while (fetched := worker.value(f"FETCH {callbacks}")) is not None:
                bid = json.loads(fetched)["custom"]["_bid"]
                fired[bid] = fired.get(bid, 0) + 1
                assert worker.call("ACK " + json.dumps({"jid": json.loads(fetched)["jid"]})) == b"+OK\r\n"
            assert fired == dict.fromkeys(accepted, 1)  # each batch once, the empty ones too
    finally:
        for gateway in gateways:
            gateway.stop()


# ---------------------------------------------------------------------------------------------
# A reservation that expires: the server runs the job again


def expire_reservations(server: FaktoryServer) -> int:
    """Make every reservation on the server due now, in its own Redis (a sorted set `working`
    scored by expiry): its reaper, which runs every 15 s, then fails them to the retry set exactly
    as it does when `reserve_for` (60 s at least) ran out. Returns how many were moved."""
    script = "local n = 0 for _, m in ipairs(redis.call('ZRANGE', 'working', 0, -1)) do n = n + redis.call('ZADD', 'working', 'XX', 'CH', 1, m) end return n"
    sock = os.path.join(server.storage, "redis.sock")
    done = subprocess.run(
        ["redis-cli", "-s", sock, "EVAL", script, "0"], capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip())


def test_a_job_run_again_after_its_reservation_expired_counts_once(oss, redis_server):
    """Worker A takes a member through gateway A and stalls; its reservation expires and the
    server hands the job out again; worker B runs it through gateway B and ACKs; A's late ACK
    (the server answers +OK: it no longer has the reservation) changes nothing."""
    ledger = {"FAKTORY_GATEWAY_REDIS_KEY_PREFIX": f"expiry-{uid()}:"}
    a = GatewayProcess(oss.url, *ENGINE, "--redis", redis_server.url, env=ledger).start()
    b = GatewayProcess(oss.url, *ENGINE, "--redis", redis_server.url, env=ledger).start()
    try:
        queue, callbacks = "q-" + uid(), "cb-" + uid()
        with (
            RawClient.connect(a.url) as producer,
            RawClient.connect(a.url, wid="w-" + uid()) as stalled,
            RawClient.connect(b.url, wid="w-" + uid()) as worker,
        ):
            bid = new_batch(producer, complete=callbacks, success=callbacks)
            jid = push_into(producer, bid, queue)
            assert producer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
            assert fetch(stalled, queue)["jid"] == jid
            assert expire_reservations(oss) == 1
            rerun = None
            deadline = time.monotonic() + 30
            while rerun is None and time.monotonic() < deadline:  # the reaper's turn, then now
                requeue_retries(worker, jid)
                rerun = fetch(worker, queue, wait=0)
            assert rerun is not None and rerun["jid"] == jid and rerun["failure"], rerun
            # The expiry is a failure only the server saw: the job is still pending, not failed.
            assert counts(producer, bid) == (1, 1, 0, "", "")
            assert worker.call("ACK " + json.dumps({"jid": jid})) == b"+OK\r\n"
            assert counts(producer, bid) == (1, 0, 0, "1", "")
            run_one(worker, callbacks)
            run_one(worker, callbacks)
            assert counts(producer, bid) == (1, 0, 0, "2", "2")
            assert stalled.call("ACK " + json.dumps({"jid": jid})) == b"+OK\r\n"  # late, through A
            assert counts(producer, bid) == (1, 0, 0, "2", "2")
            assert fetch(worker, callbacks, wait=0) is None  # each callback once
    finally:
        a.stop()
        b.stop()


# ---------------------------------------------------------------------------------------------
# A gateway that dies between claiming a callback and the server's +OK


def test_a_gateway_killed_after_claiming_a_callback_is_taken_over(oss, redis_server):
    """Gateway A claims the callback (the ACK that made it due went through A), writes its push,
    and is SIGKILLed while the push is still on its way (held by the network, then dropped).
    Gateway B finds the claim unchanged for a whole lease life and pushes the callback: it is
    enqueued once, and the batch shows it."""
    ledger = {"FAKTORY_GATEWAY_REDIS_KEY_PREFIX": f"kill-{uid()}:"}
    callbacks = "cb-" + uid()
    marker = f'"queue":"{callbacks}"'.encode()
    with FaultProxy(oss.port) as network:
        network.stall_when(marker)  # the callback's PUSH, on A's own connection
        a = GatewayProcess(network.url, *ENGINE, "--redis", redis_server.url, env=ledger).start()
        b = GatewayProcess(oss.url, *ENGINE, "--redis", redis_server.url, env=ledger).start()
        try:
            queue = "q-" + uid()
            with RawClient.connect(a.url) as producer, RawClient.connect(a.url, wid="w-" + uid()) as worker:
                bid = new_batch(producer, complete=callbacks)
                push_into(producer, bid, queue)
                assert producer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
                run_one(worker, queue)
                assert counts(producer, bid)[3] == "1"  # claimed by A
                wait_until(lambda: marker in network.held("up"), 5, "A's callback push to be written")
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait(10)
            network.cut_all(rst=True)  # what A wrote never reaches the server
            killed = time.monotonic()
            with RawClient.connect(b.url, wid="w-" + uid()) as worker:
                callback = fetch(worker, callbacks, wait=60)
                assert callback is not None, "the callback was lost\n" + b.text()[-2000:]
                assert time.monotonic() - killed >= 20  # only after a whole lease life unchanged
                assert callback["custom"] == {"_bid": bid, "_cb": "complete"}
                assert worker.call("ACK " + json.dumps({"jid": callback["jid"]})) == b"+OK\r\n"
                assert fetch(worker, callbacks, wait=6) is None  # once
                assert counts(worker, bid)[3] == "2"
            assert b.metric("faktory_gateway_callbacks_total", kind="complete", result="taken_over") == 1
        finally:
            a.stop()
            b.stop()


# ---------------------------------------------------------------------------------------------
# What the gateway cannot see, made visible


def test_an_ack_around_the_gateway_stalls_the_batch_visibly(oss):
    gateway = GatewayProcess(oss.url, *ENGINE, env={"FAKTORY_GATEWAY_BATCH_STALL_AFTER": "1s"}).start()
    try:
        queue, callbacks = "q-" + uid(), "cb-" + uid()
        with (
            RawClient.connect(gateway.url) as producer,
            RawClient.connect(oss.url, wid="w-" + uid()) as direct,
        ):
            bid = new_batch(producer, success=callbacks)
            jid = push_into(producer, bid, queue)
            assert producer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
            run_one(direct, queue)  # FETCH and ACK straight to the server: the gateway never sees it
        wait_until(lambda: gateway.metric("faktory_gateway_batches_stalled") == 1, 15, "the stall to show")
        code, body = gateway.http(f"/batches/{bid}")
        view = json.loads(body)
        assert (
            code == 200 and view["stalled"] and view["pending_jids"] == [jid] and view["state"] == "committed"
        )
        assert view["pending"] == 1 and view["total"] == 1
        assert gateway.http_status("/batches/b-unknown") == 404
    finally:
        gateway.stop()


def test_callbacks_reach_a_server_that_wants_a_password():
    server = FaktoryServer(password="s3cret").start()
    gateway = GatewayProcess(server.url, *ENGINE).start()  # the URL carries the password
    try:
        queue, callbacks = "q-" + uid(), "cb-" + uid()
        with RawClient.connect(gateway.url, password="s3cret") as client:
            bid = new_batch(client, success=callbacks)
            push_into(client, bid, queue)
            assert client.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
            run_one(client, queue)
            assert run_one(client, callbacks)["custom"]["_bid"] == bid
    finally:
        gateway.stop()
        server.cleanup()
