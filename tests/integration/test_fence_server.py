"""The commit fence against what Faktory 1.9.4 itself does (issue 17).

First the server's own behaviour, on the real binary with no gateway: the facts the fence's
assumption A3 rests on (docs/fence.md). Then the fence against it, with every component healthy
or one gateway faulted: a slow command ahead of a batch command, a client that hangs up, a client
that never reads, a step of the ledger's clock. The Ent stand-in in front of the real server
behaves as Faktory does under faults (it handles what reached it after a reset, one command at a
time, and blocks in writes to a client that does not read), and its audit is the judge.

The slow command is a real one: a `QUEUE REMOVE` of many names against thousands of paused
queues (tests/support/busy.py), which Faktory runs without any deadline.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import struct
import time

import pytest
import redis

from gateway.batches.fence import ADMIT_MAX_BYTES, LEASE_LIFE, SERVER_BOUND
from tests.support.busy import BusyServer
from tests.support.client import RawClient, job, push_line
from tests.support.faultproxy import FaultProxy
from tests.support.fence import (
    OK,
    call,
    commit_until_ok,
    hold_push,
    new_batch,
    outcome,
    push,
    uid,
    wait_until,
)
from tests.support.processes import FaktoryServer, GatewayProcess, RedisServer
from tests.support.standin import StandinProcess

SLOW = 25.0  # seconds a slow command keeps its connection busy: longer than a lease life


# Every queue these tests push to, created before any INFO runs: Faktory 1.9.4 dies of a concurrent
# map iteration (INFO) and map write (a push to a new queue) (docs/shield.md, "What no proxy can stop").
QUEUES = ("fence-faults", "fence-faults-cb", "after-reset", "big-reply")


class Busy:
    """A Faktory of these tests' own with thousands of paused queues, the stand-in in front of it."""

    def __init__(self) -> None:
        self.faktory = FaktoryServer().start()
        self.server = BusyServer(self.faktory.url)
        with RawClient.connect(self.faktory.url, wid="busy-setup") as client:
            for queue in QUEUES:
                assert client.call(push_line(job("queue-" + uid(), queue=queue))) == OK
            fetched = json.loads(client.value("FETCH big-reply"))  # that queue must be empty
            assert client.call('ACK {"jid":"%s"}' % fetched["jid"]) == OK
        self.standin = StandinProcess(self.faktory.url).start()

    def settled(self, timeout: float) -> None:
        """Wait until the server has finished every command it was given (slow ones included)."""
        wait_until(lambda: self.standin.busy() == 0, timeout, "the slow commands to end")

    def stop(self) -> None:
        self.standin.stop()
        self.faktory.cleanup()


@pytest.fixture(scope="module")
def busy():
    world = Busy()
    yield world
    world.stop()


@pytest.fixture
def stack():
    with contextlib.ExitStack() as stack:
        yield stack


def started(stack: contextlib.ExitStack, process):
    stack.callback(process.stop)
    return process.start()


def client_of(stack: contextlib.ExitStack, gateway: GatewayProcess) -> RawClient:
    client = RawClient.connect(gateway.url, timeout=120)
    stack.callback(client.close)
    return client


