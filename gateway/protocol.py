"""The Faktory wire protocol, sans I/O.

Two framers and a few reply builders, nothing else: bytes go in, frames come out. No sockets, no
asyncio, no JSON decoding of payloads, so the rules of the protocol can be tested by replaying byte
sequences, and the hot path pays only for finding line ends.

- Client to server: one command per line, ended by CRLF or a bare LF (the Ruby client sends LF).
  The verb is everything before the first space and is case-sensitive.
- Server to client: RESP. `+text`, `-CODE text`, `:int` and `$n` followed by exactly n bytes, or
  `$-1` for null.

Every frame keeps its exact bytes (`raw`) so the proxy can forward it unchanged.
"""

from __future__ import annotations

__all__ = [
    "Command",
    "CommandReader",
    "FrameTooLarge",
    "ProtocolError",
    "Reply",
    "ReplyStream",
    "bulk_reply",
    "error_reply",
    "frame_end",
    "frame_run",
    "reply_at",
]


class ProtocolError(Exception):
    """The peer sent bytes that are not the Faktory protocol."""


class FrameTooLarge(ProtocolError):
    """A line or bulk string is longer than the configured cap."""


class Command:
    """One client line: `verb`, the bytes after the first space (`args`), and the exact line (`raw`)."""

    __slots__ = ("args", "raw", "verb")

    def __init__(self, verb: bytes, args: bytes, raw: bytes):
        self.verb = verb
        self.args = args
        self.raw = raw

    def __repr__(self) -> str:
        return f"Command({self.verb!r}, {self.args[:60]!r}{'...' if len(self.args) > 60 else ''})"

    @classmethod
    def parse(cls, raw: bytes) -> Command:
        """Split one line (with its line end) into verb and arguments, as the server does."""
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
        verb, _, args = line.partition(b" ")
        return cls(verb, args, raw)


