"""Faktory's wire format as the benchmark reads it: one reply parser, the HELLO line, and a
connection on asyncio streams.

`parse()` is the only RESP reply parser in bench/: the load generator's hot `Protocol` calls it on
its receive buffer, and `Connection` calls it on the bytes its stream reader hands over. For
blocking calls (FLUSH, PUSHB, INFO, a Redis's INFO or DBSIZE) the benchmark uses
tests/support/client.py's `RawClient`, as the tests do: Redis answers in the same RESP framing,
so `redis_info()` below is a `RawClient` call too. Nothing here imports `gateway/`, so the
gateway is never measured with its own parser.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from urllib.parse import urlsplit

from tests.support.client import RawClient

# A reply's first byte (Faktory never sends RESP's other kinds). Plain ints, not an IntEnum: the load generator compares them once per reply,
# and an enum member's lookup costs about 0.25 µs more there (Python 3.11), a few % of its budget.
SIMPLE = ord("+")
ERROR = ord("-")
BULK = ord("$")
FAKTORY_KINDS = frozenset((SIMPLE, ERROR, BULK))  # all Faktory ever answers with
CRLF = b"\r\n"
JID = re.compile(rb'"jid":"([^"]*)"')  # a job's jid in its JSON, found without parsing the rest


def parse(data: bytes, pos: int = 0) -> tuple[int, bytes | None, int] | None:
    """The reply that starts at `data[pos]`: (kind, payload, where the next one starts), or None
    while it is incomplete. The payload is the line after the kind byte, or a bulk's body; None
    for the null bulk (`$-1`, FETCH on an empty queue)."""
    end = data.find(CRLF, pos)
    if end < 0:
        return None
    kind = data[pos]
    if kind != BULK:
        return kind, data[pos + 1 : end], end + 2
    length = int(data[pos + 1 : end])
    if length < 0:
        return kind, None, end + 2
    nxt = end + 4 + length
    if nxt > len(data):
        return None
    return kind, data[end + 2 : nxt - 2], nxt


def hello_line(wid: str | None) -> bytes:
    """The bench's HELLO: a worker's when `wid` is given (it may FETCH and BEAT), a producer's otherwise."""
    hello: dict = {"v": 2, "hostname": "bench", "pid": os.getpid()}
    if wid:
        hello.update(wid=wid, labels=["bench"])
    return b"HELLO " + json.dumps(hello, separators=(",", ":")).encode() + CRLF


class Connection:
    """A handshaken connection on asyncio streams, one command in flight: send a line, read its reply.

    Faktory (and the gateway, and the stand-in) answers with `+`, `-` or `$` only; any other first
    byte means the stream is out of step, and the connection is given up (ConnectionError).
    """

    __slots__ = ("buf", "reader", "url", "writer")

    def __init__(self, url: str):
        self.url = url
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = b""

    async def open(self, wid: str | None = None) -> None:
        parts = urlsplit(self.url)
        self.reader, self.writer = await asyncio.open_connection(parts.hostname, parts.port)
        self.buf = b""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        kind, payload = await self.read()
        if kind != SIMPLE or not payload.startswith(b"HI"):
            raise ConnectionError(f"bad greeting {payload!r}")
        self.writer.write(hello_line(wid))
        kind, payload = await self.read()
        if kind != SIMPLE:
            raise ConnectionError(f"handshake refused: {payload!r}")

    async def read(self) -> tuple[int, bytes | None]:
        while (reply := parse(self.buf)) is None:
            chunk = await self.reader.read(1 << 16)
            if not chunk:
                raise asyncio.IncompleteReadError(self.buf, None)
            self.buf += chunk
        kind, payload, end = reply
        self.buf = self.buf[end:]
        if kind not in FAKTORY_KINDS:
            raise ConnectionError(f"unexpected reply kind {chr(kind)!r}: {payload[:80]!r}")
        return kind, payload

    async def call(self, line: bytes) -> tuple[int, bytes | None]:
        """Send one command (with its CRLF), return its reply."""
        self.writer.write(line)
        return await self.read()

    def close(self, polite: bool = False) -> None:
        """Close; `polite` says END first, as a client that is done would."""
        if self.writer is not None:
            try:
                if polite:
                    self.writer.write(b"END\r\n")
                self.writer.close()
            except Exception:
                pass
        self.reader = self.writer = None


def redis_info(url: str, section: str) -> dict[str, str]:
    """A Redis's `INFO <section>` as {field: value} (the `# Section` headers left out)."""
    with RawClient(url, timeout=5) as client:
        text = client.value(f"INFO {section}").decode()
    return dict(line.split(":", 1) for line in text.splitlines() if line and not line.startswith("#"))


def redis_value(url: str, command: str) -> bytes | None:
    """One Redis command's reply (a bulk's body, an integer's digits); raises on -ERR."""
    with RawClient(url, timeout=5) as client:
        return client.value(command)
