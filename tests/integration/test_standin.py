"""The Ent batch stand-in (tests/support/standin.py) against the real Faktory OSS server.

The other batch tests trust the stand-in to behave like Faktory Enterprise: these tests pin down
that behaviour (docs/invariants.md, last section), including the #465 permissiveness and the audit
that the race tests read through `STANDIN REPORT`.

Every test uses queues of its own, so the one Faktory of this module needs no flushing.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest

from tests.support.client import CommandError, RawClient, job, push_line, uid
from tests.support.processes import FaktoryServer
from tests.support.standin import StandinProcess


@pytest.fixture(scope="module")
def upstream():
    server = FaktoryServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def standin(upstream):
    process = StandinProcess(upstream.url).start()
    yield process
    process.stop()


@pytest.fixture
def client(standin):
    """One connection that produces and, with its wid, also fetches and ACKs."""
    with RawClient.connect(standin.url, wid="w-" + uid()) as connection:
        yield connection


def new_batch(client: RawClient, **spec) -> str:
    return client.value("BATCH NEW " + json.dumps({"bid": "", **spec})).decode()


def callback(queue: str, jobtype: str = "Callback") -> dict:
    return {"jobtype": jobtype, "args": [], "queue": queue}


def status(client: RawClient, bid: str) -> dict:
    return client.json(f"BATCH STATUS {bid}")


def states(client: RawClient, bid: str) -> tuple[str, str]:
    s = status(client, bid)
    return s["complete_st"], s["success_st"]


def push_member(client: RawClient, bid: str, queue: str) -> str:
    jid = "j-" + uid()
    assert client.call(push_line(job(jid, queue=queue, custom={"bid": bid}))) == b"+OK\r\n"
    return jid


def fetch(client: RawClient, queue: str) -> dict:
    payload = client.value(f"FETCH {queue}")
    assert payload is not None, f"nothing on {queue}"
    return json.loads(payload)


def ack(client: RawClient, jid: str) -> None:
    assert client.call(json_line("ACK", {"jid": jid})) == b"+OK\r\n"


def fail(client: RawClient, jid: str) -> None:
    assert client.call(json_line("FAIL", {"jid": jid, "errtype": "E", "message": "boom"})) == b"+OK\r\n"


def json_line(verb: str, payload) -> str:
    return f"{verb} {json.dumps(payload, separators=(',', ':'))}"


def queue_size(client: RawClient, queue: str) -> int:
    """What the real server holds: proof that a callback was (not) pushed, beyond the stand-in's word."""
    return client.json("INFO")["faktory"]["queues"].get(queue, 0)


# --- replies --------------------------------------------------------------------------------------


