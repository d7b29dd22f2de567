"""An explicit-state model of the commit fence (docs/fence.md), checked exhaustively.

What is modelled
----------------
Gateways G1, G2 (``Config.gateways``), one ledger (Redis: the single authority, its clock is the model's
clock ``now``), one Faktory server, one batch B, at most ``max_pushes`` admitted commands ("pushes" into
B; a child ``BATCH NEW`` is the same thing) and ``commit_attempts`` attempts at ``BATCH COMMIT B``.
Every step is one atomic transition; the explorer tries every interleaving (breadth-first, so every
counterexample it prints is a shortest one) up to the bounds below.

Two protocols (``Config.protocol``):

* ``"old"``: the first design. Admission is one ledger step that records a lease per push
  (expiry = now + TTL) and writes the push upstream; the lease is removed when the server's reply
  reaches the gateway; the commit moves the batch to committing, waits until no *live* lease remains
  (expiry > now), then is written to the server. Leases simply expire.
* ``"new"``: one lease per gateway and batch, renewed while the gateway has pushes in flight, and an
  abort before the gateway's local deadline:

  1. acquire / renew / release are ledger requests: sent at local time t0, executed by Redis at any
     later time (slow requests), answered after any further delay (slow replies). One outstanding
     request per gateway (a Redis connection executes in order). acquire: if open,
     ``leases[g] = now + TTL``. renew: if ``leases[g]`` is live, ``leases[g] = now + TTL``, else the
     lease is lost. Either reply carries whether the batch is still open (else g becomes sealed).
     On an ok reply g sets ``deadline = t0 + TTL - MARGIN`` (t0 = when the *request* was sent).
  2. admission: g admits and writes a push only if ``local now < deadline`` and g is not sealed.
  3. abort: a live, running gateway whose deadline has come while it has pushes in flight resets
     their upstream connections (RST) before any time passes, and forgets the replies it was owed; it
     also aborts at once on a "lease lost" renewal reply, and first thing on resuming from a pause.
     After an abort it does not release its lease for MARGIN ticks (bytes may still be on the wire).
  4. release: a gateway with nothing in flight and nothing more to admit (sealed, or idle) may
     release its lease, and then holds no deadline until it acquires again. Not within MARGIN of an
     abort: without that rule the model finds a late push (a reset push still on the wire).
  5. commit: begin (if open or already committing: batch = committing, seal notices to every gateway,
     each delivered late or lost), then one ledger step when no live lease remains: "sent"; the
     commit's delivery to the server is a later step, its +OK reply and the ledger's finish a later
     one. While waiting, the attempt may time out (the fence timeout) and be retried later.
  6. faults (at most ``max_faults`` per run): crash (the process stops forever; its sockets are reset
     by the kernel), pause (SIGSTOP for any number of ticks, across its deadline; the network keeps
     delivering bytes already written), cut from Redis (its requests are never executed; it keeps
     running and aborts at its deadline).
  7. tick: ``now += 1`` (up to ``max_time``); not allowed while some running gateway owes an abort.

Commit rules (both protocols; ``Config.timeout_reopens_only_if_last`` / ``ok_always_commits``): old
rules: a fence timeout moves committing back to open; +OK moves committing to committed (and does
nothing otherwise). New rules: a fence timeout reopens only if no other commit attempt is live; +OK
always sets committed.

Invariants checked in every reachable state
-------------------------------------------
* ``no_push_after_commit``: no admitted push is delivered to the server after a commit was delivered
  to the server (the model has no legal reopen).
* ``ledger_follows_server``: once the server received a commit and its +OK came back (the attempt is
  "done"), the ledger says committed.

Assumptions under which the new protocol is checked safe
--------------------------------------------------------
* A1 (clocks): a gateway's clock runs at Redis's rate (drift 0 in the model: one global clock; the
  real code must add a rate margin), and a request's local start time t0 is <= the Redis time at which
  it is executed. With zero drift an offset between the clocks does not matter: only differences of
  one gateway's own readings are compared with each other.
* A2 (packet lifetime, the residual the project must document): a push written at local time w may
  be delivered to the server at time t only if either (a) its connection has not been reset, its
  gateway is alive and not paused at t, and t <= w + MAX_DELAY (MAX_DELAY may exceed TTL: a live
  gateway's link may stall for longer than a lease), or (b) t <= w + MARGIN, whatever happened to the
  connection or the process. In words: once the gateway has reset the connection (abort, or the kernel
  at a crash with SO_LINGER 0), or while the process is stopped and cannot abort, no byte survives in
  the network (send buffer, queues, retransmissions) for longer than MARGIN after it was written. In
  the real system (b) needs the kernel to give up on a stalled connection by itself
  (TCP_USER_TIMEOUT) and a bound on how long a packet lives in the network, both below MARGIN.
* A3: the check ``local now < deadline`` and the write of the push are one step (in reality a few
  microseconds with no await in between).
* TTL > MARGIN >= 1.
* Out of scope: a committer that dies after "sent" (the batch stays committing: the attempt never
  times out once sent; recovering it needs BATCH STATUS), legal reopen, renewal scheduling (a
  gateway may renew at any time it has pushes in flight, or never, which covers slow renewals).

Bounds (``Config`` defaults; each test prints the number of states explored, pytest -s)
---------------------------------------------------------------------------------------
TTL 2, MARGIN 1, MAX_DELAY 3 (> TTL: a live gateway's link may stall longer than a lease), time
0..4, 2 pushes, 1 commit attempt, at most 1 fault per run, seal notices off. The tests use 1 or 2
gateways with these or smaller bounds so that the file runs in a few seconds; `python -m
tests.model.test_fence_model` checks larger ones. Python explores some 20,000 to 40,000 states a
second here; two gateways multiply the state space, which is what keeps the CI bounds this small.

Seal notices multiply the state space, so they are off by default and checked in their own, smaller
configuration (and in the deep run). Without them a gateway still learns of the commit from a
renewal or acquire reply.

Reductions (sound: they merge states that no step can tell apart): expired leases are dropped (a
renewal or a commit treats them like absent ones); a deadline already reached is kept only as
"passed"; a dead gateway keeps only the request Redis may still execute; a push keeps its write time
only while the network may still deliver it; a request's t0 is dropped once the deadline it would
give has passed.

Modelling choices that only remove behaviours a real gateway does not have: a gateway asks the
ledger one request at a time (one Redis connection executes in order); it acquires only while it
may still admit a push; it releases only when it has nothing in flight and nothing more to admit
(it is sealed or the model's push budget is spent).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# --------------------------------------------------------------------------- explorer


@dataclass
class Result:
    """What an exhaustive exploration found."""

    states: int
    transitions: int
    seconds: float
    violated: str | None = None
    trace: list[str] | None = None
    covered: set[str] = field(default_factory=set)

    def show(self) -> str:
        head = f"{self.states} states, {self.transitions} transitions, {self.seconds:.2f} s"
        if self.trace is None:
            return head + ": no violation"
        steps = "\n".join(f"  {i:2}. {label}" for i, label in enumerate(self.trace, 1))
        return f"{head}: {self.violated} violated after\n{steps}"


Successors = Callable[[Any], Iterable[tuple[str, Any, tuple[str, ...]]]]


def explore(
    initial: Any,
    successors: Successors,
    invariants: dict[str, Callable[[Any], bool]],
    max_states: int = 2_000_000,
) -> Result:
    """Breadth-first search over hashable states; stops at the first state breaking an invariant.

    ``successors(state)`` yields ``(label, next_state, tags)``; the tags of every transition taken are
    collected in ``Result.covered`` (coverage). Returns the shortest trace of labels to a violation.
    """
    started = time.perf_counter()
    parent: dict[Any, tuple[Any, str] | None] = {initial: None}
    queue = deque([initial])
    transitions = 0
    covered: set[str] = set()

    def result(violated: str | None = None, state: Any = None) -> Result:
        trace = None
        if violated is not None:
            trace = []
            while parent[state] is not None:
                state, label = parent[state]
                trace.append(label)
            trace.reverse()
        return Result(len(parent), transitions, time.perf_counter() - started, violated, trace, covered)

    for name, holds in invariants.items():
        if not holds(initial):
            return result(name, initial)
    while queue:
        state = queue.popleft()
        for label, nxt, tags in successors(state):
            transitions += 1
            covered.update(tags)
            if nxt in parent:
                continue
            parent[nxt] = (state, label)
            for name, holds in invariants.items():
                if not holds(nxt):
                    return result(name, nxt)
            if len(parent) > max_states:
                raise RuntimeError(f"more than {max_states} states: lower the bounds")
            queue.append(nxt)
    return result()


# --------------------------------------------------------------------------- the model

OPEN, COMMITTING, COMMITTED = "open", "committing", "committed"
# push status: NET = written, not yet delivered; SERVER = delivered, reply on its way; DONE = reply in.
# LOST = written, still awaited, but the stalled link will never deliver it; DROPPED = reset and undeliverable.
NET, SERVER, DONE, LOST, DROPPED = "net", "server", "done", "lost", "dropped"
PASSED = -1  # a deadline already reached: its value no longer matters
# commit attempt phases
IDLE, WAITING, SENT, DELIVERED, FINISHED = "idle", "waiting", "sent", "delivered", "done"
LIVE_PHASES = (WAITING, SENT, DELIVERED)


@dataclass(frozen=True)
class Config:
    protocol: str = "new"  # "old" (per-push lease) or "new" (per-gateway lease)
    gateways: tuple[str, ...] = ("G1", "G2")
    ttl: int = 2
    margin: int = 1
    max_delay: int = 3
    max_time: int = 4
    max_pushes: int = 2
    commit_attempts: int = 1
    max_faults: int = 1
    notifications: bool = False
    # The protections of the new protocol; each True in the design, switched off one by one by the tests.
    abort_at_deadline: bool = True
    deadline_from_request_start: bool = True
    commit_waits_for_leases: bool = True
    renewal_fails_when_lost: bool = True
    quiet_after_abort: bool = True
    # Commit rules (both protocols).
    timeout_reopens_only_if_last: bool = True
    ok_always_commits: bool = True


class Gw(NamedTuple):
    alive: bool = True
    paused: bool = False
    cut: bool = False  # cut from Redis: its requests are never executed
    deadline: int | None = None  # local time until which it may write; None: holds no lease
    sealed: bool = False
    notice: bool = False  # a seal notification on its way
    request: tuple[str, int] | None = None  # (kind, t0) sent, not yet executed by Redis
    reply: tuple[str, str, int, bool] | None = None  # (kind, outcome, t0, batch open) on its way back
    quiet_until: int = 0  # no release before this (bytes of reset connections may still arrive)


class Push(NamedTuple):
    gw: int
    written: int
    status: str = NET
    reset: bool = False  # its connection was reset (abort or crash); its reply will never be read


@dataclass(frozen=True, slots=True)
class State:
    """The whole system. ``leases`` maps a gateway name (new) or a push name (old) to an expiry."""

    now: int = 0
    batch: str = OPEN
    leases: tuple[tuple[str, int], ...] = ()
    attempts: tuple[str, ...] = (IDLE,)
    gws: tuple[Gw, ...] = ()
    pushes: tuple[Push, ...] = ()
    server_commit: bool = False  # the server received a BATCH COMMIT
    late: bool = False  # a push reached the server after the commit did
    faults: int = 0


_STATE_FIELDS = ("now", "batch", "leases", "attempts", "gws", "pushes", "server_commit", "late", "faults")


def replace(s: State, **changes: Any) -> State:
    """dataclasses.replace, faster (the explorer makes hundreds of thousands of these)."""
    return State(*[changes[f] if f in changes else getattr(s, f) for f in _STATE_FIELDS])


def _set(mapping: tuple[tuple[str, int], ...], key: str, value: int | None) -> tuple[tuple[str, int], ...]:
    items = dict(mapping)
    if value is None:
        items.pop(key, None)
    else:
        items[key] = value
    return tuple(sorted(items.items()))


def _put(items: tuple, index: int, value: Any) -> tuple:
    return (*items[:index], value, *items[index + 1 :])


class Model:
    def __init__(self, config: Config):
        self.c = config

    def initial(self) -> State:
        gws = tuple(Gw() for _ in self.c.gateways) if self.c.protocol == "new" else ()
        return State(gws=gws, attempts=(IDLE,) * self.c.commit_attempts)

    # ---------------------------------------------------------------- invariants

    @staticmethod
    def no_push_after_commit(s: State) -> bool:
        return not s.late

    @staticmethod
    def ledger_follows_server(s: State) -> bool:
        return all(phase != FINISHED or s.batch == COMMITTED for phase in s.attempts)

    def invariants(self) -> dict[str, Callable[[State], bool]]:
        return {
            "no_push_after_commit": self.no_push_after_commit,
            "ledger_follows_server": self.ledger_follows_server,
        }

    def check(self, max_states: int = 2_000_000) -> Result:
        return explore(self.initial(), self.successors, self.invariants(), max_states)

    # ---------------------------------------------------------------- helpers

    def name(self, g: int) -> str:
        return self.c.gateways[g]

    def live_leases(self, s: State) -> list[str]:
        return [key for key, expiry in s.leases if expiry > s.now]

    def inflight(self, s: State, g: int) -> list[int]:
        return [
            i for i, p in enumerate(s.pushes) if p.gw == g and not p.reset and p.status in (NET, SERVER, LOST)
        ]

    def owes_abort(self, s: State, g: int) -> bool:
        gw = s.gws[g]
        return (
            self.c.abort_at_deadline
            and gw.alive
            and not gw.paused
            and gw.deadline is not None
            and s.now >= gw.deadline
            and bool(self.inflight(s, g))
        )

    def abort(self, s: State, g: int) -> State:
        """Reset every connection carrying g's pushes; forget the replies owed; wait before releasing."""
        pushes = tuple(
            p._replace(reset=True) if p.gw == g and p.status in (NET, SERVER, LOST) else p for p in s.pushes
        )
        quiet = s.now + self.c.margin if self.c.quiet_after_abort else 0
        gws = _put(s.gws, g, s.gws[g]._replace(deadline=None, quiet_until=quiet))
        return replace(s, pushes=pushes, gws=gws)

    def deliverable(self, s: State, p: Push) -> bool:
        """A2: the network's promise about when a written push can still reach the server."""
        if p.status != NET:
            return False
        if self.c.protocol == "old":
            return s.now <= p.written + self.c.max_delay
        gw = s.gws[p.gw]
        protected = not p.reset and gw.alive and not gw.paused
        if protected and s.now <= p.written + self.c.max_delay:
            return True
        return s.now <= p.written + self.c.margin

    # ---------------------------------------------------------------- successors

    def successors(self, s: State) -> Iterator[tuple[str, State, tuple[str, ...]]]:
        if self.c.protocol == "old":
            yield from self.old_admissions(s)
            yield from self.network_steps(s)
            yield from self.commit_steps(s)
            yield from self.tick(s)
            return
        steps = [self.network_steps(s), self.commit_steps(s), self.tick(s)]
        for g in range(len(s.gws)):
            steps += [self.gateway_steps(s, g), self.ledger_steps(s, g)]
        for step in steps:
            for label, nxt, tags in step:
                yield label, self.normalize(nxt), tags

    def normalize(self, s: State) -> State:
        """Forget what can no longer matter, so that equivalent states are one state.

        Expired leases behave as absent ones; a deadline already reached only matters as "held,
        passed"; a dead gateway only keeps the request Redis may still execute; a push only keeps
        its write time while the network may still deliver it.
        """
        now, c = s.now, self.c
        leases = s.leases
        if any(e <= now for _, e in leases):
            leases = tuple((k, e) for k, e in leases if e > now)
        gws = s.gws
        spent = len(s.pushes) >= c.max_pushes

        def alive_gw_is_spent(gw: Gw) -> bool:
            return spent and gw.alive and (gw.sealed or gw.notice)

        for g, gw in enumerate(s.gws):
            if not gw.alive:
                new = Gw(alive=False, cut=gw.cut and gw.request is not None, request=gw.request)
            else:
                new = gw
                if gw.deadline is not None and gw.deadline <= now and gw.deadline != PASSED:
                    new = new._replace(deadline=PASSED)
                if gw.quiet_until and gw.quiet_until <= now:
                    new = new._replace(quiet_until=0)
            if new.reply is not None and new.reply[2] != PASSED and c.deadline_from_request_start:
                kind, outcome, t0, batch_open = new.reply
                if outcome != "ok" or t0 + c.ttl - c.margin <= now:  # t0 no longer matters
                    new = new._replace(reply=(kind, outcome, PASSED, batch_open and outcome == "ok"))
            if new.request is not None and new.request[1] != PASSED and c.deadline_from_request_start:
                kind, t0 = new.request
                if kind == "release" or t0 + c.ttl - c.margin <= now:
                    new = new._replace(request=(kind, PASSED))
            if alive_gw_is_spent(new):  # nothing left to admit: sealed or not makes no difference
                new = new._replace(sealed=False, notice=False)
            if new != gw:
                gws = _put(gws, g, new)
        pushes = s.pushes
        for i, p in enumerate(s.pushes):
            new = p
            if p.status == SERVER and p.reset:
                new = Push(p.gw, -1, DONE)
            elif p.status in (SERVER, DONE):
                new = Push(p.gw, -1, p.status)
            elif p.status == NET:
                gw = gws[p.gw]
                if now > p.written + c.margin and (p.reset or not gw.alive or now > p.written + c.max_delay):
                    new = Push(p.gw, -1, DROPPED) if p.reset else Push(p.gw, -1, LOST)
            elif p.status == LOST and p.reset:
                new = Push(p.gw, -1, DROPPED)
            if new != p:
                pushes = _put(pushes, i, new)
        if leases is s.leases and gws is s.gws and pushes is s.pushes:
            return s
        return replace(s, leases=leases, gws=gws, pushes=pushes)

    def tick(self, s: State) -> Iterator[tuple[str, State, tuple[str, ...]]]:
        if s.now >= self.c.max_time:
            return
        if self.c.protocol == "new" and any(self.owes_abort(s, g) for g in range(len(s.gws))):
            return
        expiring = [key for key, expiry in s.leases if expiry == s.now + 1]
        note = f" ({', '.join(expiring)} lease expires)" if expiring else ""
        yield (
            f"t={s.now} -> t={s.now + 1}{note}",
            replace(s, now=s.now + 1),
            ("lease-expired",) if expiring else (),
        )

    # old protocol: a lease per push
    def old_admissions(self, s: State) -> Iterator[tuple[str, State, tuple[str, ...]]]:
        if s.batch != OPEN or len(s.pushes) >= self.c.max_pushes:
            return
        n = len(s.pushes)
        for g, gname in enumerate(self.c.gateways):
            expiry = s.now + self.c.ttl
            nxt = replace(
                s, pushes=(*s.pushes, Push(g, s.now)), leases=_set(s.leases, f"push#{n + 1}", expiry)
            )
            yield (
                f"t={s.now} {gname}: ledger admits push#{n + 1} (lease until {expiry}); push written",
                nxt,
                ("admit",),
            )

    # new protocol: one gateway's own steps
    def gateway_steps(self, s: State, g: int) -> Iterator[tuple[str, State, tuple[str, ...]]]:
        c, gw, name, now = self.c, s.gws[g], self.name(g), s.now
        if not gw.alive:
            return

        def put(new_gw: Gw, base: State = s) -> State:
            return replace(base, gws=_put(base.gws, g, new_gw))

        if gw.paused:
            resumed = put(gw._replace(paused=False))
            if self.owes_abort(resumed, g):
                yield (
                    f"t={now} {name}: resumes, its deadline has passed: aborts (RST)",
                    self.abort(resumed, g),
                    ("resume-abort", "abort"),
                )
            else:
                yield f"t={now} {name}: resumes", resumed, ("resume",)
            return

        inflight = self.inflight(s, g)
        if self.owes_abort(s, g):
            yield (
                f"t={now} {name}: deadline reached with {len(inflight)} in flight: aborts (RST)",
                self.abort(s, g),
                ("abort",),
            )

        if s.faults < c.max_faults:
            more = s.faults + 1
            crashed = replace(
                s,
                faults=more,
                pushes=tuple(
                    p._replace(reset=True) if p.gw == g and p.status != DONE else p for p in s.pushes
                ),
            )
            yield (
                f"t={now} {name}: crashes (kernel resets its sockets)",
                put(gw._replace(alive=False, reply=None), crashed),
                ("crash",),
            )
            yield (
                f"t={now} {name}: paused (SIGSTOP)",
                put(gw._replace(paused=True), replace(s, faults=more)),
                ("pause",),
            )
            if not gw.cut:
                yield (
                    f"t={now} {name}: cut from Redis",
                    put(gw._replace(cut=True), replace(s, faults=more)),
                    ("cut",),
                )

        if gw.notice:
            yield (
                f"t={now} {name}: seal notice arrives",
                put(gw._replace(notice=False, sealed=True)),
                ("notice",),
            )
            yield f"t={now} {name}: seal notice lost", put(gw._replace(notice=False)), ()

        idle = gw.request is None and gw.reply is None
        holds = gw.deadline is not None and now < gw.deadline
        if idle and not holds and not inflight and len(s.pushes) < c.max_pushes:
            yield f"t={now} {name}: sends acquire (t0={now})", put(gw._replace(request=("acquire", now))), ()
        if idle and inflight and gw.deadline is not None:
            yield f"t={now} {name}: sends renew (t0={now})", put(gw._replace(request=("renew", now))), ()
        done = gw.sealed or len(s.pushes) >= c.max_pushes  # nothing more to admit: release
        if idle and not inflight and done and gw.deadline is not None and now >= gw.quiet_until:
            yield (
                f"t={now} {name}: nothing in flight" + (", sealed" if gw.sealed else "") + ": sends release",
                put(gw._replace(request=("release", now), deadline=None)),
                (),
            )

        if holds and not gw.sealed and len(s.pushes) < c.max_pushes:
            n = len(s.pushes) + 1
            yield (
                f"t={now} {name}: admits push#{n}, {now} < deadline {gw.deadline}: written",
                replace(s, pushes=(*s.pushes, Push(g, now))),
                ("admit",),
            )

        for i in inflight:
            p = s.pushes[i]
            if p.status == SERVER:
                yield (
                    f"t={now} {name}: reply to push#{i + 1} arrives",
                    replace(s, pushes=_put(s.pushes, i, p._replace(status=DONE))),
                    ("push-answered",),
                )

        if gw.reply is not None:
            kind, outcome, t0, batch_open = gw.reply
            if outcome == "ok":
                base = t0 if c.deadline_from_request_start else now
                deadline = PASSED if base == PASSED else base + c.ttl - c.margin
                tags = ("renewed",) if kind == "renew" else ("acquired",)
                yield (
                    f"t={now} {name}: {kind} ok arrives"
                    + (
                        f" (t0={t0}): deadline {deadline}"
                        if deadline != PASSED
                        else ": its deadline already passed"
                    )
                    + ("" if batch_open else ", batch not open: sealed"),
                    put(gw._replace(reply=None, deadline=deadline, sealed=not batch_open)),
                    tags,
                )
            elif outcome == "refused":
                yield (
                    f"t={now} {name}: acquire refused arrives: sealed",
                    put(gw._replace(reply=None, sealed=True, deadline=None)),
                    (),
                )
            else:  # lost
                lost = put(gw._replace(reply=None, deadline=None))
                yield (
                    f"t={now} {name}: renewal says lease lost" + (": aborts (RST)" if inflight else ""),
                    self.abort(lost, g) if inflight else lost,
                    ("lease-lost", "abort") if inflight else ("lease-lost",),
                )

    # new protocol: Redis executing a gateway's request (even if the gateway is paused or dead)
    def ledger_steps(self, s: State, g: int) -> Iterator[tuple[str, State, tuple[str, ...]]]:
        c, gw, name, now = self.c, s.gws[g], self.name(g), s.now
        if gw.request is None or gw.cut:
            return
        kind, t0 = gw.request
        expiry = dict(s.leases).get(name)
        leases, tags = s.leases, ()
        if kind == "acquire":
            if s.batch == OPEN:
                leases, outcome, text = _set(s.leases, name, now + c.ttl), "ok", f"lease until {now + c.ttl}"
            else:
                outcome, text = "refused", f"refused ({s.batch})"
        elif kind == "renew":
            if (expiry is not None and expiry > now) or not c.renewal_fails_when_lost:
                leases, outcome, text = _set(s.leases, name, now + c.ttl), "ok", f"lease until {now + c.ttl}"
            else:
                leases, outcome, text = _set(s.leases, name, None), "lost", "lease lost"
        else:
            leases, outcome, text = _set(s.leases, name, None), None, "lease deleted"
            tags = ("released",)
        reply = (kind, outcome, t0, s.batch == OPEN) if outcome is not None and gw.alive else None
        yield (
            f"t={now} Redis executes {name}'s {kind} {'' if t0 == PASSED else f'(t0={t0})'}: {text}",
            replace(s, leases=leases, gws=_put(s.gws, g, gw._replace(request=None, reply=reply))),
            tags,
        )

    def network_steps(self, s: State) -> Iterator[tuple[str, State, tuple[str, ...]]]:
        c, now = self.c, s.now
        for i, p in enumerate(s.pushes):
            if self.deliverable(s, p):
                nxt = replace(
                    s, pushes=_put(s.pushes, i, p._replace(status=SERVER)), late=s.late or s.server_commit
                )
                stall = now - p.written
                tags = ["push-delivered"]
                if stall > c.ttl and WAITING in s.attempts:
                    tags.append("stalled-push-delivered-while-commit-waits")
                if p.reset:
                    tags.append("push-delivered-after-reset")
                if c.protocol == "new" and s.gws[p.gw].paused:
                    tags.append("push-delivered-while-paused")
                who = "" if c.protocol == "old" else f" from {self.name(p.gw)}"
                yield (
                    f"t={now} network delivers push#{i + 1}{who} to the server (written t={p.written},"
                    f" stalled {stall})" + (" AFTER THE COMMIT" if s.server_commit else ""),
                    nxt,
                    tuple(tags),
                )
            if c.protocol == "old" and p.status == SERVER:
                yield (
                    f"t={now} reply to push#{i + 1} arrives: lease removed",
                    replace(
                        s,
                        pushes=_put(s.pushes, i, p._replace(status=DONE)),
                        leases=_set(s.leases, f"push#{i + 1}", None),
                    ),
                    ("push-answered",),
                )

    def commit_steps(self, s: State) -> Iterator[tuple[str, State, tuple[str, ...]]]:
        c, now = self.c, s.now
        for k, phase in enumerate(s.attempts):
            who = f"C{k + 1}"
            if phase == IDLE and s.batch in (OPEN, COMMITTING):
                gws = s.gws
                if c.notifications and c.protocol == "new":
                    gws = tuple(gw._replace(notice=True) if gw.alive else gw for gw in gws)
                yield (
                    f"t={now} {who}: BATCH COMMIT begins: batch {s.batch} -> committing",
                    replace(s, batch=COMMITTING, attempts=_put(s.attempts, k, WAITING), gws=gws),
                    ("commit-begin",),
                )
            elif phase == WAITING:
                live = self.live_leases(s)
                if not live or not c.commit_waits_for_leases:
                    held = [key for key, _ in s.leases]
                    note = f" (expired leases: {', '.join(held)})" if held else ""
                    yield (
                        f"t={now} {who}: no live lease{note}: commit written to the server"
                        if not live
                        else f"t={now} {who}: commit written although leases {live} are live",
                        replace(s, attempts=_put(s.attempts, k, SENT)),
                        ("commit-sent", "commit-sent-over-expired-lease") if held else ("commit-sent",),
                    )
                others_live = any(q in LIVE_PHASES for j, q in enumerate(s.attempts) if j != k)
                reopen = s.batch == COMMITTING and not (c.timeout_reopens_only_if_last and others_live)
                yield (
                    f"t={now} {who}: fence timeout"
                    + (": batch back to open" if reopen else ", batch unchanged"),
                    replace(s, attempts=_put(s.attempts, k, IDLE), batch=OPEN if reopen else s.batch),
                    ("commit-timeout", "commit-timeout-while-another-is-live")
                    if others_live
                    else ("commit-timeout",),
                )
            elif phase == SENT:
                yield (
                    f"t={now} {who}: the server receives BATCH COMMIT",
                    replace(s, attempts=_put(s.attempts, k, DELIVERED), server_commit=True),
                    ("commit-delivered",),
                )
            elif phase == DELIVERED:
                if c.ok_always_commits or s.batch == COMMITTING:
                    batch = COMMITTED
                else:
                    batch = s.batch
                yield (
                    f"t={now} {who}: +OK comes back, ledger finish: batch {s.batch} -> {batch}",
                    replace(s, attempts=_put(s.attempts, k, FINISHED), batch=batch),
                    ("commit-finished",),
                )
