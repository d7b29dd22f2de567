"""Property tests of the batch guard under adversarial input (issue 14), no sockets.

Random and hostile payloads (random JSON with the keys the rules read spelt in every way Go reads
them, deep nesting, random bytes, escapes, trailing garbage) go in as PUSH, PUSHB, BATCH
NEW/OPEN/COMMIT/STATUS, ACK and FAIL arguments, as HELLO lines (through the pipeline's own
first-line handling), as FETCH and BATCH STATUS replies to the guard's handlers, and as the server's
answers to the guard's own BATCH STATUS questions. Whatever comes in, the guard must not raise:
it returns None, Forward or Respond (or an awaitable of one), every refusal is one well-formed
`-ERR CODE message` line, and the replies it only watches reach the client byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.batches.guard import BatchGuard
from gateway.batches.settings import RuleSettings
from gateway.decisions import Forward, Later, Respond
from gateway.metrics import Metrics
from gateway.protocol import Command, bulk_reply
from gateway.store import OPEN
from gateway.store.memory import MemoryStore
from tests.support import fakes
from tests.support.fakes import FakeClient, reply_of
from tests.support.playbook import answer, committed

DAY = 86400.0
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODES = {mode: fakes.settings(mode=mode) for mode in ("strict", "member-reopen", "shadow")}
ERR_LINE = re.compile(rb"-ERR [A-Z][A-Z_]+ [^\r\n]+\r\n")
BIDS = ["b-1", "b-2", "b-3", "b-4"]  # committed, open, fired, unknown to the ledger (see `world`)

# --- payloads ---------------------------------------------------------------------------------------

KEYS = [
    "custom", "Custom", "CUSTOM", "cu\u017ftom", "bid", "BID", "Bid", "parent_bid", "Parent_Bid",
    "PARENT_BID", "_bid", "_pbid", "_cb", "jid", "jobtype", "args", "queue", "reserve_for", "wid",
    "complete_st", "success_st",
]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.sampled_from([*BIDS, "", "b 1", "b-{1}", "b-1\r\n", "x" * 200, "1", "2"])
    | st.text(max_size=6)
)
json_values = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=16,
)


def job_like(bid_key: str, bid: object, extra: dict) -> dict:
    return {"jid": "j1", "jobtype": "x", "args": [], "custom": {bid_key: bid}, **extra}


jobs = st.builds(
    job_like,
    st.sampled_from(["bid", "_bid", "_pbid", "_cb", "BID"]),
    st.sampled_from(BIDS) | SCALARS,
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=2),
)


def escape_keys(text: str) -> str:
    """Spell every letter of the keys the rules read as a JSON escape (`"b\\u0069d"`)."""
    return re.sub(
        r'"(custom|bid|_bid|_pbid|_cb|parent_bid)"',
        lambda m: '"' + "".join(f"\\u{ord(c):04x}" for c in m.group(1)) + '"',
        text,
        flags=re.IGNORECASE,
    )


def nest(depth: int, inner: bytes) -> bytes:
    return b"[" * depth + inner + b"]" * depth


MUTATIONS = {
    "none": lambda data: data,
    "escape keys": lambda data: escape_keys(data.decode("utf-8", "surrogatepass")).encode(
        "utf-8", "surrogatepass"
    ),
    "trailing garbage": lambda data: data + b" }{garbage",
    "truncated": lambda data: data[: len(data) // 2],
    "invalid UTF-8": lambda data: data.replace(b'"b-', b'"\xff\xfeb-', 1) + b"\xc3",
    "duplicate key": lambda data: data.replace(b"{", b'{"custom":{},', 1),
    "deep around": lambda data: nest(100_000, data),
    "deep inside": lambda data: data.replace(b"[]", nest(3000, b""), 1).replace(
        b"{", b'{"x":' + nest(1200, b"") + b",", 1
    ),
}


def serialised(value: object, ascii_only: bool, mutation: str) -> bytes:
    data = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    return MUTATIONS[mutation](data)


payloads = (
    st.builds(
        serialised,
        json_values | jobs | st.lists(jobs, max_size=4),
        st.booleans(),
        st.sampled_from(list(MUTATIONS)),
    )
    | st.binary(max_size=80)
    | st.sampled_from([nest(100_000, b""), b"{" * 5000, b'{"a":' * 100_000, b"", b" ", b"null"])
)


def line_of(verb: bytes, payload: bytes) -> Command:
    """One client line, as the framer would give it: no LF inside."""
    return Command.parse(verb + b" " + payload.replace(b"\n", b" ") + b"\r\n")


# --- server replies ---------------------------------------------------------------------------------


def status_body(bid: object, parent: object, complete: object, success: object) -> bytes:
    body = {"bid": bid, "total": 1, "pending": 1, "complete_st": complete, "success_st": success}
    if parent is not None:
        body["parent_bid"] = parent
    return json.dumps(body).encode()


STATES = st.sampled_from(["", "1", "2", None, 0, 1, True, [], {}, "x"])
status_payloads = st.builds(
    status_body, st.sampled_from(BIDS) | SCALARS, st.sampled_from([None, *BIDS]) | SCALARS, STATES, STATES
)
replies = (
    st.builds(bulk_reply, status_payloads | payloads)
    | st.sampled_from(
        [b"$-1\r\n", b"+OK\r\n", b"$0\r\n\r\n", b"-ERR no such batch b-4\r\n", b"-ERR Internal\r\n"]
    )
    | st.builds(
        lambda text: b"-ERR " + text.encode().replace(b"\r", b"").replace(b"\n", b"") + b"\r\n",
        st.text(max_size=20),
    )
).map(reply_of)


class FuzzClient(FakeClient):
    """The playbook's FakeClient, whose server answers the guard's own BATCH STATUS with fuzz."""

    def __init__(self, answers: list, wid: str | None = "w1", peer: str = "10.0.0.7:5000"):
        super().__init__(wid=wid, peer=peer)
        self.answers = answers

    async def ask_upstream(self, line: bytes):
        self.asked.append(line)
        if self.answers:
            return self.answers[len(self.asked) % len(self.answers)]
        return await super().ask_upstream(line)


# --- the harness ------------------------------------------------------------------------------------


async def world(mode: str) -> tuple[BatchGuard, MemoryStore]:
    """A guard over a ledger where b-1 is committed, b-2 open, b-3 fired and b-4 unknown."""
    store = MemoryStore(45 * DAY, 7 * DAY)
    guard = BatchGuard(store, MODES[mode], Metrics())
    guard.start()
    await committed(guard, store, "b-1", FakeClient())
    await store.create("b-2", OPEN)
    await store.mark_fired("b-3")
    return guard, store


async def decided(guard: BatchGuard, command: Command, client: FakeClient):
    """The guard's decision, checked for shape; a Later worked out (bounded, never a hang)."""
    decision = guard.decide(command, client, True)
    if type(decision) is Later:
        decision = await asyncio.wait_for(decision.work(), 5)
    assert decision is None or isinstance(decision, Forward | Respond), decision
    if isinstance(decision, Respond):
        assert_well_formed(command, decision.data)
    if isinstance(decision, Forward):
        assert decision.data.endswith(b"\n") and decision.data.count(b"\n") == 1
    return decision


