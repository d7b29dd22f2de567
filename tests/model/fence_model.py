"""An explicit-state model of the commit fence (docs/fence.md, /work/fence-v3-spec.md), checked exhaustively.

The promise checked: no command admitted into batch B (a push into B; a child ``BATCH NEW`` is the same
thing) is *handled by the server* after B's ``BATCH COMMIT`` was.

What is modelled
----------------
Gateways G1, G2 (``Config.gateways``), one ledger (Redis), one Faktory server, one batch B, at most
``max_pushes`` client connections each carrying one batch command X ("push#n") and possibly a slow
command ahead of it, and ``commit_attempts`` attempts at ``BATCH COMMIT B`` made by one committing
gateway (not G1/G2: its own lease, if it had one, would be one more lease like theirs). Every step is one
atomic transition; the explorer tries every interleaving (breadth-first: every counterexample it prints
is a shortest one, in steps).

Three protocols (``Config.protocol``):

* ``OLD``, the first design: a lease per push, taken and written in one ledger step, removed when the
  push's reply comes back, expiring after TTL on the ledger's clock; the commit waits until no lease is
  live. Kept for its stall hole.
* ``V2``, today's code (fence v2, gateway/fence.py): one lease per gateway and batch with an expiry on
  the *ledger's* clock (``lease_life`` = the ledger's TTL); local deadline ``start + TTL - MARGIN``; the
  barrier waits only for a FETCH ahead (the model has no FETCH: v2 never waits); a client that hangs up
  makes the session keep the upstream ``linger`` (LINGER_TIMEOUT) for the owed reply, reset it, and
  finish the ticket MARGIN later (``Ticket.lost``), after which a sealed lease is released.
* ``V3``, the spec: beats instead of expiries, the committer's lapse watch on its own clock, the full
  barrier, VALID_FOR = LEASE_LIFE - MARGIN - SERVER_BOUND - WRITE_LAG (see "Findings"), the answer wait
  (``linger`` = ANSWER_CAP) and a hold of MARGIN + SERVER_BOUND after any reset.

Each protocol's parts:

1. Client. A client connects to a running gateway and sends X, either alone or behind a slow command
   (``slow_commands``: any non-batch command that keeps the server busy for any time: a big QUEUE
   REMOVE, a big PUSHB, a reply the client does not read; never a FETCH, the only one V2's barrier waits
   for). The gateway forwards the slow command at once (it is not a batch command). After X was written
   the client may hang up (``hang_ups``).
2. Admission (V2, V3). X is admitted (V3: only once nothing is unanswered ahead of it on its connection,
   the barrier: the slow command answered) locally while the gateway's lease is valid (``now <
   deadline``) and not sealed, or by an ``acquire`` (a fresh token if the gateway holds no lease), whose
   ok reply admits X if the deadline has not passed. The check (``writable()``) and the write are
   ``write_lag`` instants apart at most (A4: a pause between them), during which the gateway does
   nothing else.
3. Ledger requests (acquire, renew, release) are sent at local time t0, executed by Redis at any later
   step (slow requests), answered after any further delay (slow replies); one outstanding request per
   gateway. An ok reply sets ``deadline = max(deadline, t0 + VALID_FOR)``; a reply saying the batch is
   not open seals the lease. V2 renew succeeds only on a live (unexpired) lease; V3 renew on an existing
   field (any state), adding a beat; a failed renewal loses the lease (reset, below).
4. Renewal and release: a gateway may renew whenever its lease has tickets in flight (or never: slow
   renewals), and release its lease whenever it has none (idle or sealed).
5. The local deadline: a running gateway whose deadline has come loses the lease before any time
   passes: it resets (RST) every upstream connection carrying a command admitted under it that is
   unanswered, and never releases it (V2: it expires in the ledger; V3: a committer's watch ends it).
   A paused gateway does this first thing on resuming.
6. Tickets: a ticket (an admitted X) holds its gateway's lease while X is unanswered; after its
   connection was reset it holds it ``hold`` more instants (V2 MARGIN, ``Ticket.lost``; V3 MARGIN +
   SERVER_BOUND), then ends.
7. Hang-up: the client leaves; the gateway keeps the upstream open and reading; if X's reply has not come
   ``linger`` instants later the gateway resets the upstream (V2 LINGER_TIMEOUT after the hang-up; V3
   ANSWER_CAP, the model counting from the hang-up, which is after the write).
8. The server: bytes reach the server's host per A2 and enter the connection's receive queue; a reset
   does not remove what is already there. The server handles X only when the command ahead of it on
   that connection is finished (the slow command: any number of instants, never bounded), and within
   ``server_bound`` instants once X is at the head (A3). The reply to X reaches the gateway later
   (unless the connection was reset). The commit, once the ledger let it go, is handled by the server
   at any later step, then its +OK comes back and the committer records it (``finish_commit``).
9. Commit (V2): begin (open or committing -> committing, seal notices to every gateway, each delivered
   late or lost), then one ledger step when no live lease remains (``commit_go``), the fence timeout
   (withdraws the attempt; reopens if no other attempt is live). Commit (V3): begin + a first
   ``commit_go`` pipelined; each ``commit_go`` is sent with the lapsed map judged from the watch at
   sending, executed by the ledger later (deletes the fields whose beat is still the one judged lapsed;
   GO when none remains; re-seals a batch an abandon reopened), and its reply reaches the committer
   later, updating the watch (an entry starts at the reply's *arrival*; a changed beat restarts it).
   Fence timeout = ``finish_commit(ok=False)``. ``abandons``: a reader may abandon the commit attempts
   at any time (not only after ATTEMPT_LIFE: the spec says safety does not depend on it): committing ->
   committed if an attempt was sent, else open.
10. Faults (at most ``max_faults`` per run, kinds in ``faults``): crash (the process stops forever; the
    kernel resets its sockets, SO_LINGER 0), pause (SIGSTOP for any number of instants, across its
    deadline; not between a check and its write, where A4's lag stands for it), cut from Redis (its
    requests are never executed), and a step of the ledger's clock, forward or backward by 1 ..
    ``clock_step_max`` (V2: lease expiries move; V3 reads no clock in the fence, so the step changes
    nothing but is explored), or past the records' lifetime (V3 with ``leases_hash_expires``, the spec:
    every lease field expires; with the fix, nothing happens).
11. Time: instants (integers). ``tick`` advances every clock by one; gateway clocks are the global one
    (drift 0: the real constants carry a 1 % rate margin, the model does not); the ledger's clock runs at
    the same rate but may step (fault). ``tick`` is not allowed while something must happen at this
    instant: a command at the server's head whose ``server_bound`` is used up, a write whose lag is used
    up, a running gateway's reset at its deadline, and (``timely``) a healthy gateway's ledger request
    or reply, or its renewal when its deadline is one instant away.

``timely`` (Redis answers the committer and every healthy gateway, alive, running and not cut, within
the instant, and such a gateway renews before its deadline) removes the "slow Redis" behaviours: with it
and no fault, a healthy gateway's lease never lapses, which is what "no-fault trace" means in the tests.

Invariants checked in every reachable state
-------------------------------------------
* ``no_push_after_commit``: no admitted X is handled by the server after a commit was handled by it
  (order of the steps; two steps at one instant are ordered too; with ``strict``, only at a later
  instant: see "Time").
* ``ledger_follows_server``: once the server handled a commit and its +OK was recorded, the ledger says
  committed.

Assumptions as the model encodes them
-------------------------------------
* A1: every gateway's clock is the global one (drift 0; the committer's watch and the gateways' deadlines
  read it). The ledger's clock is separate (it steps); V3 never reads it.
* A2: bytes written at instant w enter the server's receive queue at an instant t with t <= w + MARGIN,
  or, while the connection is not reset and its gateway alive and running, t <= w + ``max_delay``
  (``max_delay`` > MARGIN: a live link may stall longer than a lease), or never. The spec's A2 is the
  case ``max_delay`` = MARGIN; the model checks the weaker assumption. A paused gateway's bytes are
  bounded by MARGIN too (the kernel gives up, TCP_USER_TIMEOUT).
* A3: the server handles a connection's commands in order, an admitted X within ``server_bound``
  instants of reaching the head of its queue (bytes that arrived before a reset included); a slow
  command ahead is unbounded.
* A4: at most ``write_lag`` instants between ``writable()`` and the write (spec: MARGIN).
* A5: the ledger is one linearizable Redis: each ledger step is atomic.
* Out of scope: a legal reopen, clock drift, a committer that dies after its commit was sent (the abandon
  covers its attempt), the slow reader (liveness, not safety).

Time, instants and the constants
--------------------------------
Time unit = MARGIN (MARGIN 1; the real MARGIN is 2 s). ``Config`` defaults: SERVER_BOUND 1, WRITE_LAG 1
(= MARGIN, A4), LEASE_LIFE 5, so VALID_FOR = 5 - 1 - 1 - 1 = 2; ANSWER_CAP 1; ``max_delay`` 3 (> MARGIN and
> VALID_FOR: a live link stalls longer than a lease); clock steps of 1..LEASE_LIFE. This keeps the spec's
relations: LEASE_LIFE = VALID_FOR + MARGIN + SERVER_BOUND (+ WRITE_LAG, see Findings), hold = MARGIN +
SERVER_BOUND, ANSWER_CAP > 0. VALID_FOR 2 is the least that lets a renewal keep a lease across an instant
(a renewal must start before the deadline, i.e. at most VALID_FOR - 1 after the previous start).
V2 and OLD: TTL = ``lease_life``; V2's local deadline is ``start + TTL - MARGIN``; ``v2()`` sets TTL 3,
LINGER 2 (> SERVER_BOUND, as 10 s > 8 s), and V2's own assumptions (SERVER_BOUND 0, WRITE_LAG 0, nothing
slow ahead). The tests use smaller settings for the multi-party runs (printed with each result).

Every step happens at an integer instant; steps sharing an instant are explored in every order, and a
chain of causes may take no time. Bounds (A2, A3, A4, the hold, the watch's LEASE_LIFE) are inclusive;
the gateway's guard ``now < deadline`` is strict, as ``writable()``. The invariant counts a push handled
at the commit's instant, after it, as late: the model does not assume that the commit takes time to
reach the server. So a hole of one unit shows, possibly as such a tie; but a tie where the real gap is
exactly zero (a bound met exactly by a protection, the commit's own latency then closing it) shows too.
So the safety checks count ties (the stronger check), and the tests that must find a hole run with
``strict`` (a push handled at a later instant than the commit): their counterexamples are real holes,
and their settings make each removed protection open a gap larger than the model's spare unit. V3 itself
has a unit to spare in the model in every branch of its argument: a write is at least one instant before
the deadline (``now < deadline`` on integers), and a reset that leads to a release (ANSWER_CAP) at least
one instant after the write.

There is no time horizon (unless ``max_time`` is set): states hold only relative times (instants left
until a deadline, the age of a write, ...), capped where larger values can no longer change any step,
and ``now`` (kept for the labels) is not part of a state's identity. So every run explores unbounded
time: a slow command, a pause, a stall last any number of instants.

Reductions (sound: they merge states that no step can tell apart)
-----------------------------------------------------------------
* Relative times, capped (see above); expired V2 leases are dropped (a renewal or a commit treats them
  like absent ones); a lease's deadline is kept as "instants left", 0 meaning reached.
* Beats: the only use of a beat is an equality test between the ledger's current beat of a token and a
  beat seen earlier (watch, lapsed map, reply). Beats of one token only grow, so a beat seen earlier is
  either the current one or stale forever: the model keeps "current / stale" instead of integers, and a
  stale watch entry keeps no age (it can never make the ledger delete anything).
* Tokens: a gateway's tokens are renamed 0, 1, ... in order of creation among those still referenced
  (fresh tokens are always new, so only identity and order matter); watch entries of tokens no longer in
  the ledger are dropped (a lapsed map naming them deletes nothing).
* A ticket that can no longer hold anything forgets its token; a connection whose X can no longer be
  handled by the server and holds no lease is DONE, whatever its history (answered, refused, lost, or
  handled with its reply no longer counted); a finished slow command is the same as none; a dead
  gateway keeps only the request Redis may still execute; a V3 committer's references to leases no
  longer in the ledger are dropped (they delete nothing); with nothing left to admit, "sealed" is
  forgotten.
* The slow command's end and its reply reaching the gateway are one step (V3 waits for the reply before
  admitting X, and nothing else happens on that connection in between: a later reply only delays X's
  admission, which the model allows anyway). While the slow command is busy it may be on its way or at
  the server: either way X behind it cannot be handled, and A2 bounds X's own arrival.
* V3's clock step: the fence reads no ledger clock, so it is not in the state and a step is the identity
  (explored, tagged, outside the fault budget).

Modelling choices that only remove behaviours a real gateway does not have: one outstanding ledger
request per gateway (one Redis connection executes in order); one batch command per client connection;
a gateway renews only while it has tickets in flight; a client hangs up only after X was written (before
that, X is simply never admitted); the V3 committer polls one ``commit_go`` at a time per attempt. Options
that remove behaviours on purpose, to keep a run small, and are named in each test: ``timely``,
``timeouts`` off, ``assign``, ``slow_commands`` / ``hang_ups`` off, ``max_delay`` = MARGIN.

Findings (see tests/model/test_fence_model.py)
----------------------------------------------
* V2 lets an admitted push be handled after the commit with no fault at all (slow command ahead, hang-up,
  linger reset, release), with a step of the ledger's clock, and with the slow command ahead and a pause,
  a crash or a cut from Redis; and its local deadline leaves no room for the server's handling time.
* The spec's VALID_FOR = LEASE_LIFE - MARGIN - SERVER_BOUND does not cover A4: a write may follow its
  ``writable()`` check by up to MARGIN, so what H wrote "before its deadline" can reach the server up to
  2 x MARGIN after it. The model finds that trace with VALID_FOR as written (``ValidFor.SPEC``); with
  WRITE_LAG subtracted (``ValidFor.WITH_WRITE_LAG``, the default) it finds nothing.
* The spec keeps a GC lifetime on the leases hash, refreshed by acquire and renew, on the ledger's clock;
  a forward step longer than that (45 min) expires every lease field at once and the next commit_go
  says GO while admitted pushes are on their way: "no step of the argument reads the ledger's clock" is
  not true of the records. The model finds it (``leases_hash_expires``). Proposed fix (the default
  here): no lifetime on the leases hash (Redis deletes a hash with its last field; a field nobody
  releases is ended by a lapse watch: a committer's, or a GC sweeper's on its own clock). The state
  record's own lifetime is not modelled: with the leases intact its expiry is a reopen followed by an
  adopting begin_commit, which the abandon (any time) already covers.
* Not found by the model (drift 0), but the same kind of gap: the hold after a reset (MARGIN +
  SERVER_BOUND) is measured on the gateway's own clock, which may run 1 % fast (A1); it must be
  (MARGIN + SERVER_BOUND) / (1 - DRIFT) locally, or SERVER_BOUND's slack must be said to cover it.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
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
    deadlocks: int = 0  # states without any successor (in this model: a bug, time can always pass)

    def show(self) -> str:
        head = f"{self.states} states, {self.transitions} transitions, {self.seconds:.2f} s"
        if self.deadlocks:
            head += f", {self.deadlocks} DEADLOCKED states"
        if self.trace is None:
            return head + ": no violation"
        steps = "\n".join(f"  {i:2}. {label}" for i, label in enumerate(self.trace, 1))
        return f"{head}: {self.violated} violated after\n{steps}"


Successors = Callable[[Any], Iterable[tuple[str, Any, tuple[str, ...]]]]


def explore(
    initial: Any,
    successors: Successors,
    invariants: dict[str, Callable[[Any], bool]],
    max_states: int = 3_000_000,
    key: Callable[[Any], Hashable] | None = None,
) -> Result:
    """Breadth-first search over states; stops at the first state breaking an invariant.

    ``successors(state)`` yields ``(label, next_state, tags)``; the tags of every transition taken are
    collected in ``Result.covered`` (coverage). Two states with the same ``key`` (default: the state) are
    one state; the first one found is kept. Returns the shortest trace of labels to a violation.
    """
    key = key or (lambda state: state)
    started = time.perf_counter()
    parent: dict[Hashable, tuple[Hashable, str] | None] = {key(initial): None}
    queue = deque([initial])
    transitions = 0
    deadlocks = 0
    covered: set[str] = set()

    def result(violated: str | None = None, at: Hashable = None) -> Result:
        trace = None
        if violated is not None:
            trace = []
            while parent[at] is not None:
                at, label = parent[at]
                trace.append(label)
            trace.reverse()
        seconds = time.perf_counter() - started
        return Result(len(parent), transitions, seconds, violated, trace, covered, deadlocks)

    for name, holds in invariants.items():
        if not holds(initial):
            return result(name, key(initial))
    while queue:
        state = queue.popleft()
        here = key(state)
        stuck = True
        for label, nxt, tags in successors(state):
            stuck = False
            transitions += 1
            covered.update(tags)
            there = key(nxt)
            if there in parent:
                continue
            parent[there] = (here, label)
            for name, holds in invariants.items():
                if not holds(nxt):
                    return result(name, there)
            if len(parent) > max_states:
                raise RuntimeError(f"more than {max_states} states: lower the bounds")
            queue.append(nxt)
        deadlocks += stuck
    return result()


# --------------------------------------------------------------------------- vocabulary


class Enum(enum.Enum):
    """An enum whose members hash by identity (they are singletons): Enum.__hash__ is Python code,
    and the explorer hashes millions of states made of them."""

    __hash__ = object.__hash__


class Protocol(Enum):
    OLD = "old"  # a lease per push (the first design)
    V2 = "v2"  # one lease per gateway, expiry on the ledger's clock (today's code)
    V3 = "v3"  # beats, the committer's lapse watch, the full barrier (the spec)


class Fault(Enum):
    CRASH = "crash"
    PAUSE = "pause"
    CUT = "cut"
    CLOCK_STEP = "clock-step"


class Batch(Enum):
    OPEN = "open"
    COMMITTING = "committing"
    COMMITTED = "committed"


class Ahead(Enum):
    """The slow command a client put ahead of X on its connection."""

    NONE = "none"  # none, or finished by the server and its reply read by the gateway
    BUSY = "busy"  # written; not finished by the server (on its way, queued or running)


class Cmd(Enum):
    """X, the batch command, on its way."""

    WAITING = "waiting"  # sent by the client, not admitted yet (V3: maybe held by the barrier)
    CHECKED = "checked"  # writable() said yes; the write follows within WRITE_LAG (A4)
    NET = "net"  # written, not yet in the server's receive queue
    QUEUED = "queued"  # in the server's receive queue (behind the slow command, or at the head)
    HANDLED = "handled"  # handled by the server (joined B); its reply is on its way
    ANSWERED = "answered"  # its reply reached the gateway
    LOST = "lost"  # written, and will never reach the server's host (the gateway does not know)
    REFUSED = "refused"  # never written (refused, or its gateway died first)
    DONE = "done"  # normal form of all the above once X holds no lease: nothing about it matters any more


WRITTEN = (Cmd.NET, Cmd.QUEUED, Cmd.HANDLED, Cmd.LOST)


class Kind(Enum):
    ACQUIRE = "acquire"
    RENEW = "renew"
    RELEASE = "release"


class Phase(Enum):
    """A commit attempt, as its committer sees it."""

    IDLE = "idle"
    WAITING = "waiting"  # begun, polling commit_go
    SENT = "sent"  # the ledger said go; the commit is on its way to the server
    HANDLED = "handled"  # the server handled the commit; +OK on its way
    FINISHED = "finished"  # +OK recorded in the ledger


class Field(Enum):
    """A commit attempt's field in the ledger ('w:A' waiting, 's:A' sent)."""

    NONE = "none"
    WAITING = "w"
    SENT = "s"