def test_batch_new_status_open_commit_replies(client):
    raw = client.call(json_line("BATCH NEW", {"bid": "", "description": "d", "success": callback("cb")}))
    assert re.fullmatch(rb"\$18\r\nb-[A-Za-z0-9_-]{16}\r\n", raw), raw
    bid = raw[5:-2].decode()

    before = datetime.now(UTC).replace(microsecond=0)
    reply = status(client, bid)
    created = datetime.strptime(reply.pop("created_at"), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((created - before).total_seconds()) <= 2
    assert reply == {"bid": bid, "description": "d", "total": 0, "pending": 0, "failed": 0,
                     "complete_st": "", "success_st": ""}  # fmt: skip

    assert client.call(f"BATCH OPEN {bid}") == b"$18\r\n%s\r\n" % bid.encode()
    child = new_batch(client, parent_bid=bid, complete=callback("cb"))
    assert status(client, child)["parent_bid"] == bid
    assert client.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"


def test_errors(client):
    for sub in ("OPEN", "COMMIT", "STATUS"):
        assert client.call(f"BATCH {sub} b-nosuchbatch") == b"-ERR no such batch b-nosuchbatch\r\n"
    orphan = json_line("BATCH NEW", {"parent_bid": "b-gone", "success": callback("cb")})
    assert client.call(orphan) == b"-ERR no such batch b-gone\r\n"
    assert client.call('BATCH NEW {"description":"no callback"}').startswith(b"-ERR ")
    assert client.call("BATCH NEW {not json").startswith(b"-ERR ")
    assert client.call("BATCH FROB b-x") == b"-ERR unknown BATCH subcommand\r\n"
    assert client.json("INFO")["server"]  # the connection is still good


def test_everything_else_goes_to_the_real_server(upstream, standin):
    with RawClient.connect(upstream.url) as direct:  # OSS itself has no batches
        assert direct.call("BATCH STATUS b-x").startswith(b"-ERR batch subsystem is only available")
    queue = "pass-" + uid()
    with RawClient.connect(standin.url, wid="w-" + uid()) as client:
        # Pipelined, with CRLF and bare LF mixed: answered in order, one at a time.
        jid = "j-" + uid()
        client.send(f"{push_line(job(jid, queue=queue))}\nBATCH FROB\r\nFETCH {queue}\r\nNOPE\n".encode())
        assert client.read_raw() == b"+OK\r\n"
        assert client.read_raw() == b"-ERR unknown BATCH subcommand\r\n"
        assert json.loads(client.read_raw().split(b"\r\n")[1])["jid"] == jid
        assert client.read_raw() == b"-ERR unknown command NOPE\r\n"
        ack(client, jid)
        assert client.value(f"FETCH {queue}") is None  # $-1 relayed
        client.send(b"END\r\n")
        assert client.is_closed()


# --- callbacks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["complete", "success"])
def test_callbacks_wait_for_commit_even_when_every_job_ran(client, kind):
    work, cbq = "work-" + uid(), "cb-" + uid()
    bid = new_batch(client, **{kind: callback(cbq, "Done")})
    for _ in range(2):
        push_member(client, bid, work)
    for _ in range(2):
        ack(client, fetch(client, work)["jid"])
    assert status(client, bid) | {"created_at": None} == {
        "bid": bid, "description": "", "created_at": None, "total": 2, "pending": 0, "failed": 0,
        "complete_st": "", "success_st": ""}  # fmt: skip
    assert queue_size(client, cbq) == 0

    assert client.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
    assert status(client, bid)[f"{kind}_st"] == "1"
    cb = fetch(client, cbq)
    assert cb["jobtype"] == "Done" and cb["args"] == []
    assert cb["custom"] == {"_bid": bid, "_cb": kind}  # no "bid": not a member; no "_pbid": no parent
    ack(client, cb["jid"])
    assert status(client, bid)[f"{kind}_st"] == "2"
    assert status(client, bid)["total"] == 2  # the callback job did not count


def test_committed_batch_fires_only_when_the_last_job_ran(client):
    work, cbq = "work-" + uid(), "cb-" + uid()
    bid = new_batch(client, complete=callback(cbq), success=callback(cbq))
    for _ in range(2):
        push_member(client, bid, work)
    assert client.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
    ack(client, fetch(client, work)["jid"])
    assert states(client, bid) == ("", "")
    fail(client, fetch(client, work)["jid"])  # a failure counts as "ran" for complete, not for success
    reply = status(client, bid)
    assert (reply["pending"], reply["failed"], reply["complete_st"], reply["success_st"]) == (1, 1, "1", "")
    cb = fetch(client, cbq)
    assert cb["custom"]["_cb"] == "complete"
    ack(client, cb["jid"])
    assert states(client, bid) == ("2", "")  # the failed job keeps success away
    assert queue_size(client, cbq) == 0


def test_empty_committed_batch_fires_at_once_complete_before_success(client):
    bid = new_batch(client, complete={"jobtype": "C"}, success={"jobtype": "S"})  # no queue: "default"
    assert client.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
    assert states(client, bid) == ("1", "")
    complete = fetch(client, "default")
    assert (complete["jobtype"], complete["args"]) == ("C", [])
    assert complete["custom"] == {"_bid": bid, "_cb": "complete"}
    assert queue_size(client, "default") == 0  # success waits for the complete callback to be ACKed

    ack(client, complete["jid"])
    assert states(client, bid) == ("2", "1")
    success = fetch(client, "default")
    assert (success["jobtype"], success["custom"]) == ("S", {"_bid": bid, "_cb": "success"})
    ack(client, success["jid"])
    assert states(client, bid) == ("2", "2")


def test_failed_callback_stays_enqueued_and_success_never_fires(client):
    cbq = "cb-" + uid()
    bid = new_batch(client, complete=callback(cbq), success=callback(cbq))
    client.call(f"BATCH COMMIT {bid}")
    fail(client, fetch(client, cbq)["jid"])
    assert states(client, bid) == ("1", "")


def test_parent_waits_for_child_and_child_callbacks_carry_pbid(client):
    work, cbq = "work-" + uid(), "cb-" + uid()
    parent = new_batch(client, success=callback(cbq, "ParentDone"))
    child = new_batch(client, parent_bid=parent, success=callback(cbq, "ChildDone"))
    jid = push_member(client, child, work)
    client.call(f"BATCH COMMIT {child}")
    client.call(f"BATCH COMMIT {parent}")
    assert states(client, parent) == states(client, child) == ("", "")

    ack(client, fetch(client, work)["jid"])
    assert states(client, child) == ("", "1")
    assert states(client, parent) == ("", "")  # the child's callback has not run yet
    cb = fetch(client, cbq)
    assert (cb["jobtype"], cb["custom"]) == ("ChildDone", {"_bid": child, "_cb": "success", "_pbid": parent})

    ack(client, cb["jid"])
    assert states(client, parent) == ("", "1")
    cb = fetch(client, cbq)
    assert (cb["jobtype"], cb["custom"]) == ("ParentDone", {"_bid": parent, "_cb": "success"})
    # Child batches are not jobs of the parent.
    assert (status(client, parent)["total"], status(client, child)["total"]) == (0, 1)
    assert jid != cb["jid"]


def test_parent_complete_waits_for_a_child_without_complete_callback(client):
    work, cbq = "work-" + uid(), "cb-" + uid()
    parent = new_batch(client, complete=callback(cbq, "ParentComplete"))
    child = new_batch(client, parent_bid=parent, success=callback(cbq, "ChildSuccess"))
    push_member(client, child, work)
    client.call(f"BATCH COMMIT {parent}")
    client.call(f"BATCH COMMIT {child}")
    assert states(client, parent) == ("", "")  # the child's job has not run
    ack(client, fetch(client, work)["jid"])
    # The child is complete itself and has no complete callback to wait for.
    assert states(client, parent) == ("1", "")
    assert sorted(fetch(client, cbq)["jobtype"] for _ in range(2)) == ["ChildSuccess", "ParentComplete"]


def test_uncommitted_child_holds_back_the_parent(client):
    cbq = "cb-" + uid()
    parent = new_batch(client, success=callback(cbq))
    child = new_batch(client, parent_bid=parent, success=callback(cbq))
    client.call(f"BATCH COMMIT {parent}")
    assert states(client, parent) == ("", "")
    client.call(f"BATCH COMMIT {child}")  # empty child fires at once ...
    assert states(client, child) == ("", "1")
    ack(client, fetch(client, cbq)["jid"])  # ... and its ACK releases the parent
    assert states(client, parent) == ("", "1")


# --- membership -----------------------------------------------------------------------------------


def test_only_jobs_the_server_accepted_join(client):
    work = "work-" + uid()
    bid = new_batch(client, success=callback("cb-" + uid()))
    good, short = "j-" + uid(), "x"  # Faktory wants a jid of 8 characters or more
    pushb = json_line("PUSHB", [job(jid, queue=work, custom={"bid": bid}) for jid in (good, short)])
    assert list(client.json(pushb)) == [short]
    refused = job("y", queue=work, custom={"bid": bid})
    with pytest.raises(CommandError):
        client.value(push_line(refused))
    client.call(push_line(job("j-" + uid(), queue=work, custom={"bid": "b-unknown"})))  # no such batch
    assert status(client, bid)["total"] == 1
    client.call(f"BATCH COMMIT {bid}")
    ack(client, fetch(client, work)["jid"])
    assert states(client, bid) == ("", "1")


# --- as permissive as Ent 1.9.4 (contribsys/faktory#465), and the audit that shows it -------------


def test_permissive_like_ent_and_the_report_counts_it(client, standin):
    work, cbq = "work-" + uid(), "cb-" + uid()
    bid = new_batch(client, success=callback(cbq))
    push_member(client, bid, work)
    client.call(f"BATCH COMMIT {bid}")
    clean = standin.report()[bid]
    assert clean == {"committed": True, "complete_st": "", "success_st": "", "joined_while_committed": 0,
                     "joined_after_callback": 0, "children_while_committed": 0,
                     "children_after_callback": 0, "total": 1}  # fmt: skip

    # From outside, with no BATCH OPEN: a job and a child batch join the committed batch.
    push_member(client, bid, work)
    new_batch(client, parent_bid=bid, success=callback(cbq))
    violations = {"joined_while_committed": 1, "children_while_committed": 1, "total": 2}
    assert standin.report()[bid] == clean | violations

    # Reopening a committed batch is allowed; what joins while it is open is no violation.
    assert client.value(f"BATCH OPEN {bid}") == bid.encode()
    assert standin.report()[bid]["committed"] is False
    push_member(client, bid, work)
    assert client.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
    assert standin.report()[bid]["joined_while_committed"] == 1

    # After a callback was enqueued, a push and a child still go through.
    fired = new_batch(client, success=callback(cbq))
    client.call(f"BATCH COMMIT {fired}")
    assert states(client, fired) == ("", "1")
    push_member(client, fired, work)
    new_batch(client, parent_bid=fired, complete=callback(cbq))
    assert client.value(f"BATCH OPEN {fired}") == fired.encode()
    push_member(client, fired, work)
    assert standin.report()[fired] == {
        "committed": False, "complete_st": "", "success_st": "1", "joined_while_committed": 1,
        "joined_after_callback": 2, "children_while_committed": 1, "children_after_callback": 1, "total": 2}  # fmt: skip


def test_standin_report_is_bulk_json(client):
    raw = client.call("STANDIN REPORT")
    assert raw.startswith(b"$") and "batches" in json.loads(raw.split(b"\r\n")[1])
    assert client.call("STANDIN FROB").startswith(b"-ERR ")


# --- password ---------------------------------------------------------------------------------------


def test_password_protected_faktory():
    server = FaktoryServer(password="s3cret").start()
    standin = StandinProcess(server.url).start()
    try:
        assert ":s3cret@" in standin.url  # the client hashes against the real server's salt
        with RawClient(standin.url) as wrong:
            assert wrong.handshake(password="nope") == b"-ERR Invalid password\r\n"
            assert wrong.is_closed()
        with RawClient.connect(standin.url, wid="w-" + uid()) as client:
            cbq = "cb-" + uid()
            bid = new_batch(client, complete=callback(cbq))
            client.call(f"BATCH COMMIT {bid}")  # fires over the stand-in's own, authenticated, connection
            assert fetch(client, cbq)["custom"] == {"_bid": bid, "_cb": "complete"}
    finally:
        standin.stop()
        server.cleanup()
