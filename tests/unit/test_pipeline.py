"""The pipeline without sockets: commands in, bytes out, in order.

A `Harness` (tests/support/playbook.py) plays the session: it feeds client and server bytes to a
Pipeline and collects exactly what comes out for either side. Most tests use the real rules over
the in-process ledger; the ones about slow decisions and tickets use `ScriptedRules`, whose
decisions the test controls.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import shield
from gateway.batches.guard import BatchGuard
from gateway.batches.settings import RuleSettings
from gateway.chunks import verbs_of
from gateway.decisions import FULL_PATH, UNCHECKED, Forward, Later, Respond
from gateway.entries import Run
from gateway.metrics import Metrics
from gateway.pipeline import Phase
from gateway.protocol import Command, FrameTooLarge, ProtocolError, bulk_reply
from gateway.store.memory import MemoryStore
from tests.support.fakes import FakeTicket, ScriptedRules
from tests.support.playbook import HELLO, HI, Harness, greeted


def real_rules() -> BatchGuard:
    """The real rules over a ledger of their own (not started: no lease renewal runs behind a test)."""
    return BatchGuard(MemoryStore(45 * 86400.0, 7 * 86400.0), RuleSettings(), Metrics())


def later(work) -> Later:
    """A scripted slow decision: `work` is an async function of nothing."""
    return Later(work)


def push(jid: str, extra: str = "") -> bytes:
    return b'PUSH {"jid":"%s","jobtype":"T","args":[]%s}\r\n' % (jid.encode(), extra.encode())


def test_the_greeting_is_owed_before_anything_is_sent():
    harness = Harness(real_rules())
    harness.from_server(HI)  # before the client said anything: relayed at once
    assert harness.client == HI
    harness.from_client(HELLO)
    assert harness.server == HELLO and harness.pipeline.phase is Phase.READY
    assert harness.wid == "w1"  # the rules noted the worker id its HELLO gave


def test_pipelined_commands_go_out_as_one_chunk_and_replies_come_back_as_received():
    harness = greeted(real_rules())
    chunk = push("a") + b"INFO\r\n" + push("b") + b"FETCH q\r\nBEAT {}\n"
    harness.from_client(chunk)
    assert harness.server == chunk  # unchanged, one write
    assert isinstance(harness.pipeline.slots[0], Run) and harness.pipeline.order.in_flight == 5
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
    assert harness.pipeline.order.in_flight == 0 and not harness.pipeline.slots


def test_a_refusal_between_forwarded_commands_keeps_its_place():
    harness = greeted(real_rules())
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
    harness = greeted(real_rules())
    before, after = (b"", b"") if alone else (push("a") + b"INFO\r\n", b"FETCH q\r\n")
    harness.from_client(before + line + after)
    assert harness.server == before + after
    replies = b"" if alone else b"+OK\r\n$2\r\n{}\r\n$-1\r\n"
    harness.from_server(replies)
    expected = shield.judge(Command.parse(line)).reply
    assert expected.startswith(b"-ERR ")
    assert harness.client == (expected if alone else b"+OK\r\n$2\r\n{}\r\n" + expected + b"$-1\r\n")
    assert harness.pipeline.order.in_flight == 0 and not harness.pipeline.slots


@pytest.mark.parametrize("line", [b"PUSH \r\n", b"ACK \n", b"QUEUE PAUSE \r\n", b"PUSHX\r\n", b"push\r\n"])
def test_lines_the_server_survives_are_forwarded_even_when_they_look_alike(line):
    harness = greeted(real_rules())
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

        rules = ScriptedRules({b"BATCH": lambda command: Later(lambda: slow(command))})
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


def test_the_ticket_contract():
    tickets = [FakeTicket(), FakeTicket(writable=False), FakeTicket()]
    rules = ScriptedRules({b"PUSH": lambda command: Forward(command.raw, None, tickets.pop(0))})
    first, second, third = tickets
    harness = greeted(rules)
    harness.from_client(b"PUSH 1\r\nPUSH 2\r\nPUSH 3\r\n")
    assert harness.server == b"PUSH 1\r\nPUSH 3\r\n"  # the unwritable one was not written
    assert harness.pipeline.resets_on_close  # the driver sets SO_LINGER before writing
    assert first.calls == ["writable", "written"] and second.calls == ["writable", "unwritable_reply"]
    first.abort()
    assert harness.aborted == 1
    assert harness.pipeline.must_read_server()
    harness.from_server(b"+OK\r\n")
    assert first.calls[-1] == "answered"
    assert harness.client == b"+OK\r\n-ERR STATE_UNAVAILABLE lease lost\r\n"
    harness.pipeline.upstream_lost()
    assert third.calls == ["writable", "written", "lost"]


def test_an_admitted_commands_ticket_ends_after_its_reply_handler():
    """What a reply handler records (the engine counts a job the server took) is in the ledger
    before the admission ends, so before a commit of the batch can pass the fence; and the
    client's reply waits for it too."""

    async def scenario():
        ticket = FakeTicket()
        recorded = asyncio.Event()

        async def count(reply):
            await recorded.wait()
            return reply.raw

        rules = ScriptedRules({b"PUSH": lambda command: Forward(command.raw, count, ticket)})
        harness = greeted(rules)
        harness.from_client(b"PUSH 1\r\n")
        harness.from_server(b"+OK\r\n")
        await asyncio.sleep(0.01)
        assert ticket.calls == ["writable", "written"] and harness.client == b""  # still counting
        recorded.set()
        await asyncio.sleep(0.01)
        assert ticket.calls[-1] == "answered" and harness.client == b"+OK\r\n"

    asyncio.run(scenario())