class Lapse(Enum):
    """V3: how a committer decides that another gateway's lease has lapsed."""

    WATCH = "watch"  # the spec: beat unchanged for LEASE_LIFE on the committer's own clock
    LEDGER_CLOCK = "ledger-clock"  # protection removed: the ledger ages beats on its own clock


class ValidFor(Enum):
    """V3: how long a lease is valid locally after the start of the request that took or renewed it."""

    WITH_WRITE_LAG = "life - margin - server_bound - write_lag"  # the spec, fixed for A4
    SPEC = "life - margin - server_bound"  # the spec as written
    NO_SERVER_BOUND = "life - margin - write_lag"  # protection removed: the server's time forgotten


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    protocol: Protocol = Protocol.V3
    gateways: tuple[str, ...] = ("G1",)
    max_pushes: int = 1
    commit_attempts: int = 1
    faults: frozenset[Fault] = frozenset(Fault)
    max_faults: int = 1
    notices: bool = False  # seal notices (PUBLISH); without them a gateway learns from a reply
    slow_commands: bool = True
    hang_ups: bool = True
    abandons: bool = False  # V3: readers abandon commit attempts
    timeouts: bool = True  # commit attempts may time out (and begin again)
    assign: bool = False  # push#n goes to gateway n (mod the number of gateways); else to any running one
    timely: bool = False
    # Count as late only a push handled at a later instant than the commit (not one that shares the
    # commit's instant, after it): every counterexample is then a real hole, not a tie that the commit's
    # own latency would close. The safety checks leave it off (the stronger check).
    strict: bool = False
    # Time, in instants (MARGIN = 1).
    margin: int = 1
    server_bound: int = 1
    lease_life: int = 5  # V3 LEASE_LIFE; V2 and OLD: the ledger's TTL
    write_lag: int = 1  # A4
    linger: int = 1  # V2 LINGER_TIMEOUT, V3 ANSWER_CAP
    max_delay: int = 3
    clock_step_max: int | None = None  # default: lease_life
    max_time: int | None = None  # a horizon (then ``now`` is part of a state); None: unbounded time
    # V3's protections, each True/spec in the design; the tests remove them one at a time.
    barrier: bool = True
    hold: int | None = None  # instants a reset ticket still holds the lease; default V2 MARGIN, V3 MARGIN+SB
    lapse: Lapse = Lapse.WATCH
    # The spec: the leases hash has a GC lifetime on the ledger's clock (refreshed by acquire and renew).
    # False: the proposed fix (see Findings).
    leases_hash_expires: bool = False
    valid_for: ValidFor = ValidFor.WITH_WRITE_LAG
    # Protections common to V2 and V3.
    abort_at_deadline: bool = True
    deadline_from_request_start: bool = True
    never_release_lost_lease: bool = True
    # V2 (and OLD).
    commit_waits_for_leases: bool = True
    renewal_fails_when_lost: bool = True
    timeout_reopens_only_if_last: bool = True
    ok_always_commits: bool = True

    def describe(self) -> str:
        """The fields that differ from the defaults."""
        default = Config()
        diff = [f"{name}={value!r}" for name, value in vars(self).items() if getattr(default, name) != value]
        return f"Config({', '.join(diff)})"


