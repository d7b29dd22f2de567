"""Coverage-guided fuzzing of the gateway's parsers: the wire framers and the job reader.

    pip install atheris
    python fuzz/fuzz_protocol.py -max_total_time=60

Every input is read the same way, so a crash found by atheris replays as a plain function call
(`TestOneInput(data)`), which is also what tests/unit/test_fuzz_smoke.py runs under hypothesis:

    byte 0      which target: 0 client commands, 1 server replies, 2 JSON payloads, 3 reply builders
    byte 1      the size cap: a small one (1..128 bytes) so that the too-large paths are reached,
                or the gateway's default when the byte is 0xff
    byte 2      how many chunk sizes follow (0..15)
    next bytes  the chunk sizes, one byte each; whatever is left after them goes in one last chunk
    the rest    the stream (or payload)

What must hold:
- CommandReader and the reply framer the pipeline runs (ReplyStream, frame_run), fed the stream
  in any split, raise nothing but ProtocolError (of which FrameTooLarge is one); the frames they
  return, put back together, are exactly the bytes consumed so far, each frame is well formed, a
  split changes nothing (fed all at once, the same frames come out; for commands, also the same
  failure), and the fast lane's run framing (frame_run) finds the same frames.
- The job readers (jobs.read_push, jobs.read_bulk) raise nothing but Malformed; a bid found is a
  valid one, and the fast-path filter (may_name_a_batch) never misses a payload that names a batch.
- error_reply and bulk_reply, given any text, make exactly one well-formed reply.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["gateway"]):
        from gateway import protocol
        from gateway.batches import jobs, policy
else:
    from gateway import protocol
    from gateway.batches import jobs, policy

DEFAULT_CAP = 16 * 2**20


def split(data: bytes) -> tuple[int, int, list[bytes], bytes]:
    """(target, cap, chunks, stream) from one fuzz input, as the module docstring lays it out."""
    target, cap_byte, count = data[0] & 3, data[1], data[2] & 15
    cap = DEFAULT_CAP if cap_byte == 0xFF else cap_byte % 128 + 1
    sizes, stream = data[3 : 3 + count], data[3 + count :]
    chunks, offset = [], 0
    for size in sizes:
        chunks.append(stream[offset : offset + size])
        offset += size
    chunks.append(stream[offset:])
    return target, cap, chunks, stream


def TestOneInput(data: bytes) -> None:  # the name atheris and libFuzzer use
    if len(data) < 3:
        return
    target, cap, chunks, stream = split(data)
    if target == 0:
        check_commands(cap, chunks, stream)
    elif target == 1:
        check_replies(cap, chunks, stream)
    elif target == 2:
        check_payload(stream)
    else:
        check_builders(stream)


# --- client commands ----------------------------------------------------------------------------


def check_command(command: protocol.Command, cap: int) -> None:
    raw = command.raw
    assert raw.endswith(b"\n") and b"\n" not in raw[:-1], raw
    assert len(raw) <= cap + 1, (len(raw), cap)
    line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    assert b" " not in command.verb
    assert (command.verb + b" " + command.args if b" " in line else command.verb) == line


def read_commands(cap: int, chunks: list[bytes], stream: bytes) -> tuple[list[bytes], bool]:
    reader = protocol.CommandReader(cap)
    frames: list[bytes] = []
    fed = 0
    for chunk in chunks:
        try:
            commands = reader.feed(chunk)
        except protocol.FrameTooLarge:
            return frames, True
        fed += len(chunk)
        for command in commands:
            check_command(command, cap)
            frames.append(command.raw)
        assert reader.buffered <= cap, (reader.buffered, cap)
        assert b"".join(frames) == stream[: fed - reader.buffered]
    return frames, False


def check_commands(cap: int, chunks: list[bytes], stream: bytes) -> None:
    frames, failed = read_commands(cap, chunks, stream)
    frames_at_once, failed_at_once = read_commands(cap, [stream], stream)
    assert failed == failed_at_once, (failed, failed_at_once)
    if not failed:
        assert frames == frames_at_once


# --- server replies -----------------------------------------------------------------------------


def check_reply(reply: protocol.Reply, cap: int) -> None:
    raw = reply.raw
    assert raw.endswith(b"\r\n"), raw
    assert reply.kind == raw[0] and reply.kind in b"+-:$", raw
    if reply.kind != protocol.DOLLAR:
        assert reply.payload == raw[1:-2] and b"\r\n" not in reply.payload, raw
        return
    header, _, rest = raw.partition(b"\r\n")
    if reply.payload is None:
        assert int(header[1:]) == -1 and rest == b"", raw
        return
    assert int(header[1:]) == len(reply.payload) <= max(cap, 64 * 2**20), raw
    assert rest == reply.payload + b"\r\n", raw


def read_replies(cap: int, chunks: list[bytes], stream: bytes) -> list[bytes] | None:
    """The frames' bytes, or None when the reader refused the stream."""
    reader = protocol.ReplyStream(cap)
    frames: list[bytes] = []
    fed = 0
    for chunk in chunks:
        try:
            replies = reader.replies(chunk)
        except protocol.ProtocolError:
            return None
        fed += len(chunk)
        for reply in replies:
            check_reply(reply, cap)
            frames.append(reply.raw)
        assert b"".join(frames) == stream[: fed - reader.held]  # all the rest was framed
    return frames


