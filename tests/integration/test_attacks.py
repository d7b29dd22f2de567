"""Issue 14, replayed as an attacker would: real Faktory, the Ent stand-in, real gateway processes.

The four attacks the issue found, each shown refused or harmless, both through the gateway and
with the forged jobs pushed straight to the server (past the gateway) and then fetched through it;
the legitimate flows the hardening must not break; and the attacks that were already refused,
kept as a regression list. `STANDIN REPORT` proves what joined a batch behind the replies.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.integration.test_batches import error_code, member, new_batch, report, uid
from tests.support.client import RawClient, ServerClosed, job, push_line
from tests.support.processes import GatewayProcess

DEEP = 100_000
ELSEWHERE = "127.0.0.2"  # another loopback address: Linux routes all of 127.0.0.0/8 to lo


@pytest.fixture(params=["strict", "member_reopen"])
def any_mode(request):
    return request.getfixturevalue(request.param)


def committed_batch(client: RawClient, queue: str = "work", cb_queue: str | None = None) -> str:
    """A batch with one member job in `queue`, committed; its callback goes to `cb_queue`."""
    bid = new_batch(client, queue=cb_queue or "cb-" + uid())
    assert client.call(member(bid, queue)) == b"+OK\r\n"
    assert client.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
    return bid


def forged(queue: str, custom: dict, jid: str | None = None) -> str:
    return push_line(job(jid or "forge-" + uid(), jobtype="x", queue=queue, args=[], custom=custom))


def ack(client: RawClient, jid: str) -> bytes:
    return client.call('ACK {"jid":"%s"}' % jid)


def assert_queue_empty(client: RawClient, queue: str) -> None:
    """Nothing waits in `queue`: a marker pushed now is the next job out (a FETCH of an empty queue
    would block for 2 s)."""
    marker = "marker-" + uid()
    assert client.call(push_line(job(marker, queue=queue))) == b"+OK\r\n"
    assert client.json(f"FETCH {queue}")["jid"] == marker
    assert ack(client, marker) == b"+OK\r\n"


def fetch_forged(standin, gateway, queue: str, custom: dict, wid: str) -> tuple[RawClient, dict]:
    """Push a forged job straight to the stand-in (past the gateway: the server takes it), then
    fetch it through the gateway as worker `wid`. Returns the worker's connection and the job."""
    with RawClient.connect(standin.url) as direct:
        assert direct.call(forged(queue, custom)) == b"+OK\r\n"
    worker = RawClient.connect(gateway.url, wid=wid)
    fetched = worker.json(f"FETCH {queue}")
    assert fetched["custom"] == custom  # the server handed the forged job out as it was pushed
    return worker, fetched


# --- attack 1: forged membership with custom._pbid (member-reopen) ------------------------------


@pytest.mark.parametrize(
    "custom_key, pbid_key",
    [("custom", "_pbid"), ("CUSTOM", "_pbid"), ("cu\u017ftom", "_pbid"), ("custom", "_\\u0070bid")],
    ids=["plain", "CUSTOM", "long-s", "escaped"],
)
def test_forged_pbid_pushed_through_the_gateway_is_refused(member_reopen, standin, custom_key, pbid_key):
    queue = "evilq-" + uid()
    with RawClient.connect(member_reopen.url, wid="attacker-" + uid()) as attacker:
        bid = committed_batch(attacker)
        line = '{"jid":"forge-%s","jobtype":"x","args":[],"queue":"%s","%s":{"%s":"%s"}}'
        forged_line = "PUSH " + line % (uid(), queue, custom_key, pbid_key, bid)
        assert error_code(attacker, forged_line) == "RESERVED_KEY"
        assert_queue_empty(attacker, queue)  # nothing reached the server
        assert error_code(attacker, f"BATCH OPEN {bid}") == "BATCH_COMMITTED"
        assert error_code(attacker, member(bid)) == "BATCH_COMMITTED"
    assert report(standin)[bid]["joined_while_committed"] == 0