def v2(**changes: Any) -> Config:
    """Today's code, under its own assumptions: the server handles at once what reaches it (its A2
    counts the server in MARGIN), check and write are one step, the ledger's clock does not step."""
    defaults: dict[str, Any] = dict(
        protocol=Protocol.V2,
        lease_life=3,
        linger=2,  # LINGER_TIMEOUT 10 s > SERVER_BOUND 8 s, as in reality (see "Time")
        server_bound=0,
        write_lag=0,
        slow_commands=False,
        faults=frozenset({Fault.CRASH, Fault.PAUSE, Fault.CUT}),
    )
    defaults.update(changes)
    return Config(**defaults)


# --------------------------------------------------------------------------- state


class Conn(NamedTuple):
    """A client connection: X, maybe a slow command ahead of it, and the ticket of X."""

    gw: int
    ahead: Ahead = Ahead.NONE
    cmd: Cmd = Cmd.WAITING
    token: int = -1  # the lease X holds (its gateway's current token) while its ticket is in flight
    lag_left: int = 0  # CHECKED: instants left until the write must have happened (A4)
    age: int = 0  # NET: instants since the write (A2)
    head_left: int = -1  # QUEUED at the head: instants left for the server to handle it (A3)
    reset: bool = False  # the upstream connection was reset (by the gateway or the kernel)
    gone: bool = False  # the client hung up
    linger_left: int = -1  # after the hang-up: instants until the gateway resets the upstream
    hold_left: int = 0  # after a reset: instants the ticket still holds the lease
    ahead_at_write: bool = False  # the slow command was still busy when X was written (for the traces)


class Lease(NamedTuple):
    token: int
    deadline_left: int  # instants until the local deadline; 0: reached
    sealed: bool = False


class Request(NamedTuple):
    kind: Kind
    token: int
    valid_left: int  # start + VALID_FOR - now (the deadline an ok reply gives), floored at 0
    conn: int = -1  # acquire: the connection whose X it admits
    fresh: bool = False  # acquire with a new token (the gateway held no valid lease)


class Reply(NamedTuple):
    kind: Kind
    token: int
    valid_left: int
    conn: int
    fresh: bool
    ok: bool
    batch_open: bool


class Gw(NamedTuple):
    alive: bool = True
    paused: bool = False
    cut: bool = False  # its requests are never executed
    lease: Lease | None = None
    notice: bool = False  # a seal notice on its way
    request: Request | None = None  # sent, not yet executed by Redis
    reply: Reply | None = None  # on its way back


LeaseRef = tuple[int, int]  # (gateway, token)


class GoReply(NamedTuple):
    go: bool
    remaining: tuple[tuple[int, int, bool], ...]  # (gateway, token, beat still current)
    lapsed: int  # how many lease fields this commit_go deleted (for the traces)


class Attempt(NamedTuple):
    phase: Phase = Phase.IDLE
    request: tuple[LeaseRef, ...] | None = None  # V3: commit_go sent, with the leases judged lapsed
    reply: GoReply | None = None  # V3: its reply on its way


class State(NamedTuple):
    batch: Batch = Batch.OPEN
    # The ledger's lease fields: (gateway, token, value). V2: instants left until expiry on the ledger's
    # clock; V3 with Lapse.LEDGER_CLOCK: age of the last beat on the ledger's clock; else 0. OLD: gateway
    # -1, token = push index, value = expiry.
    leases: tuple[tuple[int, int, int], ...] = ()
    fields: tuple[Field, ...] = ()  # the ledger's attempt fields, one per attempt
    attempts: tuple[Attempt, ...] = ()
    watch: tuple[tuple[int, int, bool, int], ...] = ()  # V3 committer: (gateway, token, current, age)
    gws: tuple[Gw, ...] = ()
    conns: tuple[Conn, ...] = ()
    server_commit: bool = False  # the server handled a BATCH COMMIT
    commit_before: bool = False  # ... at an earlier instant than now
    late: bool = False  # an admitted X was handled after that
    faults: int = 0
    now: int = 0  # for the labels only: not part of the state's identity (see key())