class CommandReader:
    """Frames the client's byte stream into commands.

    A line longer than `max_line` raises FrameTooLarge as soon as the excess is seen, without
    waiting for its end, so an endless line cannot grow memory without bound.
    """

    def __init__(self, max_line: int = 16 * 1024 * 1024):
        self.max_line = max_line
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already known to hold no LF

    def feed(self, data: bytes) -> list[Command]:
        buffer = self._buffer
        if not buffer and data.endswith(b"\n") and data.count(b"\n") == 1 and len(data) <= self.max_line + 1:
            return [Command.parse(data)]  # the common case: exactly one whole line per read
        buffer += data
        commands = []
        start = 0
        find = buffer.find
        while True:
            end = find(b"\n", max(start, self._scanned))
            if end < 0:
                break
            if end - start > self.max_line:
                raise FrameTooLarge(f"line longer than {self.max_line} bytes")
            commands.append(Command.parse(bytes(buffer[start : end + 1])))
            start = end + 1
        if start:
            del buffer[:start]
        self._scanned = len(buffer)
        if len(buffer) > self.max_line:
            raise FrameTooLarge(f"line longer than {self.max_line} bytes")
        return commands

    def take(self) -> bytes:
        """Hand back the incomplete line held so far, and hold nothing (the fast lane reads on from it)."""
        held = bytes(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        return held

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete line held back."""
        return len(self._buffer)


class Reply:
    """One RESP frame from the server: its type byte, its payload, and its exact bytes.

    `payload` is the text after the type byte for `+`, `-`, `:`; the bulk bytes for `$n`; None for `$-1`.
    """

    __slots__ = ("kind", "payload", "raw")

    def __init__(self, kind: int, payload: bytes | None, raw: bytes):
        self.kind = kind
        self.payload = payload
        self.raw = raw

    @property
    def is_error(self) -> bool:
        return self.kind == MINUS

    def __repr__(self) -> str:
        return f"Reply({self.raw[:80]!r})"


PLUS, MINUS, COLON, DOLLAR = b"+-:$"


def frame_end(data: bytes | bytearray, start: int, max_bulk: int) -> int:
    """Where the RESP frame that begins at `start` ends: an offset past its last byte.

    An offset beyond `len(data)` means the frame is incomplete; for a bulk string it is exactly
    where the frame will end, for a line it is `len(data) + 1` (its end is not known yet). Raises
    ProtocolError for anything that is not RESP.
    """
    size = len(data)
    kind = data[start]
    header_end = data.find(b"\r\n", start)
    if kind not in (PLUS, MINUS, COLON, DOLLAR):
        raise ProtocolError(f"unexpected reply type {bytes([kind])!r}")
    if header_end < 0:
        if size - start > (64 if kind == DOLLAR else max_bulk):
            raise FrameTooLarge("server line too long")
        return size + 1
    if kind != DOLLAR:
        return header_end + 2
    digits = data[start + 1 : header_end]
    if not (digits.isdigit() or digits == b"-1"):  # int() would also take " 3" or "1_0"
        raise ProtocolError(f"bad bulk length {digits[:40]!r}")
    length = int(digits)
    if length == -1:
        return header_end + 2
    if length > max_bulk:
        raise FrameTooLarge(f"bulk string of {length} bytes")
    end = header_end + 4 + length
    if end <= size and data[end - 2 : end] != b"\r\n":
        raise ProtocolError("bulk string not followed by CRLF")
    return end


def frame_run(data: bytes, pos: int, wanted: int, max_bulk: int) -> tuple[int, int, list[int] | None]:
    """Frame up to `wanted` whole replies of `data` from `pos`, by offsets only (the fast lane
    relays them as they came, without a Reply object each). Returns (end, framed, errors): the
    offset past the last whole frame (`pos` if none), how many were framed, and the indexes among
    them of error frames (`-`), or None when there was none."""
    size = len(data)
    framed = 0
    errors: list[int] | None = None
    while framed < wanted and pos < size:
        kind = data[pos]
        if kind == PLUS or kind == COLON:  # a line: frame_end's checks, inlined for the common +OK
            end = data.find(b"\r\n", pos) + 2
            if end == 1:
                break  # incomplete; frame_end measures it when it is held (the cap applies there)
        else:
            end = frame_end(data, pos, max_bulk)
            if end > size:
                break
            if kind == MINUS:
                if errors is None:
                    errors = []
                errors.append(framed)
        framed += 1
        pos = end
    return pos, framed, errors


class ReplyStream:
    """The server's byte stream, as the pipeline frames it: whole frames are framed where they lie
    in what was read (by offsets: `frame_end`, `frame_run`, `reply_at`), and an incomplete last
    frame is held until the bytes it needs have come. Raises ProtocolError for what is not RESP.

        data = stream.feed(read)    # b"" while the held frame is still incomplete
        ... frame data from offset 0 ...
        stream.keep(data, pos)      # hold data[pos:], the start of a frame still incomplete
    """

    __slots__ = ("_need", "_tail", "max_bulk")

    def __init__(self, max_bulk: int = 64 * 1024 * 1024):
        self.max_bulk = max_bulk
        self._tail = bytearray()
        self._need = 0  # bytes the held frame needs before it is worth framing again

    def feed(self, data: bytes) -> bytes:
        tail = self._tail
        if not tail:
            return data
        tail += data
        if len(tail) < self._need:
            return b""
        data = bytes(tail)
        tail.clear()
        return data

    def keep(self, data: bytes, pos: int) -> None:
        if pos < len(data):
            self._tail += data[pos:] if pos else data
            self._need = frame_end(self._tail, 0, self.max_bulk)  # checks the held frame's header too

    @property
    def held(self) -> int:
        """Bytes of an incomplete frame held for the next `feed`."""
        return len(self._tail)

    def replies(self, data: bytes) -> list[Reply]:
        """Every whole reply that `data` completes, as Reply objects (for callers that want them
        all: the tests, the fuzzer; the pipeline frames one at a time as its queue says)."""
        data = self.feed(data)
        out = []
        pos = 0
        while pos < len(data):
            end = frame_end(data, pos, self.max_bulk)
            if end > len(data):
                break
            out.append(reply_at(data, pos, end))
            pos = end
        self.keep(data, pos)
        return out


def reply_at(data: bytes, start: int, end: int) -> Reply:
    """The Reply object for the whole frame data[start:end] (found by frame_end)."""
    raw = data if start == 0 and end == len(data) else data[start:end]
    kind = raw[0]
    if kind != DOLLAR:
        return Reply(kind, raw[1:-2], raw)
    if raw == b"$-1\r\n":
        return Reply(kind, None, raw)
    return Reply(kind, raw[raw.index(b"\r\n") + 2 : -2], raw)


def error_reply(code: str, message: str) -> bytes:
    """A Faktory-style error: `-ERR CODE message`. `ERR` first, because the Ruby client raises only on it.

    Line breaks in the message would split the frame, so they are flattened.
    """
    text = f"{code} {message}" if code else message
    text = text.replace("\r", " ").replace("\n", " ")
    return b"-ERR " + text.encode("utf-8", "replace") + b"\r\n"


def bulk_reply(payload: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(payload), payload)
