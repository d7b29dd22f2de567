"""The fast lane's reading of a chunk (gateway/chunks.py): its verbs, exactly as Command.parse
splits each line, except the lines the server crashes on, which are kept whole so that they never
take the fast lane."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.chunks import FULL_PATH_VERBS, LINE, verbs_of
from gateway.protocol import Command
from tests.support.fakes import ScriptedRules
from tests.support.playbook import greeted

BARE_CRASHERS = [
    verb + end for verb in (b"PUSH", b"PUSHB", b"ACK", b"FAIL", b"BEAT", b"QUEUE") for end in (b"\n", b"\r\n")
]


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
    assert verbs_of(b"".join(lines)) == [found_verb(line) for line in lines]
    assert all(crasher in FULL_PATH_VERBS for crasher in BARE_CRASHERS)
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
