"""The commit fence under faults (issue 9): real gateways, a real Redis, the Ent stand-in, a fault proxy.

What must hold (I8): no job (`PUSH` with custom.bid) and no child batch (`BATCH NEW` with
parent_bid) reaches the server after its batch's `BATCH COMMIT` did. The stand-in's own audit
(`STANDIN REPORT`: joined_while_committed, children_while_committed) is the judge, not the gateway.

The fault proxy stands for the network between a gateway and the server. `stall_when(jid)` holds
the one connection that carries that job: the gateway has admitted and written the command, the
server has not seen it. When the gateway resets that connection (RST), the proxy drops what it
holds, as a network never delivers a reset connection's bytes to the server's application (the
fence's assumption A2); a plain close (FIN) would let the held bytes through later. So each test
below that resumes the proxy after a commit would count a late join if the gateway had not reset
its connection in time.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time

import pytest
import redis

from gateway.batches.fence import ATTEMPT_LIFE, LEASE_LIFE, VALID_FOR
from tests.support.client import RawClient, job, push_line
from tests.support.faultproxy import FaultProxy
from tests.support.fence import (
    OK,
    Waiter,
    assert_sealed,
    call,
    child,
    commit_until_ok,
    hold_push,
    new_batch,
    outcome,
    push,
    uid,
    wait_until,
)
from tests.support.processes import GatewayProcess, RedisServer
from tests.support.standin import StandinProcess


def logs(*gateways: GatewayProcess) -> str:
    return "\n".join(f"--- gateway {g.port} log:\n{g.text()}" for g in gateways)


@pytest.fixture
def world(standin, redis_server):
    """Starts gateways and proxies for one test, and stops every one of them afterwards."""
    with contextlib.ExitStack() as stack:
        yield World(standin, redis_server, stack)


class World:
    def __init__(self, standin: StandinProcess, redis_server: RedisServer, stack: contextlib.ExitStack):
        self.standin = standin
        self.redis = redis_server
        self.stack = stack

    def proxy(self, port: int | None = None, **options) -> FaultProxy:
        proxy = FaultProxy(port or self.standin.port, **options).start()
        self.stack.callback(proxy.stop)
        return proxy

    def gateway(
        self, upstream: str | None = None, redis_url: str | None = "", fence: str = "2s"
    ) -> GatewayProcess:
        """A gateway in front of the stand-in (or `upstream`), on the shared Redis (or `redis_url`;
        None: the embedded store)."""
        store = [] if redis_url is None else ["--redis", redis_url or self.redis.url]
        gateway = GatewayProcess(
            upstream or self.standin.url, *store, env={"FAKTORY_GATEWAY_COMMIT_FENCE_TIMEOUT": fence}
        )
        self.stack.callback(self._stop, gateway)
        return gateway.start()

    @staticmethod
    def _stop(gateway: GatewayProcess) -> None:
        gateway.send_signal(signal.SIGCONT)  # a stopped gateway would not hear the SIGTERM
        gateway.stop()

    def client(self, gateway: GatewayProcess) -> RawClient:
        client = RawClient.connect(gateway.url, timeout=60)
        self.stack.callback(client.close)
        return client

    def report(self, bid: str) -> dict:
        return self.standin.report()[bid]


# --- a client's own pipeline ahead of a batch command ------------------------------------------------


def test_a_batch_command_behind_a_clients_pipeline_joins_no_committed_batch(world):
    """One write of nine FETCHes on an empty queue (Faktory holds each about 2 s), then a PUSH into
    batch B (and, on a second connection, a child of batch P). A BATCH COMMIT from another gateway
    meanwhile is not held up by the pipeline, and neither command joins after it."""
    gateway_a, gateway_b = world.gateway(), world.gateway()
    piper, nester, committer = world.client(gateway_a), world.client(gateway_a), world.client(gateway_b)
    bid, parent = new_batch(committer), new_batch(committer)
    # Each connection first uses the batch, so gateway A holds a lease on it when the commit comes.
    assert call(piper, push(bid)) == OK
    assert call(nester, child(parent)).startswith(b"$")
    fetches = b"".join(b"FETCH fence-faults-empty-" + uid().encode() + b"\r\n" for _ in range(9))
    started = time.monotonic()
    piper.send(fetches + push(bid))
    nester.send(fetches + child(parent))
    time.sleep(1.0)
    for batch in (bid, parent):
        before = time.monotonic()
        assert call(committer, f"BATCH COMMIT {batch}\r\n".encode()) == OK
        # Not the pipeline's 18 s: at most about one command's round trip (a FETCH: 2 s).
        assert time.monotonic() - before < 2.5, logs(gateway_a, gateway_b)
    for _ in range(9):
        assert piper.read_raw() == b"$-1\r\n" and nester.read_raw() == b"$-1\r\n"
    pushed, nested = piper.read_raw(), nester.read_raw()
    elapsed = time.monotonic() - started
    assert elapsed > 9 * 1.5, f"the pipeline took {elapsed:.1f}s: the FETCHes were not held"
    assert pushed.startswith(b"-ERR BATCH_COMMITTED"), pushed
    assert nested.startswith(b"-ERR PARENT_SEALED"), nested
    record, owner = world.report(bid), world.report(parent)
    assert record["joined_while_committed"] == 0 and record["total"] == 1, record
    assert owner["children_while_committed"] == 0, owner


# --- overlapping commits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout", ["one-gateway-redis", "one-gateway-memory", "two-gateways-redis"], ids=lambda s: s
)
def test_overlapping_commits_leave_the_batch_committed(world, layout):
    """Connection A holds a lease (a PUSH the network holds), C1 commits and waits in the fence,
    C2 commits two seconds later. C1 times out: the batch must stay sealed for C2, not reopen.
    A's PUSH is answered, C2's commit goes through with +OK: from then on nothing may join."""
    proxy = world.proxy()
    gateway_a = world.gateway(proxy.url, redis_url=None if "memory" in layout else "", fence="4s")
    gateway_c2 = world.gateway(fence="4s") if layout.startswith("two") else gateway_a
    a, c1, c2, other = (world.client(g) for g in (gateway_a, gateway_a, gateway_c2, gateway_c2))
    bid = new_batch(c1)
    hold_push(proxy, a, bid)
    c1.send(f"BATCH COMMIT {bid}\r\n".encode())
    time.sleep(2.0)
    c2.send(f"BATCH COMMIT {bid}\r\n".encode())
    reply = c1.read_raw()
    assert reply.startswith(b"-ERR COMMIT_FENCE_TIMEOUT"), reply
    # C2's commit is still under way: the batch did not reopen when C1 gave up.
    for client in (c1, other):
        assert call(client, push(bid)).startswith(b"-ERR BATCH_COMMITTED")
    proxy.resume()  # A's PUSH, admitted before either commit, reaches the server
    assert a.read_raw() == OK
    reply = c2.read_raw()
    assert reply == OK, reply + logs(gateway_a, gateway_c2).encode()
    for client in (a, c1, other):
        assert_sealed(client, bid)
    record = world.report(bid)
    assert record["committed"] and record["total"] == 1, record
    assert record["joined_while_committed"] == 0 and record["children_while_committed"] == 0, record


# --- the network to the server stalls for longer than any lease -------------------------------------


def test_a_push_stalled_longer_than_a_lease_holds_the_commit_back_until_answered(world):
    """Gateway A admits a PUSH and writes it; the link to the server holds it longer than a lease
    lives (LEASE_LIFE). Gateway B's client commits every second: refused (COMMIT_FENCE_TIMEOUT) while
    the PUSH is in flight, since A renews its lease for it; +OK once it was answered. No late join."""
    proxy = world.proxy()
    gateway_a, gateway_b = world.gateway(proxy.url), world.gateway()
    a, committer = world.client(gateway_a), world.client(gateway_b)
    bid = new_batch(committer)
    hold_push(proxy, a, bid)
    held_at = time.monotonic()
    stall_until = held_at + LEASE_LIFE + 3
    commits = []  # (seconds since the PUSH was held, reply): the judge's verdict comes first below
    while time.monotonic() < stall_until:
        commits.append(
            (round(time.monotonic() - held_at, 1), call(committer, f"BATCH COMMIT {bid}\r\n".encode()))
        )
        if commits[-1][1] == OK:
            break
        time.sleep(1.0)
    delivered_while_held = world.report(bid)["total"]
    proxy.resume()
    _, pushed = outcome(a, 10)
    if commits[-1][1] != OK:
        commit_until_ok(committer, bid, 10)
    time.sleep(0.3)
    record = world.report(bid)
    assert record["joined_while_committed"] == 0, (record, commits, logs(gateway_a))
    assert delivered_while_held == 0  # the proxy did hold it: the server had not seen it
    assert all(reply.startswith(b"-ERR COMMIT_FENCE_TIMEOUT") for _, reply in commits), commits
    assert len(commits) >= 4, commits
    assert pushed == OK, pushed  # the stalled PUSH is answered, then the commit goes through
    assert_sealed(committer, bid)
    assert record["committed"] and record["total"] == 1, record
    assert gateway_a.metric("faktory_gateway_lease_aborts_total") == 0, logs(gateway_a)


# --- the gateway loses its store, or is stopped or killed, with a command in flight ------------------


@pytest.mark.parametrize("admission", ["acquired", "fast-lane"])
def test_a_gateway_cut_from_redis_resets_its_stalled_push_before_the_lease_expires(world, admission):
    """Redis is cut from gateway A only, while A has an admitted PUSH stalled upstream. A cannot
    renew its lease: before its local deadline passes it resets that upstream connection and
    closes its client's connection (no reply, no made-up error). Once the lease lapsed in Redis,
    a commit via gateway B succeeds; the held PUSH never reaches the server, then or later.

    `acquired`: the held PUSH is the first into the batch, admitted by taking the lease.
    `fast-lane`: the steady state, an earlier PUSH took the lease, so the held one is admitted
    locally and rides the fast lane, its ticket ended by its reply."""
    upstream = world.proxy()
    ledger = world.proxy(world.redis.port)
    gateway_a = world.gateway(upstream.url, redis_url=f"redis://127.0.0.1:{ledger.port}/0")
    gateway_b = world.gateway()
    a, committer = world.client(gateway_a), world.client(gateway_b)
    bid = new_batch(committer)
    earlier = int(admission == "fast-lane")
    if earlier:
        assert call(a, push(bid)) == OK  # takes A's lease on bid
    held = hold_push(upstream, a, bid)
    waiter = Waiter(a)
    waiter.start()
    time.sleep(0.5)
    ledger.refuse()
    ledger.cut_all()
    cut = time.monotonic()
    committed, refusals = commit_until_ok(committer, bid, LEASE_LIFE + 10)
    closed, reply = waiter.result(10)
    upstream.resume()  # if A had not reset the connection, the PUSH would arrive now: late
    time.sleep(0.5)
    record = world.report(bid)
    assert record["joined_while_committed"] == 0 and record["total"] == earlier, (record, logs(gateway_a))
    assert reply is None, f"A's client got {reply!r}, not a closed connection\n" + logs(gateway_a)
    # Taken once, either way: the fast-lane PUSH was admitted without asking Redis.
    assert gateway_a.metric("faktory_gateway_store_calls_total", operation="acquire") == 1
    # The local deadline is at most VALID_FOR after the last renewal began, which was before the cut.
    assert closed - cut < VALID_FOR + 0.5, f"reset {closed - cut:.1f}s after the cut\n" + logs(gateway_a)
    assert closed < committed, "the commit went through before A had reset its connection"
    assert refusals, "the commit did not wait for A's lease"
    assert [chunk for chunk in upstream.dropped if held.encode() in chunk], upstream.dropped
    assert gateway_a.metric("faktory_gateway_lease_aborts_total") >= 1, logs(gateway_a)


def test_a_gateway_stopped_for_longer_than_a_lease_resets_its_push_when_it_wakes(world):
    """Gateway A is SIGSTOPped with an admitted PUSH held upstream, for longer than a lease. A
    commit via B (retried every second) succeeds once A's lease lapsed in Redis. On SIGCONT, A
    finds its deadline passed and resets the connection: the held PUSH never arrives."""
    proxy = world.proxy()
    gateway_a, gateway_b = world.gateway(proxy.url), world.gateway()
    a, committer = world.client(gateway_a), world.client(gateway_b)
    bid = new_batch(committer)
    held = hold_push(proxy, a, bid)
    gateway_a.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        committed, refusals = commit_until_ok(committer, bid, LEASE_LIFE + 10)
        # B ends A's lease only after seeing it unchanged for LEASE_LIFE, from its first commit.
        assert committed - stopped > LEASE_LIFE - 1, refusals
        time.sleep(max(0.0, stopped + LEASE_LIFE + 1 - time.monotonic()))  # stopped longer than a lease
    finally:
        gateway_a.send_signal(signal.SIGCONT)
    _, reply = outcome(a, 5)
    proxy.resume()  # a PUSH A did not reset would arrive now, after the commit
    time.sleep(0.5)
    record = world.report(bid)
    assert record["joined_while_committed"] == 0 and record["total"] == 0, (record, logs(gateway_a))
    assert reply is None, f"A's client got {reply!r}, not a closed connection\n" + logs(gateway_a)
    assert [chunk for chunk in proxy.dropped if held.encode() in chunk], logs(gateway_a)
    assert gateway_a.metric("faktory_gateway_lease_aborts_total") >= 1, logs(gateway_a)


def test_a_gateway_killed_with_a_push_in_flight_lets_nothing_join_late(world):
    """Gateway A is SIGKILLed with an admitted PUSH not yet delivered. The kernel closes A's
    sockets: the upstream one, set to reset on close (SO_LINGER 0), goes with an RST, so what was
    not delivered never is. (A plain close would be a FIN, and the held PUSH would arrive after
    the commit below.) The commit via B succeeds once A's lease lapsed; no late join."""
    proxy = world.proxy()
    gateway_a, gateway_b = world.gateway(proxy.url), world.gateway()
    a, committer = world.client(gateway_a), world.client(gateway_b)
    bid = new_batch(committer)
    held = hold_push(proxy, a, bid)
    gateway_a.kill()
    killed = time.monotonic()
    _, reply = outcome(a, 5)
    assert reply is None
    committed, refusals = commit_until_ok(committer, bid, LEASE_LIFE + 10)
    proxy.resume()  # held bytes of a connection closed with a FIN would arrive now
    time.sleep(0.5)
    record = world.report(bid)
    assert record["joined_while_committed"] == 0 and record["total"] == 0, record
    assert [chunk for chunk in proxy.dropped if held.encode() in chunk], "A's upstream ended without a reset"
    assert refusals and committed - killed > 1.0, "the commit did not wait for the dead gateway's lease"


