"""The pipeline without sockets: commands in, bytes out, in order.

A `Harness` plays the session: it feeds client and server bytes to a Pipeline and collects what
comes out for either side. Most tests use the real guard over the in-process ledger; the ones
about slow decisions and tickets use `ScriptedRules`, whose decisions the test controls.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import shield
from gateway.config import build
from gateway.decisions import Forward, Respond
from gateway.guard import BatchGuard
from gateway.metrics import Metrics
from gateway.pipeline import LINE, Phase, Pipeline, Run
from gateway.protocol import Command, FrameTooLarge, ProtocolError, bulk_reply
from gateway.store.memory import MemoryStore

HI = b'+HI {"v":2}\r\n'
HELLO = b'HELLO {"v":2,"wid":"w1"}\r\n'


def real_guard():
    config = build([("test", {"upstream": "tcp://faktory:7419"})])
    return BatchGuard(MemoryStore(45 * 86400.0, 7 * 86400.0), config, Metrics())


class ScriptedRules:
    """A guard whose decisions are given per verb; every decided command is recorded."""

    def __init__(self, decisions=None):
        self.decisions = decisions or {}
        self.fast_tickets: list = []  # admitted_push hands these out (a lease admitting locally)
        self.decided: list[bytes] = []
        self.fetched: list[bytes] = []

    def decide(self, command: Command, client):
        self.decided.append(command.raw)
        decision = self.decisions.get(command.verb)
        return decision(command) if callable(decision) else decision

    def unchecked(self, verbs, chunk, client) -> bool:
        return not any(verb in self.decisions for verb in verbs)

    def admitted_push(self, verbs, chunk, client):
        return self.fast_tickets.pop(0) if self.fast_tickets and verbs == [b"PUSH"] else None

    def fetch_reply_handler(self, client):
        def handler(reply):
            self.fetched.append(reply.raw)
            return reply.raw

        return handler

    @staticmethod
    def fetch_reply_needs_rules(data: bytes) -> bool:
        return b'bid"' in data


class Harness:
    def __init__(self, guard=None, max_line: int = 1 << 20):
        self.guard = guard if guard is not None else real_guard()
        self.wid = None
        self.peer = "10.0.0.1:4000"
        self.done: list[tuple[str, str]] = []
        self.tasks: list[asyncio.Task] = []
        self.aborted = 0
        self.failed = 0
        self.server = b""
        self.client = b""
        self.pipeline = Pipeline(
            self.guard,
            self,
            max_line=max_line,
            max_bulk=1 << 20,
            command_done=lambda verb, result, elapsed, added: self.done.append((verb, result)),
            spawn=lambda coroutine: self.tasks.append(asyncio.ensure_future(coroutine)),
            wake=self.collect,
            abort=self.abort,
            fail=self.fail,
        )

    # decisions.Client, as far as the guard asks in these tests
    def unanswered(self) -> bool:
        return self.pipeline.unanswered()

    async def all_answered(self) -> None:
        future = asyncio.get_running_loop().create_future()
        if self.pipeline.when_all_answered(lambda: future.done() or future.set_result(None), future.cancel):
            await future

    def abort(self) -> None:
        self.aborted += 1

    def fail(self) -> None:
        self.failed += 1

    def collect(self) -> None:
        self.server += self.pipeline.to_server()
        self.client += self.pipeline.to_client()
        self.pipeline.count_done()

    def from_client(self, data: bytes) -> None:
        self.pipeline.on_client_data(data)
        self.collect()

    def from_server(self, data: bytes) -> None:
        self.pipeline.on_server_data(data)
        self.collect()


def greeted(guard=None) -> Harness:
    harness = Harness(guard)
    harness.from_server(HI)
    harness.from_client(HELLO)
    harness.from_server(b"+OK\r\n")
    assert harness.client == HI + b"+OK\r\n"
    harness.server = harness.client = b""
    return harness


def push(jid: str, extra: str = "") -> bytes:
    return b'PUSH {"jid":"%s","jobtype":"T","args":[]%s}\r\n' % (jid.encode(), extra.encode())


def test_the_greeting_is_owed_before_anything_is_sent():
    harness = Harness()
    harness.from_server(HI)  # before the client said anything: relayed at once
    assert harness.client == HI
    harness.from_client(HELLO)
    assert harness.server == HELLO and harness.pipeline.phase is Phase.READY
    assert harness.pipeline.wid == "w1"


def test_pipelined_commands_go_out_as_one_chunk_and_replies_come_back_as_received():
    harness = greeted()
    chunk = push("a") + b"INFO\r\n" + push("b") + b"FETCH q\r\nBEAT {}\n"
    harness.from_client(chunk)
    assert harness.server == chunk  # unchanged, one write
    assert isinstance(harness.pipeline.slots[0], Run) and harness.pipeline.in_flight == 5
    replies = b"+OK\r\n$2\r\n{}\r\n+OK\r\n$-1\r\n-ERR nope\r\n"
    harness.from_server(replies)
    assert harness.client == replies
    assert harness.done[-5:] == [
        ("PUSH", "ok"),
        ("INFO", "ok"),
        ("PUSH", "ok"),
        ("FETCH", "ok"),
        ("BEAT", "error"),
    ]
    assert harness.pipeline.in_flight == 0 and not harness.pipeline.slots


def test_a_refusal_between_forwarded_commands_keeps_its_place():
    harness = greeted()
    harness.from_client(push("a") + b"QUEUE\r\n" + push("b"))
    assert harness.server == push("a") + push("b")  # the bare QUEUE never reaches the server
    harness.from_server(b"+OK\r\n")
    shielded = shield.judge(Command.parse(b"QUEUE\r\n")).reply
    assert harness.client == b"+OK\r\n" + shielded
    harness.from_server(b"+OK\r\n")
    assert harness.client == b"+OK\r\n" + shielded + b"+OK\r\n"
    assert [result for _, result in harness.done[-3:]] == ["ok", "refused", "ok"]


BARE_CRASHERS = [
    verb + end for verb in (b"PUSH", b"PUSHB", b"ACK", b"FAIL", b"BEAT", b"QUEUE") for end in (b"\n", b"\r\n")
]


@pytest.mark.parametrize("line", [*BARE_CRASHERS, b"QUEUE pause\r\n", b"QUEUE REMOVE\n"])
@pytest.mark.parametrize("alone", [True, False], ids=["alone", "pipelined"])
def test_a_line_the_server_crashes_on_never_reaches_it_in_either_lane(line, alone):
    """One line a chunk (the fast lane's no-regex case) or in the middle of a pipelined chunk:
    the gateway answers it in its place, and the commands around it go through unchanged."""
    harness = greeted()
    before, after = (b"", b"") if alone else (push("a") + b"INFO\r\n", b"FETCH q\r\n")
    harness.from_client(before + line + after)
    assert harness.server == before + after
    replies = b"" if alone else b"+OK\r\n$2\r\n{}\r\n$-1\r\n"
    harness.from_server(replies)
    expected = shield.judge(Command.parse(line)).reply
    assert expected.startswith(b"-ERR ")
    assert harness.client == (expected if alone else b"+OK\r\n$2\r\n{}\r\n" + expected + b"$-1\r\n")
    assert harness.pipeline.in_flight == 0 and not harness.pipeline.slots


@pytest.mark.parametrize("line", [b"PUSH \r\n", b"ACK \n", b"QUEUE PAUSE \r\n", b"PUSHX\r\n", b"push\r\n"])
def test_lines_the_server_survives_are_forwarded_even_when_they_look_alike(line):
    harness = greeted()
    harness.from_client(line)
    harness.from_client(line + line)
    assert harness.server == line * 3


def test_a_refusal_first_waits_for_nothing_and_a_later_chunk_queues_behind_a_run():
    rules = ScriptedRules({b"NOPE": lambda command: Respond(b"-ERR no\r\n")})
    harness = greeted(rules)
    harness.from_client(b"INFO\r\n")  # fast lane
    harness.from_client(b"NOPE\r\n")  # refused, but after INFO's reply
    harness.from_client(b"BEAT {}\r\n")  # fast lane again
    assert harness.server == b"INFO\r\nBEAT {}\r\n" and harness.client == b""
    harness.from_server(b"$1\r\nx\r\n")
    assert harness.client == b"$1\r\nx\r\n-ERR no\r\n"
    harness.from_server(b"+OK\r\n")
    assert harness.client == b"$1\r\nx\r\n-ERR no\r\n+OK\r\n"


def test_a_slow_decision_holds_back_later_commands_in_order():
    async def scenario():
        gate = asyncio.get_running_loop().create_future()

        async def slow(command):
            await gate
            return Forward(command.raw)

        rules = ScriptedRules({b"BATCH": slow})
        harness = greeted(rules)
        harness.from_client(b"INFO\r\nBATCH COMMIT b\r\nPUSH {}\r\nBATCH OPEN b\r\n")
        assert harness.server == b"INFO\r\n"
        assert harness.pipeline.phase is Phase.DECIDING
        harness.from_client(b"BEAT {}\r\n")  # held too, though it needs no rules
        await asyncio.sleep(0)
        assert harness.server == b"INFO\r\n"
        gate.set_result(None)
        await asyncio.gather(*harness.tasks)
        assert harness.server == b"INFO\r\nBATCH COMMIT b\r\nPUSH {}\r\nBATCH OPEN b\r\nBEAT {}\r\n"
        assert harness.pipeline.phase is Phase.READY
        harness.from_server(b"+1\r\n+2\r\n+3\r\n+4\r\n+5\r\n")
        assert harness.client == b"+1\r\n+2\r\n+3\r\n+4\r\n+5\r\n"

    asyncio.run(scenario())


def test_a_slow_reply_handler_holds_later_replies_back():
    async def scenario():
        gate = asyncio.get_running_loop().create_future()

        async def late(reply):
            await gate
            return b"+LATE\r\n"

        rules = ScriptedRules({b"BATCH": lambda command: Forward(command.raw, late)})
        harness = greeted(rules)
        harness.from_client(b"BATCH NEW {}\r\nINFO\r\n")
        harness.from_server(b"$3\r\nbid\r\n$1\r\nx\r\n")
        assert harness.client == b""
        gate.set_result(None)
        await asyncio.gather(*harness.tasks)
        assert harness.client == b"+LATE\r\n$1\r\nx\r\n"

    asyncio.run(scenario())


class FakeTicket:
    def __init__(self, writable=True):
        self.calls: list[str] = []
        self._writable = writable

    def writable(self):
        self.calls.append("writable")
        return self._writable

    def unwritable_reply(self):
        self.calls.append("unwritable_reply")
        return b"-ERR STATE_UNAVAILABLE lease lost\r\n"

    def written(self, abort):
        self.calls.append("written")
        self.abort = abort

    def answered(self):
        self.calls.append("answered")

    def lost(self):
        self.calls.append("lost")


def test_the_ticket_contract():
    tickets = [FakeTicket(), FakeTicket(writable=False), FakeTicket()]
    rules = ScriptedRules({b"PUSH": lambda command: Forward(command.raw, None, tickets.pop(0))})
    first, second, third = tickets
    harness = greeted(rules)
    harness.from_client(b"PUSH 1\r\nPUSH 2\r\nPUSH 3\r\n")
    assert harness.server == b"PUSH 1\r\nPUSH 3\r\n"  # the unwritable one was not written
    assert harness.pipeline.reset_on_close  # the driver sets SO_LINGER before writing
    assert first.calls == ["writable", "written"] and second.calls == ["writable", "unwritable_reply"]
    first.abort()
    assert harness.aborted == 1
    assert harness.pipeline.owes_linger()
    harness.from_server(b"+OK\r\n")
    assert first.calls[-1] == "answered"
    assert harness.client == b"+OK\r\n-ERR STATE_UNAVAILABLE lease lost\r\n"
    harness.pipeline.upstream_lost()
    assert third.calls == ["writable", "written", "lost"]


def test_a_batch_push_admitted_in_the_fast_lane_keeps_the_ticket_contract():
    """A one-line PUSH that the guard admits under a local lease rides the fast lane: written
    unchanged, SO_LINGER first, its ticket ended by its own reply, lost with the connection."""
    rules = ScriptedRules({b"PUSH": lambda command: None})
    first, lapsed, third = FakeTicket(), FakeTicket(writable=False), FakeTicket()
    rules.fast_tickets = [first, lapsed, third]
    harness = greeted(rules)
    harness.from_client(b"PUSH 1\r\n")
    assert harness.server == b"PUSH 1\r\n" and b"PUSH 1\r\n" not in rules.decided  # the fast lane
    assert harness.pipeline.reset_on_close and first.calls == ["writable", "written"]
    assert harness.pipeline.owes_linger()
    first.abort()
    assert harness.aborted == 1
    harness.from_server(b"+OK\r\n")
    assert first.calls[-1] == "answered" and harness.client == b"+OK\r\n"
    harness.from_client(b"PUSH 2\r\n")  # its lease lapsed: not written in the fast lane...
    assert lapsed.calls == ["writable", "answered"] and rules.decided[-1] == b"PUSH 2\r\n"  # ...decided
    harness.from_client(b"PUSH 3\r\n")
    harness.pipeline.upstream_lost()
    assert third.calls == ["writable", "written", "lost"]


def test_a_batch_push_is_written_only_when_nothing_is_unanswered_ahead_of_it():
    """The fence's barrier: Faktory handles a connection's commands in order, even after a reset,
    so a batch command written behind a slow one (a big QUEUE REMOVE, a reply the client does not
    read) could reach the server long after its lease ended (docs/fence.md)."""

    async def scenario():
        guard = real_guard()
        await guard.store.create("b-1")
        guard.start()
        harness = greeted(guard)
        batch = push("j1", ',"custom":{"bid":"b-1"}')
        harness.from_client(b"QUEUE REMOVE q1 q2\r\n" + batch + b"INFO\r\n")
        await asyncio.sleep(0.01)
        assert harness.server == b"QUEUE REMOVE q1 q2\r\n"  # the PUSH, and what follows, wait
        harness.from_server(b"+OK\r\n")
        await asyncio.sleep(0.01)
        assert harness.server == b"QUEUE REMOVE q1 q2\r\n" + batch + b"INFO\r\n"
        harness.from_server(b"+OK\r\n$2\r\n{}\r\n")
        assert harness.client == b"+OK\r\n+OK\r\n$2\r\n{}\r\n"
        assert not harness.pipeline.unanswered()
        await guard.close()

    asyncio.run(scenario())


def test_an_unsolicited_server_error_is_relayed_in_order():
    harness = greeted()
    harness.from_server(b"-ERR too many connections\r\n")
    assert harness.client == b"-ERR too many connections\r\n"


def test_garbage_from_the_server_is_a_protocol_error_in_either_lane():
    harness = greeted()
    harness.from_client(b"INFO\r\n")
    with pytest.raises(ProtocolError):
        harness.from_server(b"*1\r\n")


def test_a_line_over_the_cap_is_refused_in_the_fast_lane_too():
    harness = Harness(max_line=64)
    harness.from_client(HELLO)
    with pytest.raises(FrameTooLarge):
        harness.from_client(b"INFO\r\nPUSH " + b"x" * 100)


def test_a_fetch_in_the_fast_lane_shows_a_batch_job_to_the_guard_in_order():
    rules = ScriptedRules()
    harness = greeted(rules)
    harness.from_client(b"INFO\r\nFETCH q\r\nFETCH q\r\nINFO\r\n")
    assert rules.decided == [HELLO]  # one Run, nothing decided
    assert harness.pipeline.unanswered()
    member = bulk_reply(b'{"jid":"j","custom":{"bid":"b-1"}}')
    plain = bulk_reply(b'{"jid":"k"}')
    harness.from_server(b"$1\r\ni\r\n" + member + plain)
    assert rules.fetched == [member, plain]  # back on the full path: every FETCH reply seen
    assert harness.pipeline.unanswered()  # the last INFO is still owed
    harness.from_server(b"$1\r\nj\r\n")
    assert harness.pipeline.unanswered() is False
    assert harness.client == b"$1\r\ni\r\n" + member + plain + b"$1\r\nj\r\n"
    assert [verb for verb, _ in harness.done[-4:]] == ["INFO", "FETCH", "FETCH", "INFO"]


def test_chunks_the_guard_must_see_take_the_full_path():
    guard = real_guard()
    client = Harness(ScriptedRules())  # a Client with no wid
    for chunk, unchecked in (
        (push("a") + b"INFO\r\nFETCH q\r\nACK {}\r\n", True),
        (push("a", ',"custom":{"bid":"b-1"}'), False),  # names a batch
        (push("a", ',"custom":{"b\\u0069d":"b-1"}'), False),  # could
        (b"INFO\r\nBATCH NEW {}\r\n", False),
        (b"QUEUE PAUSE q\r\n", False),
    ):
        assert guard.unchecked(LINE.findall(chunk), chunk, client) is unchecked, chunk
    rules = ScriptedRules()
    harness = greeted(rules)
    harness.from_client(b"INFO\r\nEND\r\n")  # END expects no reply: the full path counts it
    assert rules.decided == [HELLO, b"INFO\r\n", b"END\r\n"] and harness.pipeline.in_flight == 1


LINES = [
    b"INFO\r\n",
    b"A\r\r\n",
    b"A\r B\r\n",
    b"BEAT\n",
    b"\n",
    b"\r\n",
    b" X\r\n",
    b"PUSH {} \r\n",
    b"X\rY\n",
]


def found_verb(line: bytes) -> bytes:
    """What the fast lane finds for a line: its verb as Command.parse splits it, or the whole line
    when the server would crash on it (a bare payload verb or QUEUE): FULL_PATH then sends it on."""
    command = Command.parse(line)
    return line if line in BARE_CRASHERS else command.verb


def test_verbs_are_found_as_command_parse_splits_them():
    lines = LINES + BARE_CRASHERS
    assert LINE.findall(b"".join(lines)) == [found_verb(line) for line in lines]
    rules = ScriptedRules()
    harness = greeted(rules)
    for line in lines:  # one line a chunk: found without the regex
        harness.from_client(line)
        if line in BARE_CRASHERS:  # never the fast lane: decide() sees it
            assert rules.decided[-1] == line
        else:
            assert harness.pipeline.waiting[-1].verbs == [Command.parse(line).verb], line


@given(
    st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=6),
    st.booleans(),
)
def test_the_verb_regex_agrees_with_the_parser_on_any_line(bodies, crlf):
    lines = [body + (b"\r\n" if crlf else b"\n") for body in bodies]
    assert LINE.findall(b"".join(lines)) == [found_verb(line) for line in lines]


def script(n: int):
    """A client stream and the server's replies to it, with refusals, errors and bulk strings."""
    commands, replies, expected = [], [], []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            commands.append(push(f"j{i}"))
            replies.append(b"+OK\r\n")
            expected.append(b"+OK\r\n")
        elif kind == 1:
            commands.append(b"FETCH q\n")
            reply = bulk_reply(json.dumps({"jid": f"j{i}", "args": ["x\r\ny"]}).encode())
            replies.append(reply)
            expected.append(reply)
        elif kind == 2:
            commands.append(b"QUEUE\r\n")
            expected.append(None)  # the gateway's refusal
        elif kind == 3:
            commands.append(b"NOPE a\r\n")
            replies.append(b"-ERR unknown command NOPE\r\n")
            expected.append(b"-ERR unknown command NOPE\r\n")
        elif kind == 4:
            commands.append(b"FETCH empty\r\n")
            replies.append(b"$-1\r\n")
            expected.append(b"$-1\r\n")
        else:
            commands.append(b"INFO\r\n")
            replies.append(b":42\r\n")
            expected.append(b":42\r\n")
    return b"".join(commands), b"".join(replies)


def run_split(client: bytes, server: bytes, client_cuts, server_cuts) -> tuple[bytes, bytes]:
    harness = Harness()
    harness.from_server(HI)
    harness.from_client(HELLO)
    harness.from_server(b"+OK\r\n")
    for stream, cuts, feed in (
        (client, client_cuts, harness.from_client),
        (server, server_cuts, harness.from_server),
    ):
        last = 0
        for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
            if cut > last:
                feed(stream[last:cut])
            last = cut
    return harness.server, harness.client


def test_replies_split_at_every_byte_give_the_same_bytes():
    client, server = script(24)
    whole = run_split(client, server, [], [])
    assert whole[0] == HELLO + client.replace(b"QUEUE\r\n", b"")
    one_by_one = run_split(client, server, [], range(len(server)))
    commands_one_by_one = run_split(client, server, range(len(client)), [])
    assert one_by_one == whole == commands_one_by_one


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 30),
    st.lists(st.integers(0, 10_000), max_size=12),
    st.lists(st.integers(0, 10_000), max_size=12),
)
def test_any_split_of_either_stream_gives_the_same_bytes(n, client_cuts, server_cuts):
    client, server = script(n)
    assert run_split(client, server, client_cuts, server_cuts) == run_split(client, server, [], [])