def reset(client: RawClient) -> None:
    """Close with an RST (SO_LINGER 0), as a killed process with SO_LINGER 0 does."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


# --- what the server does (A3), on the real binary ---------------------------------------------------


def test_faktory_handles_what_reached_it_before_a_reset(busy):
    """The reason for the barrier: a PUSH queued behind a slow command at the server is handled
    when the slow command ends, although the connection was reset long before."""
    queue = "after-reset"
    with RawClient.connect(busy.faktory.url) as observer:
        before = json.loads(observer.value("INFO"))["faktory"]["queues"][queue]
    client = RawClient.connect(busy.faktory.url)
    client.send(busy.server.slow_line(3.0) + (push_line(job("late-" + uid(), queue=queue)) + "\r\n").encode())
    time.sleep(0.3)
    reset(client)
    reset_at = time.monotonic()
    with RawClient.connect(busy.faktory.url) as observer:

        def enqueued() -> bool:
            return json.loads(observer.value("INFO"))["faktory"]["queues"][queue] == before + 1

        wait_until(enqueued, 60, "the PUSH sent before the reset to be enqueued")
    assert time.monotonic() - reset_at > 1.0  # it waited for the slow command, after the reset


def test_faktory_handles_the_largest_admitted_command_within_the_server_bound(fresh_faktory):
    """A3's bound: the gateway admits batch commands of at most ADMIT_MAX_BYTES; the worst of
    those for the server is a PUSHB of as many minimal jobs as fit (one Redis call each, until its
    5 s per-command context ends, then a fast error for each of the rest)."""
    jobs, size, n = [], 6, 0
    while size < ADMIT_MAX_BYTES - 100:
        jobs.append(f'{{"jid":"{n:012d}","jobtype":"a","args":[],"queue":"bound","custom":{{"bid":"b-x"}}}}')
        size += len(jobs[-1]) + 1
        n += 1
    line = ("PUSHB [" + ",".join(jobs) + "]\r\n").encode()
    assert len(line) <= ADMIT_MAX_BYTES
    with RawClient.connect(fresh_faktory.url, timeout=60) as client:
        started_at = time.monotonic()
        client.send(line)
        reply = client.read_raw()
        elapsed = time.monotonic() - started_at
    assert reply.startswith(b"$"), reply[:200]
    assert elapsed < SERVER_BOUND, f"the server took {elapsed:.1f}s for a {len(line)}-byte PUSHB"


# --- the fence against it -------------------------------------------------------------------------------


def test_a_client_hanging_up_behind_a_slow_command_lets_nothing_join_a_committed_batch(busy, stack):
    """No fault at all. One gateway, its embedded ledger. A client writes a slow command and a batch
    PUSH in one write, then hangs up. A commit from another connection goes through; the PUSH
    never joins the committed batch, then or when the slow command ends."""
    gateway = started(stack, GatewayProcess(busy.standin.url))
    committer = client_of(stack, gateway)
    bid = new_batch(committer)
    hanger = RawClient.connect(gateway.url, timeout=120)
    hanger.send(busy.server.slow_line(SLOW) + push(bid))
    time.sleep(0.5)
    hanger.close()
    _, refusals = commit_until_ok(committer, bid, SLOW + LEASE_LIFE)
    busy.settled(SLOW * 4)
    record = busy.standin.report()[bid]  # the judge's verdict first
    assert record["committed"] and record["joined_while_committed"] == 0, record
    assert not refusals  # the PUSH was never admitted (the barrier): there was nothing to wait for


def test_a_slow_command_ahead_and_the_admitting_gateway_stopped_killed_or_cut_from_redis(
    busy, redis_server, stack
):
    """Three gateways each hold a lease on a batch (a first PUSH went through), then get a slow
    command and a PUSH into it in one write, and then: A1 is SIGSTOPped, A2 SIGKILLed, A3 cut
    from Redis. Gateway B commits all three (retried): each goes once B has seen the faulted
    gateway's lease unchanged for a lease life. No PUSH joins a committed batch, then or when the
    slow commands end, nor when A1 wakes up."""
    ledger = started(stack, FaultProxy(redis_server.port))
    gateways = {
        "stopped": started(stack, GatewayProcess(busy.standin.url, "--redis", redis_server.url)),
        "killed": started(stack, GatewayProcess(busy.standin.url, "--redis", redis_server.url)),
        "cut": started(
            stack, GatewayProcess(busy.standin.url, "--redis", f"redis://127.0.0.1:{ledger.port}/0")
        ),
    }
    stack.callback(gateways["stopped"].send_signal, signal.SIGCONT)
    committer = client_of(
        stack, started(stack, GatewayProcess(busy.standin.url, "--redis", redis_server.url))
    )
    bids = {fault: new_batch(committer) for fault in gateways}
    clients = {}
    for fault, gateway in gateways.items():
        clients[fault] = client_of(stack, gateway)
        assert call(clients[fault], push(bids[fault])) == OK  # the gateway now holds a lease on it
        clients[fault].send(busy.server.slow_line(SLOW) + push(bids[fault]))
    time.sleep(0.5)
    gateways["stopped"].send_signal(signal.SIGSTOP)
    gateways["killed"].kill()
    ledger.refuse()
    ledger.cut_all()
    waited = {fault: commit_until_ok(committer, bid, LEASE_LIFE + 15)[1] for fault, bid in bids.items()}
    busy.settled(SLOW * 4)

    def judge() -> None:
        report = busy.standin.report()
        for fault, bid in bids.items():
            record = report[bid]
            assert record["committed"] and record["joined_while_committed"] == 0, (fault, record)
            assert record["total"] == 1, (fault, record)

    judge()  # the slow commands are over: anything written behind them has been handled
    for fault in bids:
        assert waited[fault], f"{fault}: the commit did not wait for the faulted gateway's lease"
    gateways["stopped"].send_signal(signal.SIGCONT)
    _, reply = outcome(clients["stopped"], 30)  # the slow command's reply, then the PUSH's fate
    assert reply == OK
    _, reply = outcome(clients["stopped"], 30)
    assert reply is None or reply.startswith(b"-ERR BATCH_COMMITTED"), reply
    judge()


def test_a_step_of_the_ledgers_clock_ends_no_lease(standin, stack):
    """Redis's wall clock steps 60 s forward (NTP, `date -s`, a failover to a host whose clock is
    ahead), then, for a second batch, 60 s back, while gateway A has an admitted PUSH held on its
    way to the server. B's commit waits for it either way, and goes once it was answered."""
    ledger = started(stack, RedisServer(steppable_clock=True))
    network = started(stack, FaultProxy(standin.port))
    fence = {"FAKTORY_GATEWAY_COMMIT_FENCE_TIMEOUT": "1s"}
    gateway_a = started(stack, GatewayProcess(network.url, "--redis", ledger.url, env=fence))
    gateway_b = started(stack, GatewayProcess(standin.url, "--redis", ledger.url, env=fence))
    a, committer = client_of(stack, gateway_a), client_of(stack, gateway_b)
    for step in (60.0, -60.0):
        bid = new_batch(committer)
        hold_push(network, a, bid)
        ledger.step_clock(step)
        with redis.Redis(port=ledger.port) as admin:  # the step took: Redis's TIME moved
            assert abs(admin.time()[0] - time.time() - step) < 5
        began, commits = time.monotonic(), []
        while time.monotonic() - began < 3.0 and OK not in commits:
            commits.append(call(committer, f"BATCH COMMIT {bid}\r\n".encode()))
        network.resume()
        assert a.read_raw() == OK
        if OK not in commits:
            commit_until_ok(committer, bid, 10)
        ledger.step_clock(0.0)
        record = standin.report()[bid]  # the judge's verdict first
        assert record["committed"] and record["joined_while_committed"] == 0 and record["total"] == 1, record
        assert all(reply.startswith(b"-ERR COMMIT_FENCE_TIMEOUT") for reply in commits), (step, commits)


