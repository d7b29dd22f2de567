"""Exhaustive checks of the commit-fence model (tests/model/fence_model.py; issues 9 and 17).

Each check prints what it explored (run pytest with -s to see it). Outside CI,
`python -m tests.model.test_fence_model` runs the V3 safety check at larger bounds (minutes).

What the file shows:

* the first design's stall hole (OLD);
* today's code (V2): under its own assumptions (the server handles at once what reaches it, nothing
  slow ahead of an admitted command, no clock steps) it is safe, and each of its protections is needed;
  under the real server (a receive queue that survives a reset, slow commands ahead, handling time) and
  with a ledger clock that steps, it lets an admitted push join after the commit, with no fault at all;
* the spec (V3): safe with faults, two gateways, seal notices, overlapping and abandoned commits; and
  each of its protections, removed alone, lets a push join after the commit;
* a hole in the spec as written: A4 (a pause of up to MARGIN between writable() and the write) is not
  in VALID_FOR; the model's V3 subtracts WRITE_LAG (ValidFor.WITH_WRITE_LAG), the spec's formula fails.

The safety checks count a push handled at the commit's own instant, after it, as late (the stronger
check); the tests that must find a hole use `find` (Config.strict: a later instant), so that what they
print is a real hole, not a tie that the commit's own latency would close (fence_model, "Time").
Bounds: one push in the one-gateway runs, one push per gateway in the two-gateway runs, unbounded time;
the options each run turns off to stay small are in its Config, printed with its result.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import replace

import pytest

from tests.model.fence_model import Config, Fault, Lapse, Model, Protocol, Result, ValidFor, v2

NO_FAULTS = dict(faults=frozenset(), max_faults=0)
# A protection-removal run needs only the behaviours its counterexample uses: a smaller run.
PLAIN = dict(slow_commands=False, hang_ups=False, **NO_FAULTS)
# V3 in CI: MARGIN 1, SERVER_BOUND 1, WRITE_LAG 1 (A4), LEASE_LIFE 5, so VALID_FOR = 5 - 1 - 1 - 1 = 2
# (the least that lets a renewal keep a lease across an instant); ANSWER_CAP 1; a live link may stall 3;
# one push; one fault of any kind; unbounded time.
V3 = Config()


def check(config: Config) -> Result:
    result = Model(config).check()
    print(f"\n{config.describe()}\n{result.show()}")
    return result


def find(config: Config, invariant: str = "no_push_after_commit") -> list[str]:
    """The shortest counterexample in which the push is handled at a later instant than the commit (a
    real hole, not a tie the commit's latency would close: fence_model, "Time")."""
    return assert_counterexample(check(replace(config, strict=True)), invariant)


def assert_counterexample(result: Result, invariant: str = "no_push_after_commit") -> list[str]:
    assert result.trace is not None, f"expected a counterexample to {invariant}: {result.show()}"
    assert result.violated == invariant, result.show()
    return result.trace


def index(trace: list[str], pattern: str) -> int:
    """The first step matching the regular expression `pattern` (the test fails if there is none)."""
    for i, step in enumerate(trace):
        if re.search(pattern, step):
            return i
    raise AssertionError(f"no step matches {pattern!r} in\n" + "\n".join(trace))


def instant(step: str) -> int:
    return int(re.match(r"t=(\d+)", step).group(1))


FAULT_STEPS = r"crashes|paused|cut from Redis|clock steps"


def assert_late_push(trace: list[str]) -> tuple[int, int]:
    """The trace ends with an admitted push handled after the commit; returns both steps' indexes."""
    shown = "\n".join(trace)
    assert re.search(r"the server handles push#\d.*AFTER THE COMMIT", trace[-1]), shown
    commit = index(trace, r"the server handles BATCH COMMIT")
    assert commit < len(trace) - 1, shown
    return commit, len(trace) - 1


# --------------------------------------------------------------------------- the first design


def test_old_per_push_design_has_the_stall_hole():
    config = Config(protocol=Protocol.OLD, lease_life=2, server_bound=0, max_pushes=2, **NO_FAULTS)
    trace = find(config)
    commit, late = assert_late_push(trace)
    admitted = index(trace, r"ledger admits push#1")
    expired = index(trace, r"push#1 lease expires")
    arrived = index(trace, r"push#1 reaches the server's receive queue")
    # The push was admitted under a lease, the lease expired while the push sat in the network (it
    # reached the server's host only then), the commit went through, and then the server handled the push.
    assert admitted < expired < arrived < late and expired < commit < late, "\n".join(trace)
    stall = int(re.search(r"written (\d+) ago", trace[arrived]).group(1))
    assert stall >= config.lease_life, "\n".join(trace)


def test_old_commit_rules_let_the_ledger_lose_a_commit():
    config = Config(
        protocol=Protocol.OLD,
        max_pushes=0,
        commit_attempts=2,
        timeout_reopens_only_if_last=False,
        ok_always_commits=False,
        **NO_FAULTS,
    )
    trace = find(config, "ledger_follows_server")
    index(trace, r"fence timeout: batch back to open")
    assert re.search(r"\+OK comes back.*-> open", trace[-1]), "\n".join(trace)


# --------------------------------------------------------------------------- V2: today's code and the real server

# The trace: one gateway, Redis answering at once (timely), no fault; the network within
# MARGIN (the spec's A2) and the server handling at once what is at the head of its queue (V2's own
# assumption; its handling time is another hole, below): the only way in is a slow command ahead.
V2_REAL_SERVER = v2(slow_commands=True, max_delay=1, timely=True, **NO_FAULTS)


def test_v2_lets_a_push_in_after_the_commit_with_no_fault():
    trace = find(V2_REAL_SERVER)
    shown = "\n".join(trace)
    commit, late = assert_late_push(trace)
    assert not any(re.search(FAULT_STEPS, step) for step in trace), shown
    sent = index(trace, r"client sends a slow command and push#1 in one write")
    admitted = index(trace, r"admits push#1.*writes it behind the busy slow command")
    queued = index(trace, r"push#1 .*reaches the server's receive queue .*behind the slow command")
    hang_up = index(trace, r"push#1's client hangs up")
    reset = index(trace, r"no reply to push#1 within LINGER_TIMEOUT: resets the upstream")
    release = index(trace, r"sends release")
    released = index(trace, r"Redis executes G1's release")
    go = index(trace, r"commit_go: no live lease: the commit is sent")
    slow_done = index(trace, r"the server finishes the slow command ahead of push#1")
    # Slow command ahead, push admitted and written behind it, queued at the server; the client
    # leaves; the gateway keeps the upstream LINGER, resets it, releases the lease after MARGIN; the
    # commit goes and is handled; the slow command ends and the push, still queued, joins after.
    assert sent < admitted < hang_up < reset < release < released < go < commit < slow_done < late, shown
    assert queued < reset, shown  # in the server's queue before the reset: the reset does not remove it
    assert "its connection was reset" in trace[late], shown
    assert instant(trace[release]) - instant(trace[reset]) == V2_REAL_SERVER.margin, shown


def test_v2_lets_a_push_in_after_a_ledger_clock_step():
    config = v2(timely=True, faults=frozenset({Fault.CLOCK_STEP}), max_faults=1)
    trace = find(config)
    shown = "\n".join(trace)
    commit, _late = assert_late_push(trace)
    step = index(trace, r"the ledger's clock steps \+\d+ \(lease G1#0 expires\)")
    go = index(trace, r"commit_go: no live lease")
    assert step < go < commit, shown
    # No other fault, no slow command, no hang-up: only the ledger's clock.
    assert not any(re.search(r"crashes|paused|cut from Redis|slow command|hangs up", s) for s in trace), shown


@pytest.mark.parametrize("fault", [Fault.PAUSE, Fault.CRASH, Fault.CUT])
def test_v2_slow_command_ahead_with_a_fault(fault):
    """The same slow command ahead, no hang-up, Redis timely: SIGSTOP, SIGKILL or a cut from Redis
    ends the lease (renewals stop; it expires in the ledger) while the push waits at the server."""
    config = replace(V2_REAL_SERVER, hang_ups=False, faults=frozenset({fault}), max_faults=1)
    trace = find(config)
    shown = "\n".join(trace)
    commit, late = assert_late_push(trace)
    admitted = index(trace, r"admits push#1.*behind the busy slow command")
    faulted = index(
        trace, {Fault.PAUSE: r"paused", Fault.CRASH: r"crashes", Fault.CUT: r"cut from Redis"}[fault]
    )
    expired = index(trace, r"lease expires")
    slow_done = index(trace, r"finishes the slow command ahead of push#1")
    assert admitted < expired < commit < slow_done < late, shown
    assert faulted < expired, shown


def test_v2_deadline_forgets_the_server_time():
    """Under V2's own assumptions except that the server takes SERVER_BOUND to handle the command at the
    head of its queue: the local deadline (TTL - MARGIN) leaves no room for it."""
    # SERVER_BOUND 2: more than the model's spare unit (a write is at least one instant before the deadline).
    trace = find(v2(server_bound=2, hang_ups=False, faults=frozenset({Fault.CUT}), max_faults=1))
    _commit, _late = assert_late_push(trace)
    assert not any("slow command" in step for step in trace), "\n".join(trace)


# V2 under its own assumptions (its A2 counts the server's handling in MARGIN; nothing slow ahead; check
# and write one step; the ledger's clock does not step): its claims from issue 9 stay true.
V2_ONE_GATEWAY = v2()
V2_SAFE = {
    "one gateway, faults": (
        V2_ONE_GATEWAY,
        {
            "crash",
            "pause",
            "cut",
            "abort",
            "resume-abort",
            "renewed",
            "released",
            "hang-up-reset",
            "push-delivered-after-reset",
            "push-delivered-after-stall",
            "lease-expired",
            "commit-handled",
        },
    ),
    # TTL 2 (VALID_FOR 1), as issue 9's CI run: two gateways multiply the states.
    "two gateways": (
        v2(
            gateways=("G1", "G2"),
            max_pushes=2,
            assign=True,
            hang_ups=False,
            timeouts=False,
            lease_life=2,
            **NO_FAULTS,
        ),
        {"abort", "released", "lease-expired", "commit-handled", "push-delivered-after-reset"},
    ),
    "seal notices": (v2(notices=True), {"notice", "released", "abort", "commit-handled"}),
}


@pytest.mark.parametrize("name", list(V2_SAFE))
def test_v2_is_safe_under_its_own_assumptions(name):
    config, events = V2_SAFE[name]
    result = check(config)
    assert result.trace is None, result.show()
    assert result.deadlocks == 0, result.show()
    assert events <= result.covered, f"never reached: {sorted(events - result.covered)}"


V2_PROTECTIONS = {
    "no_abort_at_deadline": {"abort_at_deadline": False},
    "deadline_from_reply_arrival": {"deadline_from_request_start": False},
    "commit_ignores_live_leases": {"commit_waits_for_leases": False},
    # The gap this opens is MARGIN, the model's spare unit when MARGIN is 1: MARGIN 2 (TTL 4) shows it.
    "release_lost_lease_at_once": {"never_release_lost_lease": False, "margin": 2, "lease_life": 4},
}


@pytest.mark.parametrize("removed", list(V2_PROTECTIONS))
def test_v2_without_protection_is_unsafe(removed):
    trace = find(replace(V2_ONE_GATEWAY, **V2_PROTECTIONS[removed]))
    assert_late_push(trace)


def test_v2_renewal_failure_is_redundant_given_the_deadline():
    """A renewal that recreates a lost lease is still safe: it arrives after the deadline's reset."""
    result = check(v2(renewal_fails_when_lost=False))
    assert result.trace is None, result.show()


def test_v2_old_timeout_rule_reopens_under_a_sent_commit():
    """Even with +OK always committing, a timeout that reopens while another attempt was sent lets a
    push in after the commit."""
    config = v2(commit_attempts=2, hang_ups=False, timeout_reopens_only_if_last=False, **NO_FAULTS)
    trace = find(config)
    index(trace, r"fence timeout: batch back to open")


# --------------------------------------------------------------------------- V3: the spec

# The lean settings of the multi-party checks: the server's time and the write lag are checked in the
# one-gateway runs; here LEASE_LIFE 3 keeps VALID_FOR = 3 - 1 - 0 - 0 = 2.
LEAN = dict(write_lag=0, server_bound=0, lease_life=3, slow_commands=False, hang_ups=False, max_delay=1)

V3_SAFE = {
    "one gateway, faults": (
        replace(V3, max_delay=2),
        {
            "slow-command-ahead",
            "slow-command-done",
            "hang-up",
            "hang-up-reset",
            "push-handled-after-reset",
            "push-delivered-after-reset",
            "push-delivered-after-stall",
            "push-handled-while-commit-waits",
            "crash",
            "pause",
            "cut",
            "resume-abort",
            "abort",
            "clock-step-forward",
            "clock-step-backward",
            "clock-step-past-record-lifetime",
            "lease-lapsed-by-watch",
            "commit-sent-after-lapse",
            "written-after-deadline",
            "renewed",
            "released",
            "commit-handled",
            "commit-timeout",
        },
    ),
    # Redis timely (no slow request or reply): the leases end by release; their lapse is checked above.
    "two gateways": (
        replace(
            V3,
            gateways=("G1", "G2"),
            max_pushes=2,
            assign=True,
            timely=True,
            timeouts=False,
            **NO_FAULTS,
            **LEAN,
        ),
        {"released", "renewed", "commit-handled", "push-handled-while-commit-waits", "commit-sent"},
    ),
    "seal notices": (
        replace(V3, notices=True, **NO_FAULTS),
        {
            "notice",
            "released",
            "hang-up-reset",
            "push-handled-after-reset",
            "lease-lapsed-by-watch",
            "commit-handled",
        },
    ),
    # Redis timely as well (the watch across attempts runs in the deep run).
    "overlapping and abandoned commits": (
        replace(V3, commit_attempts=2, abandons=True, timely=True, **NO_FAULTS, **LEAN),
        {
            "commit-timeout-while-another-is-live",
            "abandon-reopened",
            "abandon-committed",
            "reseal",
            "commit-finished",
            "commit-handled",
            "released",
        },
    ),
}


@pytest.mark.parametrize("name", list(V3_SAFE))
def test_v3_is_safe_within_bounds(name):
    config, events = V3_SAFE[name]
    result = check(config)
    assert result.trace is None, result.show()
    assert result.deadlocks == 0, result.show()  # time can always pass: nothing is cut short
    assert events <= result.covered, f"never reached: {sorted(events - result.covered)}"


def written(trace: list[str]) -> int:
    return index(trace, r"G1 writes push#1|admits push#1.*writes it")


def test_v3_without_the_barrier():
    """(a) Admission with the slow command still ahead: the push waits behind it at the server."""
    trace = find(replace(V3, barrier=False, hang_ups=False, **NO_FAULTS))
    shown = "\n".join(trace)
    commit, late = assert_late_push(trace)
    admitted = index(trace, r"admits push#1.*behind the busy slow command")
    slow_done = index(trace, r"finishes the slow command ahead of push#1")
    assert admitted < commit < slow_done < late, shown


HOLDS = {
    "none": dict(hold=0),
    # V2's rule (Ticket.lost): MARGIN only. With SERVER_BOUND 1 the model's hang-up reset comes at least
    # ANSWER_CAP = 1 after the write, which covers the missing SERVER_BOUND exactly (a tie the commit's
    # own latency would close): SERVER_BOUND 2 (LEASE_LIFE 6 keeps VALID_FOR 2) opens a real gap.
    "margin only": dict(hold=1, server_bound=2, lease_life=6),
}


@pytest.mark.parametrize("removed", list(HOLDS))
def test_v3_without_the_hold_after_a_reset(removed):
    """(b) The ticket of a reset connection ends at once, or after MARGIN only (v2's rule): the push,
    on its way or at the server's host before the reset, is handled after the release."""
    config = replace(V3, **HOLDS[removed], slow_commands=False, **NO_FAULTS)
    hold = config.hold
    trace = find(config)
    shown = "\n".join(trace)
    commit, late = assert_late_push(trace)
    reset = index(trace, r"no reply to push#1 within ANSWER_CAP: resets the upstream")
    release = index(trace, r"sends release")
    assert reset < release < commit, shown
    assert instant(trace[release]) - instant(trace[reset]) == hold, shown
    assert "its connection was reset" in trace[late], shown


def test_v3_with_the_lapse_judged_on_the_ledgers_clock():
    """(c) The ledger ages beats on its own clock instead of the committer's watch: a step of the
    ledger's clock ends a lease at once."""
    config = replace(V3, lapse=Lapse.LEDGER_CLOCK, **PLAIN)
    config = replace(config, faults=frozenset({Fault.CLOCK_STEP}), max_faults=1)
    trace = find(config)
    shown = "\n".join(trace)
    commit, _late = assert_late_push(trace)
    step = index(trace, r"the ledger's clock steps \+")
    deleted = index(trace, r"commit_go: deletes G1#0")
    assert step < deleted < commit, shown
    assert not any(re.search(r"crashes|paused|cut from Redis|slow command", s) for s in trace), shown


def assert_lapsed_by_watch(trace: list[str]) -> None:
    shown = "\n".join(trace)
    commit, _late = assert_late_push(trace)
    deleted = index(trace, r"commit_go: deletes G1#0; no lease remains: GO")
    assert written(trace) < deleted < commit, shown


def test_v3_deadline_without_the_server_bound():
    """(d) VALID_FOR = LEASE_LIFE - MARGIN - WRITE_LAG: a push written before the deadline reaches the
    head of its queue and is still being handled when the watch ends the lease. WRITE_LAG 0 keeps the
    A4 finding out of it; SERVER_BOUND 2 (LEASE_LIFE 5, VALID_FOR 2 with the bound, 4 without) makes the
    gap more than the model's one spare unit, so that the trace is a real hole whatever path BFS shows."""
    config = replace(V3, valid_for=ValidFor.NO_SERVER_BOUND, write_lag=0, server_bound=2, **PLAIN)
    trace = find(config)
    assert_lapsed_by_watch(trace)
    # The server's time is what makes it late: the push reached the head of its queue before the
    # commit and was handled a full SERVER_BOUND later.
    arrived = index(trace, r"push#1 .*reaches the server's receive queue")
    assert arrived < index(trace, r"the server handles BATCH COMMIT"), "\n".join(trace)
    assert instant(trace[-1]) - instant(trace[arrived]) >= 1, "\n".join(trace)


def test_v3_spec_formula_misses_the_write_lag():
    """The spec as written: VALID_FOR = LEASE_LIFE - MARGIN - SERVER_BOUND, with A4 allowing the write
    MARGIN after writable(). The push is checked before the deadline, written after it, and handled
    after the watch ended the lease. (A finding: the model's V3 subtracts WRITE_LAG.) WRITE_LAG 2 (A4's
    MARGIN, the unit being a second here) makes the gap more than the model's spare unit."""
    trace = find(replace(V3, valid_for=ValidFor.SPEC, write_lag=2, **PLAIN))
    assert_lapsed_by_watch(trace)
    index(trace, r"writes push#1 \(its deadline has passed since the check\)")


def test_v3_spec_leases_hash_expires_on_a_clock_step():
    """A finding: the spec's GC lifetime on the leases hash is on the ledger's clock. A forward step
    past it (any amount is a fault in the model) ends every lease at once; the commit goes while the
    admitted push is on its way. No other fault, no slow command, no hang-up. (Fixed in the model's V3:
    no lifetime on the hash.)"""
    config = replace(V3, leases_hash_expires=True, **PLAIN)
    trace = find(replace(config, faults=frozenset({Fault.CLOCK_STEP}), max_faults=1))
    shown = "\n".join(trace)
    commit, _ = assert_late_push(trace)
    step = index(trace, r"clock steps past the records' lifetime: the leases hash expires")
    go = index(trace, r"no lease remains: GO")
    taken = index(trace, r"Redis executes G1's acquire: lease taken")
    # The lease was taken (so a commit must wait for it), the step erased it, the commit went; the push
    # was admitted under that lease (here after the commit: G1's deadline still stands) and joined late.
    assert taken < step < go < commit < written(trace), shown
    assert not any(re.search(r"crashes|paused|cut from Redis|resets", s) for s in trace), shown


def test_v3_without_the_abort_at_the_deadline():
    """(e) At its deadline the gateway gives the lease up but leaves the connection open: the stalled
    link delivers the push after the watch ended the lease."""
    trace = find(replace(V3, abort_at_deadline=False, **PLAIN))
    assert_lapsed_by_watch(trace)
    assert not any("resets" in step for step in trace), "\n".join(trace)
    index(trace, r"push#1 .*reaches the server's receive queue \(written [2-9] ago\)")


def test_v3_deadline_from_the_reply():
    """(f) The deadline counted from the reply's arrival instead of the request's start: a slow reply
    gives a deadline past the time the watch ends the lease."""
    config = replace(V3, deadline_from_request_start=False, **PLAIN)
    trace = find(config)
    shown = "\n".join(trace)
    assert_lapsed_by_watch(trace)
    starts = [
        int(m.group(1))
        for step in trace
        if (m := re.search(r"sends (?:acquire|renew).*\(start (\d+)\)", step))
    ]
    deadlines = [
        int(m.group(1)) for step in trace if (m := re.search(r"ok arrives \(deadline (\d+)\)", step))
    ]
    valid_for = Model(config).valid_for
    assert any(d > s + valid_for for d in deadlines for s in starts[-1:]), shown


def test_v3_releasing_a_lost_lease():
    """A gateway that releases its lease right after the deadline's reset (instead of leaving it to the
    watch) lets the commit go while the reset push is still on its way."""
    trace = find(replace(V3, never_release_lost_lease=False, **PLAIN))
    shown = "\n".join(trace)
    commit, _late = assert_late_push(trace)
    lost = index(trace, r"deadline reached: resets")
    released = index(trace, r"Redis executes G1's release")
    assert lost < released < commit, shown


# --------------------------------------------------------------------------- deeper bounds (not in CI)

DEEP = [
    ("V3, one gateway, one fault of any kind, every option (CI trims max_delay)", V3),
    (
        "V3, overlapping and abandoned commits, slow Redis",
        replace(V3, commit_attempts=2, abandons=True, **NO_FAULTS, **LEAN),
    ),
    (
        "V3, two gateways, one push each, slow Redis",
        replace(V3, gateways=("G1", "G2"), max_pushes=2, assign=True, timeouts=False, **NO_FAULTS, **LEAN),
    ),
    (
        "V3, two gateways, one push each, slow Redis, one fault",
        replace(V3, gateways=("G1", "G2"), max_pushes=2, assign=True, timeouts=False, **LEAN),
    ),
    (
        "V3, one gateway, two pushes, slow Redis, slow commands and hang-ups, no fault",
        replace(V3, max_pushes=2, timeouts=False, **NO_FAULTS),
    ),
]


def deeper() -> int:
    """The V3 check at bounds CI cannot afford: `python -m tests.model.test_fence_model`."""
    for name, config in DEEP:
        started = time.perf_counter()
        result = Model(config).check(max_states=20_000_000)
        print(f"{name}: {config.describe()}\n  {result.states} states, {result.transitions} transitions,"
              f" {time.perf_counter() - started:.0f} s, {'SAFE' if result.trace is None else 'VIOLATION'}"
              f"{f', {result.deadlocks} deadlocked states' if result.deadlocks else ''}",
              flush=True)  # fmt: skip
        if result.trace is not None or result.deadlocks:
            print(result.show())
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(deeper())
