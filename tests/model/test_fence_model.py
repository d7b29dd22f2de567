"""Exhaustive checks of the commit-fence model (tests/model/fence_model.py, issue 9).

Each check prints what it explored (run pytest with -s to see it). Outside CI,
`python -m tests.model.test_fence_model` runs the safety check at larger bounds (minutes).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import pytest

from tests.model.fence_model import Config, Model, Result

ONE_GATEWAY = Config(gateways=("G1",))  # 2 pushes, 1 fault, TTL 2, MARGIN 1, MAX_DELAY 3, t <= 4
TWO_GATEWAYS = Config(max_pushes=1, max_faults=0, max_time=3)
WITH_NOTICES = Config(gateways=("G1",), max_pushes=1, max_time=3, notifications=True)
OVERLAPPING_COMMITS = Config(gateways=("G1",), max_pushes=1, max_faults=0, commit_attempts=2)

DEEP = [
    Config(gateways=("G1",), max_time=5, max_faults=2, notifications=True),
    Config(gateways=("G1",), ttl=3, max_delay=4, max_time=6),
    Config(max_time=4, max_faults=1),
    Config(gateways=("G1",), max_time=5, commit_attempts=2),
]


def check(config: Config) -> Result:
    result = Model(config).check()
    print(f"\n{config}\n{result.show()}")
    return result


def assert_counterexample(result: Result, invariant: str) -> list[str]:
    assert result.trace is not None, f"expected a counterexample to {invariant}: {result.show()}"
    assert result.violated == invariant, result.show()
    return result.trace


# --------------------------------------------------------------------------- the first design


def test_old_per_push_design_has_the_stall_hole():
    config = Config(protocol="old")
    trace = assert_counterexample(check(config), "no_push_after_commit")
    shown = "\n".join(trace)
    admitted = next(i for i, step in enumerate(trace) if "ledger admits push#1" in step)
    expired = next(i for i, step in enumerate(trace) if "push#1 lease expires" in step)
    committed = next(i for i, step in enumerate(trace) if "the server receives BATCH COMMIT" in step)
    # The push was admitted under a lease, the lease expired while the push sat in the network, the
    # commit went through, and then the push arrived.
    assert admitted < expired < committed < len(trace) - 1, shown
    assert "network delivers push#1" in trace[-1] and "AFTER THE COMMIT" in trace[-1], shown
    stall = int(trace[-1].split("stalled ")[1].split(")")[0])
    assert stall >= config.ttl, shown


# --------------------------------------------------------------------------- the new design

SAFE = {
    "one gateway, faults": (
        ONE_GATEWAY,
        20_000,
        {
            "stalled-push-delivered-while-commit-waits",
            "abort",
            "resume-abort",
            "lease-lost",
            "renewed",
            "commit-delivered",
            "commit-timeout",
            "push-delivered-after-reset",
            "push-delivered-while-paused",
            "crash",
            "pause",
            "cut",
            "released",
            "lease-expired",
        },
    ),
    "two gateways": (
        TWO_GATEWAYS,
        20_000,
        {
            "stalled-push-delivered-while-commit-waits",
            "abort",
            "commit-delivered",
            "released",
            "lease-expired",
        },
    ),
    "seal notices": (WITH_NOTICES, 5_000, {"notice", "released", "abort", "commit-delivered"}),
}


@pytest.mark.parametrize("name", list(SAFE))
def test_new_design_is_safe_within_bounds(name):
    config, at_least, events = SAFE[name]
    result = check(config)
    assert result.trace is None, result.show()
    assert result.states > at_least, result.show()
    assert events <= result.covered, f"never reached: {sorted(events - result.covered)}"


# Each protection of the new design, removed alone, lets the explorer find a late push: the model
# would fail if the claim were false.
PROTECTIONS = {
    "no_abort_at_deadline": {"abort_at_deadline": False},
    "deadline_from_reply_arrival": {"deadline_from_request_start": False},
    "commit_ignores_live_leases": {"commit_waits_for_leases": False},
    "release_right_after_abort": {"quiet_after_abort": False},
}


@pytest.mark.parametrize("removed", list(PROTECTIONS))
def test_new_design_without_protection_is_unsafe(removed):
    trace = assert_counterexample(check(replace(ONE_GATEWAY, **PROTECTIONS[removed])), "no_push_after_commit")
    assert "AFTER THE COMMIT" in trace[-1], "\n".join(trace)


def test_new_design_without_abort_is_unsafe():
    trace = assert_counterexample(
        check(replace(ONE_GATEWAY, abort_at_deadline=False)), "no_push_after_commit"
    )
    assert not any("aborts" in step for step in trace), "\n".join(trace)


def test_renewal_failure_is_redundant_given_the_deadline():
    """A renewal that recreates a lost lease is still safe: it arrives after the deadline's abort."""
    result = check(replace(ONE_GATEWAY, max_pushes=1, renewal_fails_when_lost=False))
    assert result.trace is None, result.show()


# --------------------------------------------------------------------------- overlapping commits


def test_old_commit_rules_let_the_ledger_lose_a_commit():
    config = Config(
        protocol="old",
        max_pushes=0,
        commit_attempts=2,
        timeout_reopens_only_if_last=False,
        ok_always_commits=False,
    )
    trace = assert_counterexample(check(config), "ledger_follows_server")
    shown = "\n".join(trace)
    assert any("fence timeout: batch back to open" in step for step in trace), shown
    assert "+OK comes back" in trace[-1] and "-> open" in trace[-1], shown


def test_old_timeout_rule_reopens_under_a_sent_commit():
    """Even with +OK always committing, a timeout that reopens while another attempt was sent lets a
    push in after the commit."""
    config = replace(OVERLAPPING_COMMITS, timeout_reopens_only_if_last=False)
    trace = assert_counterexample(check(config), "no_push_after_commit")
    assert any("fence timeout: batch back to open" in step for step in trace), "\n".join(trace)


def test_new_commit_rules_keep_the_ledger_following_the_server():
    result = check(OVERLAPPING_COMMITS)
    assert result.trace is None, result.show()
    assert result.states > 2_000, result.show()
    events = {"commit-timeout-while-another-is-live", "commit-finished", "abort", "commit-delivered"}
    assert events <= result.covered, f"never reached: {sorted(events - result.covered)}"


def deeper() -> int:
    """The same check at bounds CI cannot afford (minutes): `python -m tests.model.test_fence_model`."""
    for config in DEEP:
        started = time.perf_counter()
        result = check(config)
        print(f"{config}: {result.states} states, {time.perf_counter() - started:.0f} s, "
              f"{'SAFE' if result.trace is None else 'VIOLATION'}")  # fmt: skip
        if result.trace is not None:
            print(result.show())
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(deeper())
