"""Helpers for the tests of `batches: gateway` (the gateway as the batch engine in front of
Faktory OSS): a producer and a worker speaking the wire protocol as the clients do, and waits."""

from __future__ import annotations

import json
import time

from tests.support.client import RawClient, job, push_line, uid

CALLBACK_WAIT = 10.0  # seconds a test waits for a callback job to reach its queue
# BATCH STATUS's keys for a root batch, in Enterprise's order (a child's adds parent_bid after bid).
STATUS_KEYS = ["bid", "description", "created_at", "total", "pending", "failed", "complete_st", "success_st"]


def new_batch(producer: RawClient, parent: str | None = None, **callbacks: str) -> str:
    """BATCH NEW with a callback per keyword (kind -> queue; the jobtype names the kind);
    returns the bid the gateway answered."""
    spec: dict = {"bid": "", "description": f"test {uid()}"}
    if parent:
        spec["parent_bid"] = parent
    for kind, queue in callbacks.items():
        spec[kind] = {"jobtype": kind.capitalize(), "queue": queue}
    reply = producer.call("BATCH NEW " + json.dumps(spec))
    assert reply.startswith(b"$"), reply
    return reply.split(b"\r\n")[1].decode()


def push_into(producer: RawClient, bid: str, queue: str, **fields) -> str:
    """PUSH a member of bid, with an explicit `retry` (25 unless given): Faktory 1.9.4 reads a PUSH
    into a job whose `retry` points at the process-wide default, so a job pushed with `"retry":0`
    makes every later job without the key ephemeral (server/commands.go `push`;
    test_engine.py::test_faktory_takes_a_pushed_retry_as_every_later_jobs_default)."""
    fields.setdefault("retry", 25)
    jid = "j-" + uid()
    reply = producer.call(push_line(job(jid, queue=queue, custom={"bid": bid}, **fields)))
    assert reply == b"+OK\r\n", reply
    return jid


def status(client: RawClient, bid: str) -> dict:
    return client.json(f"BATCH STATUS {bid}")


def counts(client: RawClient, bid: str) -> tuple[int, int, int, str, str]:
    """(total, pending, failed, complete_st, success_st), as BATCH STATUS shows them."""
    s = status(client, bid)
    return s["total"], s["pending"], s["failed"], s["complete_st"], s["success_st"]


def fetch(worker: RawClient, queue: str, wait: float = CALLBACK_WAIT) -> dict | None:
    """The next job of `queue` (FETCH blocks 2 s on the server; retried until `wait`)."""
    deadline = time.monotonic() + wait
    while True:
        fetched = worker.value(f"FETCH {queue}")
        if fetched is not None:
            return json.loads(fetched)
        if time.monotonic() > deadline:
            return None


def run_one(worker: RawClient, queue: str, ok: bool = True) -> dict:
    """FETCH one job of `queue` and ACK it (or FAIL it); returns the job."""
    fetched = fetch(worker, queue)
    assert fetched is not None, f"no job in {queue}"
    if ok:
        assert worker.call("ACK " + json.dumps({"jid": fetched["jid"]})) == b"+OK\r\n"
    else:
        line = json.dumps({"jid": fetched["jid"], "errtype": "Boom", "message": "failed on purpose"})
        assert worker.call("FAIL " + line) == b"+OK\r\n"
    return fetched


def requeue_retries(client: RawClient, jid: str) -> None:
    """Move a FAILed job from the retry set back to its queue now (Faktory's own MUTATE), instead
    of waiting for its back-off."""
    mutate = {"cmd": "requeue", "target": "retries", "filter": {"jids": [jid]}}
    # No spaces: the server splits the line on them and wants exactly two parts.
    assert client.call("MUTATE " + json.dumps(mutate, separators=(",", ":"))) == b"+OK\r\n"