def test_forged_pbid_in_a_pushb_refuses_that_job_only(member_reopen):
    queue = "evilq-" + uid()
    with RawClient.connect(member_reopen.url, wid="attacker-" + uid()) as attacker:
        bid = committed_batch(attacker)
        good = job("good-" + uid(), queue=queue)
        bad = job("forge-" + uid(), queue=queue, custom={"_pbid": bid})
        result = attacker.json("PUSHB " + json.dumps([good, bad]))
        assert list(result) == [bad["jid"]] and result[bad["jid"]].startswith("RESERVED_KEY ")
        assert attacker.json(f"FETCH {queue}")["jid"] == good["jid"]
        assert_queue_empty(attacker, queue)


@pytest.mark.parametrize(
    "forgery",
    ["pbid-only", "pbid-and-own-fired-batch", "pbid-and-unfired-child"],
)
def test_forged_pbid_pushed_past_the_gateway_grants_no_membership(member_reopen, standin, forgery):
    """The issue's replay, with the job pushed straight to the server: fetched through the gateway
    by the attacker, it must not let the attacker reopen the committed batch B."""
    queue = "evilq-" + uid()
    wid = "attacker-" + uid()
    with RawClient.connect(member_reopen.url, wid="producer-" + uid()) as producer:
        child = None
        if forgery == "pbid-and-unfired-child":
            parent = new_batch(producer)
            child = new_batch(producer, parent=parent)  # a real child of B, whose callback never fired
            producer.call(member(parent))
            producer.call(member(child))
            producer.call(f"BATCH COMMIT {child}")
            assert producer.call(f"BATCH COMMIT {parent}") == b"+OK\r\n"
            bid = parent
        else:
            bid = committed_batch(producer)
        if forgery == "pbid-and-own-fired-batch":
            own = new_batch(producer, queue="own-cb-" + uid())  # the attacker's own batch, no parent
            producer.call(f"BATCH COMMIT {own}")  # empty: its callback fires at once
            assert producer.json(f"BATCH STATUS {own}")["success_st"] == "1"
            child = own
    custom = {"_pbid": bid} if child is None else {"_bid": child, "_pbid": bid, "_cb": "success"}
    worker, _ = fetch_forged(standin, member_reopen, queue, custom, wid)
    with worker, RawClient.connect(member_reopen.url, wid=wid) as pooled:
        assert error_code(worker, f"BATCH OPEN {bid}") == "BATCH_COMMITTED"
        assert error_code(pooled, f"BATCH OPEN {bid}") == "BATCH_COMMITTED"
        assert error_code(pooled, member(bid)) == "BATCH_COMMITTED"
        child_spec = json.dumps({"parent_bid": bid, "success": {"jobtype": "x"}})
        assert error_code(pooled, "BATCH NEW " + child_spec) == "PARENT_SEALED"
    record = report(standin)[bid]
    assert record["committed"] and record["joined_while_committed"] == 0
    assert record["children_while_committed"] == 0


def test_a_forged_copy_of_a_real_child_callback_pushed_past_the_gateway_grants_no_membership(
    member_reopen, standin
):
    """The strongest form of attack 1: B's child C really fired (its success callback is enqueued,
    BATCH STATUS C says so and names B as parent) while B still runs. A copy of that callback
    (`_bid` C, `_pbid` B), pushed straight to the server and fetched through the gateway by the
    attacker, must not make the attacker a member of B: through the gateway that push is refused
    RESERVED_KEY, and issue 14 asks that jobs pushed past the gateway cannot do what it could."""
    queue = "copy-" + uid()
    with RawClient.connect(member_reopen.url, wid="producer-" + uid()) as producer:
        parent = new_batch(producer, queue=queue + "-pcb")
        child = new_batch(producer, parent=parent, queue=queue + "-ccb")
        producer.call(member(child, queue + "-c"))
        producer.call(member(parent, queue + "-p"))  # stays pending: B does not fire
        producer.call(f"BATCH COMMIT {child}")
        assert producer.call(f"BATCH COMMIT {parent}") == b"+OK\r\n"
        work = producer.json(f"FETCH {queue}-c")
        assert ack(producer, work["jid"]) == b"+OK\r\n"
        status = producer.json(f"BATCH STATUS {child}")
        assert status["success_st"] == "1" and status["parent_bid"] == parent  # C's callback is real
        assert error_code(producer, f"PUSH {json.dumps(job('c-' + uid(), custom={'_bid': child}))}") == (
            "RESERVED_KEY"
        )
    custom = {"_bid": child, "_pbid": parent, "_cb": "success"}
    worker, _ = fetch_forged(standin, member_reopen, "evilq-" + uid(), custom, "attacker-" + uid())
    with worker:
        assert error_code(worker, f"BATCH OPEN {parent}") == "BATCH_COMMITTED"
        assert error_code(worker, member(parent)) == "BATCH_COMMITTED"
    assert report(standin)[parent]["total"] == 1


