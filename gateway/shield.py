"""The server shield: the lines Faktory's own code crashes on, answered by the gateway instead.

Faktory 1.9.4 runs each connection's commands in a goroutine with no `recover` (server/server.go:
195-203, 373-407), so a handler that panics takes the whole process, and every client's server,
down. The gateway never forwards such a line: it answers it with an `-ERR` of the server's own
shape and the connection stays usable, in order (docs/shield.md lists every line, with the
source lines that crash, and how the list was derived).

Two kinds of line crash the server:

- **A payload verb alone.** `PUSH`, `PUSHB`, `ACK`, `FAIL` and `BEAT` slice their payload at a
  fixed offset, `cmd[len(verb)+1:]` (server/commands.go:167, 212, 268, 292, 333), which is past
  the end of a line that is only the verb. The gateway answers what the server answers to the
  same verb with an empty payload (`PUSH ` with its trailing space), byte for byte.
- **`QUEUE` without what it indexes.** `QUEUE` splits its line on spaces and reads `qs[0]`
  (server/commands.go:50-51), and for `PAUSE`, `RESUME` and `REMOVE` (in any spelling Go's
  `strings.ToUpper` maps to them) also `qs[1]` (line 69).

Everything here is pure: a Command in, a Shielded (or None) out. The pipeline's fast lane needs
only `BARE_VERBS` (a line with a space is never a bare verb, and every `QUEUE` line takes the
full path), and the guard calls `judge` for the rest.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from . import gotext
from .protocol import Command


class Crash(enum.Enum):
    """Why the server's code would panic on a line (what the gateway shields it from)."""

    PAYLOAD_SLICED_PAST_THE_END = "slice bounds out of range"
    QUEUE_WITHOUT_SUBCOMMAND = "index out of range [0]"
    QUEUE_WITHOUT_NAME = "index out of range [1]"


@dataclass(frozen=True)
class Shielded:
    """The gateway's answer to a line the server would crash on."""

    verb: str  # the metric label (one of metrics.VERBS)
    crash: Crash
    source: str  # where Faktory 1.9.4 panics on it
    reply: bytes  # what the client gets instead


def _error(text: bytes) -> bytes:
    return b"-ERR " + text + b"\r\n"


# The payload verbs: the reply is the server's own to the verb with an empty payload (`PUSH `),
# whose error messages are built at the same source lines (commands.go:172, 219, 273, 297, 338;
# tests/integration/test_shield.py checks each against the real server).
_BARE = {
    b"PUSH": Shielded(
        "PUSH", Crash.PAYLOAD_SLICED_PAST_THE_END, "server/commands.go:212",
        _error(b"invalid JSON: unexpected end of JSON input"),
    ),
    b"PUSHB": Shielded(
        "PUSHB", Crash.PAYLOAD_SLICED_PAST_THE_END, "server/commands.go:167",
        _error(b"invalid JSON: unexpected end of JSON input"),
    ),
    b"ACK": Shielded("ACK", Crash.PAYLOAD_SLICED_PAST_THE_END, "server/commands.go:268", _error(b"invalid ACK ")),
    b"FAIL": Shielded("FAIL", Crash.PAYLOAD_SLICED_PAST_THE_END, "server/commands.go:292", _error(b"invalid FAIL ")),
    b"BEAT": Shielded("BEAT", Crash.PAYLOAD_SLICED_PAST_THE_END, "server/commands.go:333", _error(b"invalid BEAT ")),
    # The server has no reply for a bare QUEUE to copy (`QUEUE ` says "no such QUEUE subcommand: ").
    b"QUEUE": Shielded(
        "QUEUE", Crash.QUEUE_WITHOUT_SUBCOMMAND, "server/commands.go:51",
        _error(b"QUEUE needs a subcommand: PAUSE, RESUME, REMOVE or LATENCY"),
    ),
}  # fmt: skip

# Verbs whose line crashes the server when it is the verb alone (no space after it).
BARE_VERBS = frozenset(_BARE)

# QUEUE subcommands that read a queue name (or `*`) at qs[1] without checking it is there.
_NAMED = frozenset((b"PAUSE", b"RESUME", b"REMOVE"))


def judge(command: Command) -> Shielded | None:
    """The gateway's answer when the server would crash on `command`; None when it would not.

    The server cuts the verb at the first space after trimming one `\\r\\n` or `\\n` (server.go:
    385-393), exactly as Command.parse does, so `command.verb` is the server's verb.
    """
    verb = command.verb
    if command.raw[len(verb) : len(verb) + 1] != b" ":  # no space: the line is the verb alone
        return _BARE.get(verb)
    if verb == b"QUEUE":
        # strings.Split(cmd, " ")[1:] (commands.go:50): the words after the verb, empty ones kept.
        words = command.args.split(b" ")
        if len(words) == 1:
            subcommand = gotext.upper(words[0])  # commands.go:51
            if subcommand in _NAMED:
                return Shielded(
                    "QUEUE",
                    Crash.QUEUE_WITHOUT_NAME,
                    "server/commands.go:69",
                    _error(b"QUEUE %s needs a queue name, or * for every queue" % subcommand),
                )
    return None