def test_a_batch_push_admitted_in_the_fast_lane_keeps_the_ticket_contract():
    """A one-line PUSH that the guard admits under a local lease rides the fast lane: written
    unchanged, SO_LINGER first, its ticket ended by its own reply, lost with the connection."""
    rules = ScriptedRules({b"PUSH": lambda command: None})
    first, lapsed, third = FakeTicket(), FakeTicket(writable=False), FakeTicket()
    rules.fast_tickets = [first, lapsed, third]
    harness = greeted(rules)
    harness.from_client(b"PUSH 1\r\n")
    assert harness.server == b"PUSH 1\r\n" and b"PUSH 1\r\n" not in rules.decided  # the fast lane
    assert harness.pipeline.resets_on_close and first.calls == ["writable", "written"]
    assert harness.pipeline.must_read_server()
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
        guard = real_rules()
        await guard.store.create("b-1")
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
        assert not harness.pipeline.waiting

    asyncio.run(scenario())


def test_an_unsolicited_server_error_is_relayed_in_order():
    harness = greeted(real_rules())
    harness.from_server(b"-ERR too many connections\r\n")
    assert harness.client == b"-ERR too many connections\r\n"


def test_garbage_from_the_server_is_a_protocol_error_in_either_lane():
    harness = greeted(real_rules())
    harness.from_client(b"INFO\r\n")
    with pytest.raises(ProtocolError):
        harness.from_server(b"*1\r\n")


def test_a_line_over_the_cap_is_refused_in_the_fast_lane_too():
    harness = Harness(real_rules(), max_line=64)
    harness.from_client(HELLO)
    with pytest.raises(FrameTooLarge):
        harness.from_client(b"INFO\r\nPUSH " + b"x" * 100)


def test_a_fetch_in_the_fast_lane_shows_a_batch_job_to_the_guard_in_order():
    rules = ScriptedRules()
    harness = greeted(rules)
    harness.from_client(b"INFO\r\nFETCH q\r\nFETCH q\r\nINFO\r\n")
    assert rules.decided == [HELLO]  # one Run, nothing decided
    assert harness.pipeline.waiting
    member = bulk_reply(b'{"jid":"j","custom":{"bid":"b-1"}}')
    plain = bulk_reply(b'{"jid":"k"}')
    harness.from_server(b"$1\r\ni\r\n" + member + plain)
    assert rules.fetched == [member, plain]  # back on the full path: every FETCH reply seen
    assert harness.pipeline.waiting  # the last INFO is still owed
    harness.from_server(b"$1\r\nj\r\n")
    assert not harness.pipeline.waiting
    assert harness.client == b"$1\r\ni\r\n" + member + plain + b"$1\r\nj\r\n"
    assert [verb for verb, _ in harness.done[-4:]] == ["INFO", "FETCH", "FETCH", "INFO"]


def test_chunks_the_rules_must_see_take_the_full_path():
    rules = real_rules()
    client = Harness(ScriptedRules())  # a Client with no wid
    for chunk, route in (
        (push("a") + b"INFO\r\nFETCH q\r\nACK {}\r\n", UNCHECKED),
        (push("a", ',"custom":{"bid":"b-1"}') + b"INFO\r\n", FULL_PATH),  # names a batch
        (push("a", ',"custom":{"b\\u0069d":"b-1"}') + b"INFO\r\n", FULL_PATH),  # could
        (b"INFO\r\nBATCH NEW {}\r\n", FULL_PATH),
        (b"QUEUE PAUSE q\r\n", FULL_PATH),
    ):
        assert rules.route(verbs_of(chunk), chunk, client, True) is route, chunk
    rules = ScriptedRules()
    harness = greeted(rules)
    harness.from_client(b"INFO\r\nEND\r\n")  # END expects no reply: the full path counts it
    assert rules.decided == [HELLO, b"INFO\r\n", b"END\r\n"] and harness.pipeline.order.in_flight == 1


def script(n: int) -> tuple[bytes, bytes, bytes]:
    """A client stream, the server's replies to it, and the bytes the client must get, with
    refusals, errors and bulk strings."""
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
            expected.append(shield.judge(Command.parse(b"QUEUE\r\n")).reply)  # the gateway's own answer
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
    return b"".join(commands), b"".join(replies), b"".join(expected)


def run_split(client: bytes, server: bytes, client_cuts, server_cuts) -> tuple[bytes, bytes]:
    harness = Harness(real_rules())
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
    client, server, expected = script(24)
    whole = run_split(client, server, [], [])
    assert whole == (HELLO + client.replace(b"QUEUE\r\n", b""), HI + b"+OK\r\n" + expected)
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
    client, server, expected = script(n)
    to_server = HELLO + client.replace(b"QUEUE\r\n", b"")
    assert run_split(client, server, client_cuts, server_cuts) == (to_server, HI + b"+OK\r\n" + expected)
