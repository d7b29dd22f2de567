"""The framers, replayed over byte sequences: no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol import (
    Command,
    CommandReader,
    FrameTooLarge,
    ProtocolError,
    ReplyStream,
    bulk_reply,
    error_reply,
    frame_run,
)


def feed_in_pieces(feed, data: bytes, cuts: list[int]):
    """What a reader's `feed` makes of `data` cut at these offsets."""
    frames = []
    last = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        frames.extend(feed(data[last:cut]))
        last = cut
    return frames


# --- client framing ---------------------------------------------------------------------------


def test_crlf_and_bare_lf_lines_give_the_same_command():
    a, b = CommandReader().feed(b'PUSH {"jid":"x"}\r\nPUSH {"jid":"x"}\n')
    assert (a.verb, a.args) == (b.verb, b.args) == (b"PUSH", b'{"jid":"x"}')
    assert a.raw == b'PUSH {"jid":"x"}\r\n' and b.raw == b'PUSH {"jid":"x"}\n'


def test_verb_is_case_sensitive_and_split_at_first_space_only():
    (cmd,) = CommandReader().feed(b"push a b  c\r\n")
    assert cmd.verb == b"push" and cmd.args == b"a b  c"


def test_incomplete_line_is_held_until_its_end():
    reader = CommandReader()
    assert reader.feed(b"BATCH COM") == []
    assert reader.buffered == 9
    (cmd,) = reader.feed(b"MIT b-1\r\n")
    assert cmd.raw == b"BATCH COMMIT b-1\r\n" and reader.buffered == 0


def test_line_over_the_cap_is_refused_before_its_end_arrives():
    reader = CommandReader(max_line=100)
    reader.feed(b"PUSH " + b"x" * 90)
    with pytest.raises(FrameTooLarge):
        reader.feed(b"x" * 20)


def test_line_exactly_at_the_cap_is_accepted():
    reader = CommandReader(max_line=10)
    (cmd,) = reader.feed(b"0123456789\n")
    assert cmd.verb == b"0123456789"


lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")).map(lambda b: b.rstrip(b"\r")),
    min_size=1,
    max_size=20,
)


@given(
    lines,
    st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=20, max_size=20),
    st.lists(st.integers(0, 10_000)),
)
def test_any_split_of_the_stream_gives_the_same_commands(body, endings, cuts):
    data = b"".join(line + endings[i] for i, line in enumerate(body))
    whole = CommandReader().feed(data)
    pieces = feed_in_pieces(CommandReader().feed, data, cuts)
    assert [c.raw for c in pieces] == [c.raw for c in whole]
    assert b"".join(c.raw for c in whole) == data  # nothing lost, nothing invented
    assert [Command.parse(c.raw).args for c in whole] == [c.args for c in pieces]


# --- server framing ---------------------------------------------------------------------------


def test_all_reply_types():
    data = b'+HI {"v":2}\r\n-ERR nope\r\n:42\r\n$5\r\nhello\r\n$-1\r\n$0\r\n\r\n'
    replies = ReplyStream().replies(data)
    assert [(r.kind, r.payload) for r in replies] == [
        (ord("+"), b'HI {"v":2}'),
        (ord("-"), b"ERR nope"),
        (ord(":"), b"42"),
        (ord("$"), b"hello"),
        (ord("$"), None),
        (ord("$"), b""),
    ]
    assert b"".join(r.raw for r in replies) == data
    assert replies[1].is_error and not replies[0].is_error


def test_bulk_body_is_read_by_length_not_by_line():
    (reply,) = ReplyStream().replies(b"$4\r\na\r\nb\r\n")
    assert reply.payload == b"a\r\nb"


def test_bulk_split_in_the_middle_waits_for_the_rest():
    stream = ReplyStream()
    assert stream.replies(b"$10\r\n01234") == []
    assert stream.replies(b"56") == []
    (reply,) = stream.replies(b"789\r\n+OK\r\n")[:1]
    assert reply.payload == b"0123456789"


@pytest.mark.parametrize(
    "garbage",
    [b"*1\r\n$1\r\na\r\n", b"hello\r\n", b"$abc\r\n", b"$3\r\nabcXY", b"$-7\r\n"],
)
def test_garbage_from_the_server_is_a_protocol_error(garbage):
    with pytest.raises(ProtocolError):
        ReplyStream().replies(garbage)


def test_bulk_over_the_cap_is_refused_from_its_header():
    with pytest.raises(FrameTooLarge):
        ReplyStream(max_bulk=100).replies(b"$101\r\n")


replies = st.lists(
    st.one_of(
        st.binary(max_size=30).map(lambda b: b"+" + b.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n"),
        st.binary(max_size=30).map(lambda b: b"-ERR " + b.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n"),
        st.binary(max_size=200).map(bulk_reply),
        st.just(b"$-1\r\n"),
    ),
    max_size=20,
)


@given(replies, st.lists(st.integers(0, 10_000)))
def test_any_split_of_the_reply_stream_gives_the_same_replies(frames, cuts):
    data = b"".join(frames)
    pieces = feed_in_pieces(ReplyStream().replies, data, cuts)
    assert [r.raw for r in pieces] == frames


# --- builders ---------------------------------------------------------------------------------


def test_error_reply_is_one_err_line_even_with_line_breaks_in_the_message():
    reply = error_reply("BATCH_COMMITTED", "batch b-1\r\nPUSH evil")
    assert reply == b"-ERR BATCH_COMMITTED batch b-1  PUSH evil\r\n"
    (parsed,) = ReplyStream().replies(reply)
    assert parsed.is_error


def test_bulk_reply_round_trips():
    (parsed,) = ReplyStream().replies(bulk_reply(b"b-123"))
    assert parsed.payload == b"b-123"


@pytest.mark.parametrize("garbage", [b"$ 3\r\nabc\r\n", b"$1_0\r\n0123456789\r\n", b"%partial"])
def test_loose_bulk_lengths_and_unknown_types_fail_at_once(garbage):
    with pytest.raises(ProtocolError):
        ReplyStream().replies(garbage)


def test_a_run_is_framed_by_offsets_and_its_errors_found():
    """The fast lane's framing (frame_run): how far `wanted` whole replies reach, which were errors."""
    data = b"+OK\r\n-ERR nope\r\n$3\r\nabc\r\n:7\r\n$5\r\nab"
    assert frame_run(data, 0, 10, 1024) == (len(data) - 6, 4, [1])  # the last bulk is incomplete
    assert frame_run(data, 0, 2, 1024) == (16, 2, [1])
    assert frame_run(data, 5, 1, 1024) == (16, 1, [0])
    assert frame_run(b"+OK\r", 0, 1, 1024) == (0, 0, None)
    with pytest.raises(ProtocolError):
        frame_run(b"*1\r\n", 0, 1, 1024)


@given(replies, st.lists(st.integers(0, 400), max_size=8))
def test_a_run_frames_what_the_stream_frames(frames, cuts):
    """frame_run and ReplyStream agree: one framer, two ways to hand out its frames."""
    data = b"".join(frames)
    end, framed, errors = frame_run(data, 0, len(frames) + 1, 64 * 2**20)
    assert (end, framed) == (len(data), len(frames))
    assert errors == ([i for i, f in enumerate(frames) if f.startswith(b"-")] or None)