# --- attack 2: forged callbacks mark other batches fired (every mode) ----------------------------


@pytest.mark.parametrize(
    "custom",
    [
        '{"_bid":"%s"}',
        '{"_bid":"%s","_cb":"success"}',
        '{"_\\u0062id":"%s"}',
        '{"_cb":"complete","note":"%s"}',
    ],
    ids=["_bid", "_bid+_cb", "escaped", "_cb"],
)
def test_forged_bid_pushed_through_the_gateway_is_refused(any_mode, standin, custom):
    queue = "evilq-" + uid()
    with RawClient.connect(any_mode.url, wid="w-" + uid()) as client:
        victim = new_batch(client)
        line = '{"jid":"forge-%s","jobtype":"x","args":[],"queue":"%s","custom":%s}' % (uid(), queue, custom)
        assert error_code(client, "PUSH " + line % victim) == "RESERVED_KEY"
        assert_queue_empty(client, queue)
        assert client.call(member(victim)) == b"+OK\r\n"  # the victim is open and stays so
    record = report(standin)[victim]
    assert record["total"] == 1 and record["success_st"] == "" and record["joined_after_callback"] == 0


def test_forged_callback_pushed_past_the_gateway_does_not_fire_the_victim(any_mode, standin):
    queue = "evilq-" + uid()
    with RawClient.connect(any_mode.url) as producer:
        victim = new_batch(producer)
        worker, fetched = fetch_forged(
            standin, any_mode, queue, {"_bid": victim, "_cb": "success"}, "worker-" + uid()
        )
        with worker:
            assert ack(worker, fetched["jid"]) == b"+OK\r\n"
        # The legitimate producer carries on: V is open, its pushes and its commit go through.
        assert error_code(producer, member(victim)) is None
        assert producer.value(f"BATCH OPEN {victim}").decode() == victim
        assert producer.call(member(victim)) == b"+OK\r\n"
        assert producer.call(f"BATCH COMMIT {victim}") == b"+OK\r\n"
    record = report(standin)[victim]
    assert record["total"] == 2 and record["success_st"] == ""


# --- attack 3: a borrowed worker id (member-reopen) ------------------------------------------------


def test_a_borrowed_wid_from_another_address_cannot_reopen(member_reopen, standin):
    queue = "held-" + uid()
    wid = "real-worker-" + uid()
    with RawClient.connect(member_reopen.url, wid="producer-" + uid()) as producer:
        bid = committed_batch(producer, queue=queue)
    with (
        RawClient.connect(member_reopen.url, wid=wid) as real,
        RawClient.connect(member_reopen.url, wid=wid, source=ELSEWHERE) as attacker,
    ):
        assert attacker.sock.getsockname()[0] == ELSEWHERE
        held = real.json(f"FETCH {queue}")
        assert held["custom"]["bid"] == bid
        # The attacker says the real worker's wid, from another address: not a holder of B.
        assert error_code(attacker, f"BATCH OPEN {bid}") == "BATCH_COMMITTED"
        assert error_code(attacker, member(bid)) == "BATCH_COMMITTED"
        # The real worker still reopens its batch, adds a job and commits again.
        with RawClient.connect(member_reopen.url, wid=wid) as pooled:
            assert pooled.value(f"BATCH OPEN {bid}").decode() == bid
            assert pooled.call(member(bid, queue)) == b"+OK\r\n"
            assert pooled.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
        assert error_code(attacker, f"BATCH OPEN {bid}") == "BATCH_COMMITTED"
        # The documented limit (README, "What it trusts"): the same wid from the same address is
        # that worker as far as anyone can tell, so another process on the host can borrow it.
        with RawClient.connect(member_reopen.url, wid=wid) as same_host:
            assert same_host.value(f"BATCH OPEN {bid}").decode() == bid
            assert same_host.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
        assert ack(real, held["jid"]) == b"+OK\r\n"
    assert report(standin)[bid]["joined_while_committed"] == 0


