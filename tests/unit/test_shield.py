"""The server shield, without sockets.

`shield.judge` says which lines Faktory 1.9.4 would crash on (docs/shield.md has the source
lines); the guard answers those itself, in every mode. tests/integration/test_shield.py shows
each crash on the real server and the shield in front of it.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import gotext, shield
from gateway.batches.guard import BatchGuard
from gateway.decisions import Respond
from gateway.metrics import VERBS, Metrics
from gateway.protocol import Command, bulk_reply
from gateway.store.memory import MemoryStore
from tests.support.fakes import FakeClient, settings
from tests.support.playbook import answer, decide

DAY = 86400.0

PAYLOAD_VERBS = [b"PUSH", b"PUSHB", b"ACK", b"FAIL", b"BEAT"]
ENDS = [b"\n", b"\r\n"]


def line(text: str | bytes, end: bytes = b"\r\n") -> Command:
    return Command.parse((text.encode() if isinstance(text, str) else text) + end)


@pytest.mark.parametrize("end", ENDS, ids=["LF", "CRLF"])
@pytest.mark.parametrize("verb", PAYLOAD_VERBS)
def test_a_payload_verb_alone_is_shielded_with_the_reply_to_an_empty_payload(verb, end):
    shielded = shield.judge(line(verb, end))
    assert shielded is not None and shielded.crash is shield.Crash.PAYLOAD_SLICED_PAST_THE_END
    assert shielded.verb == verb.decode() and shielded.source.startswith("server/commands.go:")
    assert shielded.reply.startswith(b"-ERR ") and shielded.reply.endswith(b"\r\n")
    assert shield.judge(line(verb + b" ", end)) is None  # `PUSH `: the server answers it, alive


@pytest.mark.parametrize(
    "text",
    [
        "QUEUE",
        "QUEUE PAUSE",
        "QUEUE pause",
        "QUEUE Resume",
        "QUEUE REMOVE",
        "QUEUE PAU\u017fE",  # Go upper-cases the long s to S
        "QUEUE RE\u017fUME",
    ],
)
def test_queue_lines_that_index_past_their_words_are_shielded(text):
    shielded = shield.judge(line(text))
    assert shielded is not None and shielded.verb == "QUEUE"
    assert shielded.reply.startswith(b"-ERR QUEUE ")


@pytest.mark.parametrize(
    "text",
    [
        "QUEUE ",  # qs = [""]: no such subcommand
        "QUEUE PAUSE ",  # qs[1] = "": a queue named "" (+OK)
        "QUEUE  PAUSE",  # qs[0] = "": no such subcommand
        "QUEUE PAUSE q1",
        "QUEUE PAUSE\tq1",  # one word, "PAUSE\tQ1": no such subcommand
        "QUEUE LATENCY",  # reads qs[1:], empty: {}
        "QUEUE PAU\u00dfE",  # Go leaves the sharp s alone: no such subcommand
        "QUEUE REMOVE *",
        "queue PAUSE",  # verbs are case-sensitive: unknown command
        "push",
        "PUSHX",
        "FETCH",  # the server checks for a queue name
        "MUTATE",  # and for MUTATE's two parts
        "BATCH",
        "INFO",
        "END",
    ],
)
def test_lines_the_server_survives_are_not_shielded(text):
    assert shield.judge(line(text)) is None


@given(st.binary(max_size=24).map(lambda data: data.replace(b"\n", b"")), st.sampled_from(ENDS))
def test_every_shielded_line_gets_one_error_line_with_a_known_verb(body, end):
    shielded = shield.judge(line(body, end))
    if shielded is not None:
        assert shielded.reply.startswith(b"-ERR ") and shielded.reply.count(b"\r\n") == 1
        assert shielded.verb in VERBS


@pytest.mark.parametrize(
    "word, upper",
    [
        (b"pause", b"PAUSE"),
        (b"Commit", b"COMMIT"),
        ("comm\u0131t".encode(), b"COMMIT"),  # dotless i
        ("\u017ftatus".encode(), b"STATUS"),  # long s
        ("pau\u00dfe".encode(), None),  # Python's upper() would say PAUSSE; Go keeps the sharp s
        ("\ufb00".encode(), None),  # Python: "FF"; Go: unchanged
        ("\u212aey".encode(), None),  # the Kelvin sign is upper case already
        (b"pa\xffuse", None),  # not UTF-8: Go reads U+FFFD
        (b"", b""),
    ],
)
def test_go_upper_case(word, upper):
    assert gotext.upper(word) == upper


# --- the guard --------------------------------------------------------------------------------------


@pytest.fixture(params=["strict", "member-reopen", "shadow"])
async def any_guard(request):
    store = MemoryStore(45 * DAY, 7 * DAY)
    guard = BatchGuard(store, settings(mode=request.param), Metrics())
    guard.start()
    yield guard
    await guard.close()


def shielded_count(guard: BatchGuard, verb: str) -> float:
    return guard.metrics.shielded.labels(verb)._value.get()


async def test_the_guard_answers_every_shielded_line_in_every_mode(any_guard):
    """Shadow mode forwards what the batch rules would refuse; it never forwards a crash."""
    client = FakeClient(wid="w1")
    for text in ("PUSH", "ACK", "QUEUE", "QUEUE remove"):
        command = line(text)
        decision = any_guard.decide(command, client, True)
        assert isinstance(decision, Respond) and decision.data == shield.judge(command).reply
        assert decision.result == "refused"
    assert shielded_count(any_guard, "QUEUE") == 2 and shielded_count(any_guard, "PUSH") == 1
    assert any_guard.decide(line("QUEUE PAUSE q1"), client, True) is None
    assert any_guard.decide(line("PUSH "), client, True) is None


async def test_a_bare_ack_is_shielded_even_while_the_worker_holds_jobs():
    store = MemoryStore(45 * DAY, 7 * DAY)
    guard = BatchGuard(store, settings(mode="member-reopen"), Metrics())
    client = FakeClient(wid="w1")
    await store.create("b-1")
    member = json.dumps({"jid": "j1", "jobtype": "x", "args": [], "custom": {"bid": "b-1"}}).encode()
    await answer(await decide(guard, "FETCH q", client), bulk_reply(member))
    assert guard.workers.holds_any(client)  # ACK and FAIL are read now
    assert isinstance(guard.decide(line("ACK"), client, True), Respond)