def assert_well_formed(command: Command, data: bytes) -> None:
    if command.verb == b"PUSHB" and data.startswith(b"$"):
        # Every job refused: the server's own reply shape, a jid -> "CODE message" map.
        header, _, rest = data.partition(b"\r\n")
        assert rest.endswith(b"\r\n") and int(header[1:]) == len(rest) - 2
        refused = json.loads(rest[:-2])
        assert refused and all(re.fullmatch(r"[A-Z][A-Z_]+ .+", why) for why in refused.values())
        return
    assert ERR_LINE.fullmatch(data), data[:200]


async def reply_to(decision, reply, transparent: bool) -> None:
    """Feed the server's reply to a forwarded command's handler, as the session would."""
    if not isinstance(decision, Forward):
        return
    out = await asyncio.wait_for(answer(decision, reply.raw), 5)
    assert isinstance(out, bytes)
    if transparent:
        assert out == reply.raw  # FETCH, BATCH STATUS/NEW/COMMIT replies reach the client unchanged


def run(scenario) -> None:
    asyncio.run(scenario)


# --- the properties -----------------------------------------------------------------------------------

VERBS = [b"PUSH", b"PUSHB", b"BATCH NEW", b"ACK", b"FAIL"]


@FUZZ
@given(
    mode=st.sampled_from(list(MODES)),
    verb=st.sampled_from(VERBS),
    payload=payloads,
    answers=st.lists(replies, max_size=3),
    reply=replies,
)
@example(
    mode="member-reopen", verb=b"ACK", payload=nest(100_000, b""), answers=[], reply=reply_of(b"+OK\r\n")
)
@example(
    mode="strict",
    verb=b"PUSH",
    payload=b'{"custom":{"_p\\u0062id":"b-1"}}',
    answers=[],
    reply=reply_of(b"+OK\r\n"),
)
@example(
    mode="strict",
    verb=b"PUSHB",
    payload=b'[{"jid":"a","custom":{"bid":"b-1"}},{"jid":"b","CUSTOM":{"_bid":"b-2"}}]',
    answers=[],
    reply=reply_of(b"$2\r\n{}\r\n"),
)
@example(
    mode="strict",
    verb=b"PUSH",
    payload=b'{"custom":{"bid":"b-4"}}',
    answers=[reply_of(bulk_reply(nest(100_000, b"")))],
    reply=reply_of(b"+OK\r\n"),
)
def test_commands_with_hostile_payloads(mode, verb, payload, answers, reply):
    async def scenario():
        guard, _ = await world(mode)
        try:
            client = FuzzClient(answers)
            # A member job held first, so that ACK and FAIL are read in member-reopen mode.
            held = json.dumps({"jid": "j1", "jobtype": "x", "args": [], "custom": {"bid": "b-1"}})
            fetch = await decided(guard, Command.parse(b"FETCH q\r\n"), client)
            await reply_to(fetch, reply_of(bulk_reply(held.encode())), transparent=True)
            decision = await decided(guard, line_of(verb, payload), client)
            await reply_to(decision, reply, transparent=verb != b"PUSHB")
        finally:
            await guard.close()

    run(scenario())