# --- attack 4: deep JSON ----------------------------------------------------------------------------


def logged(gateway: GatewayProcess) -> str:
    """Everything the gateway process wrote so far."""
    return "\n".join(gateway.output)


def deep_array(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_a_deep_ack_gets_the_servers_own_reply_and_the_connection_stays(member_reopen, faktory, standin):
    queue = "deep-" + uid()
    wid = "worker-" + uid()
    line = b"ACK " + deep_array(DEEP)
    with RawClient.connect(faktory.url, wid="direct-" + uid()) as direct:
        expected = direct.call(line)
    assert expected.startswith(b"-ERR invalid ACK")
    with RawClient.connect(member_reopen.url, wid="producer-" + uid()) as producer:
        bid = committed_batch(producer, queue=queue)
    with RawClient.connect(member_reopen.url, wid=wid) as worker:
        held = worker.json(f"FETCH {queue}")  # the worker holds a job of B: its ACKs are read
        assert worker.call(line) == expected
        assert worker.call("INFO").startswith(b"$")
        assert worker.call(push_line(job("after-" + uid(), queue=queue + "-x"))) == b"+OK\r\n"
        # Still a holder of B (the deep ACK released nothing) ...
        assert worker.value(f"BATCH OPEN {bid}").decode() == bid
        assert worker.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
        assert ack(worker, held["jid"]) == b"+OK\r\n"
        time.sleep(0.2)
        # ... until its real ACK.
        assert error_code(worker, f"BATCH OPEN {bid}") == "BATCH_COMMITTED"
    assert "Traceback" not in logged(member_reopen)


def test_a_deep_job_fetched_through_the_gateway_arrives_unchanged(member_reopen, faktory):
    """Go reads JSON up to 10,000 levels deep, Python far less: a deep callback-looking job pushed
    straight to the server must reach the worker as the server sent it."""
    queue = "deepjob-" + uid()
    with RawClient.connect(member_reopen.url, wid="w-" + uid()) as producer:
        victim = new_batch(producer)
    payload = {"jid": "deep-" + uid(), "jobtype": "x", "queue": queue, "custom": {"_bid": victim}}
    line = push_line(payload).encode()[:-1] + b',"args":[' + deep_array(5000) + b"]}"
    with RawClient.connect(faktory.url) as direct:
        assert direct.call(line) == b"+OK\r\n"
    with RawClient.connect(member_reopen.url, wid="w-" + uid()) as worker:
        reply = worker.call(f"FETCH {queue}")
        assert reply.startswith(b"$") and b'"_bid":"%s"' % victim.encode() in reply
        assert reply.count(b"[") > 5000
        assert worker.call("INFO").startswith(b"$")
        assert worker.call(member(victim)) == b"+OK\r\n"  # the victim was not marked fired
    assert "Traceback" not in logged(member_reopen)


def hello_outcome(url: str, line: bytes) -> tuple[bytes | None, bool]:
    """(the reply to this HELLO line, or None; whether the connection is then closed)."""
    client = RawClient(url)
    try:
        client.greeting = client.read_raw()
        client.send(line)
        try:
            reply = client.read_raw()
        except ServerClosed:
            return None, True
        return reply, client.is_closed(3)
    finally:
        client.close()


def test_a_deep_hello_is_answered_as_the_server_answers_it(member_reopen, strict, faktory):
    line = b"HELLO " + deep_array(DEEP) + b"\r\n"
    direct = hello_outcome(faktory.url, line)
    assert direct == (None, True)  # Faktory 1.9.4 closes the connection without a reply
    for gateway in (member_reopen, strict):
        assert hello_outcome(gateway.url, line) == direct
        nested = b'HELLO {"v":2,"wid":' + deep_array(DEEP) + b"}\r\n"
        assert hello_outcome(gateway.url, nested) == hello_outcome(faktory.url, nested)
        with RawClient.connect(gateway.url, wid="w-" + uid()) as client:  # the gateway serves on
            assert client.call("INFO").startswith(b"$")
    time.sleep(0.2)
    for gateway in (member_reopen, strict):
        assert "Traceback" not in logged(gateway)
        assert "internal error" not in logged(gateway)


# --- the legitimate flows still work ---------------------------------------------------------------


def test_a_real_callback_fetched_by_a_worker_marks_its_batch_fired(any_mode, standin):
    queue = "fire-" + uid()
    with RawClient.connect(any_mode.url, wid="worker-" + uid()) as worker:
        bid = committed_batch(worker, queue=queue, cb_queue=queue + "-cb")
        work = worker.json(f"FETCH {queue}")
        assert ack(worker, work["jid"]) == b"+OK\r\n"
        callback = worker.json(f"FETCH {queue}-cb")
        assert callback["custom"]["_bid"] == bid
    # Another connection, which never asked BATCH STATUS: the ledger says fired.
    with RawClient.connect(any_mode.url) as producer:
        assert error_code(producer, member(bid)) == "BATCH_CALLBACK_FIRED"
        assert error_code(producer, f"BATCH OPEN {bid}") == "BATCH_CALLBACK_FIRED"
    assert report(standin)[bid]["joined_after_callback"] == 0


def test_a_real_member_reopens_its_committed_batch(member_reopen, standin):
    queue = "member-" + uid()
    wid = "worker-" + uid()
    with RawClient.connect(member_reopen.url, wid="producer-" + uid()) as producer:
        bid = committed_batch(producer, queue=queue)
        assert error_code(producer, f"BATCH OPEN {bid}") == "BATCH_COMMITTED"
    with RawClient.connect(member_reopen.url, wid=wid) as worker:
        held = worker.json(f"FETCH {queue}")
        assert worker.value(f"BATCH OPEN {bid}").decode() == bid
        assert worker.call(member(bid, queue)) == b"+OK\r\n"
        assert worker.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
        assert ack(worker, held["jid"]) == b"+OK\r\n"
    record = report(standin)[bid]
    assert record["total"] == 2 and record["joined_while_committed"] == 0 and record["committed"]


def test_a_childs_real_callback_lets_its_worker_reopen_the_parent(member_reopen, standin):
    queue = "child-" + uid()
    wid = "worker-" + uid()
    with RawClient.connect(member_reopen.url, wid="producer-" + uid()) as producer:
        parent = new_batch(producer, queue=queue + "-parent")
        child = new_batch(producer, parent=parent, queue=queue + "-cb")
        producer.call(member(child, queue))
        producer.call(f"BATCH COMMIT {child}")
        producer.call(member(parent, queue + "-p"))
        assert producer.call(f"BATCH COMMIT {parent}") == b"+OK\r\n"
    with RawClient.connect(member_reopen.url, wid=wid) as worker:
        assert error_code(worker, f"BATCH OPEN {parent}") == "BATCH_COMMITTED"  # nothing held yet
        work = worker.json(f"FETCH {queue}")
        assert work["custom"]["bid"] == child
        assert ack(worker, work["jid"]) == b"+OK\r\n"
        callback = worker.json(f"FETCH {queue}-cb")
        assert callback["custom"] == {"_bid": child, "_cb": "success", "_pbid": parent}
        assert worker.value(f"BATCH OPEN {parent}").decode() == parent
        assert worker.call(member(parent, queue + "-p")) == b"+OK\r\n"
        assert worker.call(f"BATCH COMMIT {parent}") == b"+OK\r\n"
        assert ack(worker, callback["jid"]) == b"+OK\r\n"
    record = report(standin)[parent]
    assert record["total"] == 2 and record["joined_while_committed"] == 0


# --- regressions: attacks that were already refused ---------------------------------------------------


@pytest.fixture(scope="module")
def sealed(strict):
    """One committed batch that every regression case attacks; none may join it."""
    with RawClient.connect(strict.url) as client:
        return committed_batch(client, queue="sealed-" + uid())


def job_line(body: str) -> bytes:
    return ('PUSH {"jid":"r-%s","jobtype":"x","args":[],"queue":"regress",%s}' % (uid(), body)).encode()


REGRESSIONS = {
    # (line built from the sealed bid, the -ERR code expected, or None: forwarded and harmless)
    "Custom": (lambda b: job_line('"Custom":{"bid":"%s"}' % b), "BATCH_COMMITTED"),
    "CUSTOM": (lambda b: job_line('"CUSTOM":{"bid":"%s"}' % b), "BATCH_COMMITTED"),
    "long-s raw": (lambda b: job_line('"cu\u017ftom":{"bid":"%s"}' % b), "BATCH_COMMITTED"),
    "long-s escaped": (lambda b: job_line('"cu\\u017ftom":{"bid":"%s"}' % b), "BATCH_COMMITTED"),
    "custom escaped": (lambda b: job_line('"\\u0063ustom":{"bid":"%s"}' % b), "BATCH_COMMITTED"),
    "bid escaped": (lambda b: job_line('"custom":{"b\\u0069d":"%s"}' % b), "BATCH_COMMITTED"),
    "bid value escaped": (
        lambda b: job_line('"custom":{"bid":"%s"}' % "".join(f"\\u{ord(c):04x}" for c in b)),
        "BATCH_COMMITTED",
    ),
    "BID in custom (no member to the server)": (lambda b: job_line('"custom":{"BID":"%s"}' % b), None),
    "duplicate custom": (
        lambda b: job_line('"custom":{"bid":"b-other"},"custom":{"bid":"%s"}' % b),
        "MALFORMED",
    ),
    "duplicate bid": (lambda b: job_line('"custom":{"bid":"b-other","bid":"%s"}' % b), "MALFORMED"),
    "custom and Custom": (lambda b: job_line('"custom":{},"Custom":{"bid":"%s"}' % b), "MALFORMED"),
    "number bid": (lambda b: job_line('"custom":{"bid":7}'), "MALFORMED"),
    "float bid": (lambda b: job_line('"custom":{"bid":1e3}'), "MALFORMED"),
    "list bid": (lambda b: job_line('"custom":{"bid":["%s"]}' % b), "MALFORMED"),
    # Go reads bytes that are not UTF-8 (as U+FFFD) and 10,000 levels of nesting: such a job is
    # judged like any other, not refused blind (issue 18).
    "invalid UTF-8 in the job": (
        lambda b: job_line('"custom":{"bid":"%s"},"note":"\xff"' % b).replace(b"\xc3\xbf", b"\xff"),
        "BATCH_COMMITTED",
    ),
    "invalid UTF-8 in the bid": (
        lambda b: job_line('"custom":{"bid":"%s\xff"}' % b).replace(b"\xc3\xbf", b"\xff"),
        "MALFORMED",
    ),
    "trailing garbage": (lambda b: job_line('"custom":{"bid":"%s"}' % b) + b" garbage", "MALFORMED"),
    "a second object after": (
        lambda b: job_line('"custom":{}') + b'{"custom":{"bid":"%s"}}' % b.encode(),
        "MALFORMED",
    ),
    "deep nesting in the job": (
        lambda b: job_line('"custom":{"bid":"%s"},"x":%s' % (b, deep_array(DEEP).decode())),
        "BATCH_COMMITTED",
    ),
    "deep nesting in its custom": (
        lambda b: job_line('"custom":{"x":%s,"bid":"%s"}' % (deep_array(5000).decode(), b)),
        "BATCH_COMMITTED",
    ),
    "Parent_Bid": (
        lambda b: b'BATCH NEW {"Parent_Bid":"%s","success":{"jobtype":"x"}}' % b.encode(),
        "PARENT_SEALED",
    ),
    "PARENT_BID": (
        lambda b: b'BATCH NEW {"PARENT_BID":"%s","success":{"jobtype":"x"}}' % b.encode(),
        "PARENT_SEALED",
    ),
    "parent_bid escaped": (
        lambda b: b'BATCH NEW {"p\\u0061rent_bid":"%s","success":{"jobtype":"x"}}' % b.encode(),
        "PARENT_SEALED",
    ),
    "parent_bid duplicate": (
        lambda b: b'BATCH NEW {"parent_bid":"","parent_bid":"%s","success":{"jobtype":"x"}}' % b.encode(),
        "MALFORMED",
    ),
    "number parent_bid": (lambda b: b'BATCH NEW {"parent_bid":7,"success":{"jobtype":"x"}}', "MALFORMED"),
    "deep BATCH NEW": (
        lambda b: b'BATCH NEW {"parent_bid":"%s","x":%s}' % (b.encode(), deep_array(DEEP)),
        "MALFORMED",
    ),
    # BATCH subcommands as Go upper-cases QUEUE's (issue 18): the rules apply to every spelling.
    "BATCH open": (lambda b: b"BATCH open %s" % b.encode(), "BATCH_COMMITTED"),
    "BATCH oPeN": (lambda b: b"BATCH oPeN %s" % b.encode(), "BATCH_COMMITTED"),
    "BATCH new with its parent": (
        lambda b: b'BATCH new {"parent_bid":"%s","success":{"jobtype":"x"}}' % b.encode(),
        "PARENT_SEALED",
    ),
    "an unknown BATCH subcommand naming the bid": (lambda b: b"BATCH REOPEN %s" % b.encode(), "MALFORMED"),
    "BATCH  OPEN (two spaces)": (lambda b: b"BATCH  OPEN %s" % b.encode(), "MALFORMED"),
    "BATCH OPEN with a space": (lambda b: b"BATCH OPEN %s x" % b.encode(), "MALFORMED"),
    "BATCH OPEN twice the bid": (lambda b: b"BATCH OPEN %s\tb-2" % b.encode(), "MALFORMED"),
}


@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_already_refused_attacks_stay_refused(strict, standin, sealed, case):
    build, code = REGRESSIONS[case]
    with RawClient.connect(strict.url) as client:
        assert error_code(client, build(sealed)) == code
        assert client.call("INFO").startswith(b"$")  # the connection stays usable
    record = report(standin)[sealed]
    assert record["joined_while_committed"] == 0 and record["children_while_committed"] == 0
    assert record["total"] == 1 and record["committed"]


def test_a_batch_push_sent_byte_by_byte_is_refused(strict, standin, sealed):
    with RawClient.connect(strict.url) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in (member(sealed) + "\r\n").encode():
            client.send(bytes([byte]))
            time.sleep(0.001)
        assert client.read_raw().startswith(b"-ERR BATCH_COMMITTED batch " + sealed.encode())
        assert client.call("INFO").startswith(b"$")
    assert report(standin)[sealed]["joined_while_committed"] == 0


def test_pipelined_push_commit_push_refuses_the_second_push(strict, standin):
    with RawClient.connect(strict.url) as client:
        bid = new_batch(client)
        client.send(f"{member(bid)}\r\nBATCH COMMIT {bid}\r\n{member(bid)}\r\n".encode())
        replies = [client.read_raw() for _ in range(3)]
    assert replies[:2] == [b"+OK\r\n", b"+OK\r\n"]
    assert replies[2].startswith(b"-ERR BATCH_COMMITTED batch " + bid.encode())
    record = report(standin)[bid]
    assert record["total"] == 1 and record["joined_while_committed"] == 0


def test_pushb_mixing_good_and_bad_jobs_refuses_only_the_bad(strict, standin, sealed):
    queue = "mix-" + uid()
    good = job("good-" + uid(), queue=queue)
    bad = [
        job("member-" + uid(), queue=queue, custom={"bid": sealed}),
        {**job("case-" + uid(), queue=queue), "CUSTOM": {"bid": sealed}},
        job("forged-" + uid(), queue=queue, custom={"_bid": sealed}),
        job("forged-p-" + uid(), queue=queue, custom={"_pbid": sealed}),
    ]
    with RawClient.connect(strict.url) as client:
        result = client.json("PUSHB " + json.dumps([good, *bad]))
        assert set(result) == {j["jid"] for j in bad}
        assert [result[j["jid"]].split()[0] for j in bad] == [
            "BATCH_COMMITTED",
            "BATCH_COMMITTED",
            "RESERVED_KEY",
            "RESERVED_KEY",
        ]
        assert client.json(f"FETCH {queue}")["jid"] == good["jid"]
        assert_queue_empty(client, queue)
        # A PUSHB whose only batch job is spelt ambiguously is refused whole.
        ambiguous = {**job("amb-" + uid(), queue=queue), "custom": {}, "Custom": {"bid": sealed}}
        assert error_code(client, "PUSHB " + json.dumps([good | {"jid": "g2-" + uid()}, ambiguous])) == (
            "MALFORMED"
        )
        assert_queue_empty(client, queue)
    record = report(standin)[sealed]
    assert record["joined_while_committed"] == 0 and record["total"] == 1