def check_replies(cap: int, chunks: list[bytes], stream: bytes) -> None:
    frames = read_replies(cap, chunks, stream)
    frames_at_once = read_replies(cap, [stream], stream)
    # A split may refuse sooner (an unfinished line is judged by what has come so far), so only
    # two successes must agree.
    if frames is not None and frames_at_once is not None:
        assert frames == frames_at_once
    if frames_at_once is not None:  # the fast lane's framing agrees, frame for frame
        end, framed, errors = protocol.frame_run(stream, 0, len(frames_at_once) + 1, cap)
        assert (end, framed) == (sum(map(len, frames_at_once)), len(frames_at_once))
        assert errors == ([i for i, frame in enumerate(frames_at_once) if frame[:1] == b"-"] or None)


# --- JSON payloads (PUSH, PUSHB, BATCH NEW) -----------------------------------------------------


def check_payload(payload: bytes) -> None:
    try:
        bids = [jobs.read_push(payload)[0]]
    except policy.Malformed:
        bids = []
    try:
        bids += [job.bid for job in jobs.read_bulk(payload) or []]
    except policy.Malformed:
        pass
    for bid in bids:
        if bid is not None:
            assert policy.BID.fullmatch(bid), bid
            assert jobs.may_name_a_batch(payload), payload
    try:
        value = jobs.decode(payload)
        parent = jobs.field(value, "parent_bid") if isinstance(value, dict) else None
    except policy.Malformed:
        return
    if parent:
        try:
            policy.valid_bid(parent)
        except policy.Malformed:
            pass


# --- the gateway's own replies ------------------------------------------------------------------


def check_builders(stream: bytes) -> None:
    text = stream.decode("utf-8", "replace")
    code, _, message = text.partition(" ")
    for built in (protocol.error_reply(code, message), protocol.bulk_reply(stream)):
        replies = protocol.ReplyStream().replies(built)
        assert [reply.raw for reply in replies] == [built], built


# Tokens libFuzzer splices into inputs, so that it reaches deep states sooner than byte by byte.
DICTIONARY = [
    b"\r\n",
    b"\n",
    b" ",
    b"+OK",
    b"+HI ",
    b"-ERR ",
    b":1",
    b"$0",
    b"$-1",
    b"$5",
    b"$18446744073709551616",
    b"HELLO ",
    b"PUSH ",
    b"PUSHB ",
    b"FETCH ",
    b"ACK ",
    b"BATCH NEW ",
    b"BATCH COMMIT ",
    b"END",
    b'"bid"',
    b'"custom"',
    b'"CUSTOM"',
    b'"parent_bid"',
    b'"jid"',
    b'"b-123"',
    b"\\u0062",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"null",
    b"true",
    b"1e999",
    b"\xef\xbb\xbf",
    b"\xc5\xbf",
]


def main() -> None:
    import tempfile

    args = list(sys.argv)
    if not any(arg.startswith("-dict=") for arg in args):
        # One fixed file, rewritten each run: libFuzzer exits without running Python's cleanup.
        path = os.path.join(tempfile.gettempdir(), "faktory-gateway-fuzz.dict")
        with open(path, "w") as handle:
            for token in DICTIONARY:
                handle.write('"' + "".join(f"\\x{byte:02x}" for byte in token) + '"\n')
        args.append("-dict=" + path)
    atheris.Setup(args, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
