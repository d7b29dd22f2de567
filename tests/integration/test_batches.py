"""The batch invariants, end to end: real Faktory behind the Ent stand-in, real Redis, the gateway.

Each contribsys/faktory#465 scenario runs twice: straight to the stand-in, where it goes through
(the server is that permissive), and through the gateway, where it is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.support.client import CommandError, RawClient, job, push_line, uid
from tests.support.processes import REPO, GatewayProcess, RedisServer


def new_batch(client: RawClient, parent: str | None = None, queue: str = "callbacks") -> str:
    # A callback with its own jid, as the Go, Ruby and Rust clients send it.
    spec = {
        "description": "test",
        "success": {"jid": "cb-" + uid(), "jobtype": "Done", "args": [], "queue": queue},
    }
    if parent:
        spec["parent_bid"] = parent
    return client.value("BATCH NEW " + json.dumps(spec)).decode()


def member(bid: str, queue: str = "work") -> str:
    return push_line(job("j-" + uid(), queue=queue, custom={"bid": bid}))


def error_code(client: RawClient, line: str) -> str | None:
    """The -ERR code of the reply, or None when the command went through."""
    try:
        client.value(line)
    except CommandError as exc:
        return exc.args[0].split()[1]
    return None


def report(standin) -> dict:
    with RawClient.connect(standin.url) as client:
        return client.json("STANDIN REPORT")["batches"]


# --- the #465 scenarios: permissive direct, refused through the gateway ------------------------


@pytest.fixture(params=["direct", "gateway"])
def route(request, standin, strict):
    return request.param, standin if request.param == "direct" else strict


def test_reopen_of_a_committed_batch_from_outside(route):
    name, target = route
    with RawClient.connect(target.url) as client:
        bid = new_batch(client)
        client.call(member(bid))
        assert client.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
        reply = client.call(f"BATCH OPEN {bid}")
    if name == "direct":
        assert reply == b"$%d\r\n%s\r\n" % (len(bid), bid.encode())  # Ent echoes the bid
    else:
        assert reply.startswith(b"-ERR BATCH_COMMITTED batch " + bid.encode())


def test_push_into_a_committed_batch(route, standin):
    name, target = route
    with RawClient.connect(target.url) as client:
        bid = new_batch(client)
        client.call(member(bid))
        client.call(f"BATCH COMMIT {bid}")
        code = error_code(client, member(bid))
        assert client.call("INFO").startswith(b"$")  # the connection stays usable
    counted = report(standin)[bid]["joined_while_committed"]
    if name == "direct":
        assert code is None and counted == 1
    else:
        assert code == "BATCH_COMMITTED" and counted == 0


def test_child_batch_under_a_committed_parent(route, standin):
    name, target = route
    with RawClient.connect(target.url) as client:
        parent = new_batch(client)
        client.call(member(parent))
        client.call(f"BATCH COMMIT {parent}")
        spec = {"parent_bid": parent, "success": {"jobtype": "Done", "args": []}}
        code = error_code(client, "BATCH NEW " + json.dumps(spec))
    counted = report(standin)[parent]["children_while_committed"]
    if name == "direct":
        assert code is None and counted == 1
    else:
        assert code == "PARENT_SEALED" and counted == 0


def run_to_callback(client: RawClient, bid: str, queue: str) -> dict:
    """Commit `bid` (one member job in `queue`), run that job, and fetch the success callback."""
    client.call(member(bid, queue=queue))
    assert client.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
    work = client.json(f"FETCH {queue}")
    client.call(json.dumps({"jid": work["jid"]}).join(["ACK ", ""]))
    callback = client.json(f"FETCH {queue}-cb")
    assert callback["custom"]["_bid"] == bid
    return callback


def test_push_after_the_callback_was_enqueued(route, standin):
    name, target = route
    queue = "fire-" + uid()
    with RawClient.connect(target.url) as client:
        bid = new_batch(client, queue=queue + "-cb")
        run_to_callback(client, bid, queue)
        code = error_code(client, member(bid))
        reopen = error_code(client, f"BATCH OPEN {bid}")
    record = report(standin)[bid]
    if name == "direct":
        assert code is None and reopen is None and record["joined_after_callback"] == 1
    else:
        # The gateway saw the callback job go by in the FETCH reply: the batch is fired for good.
        assert code == "BATCH_CALLBACK_FIRED" and reopen == "BATCH_CALLBACK_FIRED"
        assert record["joined_after_callback"] == 0


def test_with_the_go_client_as_a_user_would(standin, strict):
    """The #465 violations through the reference client's batch API (tests/clients/go)."""

    def violate(url: str) -> dict:
        program = REPO / ".tools/bin/violate465"
        result = subprocess.run(
            [str(program)], env={**os.environ, "FAKTORY_URL": url}, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    direct = violate(standin.url)
    assert {k: v for k, v in direct.items() if k != "bid"} == {
        "reopen": "",
        "push": "",
        "child": "",
        "pushbulk": "",
    }
    through = violate(strict.url)
    bid = through["bid"]
    assert through["reopen"].startswith(f"ERR BATCH_COMMITTED batch {bid}")
    assert through["push"].startswith(f"ERR BATCH_COMMITTED batch {bid}")
    assert through["child"].startswith(f"ERR PARENT_SEALED parent batch {bid}")
    assert through["pushbulk"].startswith(f"BATCH_COMMITTED batch {bid}")
    assert report(standin)[bid]["total"] == 1  # only the job pushed before the commit


def test_with_pyfaktory_as_a_user_would(standin, strict):
    """The same #465 violations through a real client library's batch API."""
    from pyfaktory import Batch, Client, Job, Producer, TargetJob

    def violate(url: str) -> list:
        with Client(faktory_url=url, role="producer") as client:
            producer = Producer(client)
            batch = Batch(
                description="pyfaktory",
                success=TargetJob(jobtype="Done", args=[], queue="callbacks"),
                complete=None,
                parent_bid=None,
            )
            bid = producer.batch_new(batch).split()[-1]  # pyfaktory returns the raw bulk reply
            producer.push(Job(jobtype="Work", args=[1], queue="work", custom={"bid": bid}))
            producer.batch_commit(bid)
            outcomes = []
            for attempt in (
                lambda: producer.batch_open(bid),
                lambda: producer.push(Job(jobtype="Work", args=[2], queue="work", custom={"bid": bid})),
            ):
                try:
                    attempt()
                    outcomes.append("accepted")
                except Exception as exc:  # pyfaktory raises its own error type with the server's text
                    outcomes.append("BATCH_COMMITTED" if "BATCH_COMMITTED" in str(exc) else repr(exc))
            return outcomes

    assert violate(standin.url) == ["accepted", "accepted"]
    assert violate(strict.url) == ["BATCH_COMMITTED", "BATCH_COMMITTED"]


# --- the guarantees still hold through the gateway -----------------------------------------------


def test_callbacks_fire_right_after_the_last_job_of_a_committed_batch(strict):
    queue = "g-" + uid()
    with RawClient.connect(strict.url) as client:
        spec = {
            "complete": {"jobtype": "Complete", "args": [], "queue": queue + "-cb"},
            "success": {"jobtype": "Success", "args": [], "queue": queue + "-cb"},
        }
        bid = client.value("BATCH NEW " + json.dumps(spec)).decode()
        client.call(member(bid, queue))
        client.call(member(bid, queue))
        assert client.value(f"FETCH {queue}-cb") is None  # nothing fires before the commit
        assert client.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
        for _ in range(2):
            work = client.json(f"FETCH {queue}")
            client.call('ACK {"jid":"%s"}' % work["jid"])
        complete = client.json(f"FETCH {queue}-cb")
        assert complete["jobtype"] == "Complete" and complete["custom"]["_cb"] == "complete"
        assert client.value(f"FETCH {queue}-cb") is None  # success waits for the complete callback
        client.call('ACK {"jid":"%s"}' % complete["jid"])
        success = client.json(f"FETCH {queue}-cb")
        assert success["jobtype"] == "Success"
        status = client.json(f"BATCH STATUS {bid}")
        assert status["complete_st"] == "2" and status["success_st"] == "1"


def test_an_empty_committed_batch_fires_at_once(strict):
    queue = "empty-" + uid()
    with RawClient.connect(strict.url) as client:
        bid = new_batch(client, queue=queue)
        assert client.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
        assert client.json(f"FETCH {queue}")["custom"]["_bid"] == bid


def test_a_job_inside_the_batch_may_reopen_it_in_member_reopen_mode(member_reopen, standin):
    queue = "mr-" + uid()
    wid = "worker-" + uid()
    with (
        RawClient.connect(member_reopen.url, wid=wid) as worker,
        RawClient.connect(member_reopen.url, wid=wid) as producer,
        RawClient.connect(member_reopen.url, wid="outsider-" + uid()) as outsider,
    ):
        bid = new_batch(producer, queue=queue + "-cb")
        producer.call(member(bid, queue))
        assert producer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
        assert error_code(outsider, f"BATCH OPEN {bid}") == "BATCH_COMMITTED"
        held = worker.json(f"FETCH {queue}")
        # The job's own process reopens its batch on another pooled connection (same wid).
        assert producer.value(f"BATCH OPEN {bid}").decode() == bid
        assert producer.call(member(bid, queue)) == b"+OK\r\n"
        assert producer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
        worker.call('ACK {"jid":"%s"}' % held["jid"])
        # Once the job is done, its worker is an outsider again.
        time.sleep(0.2)
        assert error_code(producer, f"BATCH OPEN {bid}") == "BATCH_COMMITTED"
    assert report(standin)[bid]["joined_while_committed"] == 0


def test_a_child_callback_may_reopen_its_parent_in_member_reopen_mode(member_reopen):
    """Ruby's complex_batch.rb pattern: the child's success callback adds a step to the parent."""
    queue = "cb-" + uid()
    wid = "worker-" + uid()
    with RawClient.connect(member_reopen.url, wid=wid) as worker:
        parent = new_batch(worker, queue=queue + "-parent")
        child = new_batch(worker, parent=parent, queue=queue)
        worker.call(member(child, queue + "-work"))
        worker.call(f"BATCH COMMIT {child}")
        worker.call(member(parent, queue + "-work"))
        worker.call(f"BATCH COMMIT {parent}")
        for _ in range(2):
            work = worker.json(f"FETCH {queue}-work")
            worker.call('ACK {"jid":"%s"}' % work["jid"])
        callback = worker.json(f"FETCH {queue}")
        assert callback["custom"]["_pbid"] == parent
        assert worker.value(f"BATCH OPEN {parent}").decode() == parent
        assert worker.call(member(parent, queue + "-work")) == b"+OK\r\n"
        assert worker.call(f"BATCH COMMIT {parent}") == b"+OK\r\n"


# --- PUSHB, unknown batches, shadow mode, bad input ------------------------------------------------


def test_pushb_refuses_only_the_jobs_that_break_a_rule(strict):
    queue = "bulk-" + uid()
    with RawClient.connect(strict.url) as client:
        open_bid, sealed = new_batch(client), new_batch(client)
        client.call(member(sealed))
        client.call(f"BATCH COMMIT {sealed}")
        jobs = [
            job("free-" + uid(), queue=queue),
            job("open-" + uid(), queue=queue, custom={"bid": open_bid}),
            job("sealed-" + uid(), queue=queue, custom={"bid": sealed}),
            {"jid": "bad"},  # the server's own refusal, merged with the gateway's
        ]
        result = client.json("PUSHB " + json.dumps(jobs))
        assert set(result) == {jobs[2]["jid"], "bad"}
        assert result[jobs[2]["jid"]].startswith("BATCH_COMMITTED batch " + sealed)
        fetched = {client.json(f"FETCH {queue}")["jid"] for _ in range(2)}
        assert fetched == {jobs[0]["jid"], jobs[1]["jid"]}
        assert client.value(f"FETCH {queue}") is None


def test_pushb_with_only_refused_jobs_never_reaches_the_server(strict, standin):
    with RawClient.connect(strict.url) as client:
        sealed = new_batch(client)
        client.call(f"BATCH COMMIT {sealed}")
        jobs = [job("s1-" + uid(), custom={"bid": sealed}), job("s2-" + uid(), custom={"bid": sealed})]
        assert set(client.json("PUSHB " + json.dumps(jobs))) == {jobs[0]["jid"], jobs[1]["jid"]}
    assert report(standin)[sealed]["total"] == 0


@pytest.mark.parametrize("unknown_batch", ["verify", "allow", "reject"])
def test_batches_the_gateway_never_saw(standin, redis_server, unknown_batch):
    gateway = GatewayProcess(
        standin.url, "--redis", redis_server.url, env={"FAKTORY_GATEWAY_UNKNOWN_BATCH": unknown_batch}
    ).start()
    queue = "unk-" + uid()
    try:
        with RawClient.connect(standin.url) as direct, RawClient.connect(gateway.url) as client:
            existing = new_batch(direct)  # created behind the gateway's back
            fired = new_batch(direct, queue=queue)
            direct.call(f"BATCH COMMIT {fired}")
            assert direct.json(f"FETCH {queue}")["custom"]["_bid"] == fired  # its callback fired
            outcomes = [error_code(client, member(b)) for b in (existing, fired, "b-never-existed")]
    finally:
        gateway.stop()
    expected = {
        "verify": [None, "BATCH_CALLBACK_FIRED", None],  # no such batch: the server's own reply
        "allow": [None, None, None],
        "reject": ["BATCH_UNKNOWN", "BATCH_UNKNOWN", "BATCH_UNKNOWN"],
    }
    assert outcomes == expected[unknown_batch]


def test_a_batch_the_server_does_not_have_gets_the_servers_own_reply(standin, strict):
    """Clients match on the server's error text (faktory-rs maps "no such batch" to None), so where
    the server itself refuses, the client must get the server's bytes, not a gateway code."""
    missing = "b-never-" + uid()
    lines = [
        f"BATCH OPEN {missing}",
        f"BATCH COMMIT {missing}",
        f"BATCH STATUS {missing}",
        'BATCH NEW {"parent_bid":"%s","success":{"jobtype":"Done","args":[]}}' % missing,
        push_line(job("j-" + uid(), queue="nosuch", custom={"bid": missing})),
        "PUSHB " + json.dumps([job("jb-" + uid(), queue="nosuch", custom={"bid": missing})]),
    ]
    with RawClient.connect(standin.url) as direct, RawClient.connect(strict.url) as through:
        for line in lines:
            expected = direct.call(line)
            assert through.call(line) == expected, line
    assert expected == b"$2\r\n{}\r\n"
    with RawClient.connect(strict.url) as through:
        assert through.call(f"BATCH OPEN {missing}") == f"-ERR no such batch {missing}\r\n".encode()
        # and the gateway recorded nothing for it: a commit is still the server's to refuse
        assert through.call(f"BATCH COMMIT {missing}").startswith(b"-ERR no such batch")


def test_batch_new_naming_a_known_bid_cannot_reset_it(standin, strict):
    """BATCH NEW with a non-empty bid: the server chooses the bid (the Go client always sends
    "bid":""); the ledger only records a bid it does not know, so a committed batch stays sealed."""
    with RawClient.connect(strict.url) as client:
        sealed = new_batch(client)
        client.call(f"BATCH COMMIT {sealed}")
        spec = {"bid": sealed, "success": {"jobtype": "Done", "args": []}}
        created = client.value("BATCH NEW " + json.dumps(spec)).decode()
        assert created != sealed
        assert error_code(client, member(sealed)) == "BATCH_COMMITTED"
        assert error_code(client, member(created)) is None


def test_shadow_mode_forwards_and_counts_what_it_would_refuse(standin):
    gateway = GatewayProcess(standin.url, "--mode", "shadow").start()
    try:
        with RawClient.connect(gateway.url) as client:
            bid = new_batch(client)
            client.call(f"BATCH COMMIT {bid}")
            assert error_code(client, member(bid)) is None
            assert client.value(f"BATCH OPEN {bid}").decode() == bid
        metrics = gateway.http("/metrics")[1]
    finally:
        gateway.stop()
    assert 'faktory_gateway_shadow_refusals_total{code="BATCH_COMMITTED"} 2.0' in metrics
    assert report(standin)[bid]["joined_while_committed"] == 1


@pytest.mark.parametrize(
    "line, code",
    [
        ("BATCH OPEN", "MALFORMED"),
        ("BATCH COMMIT b-1 b-2", "MALFORMED"),
        ("BATCH OPEN " + "x" * 10_000, "MALFORMED"),
        ('PUSH {"jid":"abcdefgh","jobtype":"x","args":[],"custom":{"bid":"b 1"}}', "MALFORMED"),
        ('PUSH {"jid":"abcdefgh","jobtype":"x","args":[],"custom":{"bid":7}}', "MALFORMED"),
        ('PUSH {"jid":"abcdefgh","custom":{"bid":"b-1"},"custom":{}}', "MALFORMED"),
        ('BATCH NEW {"parent_bid":"b-1","Parent_Bid":"b-2"}', "MALFORMED"),
        ('PUSH {"jid":"abcdefgh","custom":{"bid":"b-1"', "MALFORMED"),
    ],
)
def test_malformed_batch_commands_get_a_clear_error_and_the_connection_stays(strict, line, code):
    with RawClient.connect(strict.url) as client:
        assert error_code(client, line) == code
        assert client.call("INFO").startswith(b"$")


def test_non_batch_commands_never_touch_redis(standin):
    import redis

    # A Redis of its own: other gateways' leases on the shared one are renewed in the background.
    redis_server = RedisServer().start()
    gateway = GatewayProcess(standin.url, "--redis", redis_server.url).start()
    admin = redis.Redis(port=redis_server.port)
    try:
        queue = "plain-" + uid()
        with RawClient.connect(gateway.url, wid="w-" + uid()) as client:
            admin.config_resetstat()
            for i in range(50):
                client.call(push_line(job(f"plain-{i}-{uid()}", queue=queue, args=["\u00e9t\u00e9", i])))
                work = client.json(f"FETCH {queue}")
                client.call('ACK {"jid":"%s"}' % work["jid"])
            client.call("INFO")
            client.call('BEAT {"wid":"x"}')
            stats = admin.info("commandstats")
    finally:
        admin.close()
        gateway.stop()
        redis_server.cleanup()
    assert set(stats) <= {"cmdstat_config|resetstat", "cmdstat_info"}, stats
