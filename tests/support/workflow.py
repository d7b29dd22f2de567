"""The Go batch workflow (tests/clients/go/workflow: the Go client's batch API producing,
faktory_worker_go working), run as a user runs it; shared by its test and the demo."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass

from tests.support.processes import REPO

PROGRAM = REPO / ".tools/bin/workflow"  # built by scripts/install-test-deps.sh


def run(command: str, url: str, queue: str, timeout: str = "60s") -> list[dict]:
    """One half of the workflow (`produce` or `work`) against FAKTORY_URL=url: its JSON records.
    Raises RuntimeError with its output when it fails."""
    done = subprocess.run(
        [str(PROGRAM), command, "-queue", queue, "-timeout", timeout],
        env={**os.environ, "FAKTORY_URL": url},
        capture_output=True,
        text=True,
        timeout=90,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"workflow {command} exited {done.returncode}:\n{done.stdout}{done.stderr[-3000:]}"
        )
    return [json.loads(line) for line in done.stdout.splitlines()]


@dataclass
class Workflow:
    produced: dict  # the producer's record: bids, jids, statuses once committed
    records: list[dict]  # the worker's, in the order its handlers returned

    @property
    def parent(self) -> str:
        return self.produced["parent"]

    @property
    def child(self) -> str:
        return self.produced["child"]

    @property
    def ran(self) -> list[dict]:
        return [r for r in self.records if r["event"] == "ran"]

    @property
    def final(self) -> dict[str, dict]:
        """bid -> its BatchStatus once the worker was done."""
        return {r["bid"]: r["status"] for r in self.records if r["event"] == "final"}

    def callbacks(self) -> dict[tuple[str, str], int]:
        """(bid, kind) -> its position among the runs, for every callback run."""
        return {(r["_bid"], r["_cb"]): i for i, r in enumerate(self.ran) if r["_cb"]}

    def order_problems(self) -> list[str]:
        """What breaks Enterprise's callback order (a batch's complete before its success, a
        child's before its parent's), or a callback that did not run exactly once."""
        at = self.callbacks()
        problems = [f"{kind} of {bid} ran {n} times" for (bid, kind), n in self._runs().items() if n != 1]
        expected = [((self.child, "complete"), (self.child, "success")), ((self.child, "complete"), (self.parent, "complete")),
                    ((self.parent, "complete"), (self.parent, "success")), ((self.child, "success"), (self.parent, "success"))]  # fmt: skip
        for first, then in expected:
            if first not in at or then not in at or at[first] > at[then]:
                problems.append(f"{first[1]} of {first[0]} should run before {then[1]} of {then[0]}")
        return problems

    def _runs(self) -> dict[tuple[str, str], int]:
        runs = {(bid, kind): 0 for bid in (self.parent, self.child) for kind in ("complete", "success")}
        for r in self.ran:
            if r["_cb"]:
                runs[r["_bid"], r["_cb"]] = runs.get((r["_bid"], r["_cb"]), 0) + 1
        return runs


def run_workflow(producer_url: str, worker_url: str, queue: str) -> Workflow:
    [produced] = run("produce", producer_url, queue)
    return Workflow(produced, run("work", worker_url, queue))