@FUZZ
@given(
    mode=st.sampled_from(list(MODES)),
    sub=st.sampled_from([b"OPEN", b"COMMIT", b"STATUS"]),
    arg=st.sampled_from([b.encode() for b in BIDS])
    | st.binary(max_size=40)
    | st.just(b"b-1 b-2")
    | st.just(b"x" * 10_000),
    wid=st.sampled_from([None, "w1", "w2"]),
    answers=st.lists(replies, max_size=3),
    reply=replies,
)
def test_batch_subcommands_with_hostile_arguments_and_answers(mode, sub, arg, wid, answers, reply):
    async def scenario():
        guard, _ = await world(mode)
        try:
            client = FuzzClient(answers, wid=wid)
            command = line_of(b"BATCH " + sub, arg)
            decision = await decided(guard, command, client)
            await reply_to(decision, reply, transparent=True)
        finally:
            await guard.close()

    run(scenario())


@FUZZ
@given(
    mode=st.sampled_from(list(MODES)),
    fetched=st.builds(bulk_reply, payloads | st.builds(lambda j: json.dumps(j).encode(), jobs)).map(reply_of)
    | replies,
    answers=st.lists(replies, max_size=3),
    wid=st.sampled_from([None, "w1"]),
)
@example(
    mode="member-reopen",
    fetched=reply_of(bulk_reply(b'{"jid":"f","custom":{"_bid":"b-2","_pbid":"b-1"}}')),
    answers=[reply_of(bulk_reply(status_body("b-2", "b-1", "1", "")))],
    wid="w1",
)
@example(
    mode="member-reopen",
    fetched=reply_of(bulk_reply(b'{"jid":"f","custom":{"_bid":"b-2"},"reserve_for":1e400}')),
    answers=[reply_of(bulk_reply(status_body("b-2", None, "1", "")))],
    wid="w1",
)
@example(
    mode="strict",
    fetched=reply_of(bulk_reply(b'{"custom":{"_bid":"b-2"},"x":' + nest(100_000, b"") + b"}")),
    answers=[],
    wid=None,
)
def test_fetch_replies_are_watched_never_changed(mode, fetched, answers, wid):
    async def scenario():
        guard, _ = await world(mode)
        try:
            client = FuzzClient(answers, wid=wid)
            decision = await decided(guard, Command.parse(b"FETCH q\r\n"), client)
            await reply_to(decision, fetched, transparent=True)
            # Whatever it learnt, the guard still decides the next batch commands without raising.
            for line in (b"BATCH OPEN b-1", b"BATCH OPEN b-2", b'PUSH {"jid":"n","custom":{"bid":"b-2"}}'):
                await reply_to(
                    await decided(guard, Command.parse(line + b"\r\n"), client), reply_of(b"+OK\r\n"), False
                )
            await decided(guard, Command.parse(b'ACK {"jid":"f"}\r\n'), client)
        finally:
            await guard.close()

    run(scenario())