def send_queue(port: int) -> int:
    """Bytes in the kernel's send queues of the TCP connections to 127.0.0.1:port, in any state
    (ss's Send-Q): sent by a process, not yet taken by the other side."""
    out = subprocess.run(["ss", "-tnH", "dport", f"= :{port}"], capture_output=True, text=True, check=True)
    return sum(int(line.split()[2]) for line in out.stdout.splitlines())


def test_a_gateway_killed_with_a_push_in_its_socket_buffer_lets_nothing_join_late(world):
    """The same with no proxy magic: the link takes no more bytes (the proxy stops reading, its
    receive window is small), so a large admitted PUSH sits in gateway A's *kernel send queue* when
    A is SIGKILLed. A socket closed with SO_LINGER 0 is reset and its queue discarded; closed
    normally, the orphaned socket would still send the queue, then a FIN, and the PUSH would reach
    the server once the link takes bytes again: after the commit below."""
    proxy = world.proxy(rcvbuf=4096)
    gateway_a, gateway_b = world.gateway(proxy.url), world.gateway()
    a, committer = world.client(gateway_a), world.client(gateway_b)
    bid = new_batch(committer)
    first = "first-" + uid()
    proxy.stop_reading_after(first.encode())
    assert call(a, push(bid, first)) == OK  # it passes; from here the link reads nothing from A
    line = push_line(job("big-" + uid(), args=["x" * 2**18], queue="fence-faults", custom={"bid": bid}))
    a.send(line.encode() + b"\r\n")
    wait_until(lambda: send_queue(proxy.port) > 2**17, 10, "the PUSH to sit in gateway A's send queue")
    queued = send_queue(proxy.port)
    gateway_a.kill()
    killed = time.monotonic()
    time.sleep(0.2)
    left = send_queue(proxy.port)  # an orphaned socket keeps its queue; a reset one has none
    committed, refusals = commit_until_ok(committer, bid, LEASE_LIFE + 10)
    proxy.resume()  # the link takes bytes again
    time.sleep(1.0)
    record = world.report(bid)
    assert record["joined_while_committed"] == 0 and record["total"] == 1, (record, queued, left)
    assert left == 0, f"{left} bytes still queued to the server after the kill ({queued} before)"
    assert refusals and committed - killed > 1.0, "the commit did not wait for the dead gateway's lease"


