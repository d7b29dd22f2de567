"""Reading a chunk of whole command lines for the fast lane, without splitting it into commands.

The pipeline's fast lane forwards a chunk that the rules need not see as one write, and the rules
(batches/guard.py `route`) decide that from the chunk's verbs and a few byte markers. Finding the
verbs costs no regex for the common chunk of one line, and one C-speed regex otherwise. Pure; the
tests check it against `Command.parse` (tests/unit/test_chunks.py).
"""

from __future__ import annotations

import re

from .shield import BARE_VERBS

# One match per whole line, capturing its verb exactly as Command.parse splits it (up to the first
# space, without the line end), except a line the server crashes on (one of shield.BARE_VERBS
# alone on its line), whose capture keeps its line end: FULL_PATH_VERBS holds those, so such a
# chunk goes through decide(), which answers the line (the shield) instead of forwarding it. The
# capture is a lookahead, and the match then takes the whole line; verbs followed by a space
# (most lines) are tried first.
_BARE = b"|".join(sorted(BARE_VERBS))
_VERB = rb"[^ \r\n]*(?:\r(?!\n)[^ \r\n]*)*"  # up to a space or the line end; a lone \r is in the verb
LINE = re.compile(rb"(?=(%s(?= )|(?:%s)\r?\n|%s))[^\n]*\n" % (_VERB, _BARE, _VERB))

# Verbs (or, for the shield, whole lines) that never take the fast lane: END (the server closes),
# every QUEUE line and the bare lines the server crashes on (decide() answers them itself).
FULL_PATH_VERBS = frozenset(
    (b"END", b"QUEUE", *(verb + end for verb in BARE_VERBS for end in (b"\n", b"\r\n")))
)


def verbs_of(chunk: bytes) -> list[bytes]:
    """The verbs of `chunk` (whole lines, ending with a line end), as LINE finds them."""
    if chunk.find(b"\n") == len(chunk) - 1:  # one line, the common case: no regex
        verb = chunk.partition(b" ")[0]
        if verb[-1:] == b"\n":  # no space: the verb is the line without its end,
            bare = verb[:-2] if verb[-2:] == b"\r\n" else verb[:-1]
            if bare not in BARE_VERBS:  # unless the server crashes on it (LINE's rule)
                verb = bare
        return [verb]
    return LINE.findall(chunk)