def hello(command: Command) -> str | None:
    """The rules' reading of a HELLO line (batches/workers.py): the worker id they note on the
    client, if any; the line itself is always forwarded as it is."""
    client = FakeClient()
    rules = BatchGuard(MemoryStore(45 * DAY, 7 * DAY), RuleSettings(), Metrics())
    assert rules.decide(command, client, True) is None
    return client.wid


@FUZZ
@given(
    value=st.builds(
        lambda wid, rest: {"v": 2, "wid": wid, **rest},
        json_values,
        st.dictionaries(st.sampled_from(KEYS), json_values, max_size=3),
    )
    | json_values,
    mutation=st.sampled_from(list(MUTATIONS)),
    then=st.sampled_from([b"BATCH OPEN b-1", b'ACK {"jid":"j1"}', b'PUSH {"custom":{"bid":"b-2"}}']),
)
@example(value={"v": 2, "wid": "x"}, mutation="deep around", then=b"BATCH OPEN b-1")
@example(value={"v": 2, "wid": "real-worker-7"}, mutation="escape keys", then=b"BATCH OPEN b-1")
def test_hello_lines_never_raise_and_give_a_sane_wid(value, mutation, then):
    wid = hello(line_of(b"HELLO", serialised(value, True, mutation)))
    assert wid is None or (isinstance(wid, str) and 0 < len(wid) <= 128 and wid.isprintable())

    async def scenario():
        guard, _ = await world("member-reopen")
        try:
            await decided(guard, Command.parse(then + b"\r\n"), FuzzClient([], wid=wid))
        finally:
            await guard.close()

    run(scenario())


def test_deep_hello_leaves_no_wid():
    assert hello(line_of(b"HELLO", nest(100_000, b""))) is None
    assert hello(line_of(b"HELLO", b'{"wid":' + nest(100_000, b"") + b"}")) is None
    assert hello(Command.parse(b'HELLO {"v":2,"wid":"w-7"}\r\n')) == "w-7"


STEPS = st.tuples(
    st.sampled_from(
        [
            b"PUSH",
            b"PUSHB",
            b"BATCH NEW",
            b"ACK",
            b"FAIL",
            b"FETCH",
            b"BATCH OPEN",
            b"BATCH STATUS",
            b"BATCH COMMIT",
        ]
    ),
    payloads,
    replies,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(list(MODES)),
    steps=st.lists(STEPS, min_size=1, max_size=8),
    answers=st.lists(replies, max_size=3),
)
def test_sequences_of_hostile_commands_and_replies(mode, steps, answers):
    """A session's worth of commands and replies: the guard's memory of earlier ones (holdings,
    fired batches, leases) must not make a later one raise."""

    async def scenario():
        guard, _ = await world(mode)
        try:
            client = FuzzClient(answers)
            for verb, payload, reply in steps:
                if verb == b"FETCH":
                    command = Command.parse(b"FETCH q\r\n")
                elif verb in (b"BATCH OPEN", b"BATCH STATUS", b"BATCH COMMIT"):
                    command = line_of(verb, BIDS[len(payload) % len(BIDS)].encode())
                else:
                    command = line_of(verb, payload)
                decision = await decided(guard, command, client)
                await reply_to(decision, reply, transparent=verb not in (b"PUSHB",))
        finally:
            await guard.close()

    run(scenario())
