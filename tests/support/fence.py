"""Helpers for the batch and commit-fence integration tests: lines, calls, waits, metrics.

The judge of every fence test is the Ent stand-in's own audit (`STANDIN REPORT`), never the
gateway's view of itself.
"""

from __future__ import annotations

import json
import threading
import time

from tests.support.client import RawClient, ServerClosed, job, push_line, uid
from tests.support.faultproxy import FaultProxy

OK = b"+OK\r\n"
SPEC = {"success": {"jobtype": "Done", "args": [], "queue": "fence-faults-cb"}}


def push(bid: str, jid: str | None = None) -> bytes:
    return (push_line(job(jid or "j-" + uid(), queue="fence-faults", custom={"bid": bid})) + "\r\n").encode()


def child(parent: str) -> bytes:
    return ("BATCH NEW " + json.dumps({**SPEC, "parent_bid": parent}) + "\r\n").encode()


def new_batch(client: RawClient) -> str:
    return client.value("BATCH NEW " + json.dumps(SPEC)).decode()


def call(client: RawClient, line: bytes) -> bytes:
    client.send(line)
    return client.read_raw()


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def outcome(client: RawClient, timeout: float) -> tuple[float, bytes | None]:
    """(when, reply) for the next reply; reply None when the connection closed (FIN or reset)."""
    client.sock.settimeout(timeout)
    try:
        reply = client.read_raw()
    except (ServerClosed, ConnectionError):
        reply = None
    return time.monotonic(), reply


class Waiter(threading.Thread):
    """Reads one reply (or the close) on a client, in the background, and notes when it came."""

    def __init__(self, client: RawClient, timeout: float = 60.0):
        super().__init__(daemon=True)
        self.client = client
        self.timeout = timeout
        self.when: float | None = None
        self.reply: bytes | None = None

    def run(self) -> None:
        self.when, self.reply = outcome(self.client, self.timeout)

    def result(self, timeout: float = 60.0) -> tuple[float | None, bytes | None]:
        self.join(timeout)
        return self.when, self.reply


def commit_until_ok(client: RawClient, bid: str, timeout: float) -> tuple[float, list[bytes]]:
    """Retry BATCH COMMIT every second until +OK; returns when it came and the refusals before."""
    refusals = []
    deadline = time.monotonic() + timeout
    while True:
        reply = call(client, f"BATCH COMMIT {bid}\r\n".encode())
        if reply == OK:
            return time.monotonic(), refusals
        assert reply.startswith(b"-ERR COMMIT_FENCE_TIMEOUT"), reply
        refusals.append(reply)
        assert time.monotonic() < deadline, f"no +OK for the commit within {timeout}s: {refusals[-1]!r}"
        time.sleep(1.0)


def assert_sealed(client: RawClient, bid: str) -> None:
    """Pushes and child batches into bid are refused."""
    reply = call(client, push(bid))
    assert reply.startswith(b"-ERR BATCH_COMMITTED"), reply
    reply = call(client, child(bid))
    assert reply.startswith(b"-ERR PARENT_SEALED"), reply


def hold_push(proxy: FaultProxy, client: RawClient, bid: str) -> str:
    """Send a PUSH into bid that the proxy holds on its way to the server (admitted, written, not
    delivered); return its jid once the proxy holds it."""
    jid = "held-" + uid()
    proxy.stall_when(jid.encode())
    client.send(push(bid, jid))
    wait_until(lambda: jid.encode() in proxy.held(), 10, "the proxy to hold the PUSH")
    return jid
