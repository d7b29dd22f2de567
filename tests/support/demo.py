"""What the gateway is for, without Faktory Enterprise: the contribsys/faktory#465 scenarios, twice;
then batches on Faktory OSS with the gateway as their engine.

Starts the real Faktory OSS server, the Ent stand-in in front of it (tests/support/standin.py, as
permissive as Ent 1.9.4) and two gateways in front of the stand-in (one `strict`, one
`member-reopen`), runs every scenario once straight to the stand-in and once through a gateway,
prints one row per scenario. Then a third gateway, `--batches gateway`, straight in front of
Faktory OSS, and a Go program using the Go client's batch API and a faktory_worker_go worker
through it (tests/clients/go/workflow): a parent batch, a child, a job that fails once and is
retried; the callbacks are printed as they ran. Everything it started is stopped. Exit status 0
when everything came out as expected, 1 when something did not (it is named), 2 when the peers
could not be started.

    scripts/demo.sh                      # installs the test dependencies first, then runs this
    python -m tests.support.demo         # the same, from the repository root, in .venv

The stand-in is a demonstration and test aid: nothing in the gateway uses it.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from tests.support.client import RawClient, job, push_line, uid
from tests.support.processes import FaktoryServer, GatewayProcess, Process
from tests.support.standin import StandinProcess
from tests.support.workflow import run_workflow

ACCEPTED = "accepted"
DIRECT, THROUGH = "direct (stand-in)", "through the gateway"


class FlowBroken(Exception):
    """A step that sets a scenario up did not do what Ent does; the row shows it as an error."""


@dataclass(frozen=True)
class Scenario:
    title: str
    run: Callable[[str], str]  # the target's URL -> "accepted" or "refused CODE"
    direct: str  # the expected outcome straight to the stand-in
    through: str  # the expected outcome through the gateway
    gateway: str = "strict"  # which gateway the row goes through


# --- one command, one outcome -------------------------------------------------------------------


def outcome(reply: bytes) -> str:
    """`accepted`, or `refused CODE` for an -ERR reply (the gateway's codes are its first word)."""
    if not reply.startswith(b"-"):
        return ACCEPTED
    text = reply[1:].decode(errors="replace").strip()
    words = text.removeprefix("ERR ").split()
    return f"refused {words[0]}" if words and words[0].isupper() else f"refused ({text})"


def step(client: RawClient, line: str) -> bytes:
    """A set-up step: it must be accepted, or the scenario cannot show what it is meant to."""
    reply = client.call(line)
    if reply.startswith(b"-"):
        raise FlowBroken(f"{line.split(' {')[0]} -> {reply.decode(errors='replace').strip()}")
    return reply


def new_batch(client: RawClient, callbacks: str, parent: str | None = None, **kinds: str) -> str:
    """BATCH NEW with a callback for each kind given (complete=..., success=...), into `callbacks`."""
    spec: dict = {"description": "demo"}
    for kind, jobtype in (kinds or {"success": "Done"}).items():
        spec[kind] = {"jobtype": jobtype, "args": [], "queue": callbacks}
    if parent:
        spec["parent_bid"] = parent
    reply = step(client, "BATCH NEW " + json.dumps(spec))
    return reply.split(b"\r\n")[1].decode()


def member(bid: str, queue: str) -> str:
    return push_line(job("j-" + uid(), queue=queue, custom={"bid": bid}))


def committed_batch(client: RawClient, queue: str) -> str:
    """A batch with one job in `queue`, committed."""
    bid = new_batch(client, queue + "-cb")
    step(client, member(bid, queue))
    step(client, f"BATCH COMMIT {bid}")
    return bid


def fetch(client: RawClient, queue: str) -> dict:
    payload = client.value(f"FETCH {queue}")
    if payload is None:
        raise FlowBroken(f"nothing to fetch on {queue}")
    return json.loads(payload)


def ack(client: RawClient, jid: str) -> None:
    step(client, "ACK " + json.dumps({"jid": jid}))


def queue_size(client: RawClient, queue: str) -> int:
    return client.json("INFO")["faktory"]["queues"].get(queue, 0)


# --- the scenarios ------------------------------------------------------------------------------


def outsider_reopens_committed(url: str) -> str:
    with RawClient.connect(url) as client:
        bid = committed_batch(client, "demo-" + uid())
        return outcome(client.call(f"BATCH OPEN {bid}"))


def push_into_committed(url: str) -> str:
    with RawClient.connect(url) as client:
        queue = "demo-" + uid()
        bid = committed_batch(client, queue)
        return outcome(client.call(member(bid, queue)))


def child_under_committed(url: str) -> str:
    with RawClient.connect(url) as client:
        queue = "demo-" + uid()
        parent = committed_batch(client, queue)
        spec = {"parent_bid": parent, "success": {"jobtype": "Done", "args": [], "queue": queue + "-cb"}}
        return outcome(client.call("BATCH NEW " + json.dumps(spec)))


def push_after_callback(url: str) -> str:
    """The batch's job runs, its success callback is enqueued; BATCH STATUS says so (the gateway
    learns "fired" from that reply); then one more job tries to join."""
    with RawClient.connect(url, wid="w-" + uid()) as client:
        queue = "demo-" + uid()
        bid = committed_batch(client, queue)
        ack(client, fetch(client, queue)["jid"])
        status = client.json(f"BATCH STATUS {bid}")
        if not status["success_st"]:
            raise FlowBroken(f"the success callback was not enqueued: {status}")
        return outcome(client.call(member(bid, queue)))


def callbacks_after_last_job(url: str) -> str:
    """Legal: complete and success fire after the commit, once the last job ran, complete first."""
    with RawClient.connect(url, wid="w-" + uid()) as client:
        queue = "demo-" + uid()
        bid = new_batch(client, queue + "-cb", complete="Complete", success="Success")
        for _ in range(2):
            step(client, member(bid, queue))
        step(client, f"BATCH COMMIT {bid}")
        ack(client, fetch(client, queue)["jid"])
        if queue_size(client, queue + "-cb"):
            raise FlowBroken("a callback fired before the last job ran")
        ack(client, fetch(client, queue)["jid"])
        order = []
        for _ in range(2):
            callback = fetch(client, queue + "-cb")
            order.append(callback["jobtype"])
            ack(client, callback["jid"])
        if order != ["Complete", "Success"]:
            raise FlowBroken(f"callbacks came as {order}")
        return ACCEPTED


def empty_batch(url: str) -> str:
    """Legal: an empty batch fires its callback as soon as it is committed."""
    with RawClient.connect(url, wid="w-" + uid()) as client:
        queue = "demo-" + uid()
        bid = new_batch(client, queue)
        step(client, f"BATCH COMMIT {bid}")
        callback = fetch(client, queue)
        if callback["custom"].get("_bid") != bid:
            raise FlowBroken(f"not the batch's callback: {callback}")
        ack(client, callback["jid"])
        return ACCEPTED


def held_job_setup(url: str, wid: str) -> tuple[RawClient, str, str]:
    """A committed batch whose job a worker (`wid`) has fetched and not yet ACKed."""
    worker = RawClient.connect(url, wid=wid)
    try:
        queue = "demo-" + uid()
        bid = committed_batch(worker, queue)
        held = fetch(worker, queue)
        if held.get("custom", {}).get("bid") != bid:
            raise FlowBroken(f"fetched a job of another batch: {held}")
        return worker, bid, queue
    except BaseException:
        worker.close()
        raise


def member_reopens(url: str) -> str:
    """Legal in member-reopen mode: the process holding a job of the batch reopens it (from another
    pooled connection with the same wid, as faktory_worker_go does), adds a job, commits again."""
    wid = "worker-" + uid()
    worker, bid, queue = held_job_setup(url, wid)
    with worker, RawClient.connect(url, wid=wid) as pooled:
        result = outcome(pooled.call(f"BATCH OPEN {bid}"))
        if result == ACCEPTED:
            step(pooled, member(bid, queue))
            step(pooled, f"BATCH COMMIT {bid}")
        return result


def outsider_reopens_held(url: str) -> str:
    """In member-reopen mode, a process that holds no job of the batch may not reopen it."""
    worker, bid, _ = held_job_setup(url, "worker-" + uid())
    with worker, RawClient.connect(url, wid="outsider-" + uid()) as outsider:
        return outcome(outsider.call(f"BATCH OPEN {bid}"))


SCENARIOS = (
    Scenario("outsider reopens a committed batch", outsider_reopens_committed,
             ACCEPTED, "refused BATCH_COMMITTED"),
    Scenario("push into a committed batch", push_into_committed, ACCEPTED, "refused BATCH_COMMITTED"),
    Scenario("child batch under a committed batch", child_under_committed, ACCEPTED, "refused PARENT_SEALED"),
    Scenario("push after the callback was enqueued", push_after_callback,
             ACCEPTED, "refused BATCH_CALLBACK_FIRED"),
    Scenario("legal: callbacks after the last job", callbacks_after_last_job, ACCEPTED, ACCEPTED),
    Scenario("legal: empty batch fires at commit", empty_batch, ACCEPTED, ACCEPTED),
    Scenario("legal: member reopens (member-reopen mode)", member_reopens, ACCEPTED, ACCEPTED,
             gateway="member-reopen"),
    Scenario("outsider reopens (member-reopen mode)", outsider_reopens_held,
             ACCEPTED, "refused BATCH_COMMITTED", gateway="member-reopen"),
)  # fmt: skip


# --- running and reporting ----------------------------------------------------------------------


def attempt(scenario: Scenario, url: str) -> str:
    try:
        return scenario.run(url)
    except FlowBroken as exc:
        return f"error: {exc}"
    except (OSError, ValueError, KeyError) as exc:
        return f"error: {type(exc).__name__}: {exc}"


def summarize(results: list[tuple[Scenario, str, str]], out: TextIO) -> int:
    """Print the table and any row that differs from what is expected; the exit status."""
    widths = (max(len(s.title) for s, _, _ in results), max(len(DIRECT), *(len(d) for _, d, _ in results)))
    line = f"{{:<{widths[0]}}}  {{:<{widths[1]}}}  {{}}"
    print(line.format("scenario", DIRECT, THROUGH), file=out)
    print(line.format("-" * widths[0], "-" * widths[1], "-" * len(THROUGH)), file=out)
    for scenario, direct, through in results:
        print(line.format(scenario.title, direct, through), file=out)
    wrong = [
        f"  {s.title}: {column} gave {got!r}, expected {want!r}"
        for s, direct, through in results
        for column, got, want in ((DIRECT, direct, s.direct), (THROUGH, through, s.through))
        if got != want
    ]
    print(file=out)
    if wrong:
        print(f"UNEXPECTED: {len(wrong)} cell(s) differ from what Ent and the gateway should do:", file=out)
        print("\n".join(wrong), file=out)
        return 1
    print(
        "Every row as expected: Ent lets every #465 violation through, the gateway refuses each one,",
        file=out,
    )
    print("and the legal flows work the same through it.", file=out)
    return 0


def batches_on_oss(faktory: FaktoryServer, started: list[Process], out: TextIO) -> int:
    """Part two: the gateway as the batch engine (`batches: gateway`) in front of Faktory OSS, no
    stand-in; the Go client's batch API producing, faktory_worker_go working, through it."""
    gateway = GatewayProcess(
        faktory.url, "--batches", "gateway", "--mode", "member-reopen", "--log-level", "error"
    )
    started.append(gateway)
    gateway.start()
    metrics = f"http://127.0.0.1:{gateway.http_port}/metrics"
    print(
        f"\nBatches on Faktory OSS: gateway --batches gateway at {gateway.url} (metrics on {metrics}),",
        file=out,
    )
    print(
        "straight in front of Faktory OSS; a Go program (the Go client's batch API, a faktory_worker_go",
        file=out,
    )
    print("worker) through it.\n", file=out)
    try:
        flow = run_workflow(gateway.url, gateway.url, "demo-" + uid())
    except (RuntimeError, OSError) as exc:
        print(f"UNEXPECTED: the workflow failed: {exc}", file=out)
        return 1
    names = {flow.parent: "parent", flow.child: "child"}
    print(f"  produced: parent {flow.parent} (Step, Spawn), child {flow.child} (Step, Step, Flaky)", file=out)
    for r in flow.ran:
        if r["_cb"]:
            s = r["status"]
            what = f"{r['_cb']} callback of the {names.get(r['_bid'], r['_bid'])}"
            detail = f"status: total {s['total']}, pending {s['pending']}, failed {s['failed']}"
        else:
            what = f"{r['jobtype']} ({names.get(r['bid'], r['bid'])})"
            detail = (f"failed: {r['error']}" if r["error"] else "retried, succeeded" if r["retried"]
                      else f"reopened its committed batch, added {r['added']}" if r.get("added") else "ok")  # fmt: skip
        print(f"  ran {what:<32} {detail}", file=out)
    for bid, s in flow.final.items():
        print(f"  final {names[bid]:<6} total {s['total']}, pending {s['pending']}, failed {s['failed']}, "
              f"complete_st {s['complete_st']!r}, success_st {s['success_st']!r}", file=out)  # fmt: skip
    problems = flow.order_problems() + [
        f"the {names[bid]} did not end with both callbacks done" for bid, s in flow.final.items()
        if (s["pending"], s["complete_st"], s["success_st"]) != (0, "2", "2")
    ]  # fmt: skip
    if problems:
        print("\nUNEXPECTED: " + "; ".join(problems), file=out)
        return 1
    print(
        "\nAs Enterprise documents it: every callback once, a batch's complete before its success, a",
        file=out,
    )
    print("child's before its parent's; the failed job's retry counted once.", file=out)
    return 0


def refusal_counts(gateway: GatewayProcess) -> list[str]:
    """The gateway's own account, from its /metrics."""
    return [
        line
        for line in gateway.http("/metrics")[1].splitlines()
        if line.startswith("faktory_gateway_refusals_total{")
    ]


def main() -> int:
    # SIGTERM stops the demo as Ctrl-C does: through the `finally` that stops the peers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started: list[Process] = []
    try:
        try:
            faktory = FaktoryServer().start()
            started.append(faktory)
            standin = StandinProcess(faktory.url).start()
            started.append(standin)
            gateways = {}
            for mode in ("strict", "member-reopen"):
                gateway = GatewayProcess(standin.url, "--mode", mode, "--log-level", "error")
                started.append(gateway)
                gateways[mode] = gateway.start()
        except (RuntimeError, TimeoutError, OSError) as exc:
            print(f"demo: could not start the peers: {exc}", file=sys.stderr)
            return 2
        print(f"{'Faktory OSS 1.9.4':<29}{faktory.url}")
        print(f"{'Ent stand-in':<29}{standin.url}  (in front of Faktory; as permissive as Ent)")
        for mode, gateway in gateways.items():
            print(f"{'gateway --mode ' + mode:<29}{gateway.url}  (in front of the stand-in; metrics on "
                  f"http://127.0.0.1:{gateway.http_port}/metrics)")  # fmt: skip
        print()
        results = [(s, attempt(s, standin.url), attempt(s, gateways[s.gateway].url)) for s in SCENARIOS]
        status = summarize(results, sys.stdout)
        print("\nThe strict gateway counted:")
        print("\n".join("  " + line for line in refusal_counts(gateways["strict"])))
        return max(status, batches_on_oss(faktory, started, sys.stdout))
    finally:
        for process in reversed(started):
            if isinstance(process, FaktoryServer):
                process.cleanup()
            else:
                process.stop()


if __name__ == "__main__":
    sys.exit(main())