# --- the committing gateway dies mid-commit ---------------------------------------------------------


def attempts(admin: redis.Redis, bid: str) -> list[str]:
    return [member.decode() for member in admin.hkeys(f"fgw:{{{bid}}}:attempts")]


def test_a_committing_gateway_killed_mid_commit_leaves_usable_batches(world):
    """Gateway C is SIGKILLed with four commits under way:
    - W1, W2: waiting in the fence (gateway X holds a lease on each with a PUSH the network holds);
    - S1, S2: let through the fence and written upstream, not yet delivered (the network holds them).
    The batches read committing: pushes are refused. A retried commit via gateway B goes through
    at once for S1 and, once X's PUSH was answered, for W1. Left alone, W2 reopens once B has seen
    its attempt unchanged for ATTEMPT_LIFE (never sent: the server cannot have committed it) and
    S2 reads committed (it may have been: the safe side), and a commit via B is forwarded and
    answered +OK. Nothing of this depends on Redis's clock."""
    fence = 3.0  # C must be killed before its waiting commits time out
    admin = redis.Redis(port=world.redis.port)
    world.stack.callback(admin.close)
    to_x, to_c = world.proxy(), world.proxy()
    gateway_x, gateway_b = world.gateway(to_x.url), world.gateway()
    gateway_c = world.gateway(to_c.url, fence=f"{fence:g}s")
    b = world.client(gateway_b)
    w1, w2, s1, s2 = (new_batch(b) for _ in range(4))
    pushers = {bid: world.client(gateway_x) for bid in (w1, w2)}
    for bid, client in pushers.items():
        hold_push(to_x, client, bid)
    committers = {bid: world.client(gateway_c) for bid in (w1, w2, s1, s2)}
    for bid in (s1, s2):
        to_c.stall_when(f"BATCH COMMIT {bid}".encode())
        committers[bid].send(f"BATCH COMMIT {bid}\r\n".encode())
    wait_until(
        lambda: all(f"BATCH COMMIT {bid}".encode() in to_c.held() for bid in (s1, s2)), 10, "held commits"
    )
    for bid in (w1, w2):
        committers[bid].send(f"BATCH COMMIT {bid}\r\n".encode())
    wait_until(lambda: all(attempts(admin, bid) for bid in (w1, w2)), 10, "the waiting attempts")
    assert all(a.startswith("w:") for bid in (w1, w2) for a in attempts(admin, bid))
    assert all(a.startswith("s:") for bid in (s1, s2) for a in attempts(admin, bid))
    gateway_c.kill()

    for bid in (w1, w2, s1, s2):  # the batches read committing; B starts watching their attempts
        assert call(b, push(bid)).startswith(b"-ERR BATCH_COMMITTED"), logs(gateway_b)
    watched = time.monotonic()
    assert call(b, f"BATCH COMMIT {s1}\r\n".encode()) == OK, logs(gateway_b)
    to_x.resume()  # X's PUSHes, admitted before the commits began, are answered; X's leases end
    for client in pushers.values():
        assert client.read_raw() == OK
    assert call(b, f"BATCH COMMIT {w1}\r\n".encode()) == OK, logs(gateway_b)

    expiry = watched + ATTEMPT_LIFE
    assert time.monotonic() < expiry - 5, "too slow to see the attempts alive"
    while call(b, push(w2)) != OK:  # usable again once B saw W2's attempt unchanged long enough
        assert time.monotonic() < expiry + 5, "W2 did not reopen after its attempt was seen dead"
        time.sleep(0.5)
    reopened = time.monotonic()
    assert reopened > expiry - 1, f"W2 reopened {expiry - reopened:.1f}s before its attempt was seen dead"
    assert call(b, push(s2)).startswith(b"-ERR BATCH_COMMITTED")  # S2 reads committed
    assert call(b, f"BATCH COMMIT {w2}\r\n".encode()) == OK
    assert call(b, f"BATCH COMMIT {s2}\r\n".encode()) == OK
    report = world.standin.report()
    for bid in (w1, w2, s1, s2):
        assert_sealed(b, bid)
        record = report[bid]
        assert record["committed"] and record["joined_while_committed"] == 0, (bid, record)
        assert record["children_while_committed"] == 0, (bid, record)
    assert report[w1]["total"] == 1 and report[w2]["total"] == 2 and report[s2]["total"] == 0