def key(s: State) -> tuple:
    return s[:-1]


def _put(items: tuple, index: int, value: Any) -> tuple:
    return (*items[:index], value, *items[index + 1 :])


Step = tuple[str, State, tuple[str, ...]]


# --------------------------------------------------------------------------- the model


class Model:
    def __init__(self, config: Config):
        c = self.c = config
        self.v3 = c.protocol is Protocol.V3
        life = c.lease_life
        if self.v3:
            self.valid_for = {
                ValidFor.WITH_WRITE_LAG: life - c.margin - c.server_bound - c.write_lag,
                ValidFor.SPEC: life - c.margin - c.server_bound,
                ValidFor.NO_SERVER_BOUND: life - c.margin - c.write_lag,
            }[c.valid_for]
        else:
            self.valid_for = life - c.margin
        default_hold = c.margin + c.server_bound if self.v3 else c.margin
        self.hold = default_hold if c.hold is None else c.hold
        self.step_max = life if c.clock_step_max is None else c.clock_step_max
        self._conn_memo: dict[tuple, Conn] = {}
        if self.valid_for < 1:
            raise ValueError(f"VALID_FOR {self.valid_for} < 1: nothing could ever be admitted")
        if c.timely and self.valid_for < 2:
            raise ValueError("timely renewals need VALID_FOR >= 2 (a renewal per instant)")

    def initial(self) -> State:
        gws = () if self.c.protocol is Protocol.OLD else tuple(Gw() for _ in self.c.gateways)
        n = self.c.commit_attempts
        return State(gws=gws, fields=(Field.NONE,) * n, attempts=(Attempt(),) * n)

    # ---------------------------------------------------------------- invariants

    @staticmethod
    def no_push_after_commit(s: State) -> bool:
        return not s.late

    @staticmethod
    def ledger_follows_server(s: State) -> bool:
        return all(a.phase is not Phase.FINISHED or s.batch is Batch.COMMITTED for a in s.attempts)

    def invariants(self) -> dict[str, Callable[[State], bool]]:
        return {
            "no_push_after_commit": self.no_push_after_commit,
            "ledger_follows_server": self.ledger_follows_server,
        }

    def check(self, max_states: int = 3_000_000) -> Result:
        identity = key if self.c.max_time is None else None
        return explore(self.initial(), self.successors, self.invariants(), max_states, identity)

    # ---------------------------------------------------------------- helpers

    def name(self, g: int) -> str:
        return self.c.gateways[g]

    @staticmethod
    def at(s: State) -> str:
        return f"t={s.now}"

    @staticmethod
    def running(gw: Gw) -> bool:
        return gw.alive and not gw.paused

    def healthy(self, gw: Gw) -> bool:
        return gw.alive and not gw.paused and not gw.cut

    @staticmethod
    def writing(s: State, g: int) -> int | None:
        """The connection whose X gateway g checked and has not written yet (A4): it does nothing else."""
        for i, conn in enumerate(s.conns):
            if conn.gw == g and conn.cmd is Cmd.CHECKED:
                return i
        return None

    @staticmethod
    def inflight(s: State, g: int) -> list[int]:
        return [i for i, conn in enumerate(s.conns) if conn.gw == g and conn.token >= 0]

    @staticmethod
    def at_head(conn: Conn) -> bool:
        return conn.cmd is Cmd.QUEUED and conn.ahead is not Ahead.BUSY

    def owes_lose(self, s: State, g: int) -> bool:
        gw = s.gws[g]
        return gw.lease is not None and gw.lease.deadline_left == 0

    def deliverable(self, s: State, conn: Conn) -> bool:
        """A2: may X, written ``conn.age`` instants ago, enter the server's receive queue now?"""
        if conn.cmd is not Cmd.NET:
            return False
        if self.c.protocol is Protocol.OLD:
            return conn.age <= self.c.max_delay
        gw = s.gws[conn.gw]
        if not conn.reset and gw.alive and not gw.paused and conn.age <= self.c.max_delay:
            return True
        return conn.age <= self.c.margin

    def with_beat(self, s: State, g: int, token: int) -> State:
        """V3: the ledger added a beat to (g, token): every beat of it seen before is stale now."""
        if not self.v3:
            return s
        watch = tuple(
            (h, t, False, 0) if (h, t) == (g, token) else (h, t, cur, age) for h, t, cur, age in s.watch
        )
        attempts = s.attempts
        for k, a in enumerate(attempts):
            new = a
            if a.request and (g, token) in a.request:
                new = new._replace(request=tuple(ref for ref in a.request if ref != (g, token)))
            if a.reply and any((h, t) == (g, token) for h, t, _ in a.reply.remaining):
                remaining = tuple((h, t, cur and (h, t) != (g, token)) for h, t, cur in a.reply.remaining)
                new = new._replace(reply=a.reply._replace(remaining=remaining))
            if new is not a:
                attempts = _put(attempts, k, new)
        return s._replace(watch=watch, attempts=attempts)

    def lose(self, s: State, g: int, reset: bool = True) -> State:
        """Gateway g gives its lease up for good: resets the connections of its unanswered tickets; it
        never releases it (unless that protection is removed)."""
        gw = s.gws[g]
        token = gw.lease.token
        conns = s.conns
        if reset:
            for i, conn in enumerate(s.conns):
                if conn.gw == g and conn.token == token and conn.cmd in WRITTEN and not conn.reset:
                    conns = _put(conns, i, conn._replace(reset=True, hold_left=self.hold))
        new = gw._replace(lease=None)
        if not self.c.never_release_lost_lease and gw.request is None:
            new = new._replace(request=Request(Kind.RELEASE, token, 0))
        return s._replace(conns=conns, gws=_put(s.gws, g, new))

    # ---------------------------------------------------------------- successors

    def successors(self, s: State) -> Iterator[Step]:
        if self.c.protocol is Protocol.OLD:
            steps = [self.old_admissions(s), self.server_steps(s), self.commit_steps(s), self.tick(s)]
        else:
            # The server's steps last, after the tick: among shortest counterexamples BFS then prints one
            # where the server acts as late as it may (the readable order: every order is explored).
            steps = [self.commit_steps(s), self.client_steps(s), self.clock_steps(s)]
            for g in range(len(s.gws)):
                steps += [self.gateway_steps(s, g), self.ledger_steps(s, g)]
            steps += [self.tick(s), self.server_steps(s)]
        for step in steps:
            for label, nxt, tags in step:
                yield label, nxt if nxt is s else self.normalize(nxt), tags

    # clients -----------------------------------------------------------------------------------

    def client_steps(self, s: State) -> Iterator[Step]:
        c, now = self.c, self.at(s)
        if len(s.conns) < c.max_pushes:
            n = len(s.conns) + 1
            for g, gw in enumerate(s.gws):
                if not self.running(gw) or self.writing(s, g) is not None:
                    continue
                if c.assign and g != (n - 1) % len(s.gws):
                    continue
                yield (
                    f"{now} client sends push#{n} to {self.name(g)}",
                    s._replace(conns=(*s.conns, Conn(g))),
                    (),
                )
                if c.slow_commands:
                    yield (
                        f"{now} client sends a slow command and push#{n} in one write to {self.name(g)};"
                        " the slow command is forwarded",
                        s._replace(conns=(*s.conns, Conn(g, ahead=Ahead.BUSY))),
                        ("slow-command-ahead",),
                    )
        if not c.hang_ups:
            return
        for i, conn in enumerate(s.conns):
            gw = s.gws[conn.gw]
            if (
                conn.cmd in WRITTEN
                and not conn.gone
                and not conn.reset
                and conn.token >= 0
                and self.running(gw)
            ):
                yield (
                    f"{now} push#{i + 1}'s client hangs up; {self.name(conn.gw)} keeps the upstream open"
                    " for the reply",
                    s._replace(conns=_put(s.conns, i, conn._replace(gone=True, linger_left=c.linger))),
                    ("hang-up",),
                )

    # the server (and the network to it) ---------------------------------------------------------

    def server_steps(self, s: State) -> Iterator[Step]:
        c, now = self.c, self.at(s)
        for i, conn in enumerate(s.conns):
            push = f"push#{i + 1}"
            if conn.ahead is Ahead.BUSY:
                head = conn.cmd is Cmd.QUEUED
                yield (
                    f"{now} the server finishes the slow command ahead of {push}"
                    + (f": {push} is at the head of its queue" if head else ""),
                    s._replace(
                        conns=_put(
                            s.conns,
                            i,
                            conn._replace(ahead=Ahead.NONE, head_left=c.server_bound if head else -1),
                        )
                    ),
                    ("slow-command-done",),
                )
            if self.deliverable(s, conn):
                tags = ["push-delivered"]
                if conn.reset:
                    tags.append("push-delivered-after-reset")
                if conn.ahead is Ahead.BUSY:
                    tags.append("push-queued-behind-slow-command")
                if conn.age > c.margin:
                    tags.append("push-delivered-after-stall")
                gw = f" from {self.name(conn.gw)}" if s.gws else ""
                head = conn.ahead is not Ahead.BUSY
                yield (
                    f"{now} {push}{gw} reaches the server's receive queue (written {conn.age} ago"
                    + (", connection reset" if conn.reset else "")
                    + (")" if head else ", behind the slow command)"),
                    s._replace(
                        conns=_put(
                            s.conns,
                            i,
                            conn._replace(cmd=Cmd.QUEUED, age=0, head_left=c.server_bound if head else -1),
                        )
                    ),
                    tuple(tags),
                )
            if self.at_head(conn):
                tags = ["push-handled"]
                if conn.reset:
                    tags.append("push-handled-after-reset")
                if conn.ahead_at_write:
                    tags.append("push-handled-after-slow-command")
                if any(a.phase is Phase.WAITING for a in s.attempts):
                    tags.append("push-handled-while-commit-waits")
                late = s.commit_before if c.strict else s.server_commit
                if late:
                    tags.append("push-handled-after-commit")
                yield (
                    f"{now} the server handles {push}"
                    + (" (its connection was reset)" if conn.reset else "")
                    + (
                        ": AFTER THE COMMIT"
                        if late
                        else ", at the commit's instant"
                        if s.server_commit
                        else ""
                    ),
                    s._replace(
                        conns=_put(s.conns, i, conn._replace(cmd=Cmd.HANDLED, head_left=-1)),
                        late=s.late or late,
                    ),
                    tuple(tags),
                )
            if conn.cmd is Cmd.HANDLED and not conn.reset:
                if c.protocol is Protocol.OLD:
                    yield (
                        f"{now} reply to {push} arrives: its lease is removed",
                        s._replace(
                            conns=_put(s.conns, i, conn._replace(cmd=Cmd.ANSWERED)),
                            leases=tuple(e for e in s.leases if e[:2] != (-1, i)),
                        ),
                        ("push-answered",),
                    )
                elif self.running(s.gws[conn.gw]) and self.writing(s, conn.gw) is None:
                    yield (
                        f"{now} {self.name(conn.gw)} reads the reply to {push}",
                        s._replace(conns=_put(s.conns, i, conn._replace(cmd=Cmd.ANSWERED))),
                        ("push-answered",),
                    )

    # OLD: a lease per push ---------------------------------------------------------------------

    def old_admissions(self, s: State) -> Iterator[Step]:
        if s.batch is not Batch.OPEN or len(s.conns) >= self.c.max_pushes:
            return
        n = len(s.conns)
        for g, gname in enumerate(self.c.gateways):
            yield (
                f"{self.at(s)} {gname}: ledger admits push#{n + 1} (lease until t={s.now + self.c.lease_life});"
                " push written",
                s._replace(
                    conns=(*s.conns, Conn(g, cmd=Cmd.NET)),
                    leases=(*s.leases, (-1, n, self.c.lease_life)),
                ),
                ("admit",),
            )

    # a gateway's own steps (V2, V3) ---------------------------------------------------------------

    def gateway_steps(self, s: State, g: int) -> Iterator[Step]:
        c, gw, name, now = self.c, s.gws[g], self.name(g), self.at(s)
        if not gw.alive:
            return

        def put(new: Gw, base: State = s) -> State:
            return base._replace(gws=_put(base.gws, g, new))

        writing = self.writing(s, g)
        if s.faults < c.max_faults:
            more = s.faults + 1
            if Fault.CRASH in c.faults:
                conns = tuple(
                    conn._replace(reset=True)
                    if conn.gw == g and conn.cmd in WRITTEN
                    else conn._replace(cmd=Cmd.REFUSED)
                    if conn.gw == g and conn.cmd in (Cmd.WAITING, Cmd.CHECKED)
                    else conn
                    for conn in s.conns
                )
                yield (
                    f"{now} {name} crashes (the kernel resets its connections)",
                    put(gw._replace(alive=False), s._replace(conns=conns, faults=more)),
                    ("crash",),
                )
            if Fault.PAUSE in c.faults and not gw.paused and writing is None:
                yield (
                    f"{now} {name} is paused (SIGSTOP)",
                    put(gw._replace(paused=True), s._replace(faults=more)),
                    ("pause",),
                )
            if Fault.CUT in c.faults and not gw.cut:
                yield (
                    f"{now} {name} is cut from Redis",
                    put(gw._replace(cut=True), s._replace(faults=more)),
                    ("cut",),
                )

        if gw.paused:
            resumed = put(gw._replace(paused=False))
            if self.owes_lose(resumed, g):
                yield (
                    f"{now} {name} resumes; its deadline has passed: resets its connections, lease lost",
                    self.lose(resumed, g, c.abort_at_deadline),
                    ("resume-abort", "abort"),
                )
            else:
                yield f"{now} {name} resumes", resumed, ("resume",)
            return

        if writing is not None:  # inside the step that checked writable(): nothing else until the write
            conn = s.conns[writing]
            late = gw.lease is None or gw.lease.deadline_left == 0
            yield (
                f"{now} {name} writes push#{writing + 1}"
                + (" (its deadline has passed since the check)" if late else "")
                + (" behind the busy slow command" if conn.ahead is Ahead.BUSY else ""),
                s._replace(
                    conns=_put(
                        s.conns,
                        writing,
                        conn._replace(
                            cmd=Cmd.NET, lag_left=0, age=0, ahead_at_write=conn.ahead is Ahead.BUSY
                        ),
                    )
                ),
                ("written-after-deadline",) if late else ("written",),
            )
            return

        lease = gw.lease
        inflight = self.inflight(s, g)
        if self.owes_lose(s, g):
            n = sum(1 for i in inflight if s.conns[i].cmd in WRITTEN and not s.conns[i].reset)
            yield (
                f"{now} {name}: deadline reached"
                + (f": resets {n} connection(s) (RST)" if n and c.abort_at_deadline else "")
                + ", lease lost",
                self.lose(s, g, c.abort_at_deadline),
                ("abort",) if n else ("deadline-passed",),
            )

        if gw.notice:
            sealed = gw._replace(notice=False, lease=lease._replace(sealed=True) if lease else None)
            yield f"{now} {name}: seal notice arrives", put(sealed), ("notice",)
            yield f"{now} {name}: seal notice lost", put(gw._replace(notice=False)), ()

        valid = lease is not None and lease.deadline_left > 0
        idle = gw.request is None and gw.reply is None
        for i, conn in enumerate(s.conns):
            if conn.gw != g or conn.cmd is not Cmd.WAITING:
                continue
            blocked = conn.ahead is Ahead.BUSY and self.v3 and c.barrier
            if blocked:
                continue
            if valid and not lease.sealed:
                deadline = s.now + lease.deadline_left
                yield (
                    f"{now} {name} admits push#{i + 1} locally ({s.now} < deadline {deadline})"
                    + self.write_note(conn),
                    self.admit(s, i, lease.token),
                    self.admit_tags(conn),
                )
            elif idle and (lease is None or valid):
                # A sealed valid lease is asked again under its token; otherwise a fresh token (the
                # deadline of a lease that passed it is acted on first: it is lost, never revived).
                fresh = lease is None
                token = self.fresh_token(s, g) if fresh else lease.token
                yield (
                    f"{now} {name} sends acquire for push#{i + 1} (start {s.now})",
                    put(gw._replace(request=Request(Kind.ACQUIRE, token, self.valid_for, i, fresh))),
                    (),
                )
        if idle and valid and inflight:
            yield (
                f"{now} {name} sends renew (start {s.now})",
                put(gw._replace(request=Request(Kind.RENEW, lease.token, self.valid_for))),
                (),
            )
        if idle and valid and not inflight:
            yield (
                f"{now} {name}: no ticket in flight"
                + (", sealed" if lease.sealed else "")
                + ": sends release",
                put(gw._replace(request=Request(Kind.RELEASE, lease.token, 0), lease=None)),
                ("release-sent",),
            )

        for i, conn in enumerate(s.conns):
            if conn.gw == g and conn.gone and conn.linger_left == 0 and conn.token >= 0 and not conn.reset:
                what = "ANSWER_CAP" if self.v3 else "LINGER_TIMEOUT"
                yield (
                    f"{now} {name}: no reply to push#{i + 1} within {what}: resets the upstream"
                    f" (its ticket holds the lease {self.hold} more)",
                    s._replace(conns=_put(s.conns, i, conn._replace(reset=True, hold_left=self.hold))),
                    ("hang-up-reset",),
                )

        if gw.reply is not None:
            yield from self.reply_arrives(s, g)

    def write_note(self, conn: Conn) -> str:
        busy = " behind the busy slow command" if conn.ahead is Ahead.BUSY else ""
        return f": writes it{busy}" if self.c.write_lag == 0 else f": the write follows{busy}"

    @staticmethod
    def admit_tags(conn: Conn) -> tuple[str, ...]:
        return ("admit", "admitted-behind-busy-slow-command") if conn.ahead is Ahead.BUSY else ("admit",)

    def admit(self, s: State, i: int, token: int) -> State:
        conn = s.conns[i]
        if self.c.write_lag == 0:
            new = conn._replace(cmd=Cmd.NET, token=token, age=0, ahead_at_write=conn.ahead is Ahead.BUSY)
        else:
            new = conn._replace(cmd=Cmd.CHECKED, token=token, lag_left=self.c.write_lag)
        return s._replace(conns=_put(s.conns, i, new))

    def reply_arrives(self, s: State, g: int) -> Iterator[Step]:
        c, gw, name, now = self.c, s.gws[g], self.name(g), self.at(s)
        reply, lease = gw.reply, gw.lease
        cleared = gw._replace(reply=None)
        valid_left = reply.valid_left if c.deadline_from_request_start else self.valid_for
        mine = lease is not None and lease.token == reply.token
        if reply.kind is Kind.ACQUIRE:
            i = reply.conn
            conn = s.conns[i]
            # Granted: the lease it asked under is still this gateway's (or it asked for a new one and
            # holds none). A lease given up while asking is never revived (fence.admit: lease.lost).
            if reply.ok and (mine or (reply.fresh and lease is None)):
                deadline_left = max(valid_left, lease.deadline_left if mine else 0)
                new_lease = Lease(reply.token, deadline_left, lease.sealed if mine else False)
                base = s._replace(gws=_put(s.gws, g, cleared._replace(lease=new_lease)))
                deadline = s.now + deadline_left
                if conn.cmd is Cmd.WAITING and deadline_left > 0:
                    yield (
                        f"{now} {name}: acquire ok arrives (deadline {deadline}): admits push#{i + 1}"
                        + self.write_note(conn),
                        self.admit(base, i, reply.token),
                        ("acquired", *self.admit_tags(conn)),
                    )
                else:
                    yield (
                        f"{now} {name}: acquire ok arrives, deadline {deadline} already passed: push#{i + 1} refused",
                        base._replace(conns=_put(s.conns, i, conn._replace(cmd=Cmd.REFUSED))),
                        ("acquired",),
                    )
            else:
                new_gw = cleared._replace(lease=lease._replace(sealed=True)) if mine else cleared
                yield (
                    f"{now} {name}: acquire refused arrives (batch not open): push#{i + 1} refused",
                    s._replace(
                        gws=_put(s.gws, g, new_gw), conns=_put(s.conns, i, conn._replace(cmd=Cmd.REFUSED))
                    ),
                    ("acquire-refused",),
                )
            return
        if not mine:
            yield (
                f"{now} {name}: {reply.kind.value} reply for a lease it gave up arrives: ignored",
                s._replace(gws=_put(s.gws, g, cleared)),
                (),
            )
            return
        if reply.ok:
            deadline_left = max(valid_left, lease.deadline_left)
            new_lease = Lease(lease.token, deadline_left, lease.sealed or not reply.batch_open)
            yield (
                f"{now} {name}: renew ok arrives (deadline {s.now + deadline_left})"
                + ("" if reply.batch_open else ", batch not open: sealed"),
                s._replace(gws=_put(s.gws, g, cleared._replace(lease=new_lease))),
                ("renewed",),
            )
        else:
            base = s._replace(gws=_put(s.gws, g, cleared))
            yield (
                f"{now} {name}: renewal says the lease is gone: resets its connections, lease lost",
                self.lose(base, g),
                ("lease-lost",),
            )

    # Redis executing a gateway's request (even if the gateway is paused or dead) ------------------

    def ledger_steps(self, s: State, g: int) -> Iterator[Step]:
        c, gw, name, now = self.c, s.gws[g], self.name(g), self.at(s)
        request = gw.request
        if request is None or gw.cut:
            return
        fields = {(h, t): v for h, t, v in s.leases}
        ref = (g, request.token)
        is_open = s.batch is Batch.OPEN
        fresh_value = 0 if self.v3 else c.lease_life
        base, tags = s, ()
        if request.kind is Kind.RELEASE:
            fields.pop(ref, None)
            ok, text, tags = True, "lease field deleted", ("released",)
        elif request.kind is Kind.ACQUIRE:
            ok = is_open
            if ok:
                fields[ref] = fresh_value
                base = self.with_beat(s, *ref)
                text = "lease taken" if self.v3 else f"lease until t={s.now + c.lease_life} (ledger clock)"
            else:
                text = f"refused ({s.batch.value})"
        else:  # renew
            ok = ref in fields or not c.renewal_fails_when_lost
            if ok:
                fields[ref] = fresh_value
                base = self.with_beat(s, *ref)
                text = "beat" if self.v3 else f"lease until t={s.now + c.lease_life} (ledger clock)"
            else:
                text = "no such lease: renewal fails"
        reply = None
        if request.kind is not Kind.RELEASE and gw.alive:
            reply = Reply(
                request.kind, request.token, request.valid_left, request.conn, request.fresh, ok, is_open
            )
        leases = tuple(sorted((h, t, v) for (h, t), v in fields.items()))
        yield (
            f"{now} Redis executes {name}'s {request.kind.value}: {text}",
            base._replace(leases=leases, gws=_put(base.gws, g, gw._replace(request=None, reply=reply))),
            tags,
        )

    # the ledger's clock -------------------------------------------------------------------------

    def clock_steps(self, s: State) -> Iterator[Step]:
        c = self.c
        if Fault.CLOCK_STEP not in c.faults:
            return
        if self.v3 and c.lapse is Lapse.WATCH:
            # Nothing in V3's fence reads the ledger's clock, so it is not part of the state and a step
            # leads back to the same state: explored (its tag is recorded), and outside the fault budget
            # (a budget spent on a step that changes nothing would only double the states).
            for sign, tag in (("+", "clock-step-forward"), ("-", "clock-step-backward")):
                yield (
                    f"{self.at(s)} the ledger's clock steps {sign}(any amount): the fence reads no ledger clock",
                    s,
                    ("clock-step", tag),
                )
            # A forward step longer than the records' lifetime (45 min: any amount is a fault here). The
            # spec keeps a GC lifetime on the leases hash, on the ledger's clock: the step expires every
            # lease field at once. With the fix (no lifetime on the hash: Redis deletes it when its last
            # field goes; fields nobody releases are ended by a lapse watch) the step changes nothing.
            if c.leases_hash_expires and s.faults < c.max_faults and s.leases:
                yield (
                    f"{self.at(s)} the ledger's clock steps past the records' lifetime: the leases hash expires",
                    s._replace(leases=(), faults=s.faults + 1),
                    ("clock-step", "clock-step-forward", "leases-hash-expired"),
                )
            elif s.leases:
                yield (
                    f"{self.at(s)} the ledger's clock steps past the records' lifetime: the leases hash has none",
                    s,
                    ("clock-step", "clock-step-forward", "clock-step-past-record-lifetime"),
                )
            return
        if s.faults >= c.max_faults:
            return
        for amount in range(1, self.step_max + 1):
            for sign in (1, -1):
                leases = s.leases
                note = ""
                if c.protocol is Protocol.V2:
                    leases = tuple((h, t, v - sign * amount) for h, t, v in s.leases)
                    expired = [f"{self.name(h)}#{t}" for h, t, v in leases if v <= 0]
                    note = f" (lease {', '.join(expired)} expires)" if expired else ""
                else:  # V3 with the lapse judged on the ledger's clock: the beats' ages move
                    leases = tuple(
                        (h, t, max(-self.step_max, min(c.lease_life, v + sign * amount)))
                        for h, t, v in s.leases
                    )
                yield (
                    f"{self.at(s)} the ledger's clock steps {'+' if sign > 0 else '-'}{amount}{note}",
                    s._replace(leases=leases, faults=s.faults + 1),
                    ("clock-step", "clock-step-forward" if sign > 0 else "clock-step-backward"),
                )

    # commits ------------------------------------------------------------------------------------

    def seal(self, s: State, k: int) -> State:
        """The batch is committing with attempt k waiting; every live gateway gets a seal notice."""
        gws = s.gws
        if self.c.notices:
            gws = tuple(gw._replace(notice=True) if gw.alive else gw for gw in gws)
        return s._replace(batch=Batch.COMMITTING, fields=_put(s.fields, k, Field.WAITING), gws=gws)

    def lapsed(self, s: State) -> tuple[LeaseRef, ...]:
        life = self.c.lease_life
        return tuple((h, t) for h, t, cur, age in s.watch if cur and age >= life)

    def commit_steps(self, s: State) -> Iterator[Step]:
        c, now = self.c, self.at(s)
        for k, a in enumerate(s.attempts):
            who = f"C{k + 1}"
            put = lambda new, base=s, k=k: base._replace(attempts=_put(base.attempts, k, new))  # noqa: E731
            if a.phase is Phase.IDLE and s.batch in (Batch.OPEN, Batch.COMMITTING):
                begun = self.seal(s, k)
                if self.v3:
                    first = self.lapsed(s) if c.lapse is Lapse.WATCH else ()
                    begun = put(Attempt(Phase.WAITING, request=first), begun)
                    label = f"{now} {who}: begin_commit ({s.batch.value} -> committing) and a first commit_go sent"
                else:
                    begun = put(Attempt(Phase.WAITING), begun)
                    label = f"{now} {who}: BATCH COMMIT begins: batch {s.batch.value} -> committing"
                yield label, begun, ("commit-begin",)
            elif a.phase is Phase.WAITING and self.v3:
                yield from self.v3_waiting(s, k)
            elif a.phase is Phase.WAITING:
                live = [f"{self.name(h)}#{t}" if h >= 0 else f"push#{t + 1}" for h, t, _ in s.leases]
                if not live or not c.commit_waits_for_leases:
                    yield (
                        f"{now} {who}: commit_go: no live lease: the commit is sent to the server"
                        if not live
                        else f"{now} {who}: commit sent although leases {live} are live",
                        put(a._replace(phase=Phase.SENT), s._replace(fields=_put(s.fields, k, Field.SENT))),
                        ("commit-sent",),
                    )
                yield from self.timeout(s, k)
            elif a.phase is Phase.SENT:
                yield (
                    f"{now} {who}: the server handles BATCH COMMIT",
                    put(a._replace(phase=Phase.HANDLED), s._replace(server_commit=True)),
                    ("commit-handled",),
                )
            elif a.phase is Phase.HANDLED:
                committed = c.ok_always_commits or s.batch is Batch.COMMITTING
                batch = Batch.COMMITTED if committed else s.batch
                fields = (Field.NONE,) * len(s.fields) if committed else s.fields
                yield (
                    f"{now} {who}: +OK comes back, finish_commit: batch {s.batch.value} -> {batch.value}",
                    put(a._replace(phase=Phase.FINISHED), s._replace(batch=batch, fields=fields)),
                    ("commit-finished",),
                )
        if c.abandons and s.batch is Batch.COMMITTING:
            sent = Field.SENT in s.fields
            batch = Batch.COMMITTED if sent else Batch.OPEN
            yield (
                f"{now} a reader abandons the commit attempts: batch -> {batch.value}",
                s._replace(batch=batch, fields=(Field.NONE,) * len(s.fields)),
                ("abandon-committed",) if sent else ("abandon-reopened",),
            )

    def timeout(self, s: State, k: int) -> Iterator[Step]:
        """finish_commit(ok=False): the attempt's field goes; the batch reopens if no other remains."""
        c = self.c
        if not c.timeouts:
            return
        fields = _put(s.fields, k, Field.NONE)
        others = any(f is not Field.NONE for f in fields)
        reopen = s.batch is Batch.COMMITTING and not (c.timeout_reopens_only_if_last and others)
        yield (
            f"{self.at(s)} C{k + 1}: fence timeout"
            + (": batch back to open" if reopen else ", batch unchanged"),
            s._replace(
                fields=fields,
                attempts=_put(s.attempts, k, Attempt()),
                batch=Batch.OPEN if reopen else s.batch,
            ),
            ("commit-timeout", "commit-timeout-while-another-is-live") if others else ("commit-timeout",),
        )

    def v3_waiting(self, s: State, k: int) -> Iterator[Step]:
        c, now, a, who = self.c, self.at(s), s.attempts[k], f"C{k + 1}"

        def put(new: Attempt, base: State = s) -> State:
            return base._replace(attempts=_put(base.attempts, k, new))

        if a.request is None and a.reply is None:
            lapsed = self.lapsed(s) if c.lapse is Lapse.WATCH else ()
            names = ", ".join(f"{self.name(h)}#{t}" for h, t in lapsed)
            yield (
                f"{now} {who}: sends commit_go" + (f" (lapsed: {names})" if names else ""),
                put(a._replace(request=lapsed)),
                (),
            )
            yield from self.timeout(s, k)
        elif a.request is not None:
            if s.batch is Batch.COMMITTED:
                reply, base, text, tags = GoReply(True, (), 0), s, "committed already: GO", ()
            elif s.batch is Batch.OPEN:
                base = self.seal(s, k)
                remaining = tuple((h, t, True) for h, t, _ in s.leases)
                reply, text, tags = (
                    GoReply(False, remaining, 0),
                    "batch open again: seals it anew, WAIT",
                    ("reseal",),
                )
            else:
                if c.lapse is Lapse.WATCH:
                    gone = [(h, t) for h, t, _ in s.leases if (h, t) in a.request]
                else:
                    gone = [(h, t) for h, t, v in s.leases if v >= c.lease_life]
                leases = tuple(e for e in s.leases if e[:2] not in gone)
                deleted = f"deletes {', '.join(f'{self.name(h)}#{t}' for h, t in gone)}" if gone else ""
                tags = (
                    ("lease-lapsed-by-watch",)
                    if gone and c.lapse is Lapse.WATCH
                    else ("lease-lapsed-by-ledger-clock",)
                    if gone
                    else ()
                )
                if leases:
                    base = s._replace(leases=leases, fields=_put(s.fields, k, Field.WAITING))
                    remaining = tuple((h, t, True) for h, t, _ in leases)
                    reply = GoReply(False, remaining, 0)
                    held = ", ".join(f"{self.name(h)}#{t}" for h, t, _ in leases)
                    text = (deleted + "; " if deleted else "") + f"{held} remain: WAIT"
                else:
                    base = s._replace(leases=leases, fields=_put(s.fields, k, Field.SENT))
                    reply = GoReply(True, (), len(gone))
                    text = (deleted + "; " if deleted else "") + "no lease remains: GO"
            yield (
                f"{now} Redis executes {who}'s commit_go: {text}",
                put(a._replace(request=None, reply=reply), base),
                tags,
            )
        else:
            reply = a.reply
            watch = {(h, t): (cur, age) for h, t, cur, age in s.watch}
            for h, t, cur in reply.remaining:
                seen = watch.get((h, t))
                if not (seen and seen[0] and cur):
                    watch[(h, t)] = (cur, 0)
            new_watch = tuple(sorted((h, t, cur, age) for (h, t), (cur, age) in watch.items()))
            if reply.go:
                yield (
                    f"{now} {who}: GO arrives: the commit is sent to the server",
                    put(Attempt(Phase.SENT), s._replace(watch=new_watch)),
                    ("commit-sent", "commit-sent-after-lapse") if reply.lapsed else ("commit-sent",),
                )
            else:
                yield (
                    f"{now} {who}: WAIT arrives (watch updated)",
                    put(a._replace(reply=None), s._replace(watch=new_watch)),
                    (),
                )

    # time ---------------------------------------------------------------------------------------

    def urgent(self, s: State) -> bool:
        """Something must happen at this instant: time cannot pass."""
        c = self.c
        if c.timely and any(a.request is not None or a.reply is not None for a in s.attempts):
            return True  # Redis answers the committer within the instant too
        for conn in s.conns:
            if conn.head_left == 0 and self.at_head(conn):
                return True  # A3
            if conn.cmd is Cmd.CHECKED and conn.lag_left == 0:
                return True  # A4
        for g, gw in enumerate(s.gws):
            if self.running(gw) and self.writing(s, g) is None and self.owes_lose(s, g):
                return True  # the deadline timer of a running gateway
            if c.timely and self.healthy(gw):  # Redis answers it within the instant; it renews in time
                if gw.request is not None or gw.reply is not None:
                    return True
                if gw.lease is not None and gw.lease.deadline_left <= 1 and self.inflight(s, g):
                    return True
        return False

    def tick(self, s: State) -> Iterator[Step]:
        if self.urgent(s) or (self.c.max_time is not None and s.now >= self.c.max_time):
            return
        c = self.c
        conns = []
        for conn in s.conns:
            if conn.cmd is Cmd.CHECKED:
                conn = conn._replace(lag_left=conn.lag_left - 1)
            elif conn.cmd is Cmd.NET:
                conn = conn._replace(age=conn.age + 1)
            elif conn.head_left > 0:
                conn = conn._replace(head_left=conn.head_left - 1)
            if conn.linger_left > 0:
                conn = conn._replace(linger_left=conn.linger_left - 1)
            if conn.hold_left > 0:
                conn = conn._replace(hold_left=conn.hold_left - 1)
            conns.append(conn)
        gws = []
        for gw in s.gws:
            if gw.lease is not None and gw.lease.deadline_left > 0:
                gw = gw._replace(lease=gw.lease._replace(deadline_left=gw.lease.deadline_left - 1))
            if gw.request is not None and gw.request.valid_left > 0:
                gw = gw._replace(request=gw.request._replace(valid_left=gw.request.valid_left - 1))
            if gw.reply is not None and gw.reply.valid_left > 0:
                gw = gw._replace(reply=gw.reply._replace(valid_left=gw.reply.valid_left - 1))
            gws.append(gw)
        expiring: list[str] = []
        if self.v3:
            leases = s.leases
            if c.lapse is Lapse.LEDGER_CLOCK:
                leases = tuple((h, t, min(v + 1, c.lease_life)) for h, t, v in s.leases)
        else:
            leases = tuple((h, t, v - 1) for h, t, v in s.leases)
            expiring = [f"push#{t + 1}" if h < 0 else f"{self.name(h)}#{t}" for h, t, v in leases if v <= 0]
        watch = tuple((h, t, cur, min(age + 1, c.lease_life) if cur else 0) for h, t, cur, age in s.watch)
        note = f" ({', '.join(expiring)} lease expires)" if expiring else ""
        yield (
            f"t={s.now} -> t={s.now + 1}{note}",
            s._replace(
                now=s.now + 1,
                conns=tuple(conns),
                gws=tuple(gws),
                leases=leases,
                watch=watch,
                commit_before=s.server_commit and c.strict,  # only read in strict mode
            ),
            ("lease-expired",) if expiring else (),
        )

    # ---------------------------------------------------------------- normal form

    def normalize(self, s: State) -> State:
        """Forget what can no longer matter, so that equivalent states are one state (module doc)."""
        old = self.c.protocol is Protocol.OLD
        leases = s.leases
        if not self.v3 and leases and any(v <= 0 for _, _, v in leases):
            leases = tuple(e for e in leases if e[2] > 0)
        gws = s.gws
        if not all(gw.alive for gw in gws):
            gws = tuple(
                gw if gw.alive else Gw(alive=False, cut=gw.cut and gw.request is not None, request=gw.request)
                for gw in gws
            )
        conns = s.conns
        if old:
            conns = tuple(self.old_conn(conn) for conn in conns)
        else:
            normal = [self.norm_conn(conn, gws[conn.gw]) for conn in conns]
            if any(a is not b for a, b in zip(normal, conns, strict=False)):
                conns = tuple(normal)
            # A lease with nothing left to admit: sealed or not makes no difference.
            if len(conns) >= self.c.max_pushes:
                for g, gw in enumerate(gws):
                    if (gw.notice or (gw.lease is not None and gw.lease.sealed)) and gw.alive:
                        if not any(conn.gw == g and conn.cmd is Cmd.WAITING for conn in conns):
                            lease = gw.lease._replace(sealed=False) if gw.lease else None
                            gws = _put(gws, g, gw._replace(notice=False, lease=lease))
        if leases is not s.leases or gws is not s.gws or conns is not s.conns:
            s = s._replace(leases=leases, gws=gws, conns=conns)
        if self.v3:
            s = self.canonical_v3(s)
        elif not old:
            s = self.canonical_tokens(s)
        return s

    def old_conn(self, conn: Conn) -> Conn:
        if conn.cmd is Cmd.NET and conn.age > self.c.max_delay:
            return Conn(conn.gw, cmd=Cmd.LOST)
        if conn.cmd in (Cmd.ANSWERED, Cmd.HANDLED):
            return Conn(conn.gw, cmd=conn.cmd)
        return conn

    def norm_conn(self, conn: Conn, gw: Gw) -> Conn:
        """A connection in normal form, given its gateway (memoized: the same pairs recur)."""
        lease_token = gw.lease.token if gw.lease is not None else -1
        memo = (conn, gw.alive, lease_token)
        try:
            return self._conn_memo[memo]
        except KeyError:
            pass
        c, new = self.c, conn
        if new.cmd is Cmd.NET and new.age > c.margin and (new.reset or not gw.alive or new.age > c.max_delay):
            new = new._replace(cmd=Cmd.LOST, age=0)  # A2: it will never arrive
        if new.cmd is Cmd.WAITING and not gw.alive:
            new = new._replace(cmd=Cmd.REFUSED)
        if new.token >= 0:
            holds = new.token == lease_token and (
                new.cmd is Cmd.CHECKED or (new.cmd in WRITTEN and (not new.reset or new.hold_left > 0))
            )
            if not holds:
                new = new._replace(token=-1, hold_left=0)
        if (new.token < 0 or new.reset) and (new.hold_left or new.gone or new.linger_left >= 0):
            # The hang-up only matters to a ticket in flight on an open connection; the hold only to a
            # ticket in flight.
            new = new._replace(gone=False, linger_left=-1, hold_left=new.hold_left if new.token >= 0 else 0)
        if new.cmd in (Cmd.ANSWERED, Cmd.REFUSED) or (new.cmd in (Cmd.LOST, Cmd.HANDLED) and new.token < 0):
            # Finished: it can no longer be handled by the server and holds no lease (a HANDLED one's
            # reply may still come, to a gateway that no longer counts it).
            new = Conn(new.gw, cmd=Cmd.DONE)
        self._conn_memo[memo] = new
        return new

    def canonical_v3(self, s: State) -> State:
        """The committer's references to leases no longer in the ledger can delete nothing: dropped, so
        that every reference to a token is in the ledger or at its gateway."""
        watch = s.watch
        if self.c.lapse is Lapse.LEDGER_CLOCK:
            watch = ()
        busy = watch or any(a.request or a.reply is not None for a in s.attempts)
        if busy:
            present = {(h, t) for h, t, _ in s.leases}
            if any((h, t) not in present for h, t, _, _ in watch):
                watch = tuple(e for e in watch if e[:2] in present)
            attempts = s.attempts
            for k, a in enumerate(attempts):
                new = a
                if a.request and any(ref not in present for ref in a.request):
                    new = new._replace(request=tuple(r for r in a.request if r in present))
                if a.reply is not None and any((h, t) not in present for h, t, _ in a.reply.remaining):
                    remaining = tuple(e for e in a.reply.remaining if e[:2] in present)
                    new = new._replace(reply=a.reply._replace(remaining=remaining))
                if new is not a:
                    attempts = _put(attempts, k, new)
            if watch is not s.watch or attempts is not s.attempts:
                s = s._replace(watch=watch, attempts=attempts)
        elif watch is not s.watch:
            s = s._replace(watch=watch)
        return self.canonical_tokens(s)

    @staticmethod
    def token_refs(s: State) -> set[LeaseRef]:
        """Every (gateway, token) the state refers to (after canonical_v3, the committer's are in the
        ledger's)."""
        refs = {(h, t) for h, t, _ in s.leases}
        for g, gw in enumerate(s.gws):
            if gw.lease is not None:
                refs.add((g, gw.lease.token))
            if gw.request is not None:
                refs.add((g, gw.request.token))
            if gw.reply is not None:
                refs.add((g, gw.reply.token))
        for conn in s.conns:
            if conn.token >= 0:
                refs.add((conn.gw, conn.token))
        return refs

    def fresh_token(self, s: State, g: int) -> int:
        return 1 + max((t for h, t in self.token_refs(s) if h == g), default=-1)

    def canonical_tokens(self, s: State) -> State:
        """Rename each gateway's tokens 0, 1, ... in order, keeping only those still referenced."""
        if (
            all(t == 0 for _, t, _ in s.leases)
            and all(
                (gw.lease is None or gw.lease.token == 0)
                and (gw.request is None or gw.request.token == 0)
                and (gw.reply is None or gw.reply.token == 0)
                for gw in s.gws
            )
            and all(conn.token <= 0 for conn in s.conns)
        ):
            return s  # every token in use is 0: already canonical
        refs = self.token_refs(s)
        renames: dict[int, dict[int, int]] = {}
        for g in range(len(s.gws)):
            used = sorted(t for h, t in refs if h == g)
            if used != list(range(len(used))):
                renames[g] = {t: n for n, t in enumerate(used)}
        if not renames:
            return s

        def r(g: int, t: int) -> int:
            return renames[g].get(t, t) if g in renames else t

        gws = tuple(
            gw._replace(
                lease=gw.lease._replace(token=r(g, gw.lease.token)) if gw.lease else None,
                request=gw.request._replace(token=r(g, gw.request.token)) if gw.request else None,
                reply=gw.reply._replace(token=r(g, gw.reply.token)) if gw.reply else None,
            )
            for g, gw in enumerate(s.gws)
        )
        conns = tuple(
            conn._replace(token=r(conn.gw, conn.token)) if conn.token >= 0 else conn for conn in s.conns
        )
        attempts = tuple(
            a._replace(
                request=tuple((h, r(h, t)) for h, t in a.request) if a.request is not None else None,
                reply=a.reply._replace(remaining=tuple((h, r(h, t), cur) for h, t, cur in a.reply.remaining))
                if a.reply is not None
                else None,
            )
            for a in s.attempts
        )
        return s._replace(
            leases=tuple(sorted((h, r(h, t), v) for h, t, v in s.leases)),
            watch=tuple(sorted((h, r(h, t), cur, age) for h, t, cur, age in s.watch)),
            gws=gws,
            conns=conns,
            attempts=attempts,
        )
