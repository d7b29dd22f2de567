"""`batches: gateway` with real client libraries, end to end, on the real Faktory OSS server: the Go
client's batch API producing through one gateway and a faktory_worker_go worker fetching through
another (tests/clients/go/workflow), and pyfaktory's batch commands. Nothing here knows the gateway:
the programs are written as a user writes them against Faktory Enterprise."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.client import uid
from tests.support.processes import FaktoryServer, GatewayProcess
from tests.support.workflow import run_workflow

ENGINE = ("--batches", "gateway", "--log-level", "warning", "--mode", "member-reopen")
ENT_BID = re.compile(r"b-[A-Za-z0-9_-]{16}")  # what BATCH NEW answers (docs/engine.md)


@pytest.fixture(scope="module")
def oss():
    server = FaktoryServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module", params=["one gateway", "two gateways"])
def pair(request, oss):
    """(producers' gateway, workers' gateway): one gateway with the embedded store, or two sharing
    Redis, the workers' gateway never seeing a BATCH NEW or a PUSH of the batch's jobs."""
    if request.param == "one gateway":
        gateway = GatewayProcess(oss.url, *ENGINE).start()
        yield gateway, gateway
        gateway.stop()
        return
    store = request.getfixturevalue("redis_server")
    ledger = {"FAKTORY_GATEWAY_REDIS_KEY_PREFIX": f"clients-{uid()}:"}
    producers = GatewayProcess(oss.url, *ENGINE, "--redis", store.url, env=ledger).start()
    workers = GatewayProcess(oss.url, *ENGINE, "--redis", store.url, env=ledger).start()
    yield producers, workers
    producers.stop()
    workers.stop()


def test_the_go_client_and_faktory_worker_go_run_a_nested_workflow(pair):
    producers, workers = pair
    flow = run_workflow(producers.url, workers.url, "wf-" + uid())
    produced, parent, child = flow.produced, flow.parent, flow.child
    assert ENT_BID.fullmatch(parent)
    assert child.startswith(parent) and len(child) == 28  # one tree, one Cluster slot
    # Committed, nothing run yet: what the Go client's BatchStatus parses.
    assert {k: produced["parent_status"][k] for k in ("bid", "total", "pending", "failed")} == {
        "bid": parent,
        "total": 2,
        "pending": 2,
        "failed": 0,
    }
    assert "parent_bid" not in produced["parent_status"]  # a root has none (omitempty: "")
    assert produced["parent_status"]["description"] == "workflow parent"
    assert produced["child_status"]["parent_bid"] == parent
    assert (produced["child_status"]["total"], produced["child_status"]["pending"]) == (3, 3)
    for status in (produced["parent_status"], produced["child_status"]):
        assert (status["complete_st"], status["success_st"]) == ("", "")

    ran, final = flow.ran, flow.final

    # Every job ran, the flaky one twice (failed, then its retry succeeded); Spawn's help.Batch
    # reopened the committed parent (BATCH OPEN answered the parent's bid) and added a job to it.
    kinds = sorted(r["jobtype"] for r in ran if not r["_cb"])
    assert kinds == ["Added", "Flaky", "Flaky", "Spawn", "Step", "Step", "Step"]
    [spawn] = [r for r in ran if r["jobtype"] == "Spawn"]
    assert spawn["opened"] == parent and spawn["error"] == ""
    [added] = [r for r in ran if r["jobtype"] == "Added"]
    assert added["jid"] == spawn["added"] and added["bid"] == parent
    flaky = [r for r in ran if r["jobtype"] == "Flaky"]
    assert [(r["retried"], r["error"] == "") for r in flaky] == [(False, False), (True, True)]
    assert flaky[0]["bid"] == child

    # Each callback once, with the custom fields Enterprise sets, in the documented order.
    assert flow.order_problems() == []  # each once; complete before success, children first
    callbacks = flow.callbacks()
    for (bid, kind), i in callbacks.items():
        assert ran[i]["jobtype"] == kind.capitalize() and ran[i]["error"] == ""
        assert ran[i]["_pbid"] == (parent if bid == child else "")
        assert ran[i]["jid"] == produced["callbacks"][f"{'parent' if bid == parent else 'child'}_{kind}"]
    # The child's complete callback saw the failure (and requeued its retry); its success
    # callback saw it recovered.
    child_complete = ran[callbacks[child, "complete"]]
    assert child_complete["status"]["failed"] == 1 and child_complete["requeued"] == [flaky[0]["jid"]]
    assert ran[callbacks[child, "success"]]["status"]["failed"] == 0
    assert ran[callbacks[child, "success"]]["status"]["success_st"] == "1"  # enqueued, not yet ACKed

    # Over: every job and callback acknowledged, through whichever gateway the worker used.
    assert set(final) == {parent, child}
    for bid, total in ((parent, 3), (child, 3)):
        assert {k: final[bid][k] for k in ("total", "pending", "failed", "complete_st", "success_st")} == {
            "total": total,
            "pending": 0,
            "failed": 0,
            "complete_st": "2",
            "success_st": "2",
        }


def test_pyfaktory_batch_commands(pair):
    """pyfaktory's producer batch API (NEW, commit, OPEN) and its consumer's FETCH/ACK/FAIL and
    BATCH STATUS (the library's own wire code; its process-pool Consumer adds nothing here)."""
    from pyfaktory import Batch, Client, Job, Producer, TargetJob
    from pyfaktory.models import JobFilter, MutateOperation

    producers, workers = pair
    queue, callbacks = "py-" + uid(), "py-cb-" + uid()
    with Client(faktory_url=producers.url, role="producer") as client:
        producer = Producer(client)
        batch = Batch(
            description="pyfaktory",
            complete=TargetJob(jobtype="Complete", args=[], queue=callbacks),
            success=TargetJob(jobtype="Success", args=["done"], queue=callbacks),
            parent_bid=None,
        )
        bid = producer.batch_new(batch).split()[-1]  # pyfaktory returns the raw bulk reply
        assert ENT_BID.fullmatch(bid)
        jids = []
        for n in range(3):
            member = Job(jobtype="Work", args=[n], queue=queue, custom={"bid": bid})
            producer.push(member)
            jids.append(member.jid)
        producer.batch_commit(bid)
        with pytest.raises(Exception, match="BATCH_COMMITTED"):
            producer.batch_open(bid)  # strict or member-reopen: a producer is no member

    def status() -> dict:
        return json.loads(worker._batch_status(bid).split("\r\n")[1])

    with Client(faktory_url=workers.url, role="consumer") as worker:
        assert (status()["total"], status()["pending"]) == (3, 3)
        seen = []
        while len(seen) < 3:
            fetched = worker._fetch([queue])
            if fetched is None:
                continue
            seen.append(fetched["jid"])
            if fetched["args"] == [1]:
                worker._fail(jid=fetched["jid"], errtype="Boom", message="on purpose", backtrace=[])
            else:
                worker._ack(jid=fetched["jid"])
        assert sorted(seen) == sorted(jids)
        assert {k: status()[k] for k in ("pending", "failed", "complete_st", "success_st")} == {
            "pending": 1,
            "failed": 1,
            "complete_st": "1",
            "success_st": "",
        }
        complete = worker._fetch([callbacks])
        assert complete["jobtype"] == "Complete" and complete["custom"] == {"_bid": bid, "_cb": "complete"}
        worker._ack(jid=complete["jid"])
        assert status()["complete_st"] == "2"
        # The failed job's retry, moved back to its queue now rather than after its back-off.
        worker.mutate(
            MutateOperation(
                cmd="requeue", target="retries", filter=JobFilter(jids=[jids[1]], regexp=None, jobtype=None)
            )
        )
        retry = worker._fetch([queue])
        assert retry["jid"] == jids[1] and retry["failure"]["retry_count"] == 0
        worker._ack(jid=retry["jid"])
        success = worker._fetch([callbacks])
        assert success["jobtype"] == "Success" and success["args"] == ["done"]
        worker._ack(jid=success["jid"])
        assert {k: status()[k] for k in ("total", "pending", "failed", "complete_st", "success_st")} == {
            "total": 3,
            "pending": 0,
            "failed": 0,
            "complete_st": "2",
            "success_st": "2",
        }