@pytest.mark.parametrize("unread", ["replies-owed-ahead", "a-reply-unread-ahead"])
def test_a_client_that_never_reads_holds_no_commit(busy, stack, unread):
    """A client pushes into batch B and never reads: with 150 INFOs (110 KB replies each) still
    owed ahead of the PUSH (the barrier holds the PUSH), or with a 12 MB job it fetched and
    never read, so that the gateway stopped reading the server for it, though nothing is owed
    (the PUSH is admitted; its reply must still be read). A commit of B from another client goes
    within twice the fence's timeout, and nothing joins after it."""
    fence_timeout = 1.0
    gateway = started(
        stack,
        GatewayProcess(busy.standin.url, env={"FAKTORY_GATEWAY_COMMIT_FENCE_TIMEOUT": f"{fence_timeout:g}s"}),
    )
    committer = client_of(stack, gateway)
    bid = new_batch(committer)
    reader = RawClient.connect(gateway.url, wid="reader-" + uid(), timeout=60)
    stack.callback(reader.close)
    reader.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert call(reader, push(bid)) == OK  # the gateway holds a lease on the batch
    if unread == "replies-owed-ahead":
        reader.send(b"INFO\r\n" * 150 + push(bid))
    else:
        big = job("big-" + uid(), queue="big-reply", args=["x" * 12 * 2**20])
        assert call(committer, (push_line(big) + "\r\n").encode()) == OK
        reader.send(b"FETCH big-reply\r\n")
        time.sleep(2.0)  # the 12 MB reply is read from the server, and sits unread by the client
        reader.send(push(bid))
    time.sleep(1.0)
    began = time.monotonic()
    assert call(committer, f"BATCH COMMIT {bid}\r\n".encode()) == OK
    assert time.monotonic() - began < 2 * fence_timeout
    reset(reader)
    busy.settled(60)
    record = busy.standin.report()[bid]
    assert record["committed"] and record["joined_while_committed"] == 0, record
