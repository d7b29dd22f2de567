"""How the Go server reads text, wherever the gateway must read it the same way.

Faktory is written in Go, and a few of its readings differ from Python's obvious ones. Where a
rule depends on what the server reads, the gateway uses these instead:

- `upper`: Go's `strings.ToUpper`, which `QUEUE` applies to its subcommand (server/commands.go:51
  in v1.9.4) and which the gateway also applies to `BATCH` subcommands, failing closed.
- `fold_key`: encoding/json's matching of an object key to a struct field (`custom` matches
  `Custom`, `CUSTOM` and `cu\\u017ftom`).

Both were derived by enumerating every Unicode code point with Go 1.26 (the toolchain Faktory
1.9.4's test binary is built with; Unicode 15): the only non-ASCII runes that `unicode.ToUpper`
maps to ASCII are U+0131 (dotless i -> I) and U+017F (long s -> S); the only ones whose
encoding/json fold is ASCII are U+017F (-> s) and U+212A (Kelvin sign -> k). Python's
`str.upper()` is not Go's: it maps "ß" to "SS" and the "ﬀ" ligature to "FF", which Go leaves alone.
"""

from __future__ import annotations

# The non-ASCII runes that Go's unicode.ToUpper maps to ASCII letters.
_GO_UPPER_TO_ASCII = {"\u0131": "I", "\u017f": "S"}


def upper(word: bytes) -> bytes | None:
    """Go's `strings.ToUpper(word)` when the result is ASCII, else None.

    None means the server's reading contains a non-ASCII rune (or U+FFFD, Go's replacement for
    a byte that is not UTF-8), so it equals no ASCII keyword such as `PAUSE` or `COMMIT`.
    """
    if word.isascii():
        return word.upper()
    try:
        text = word.decode("utf-8")
    except UnicodeDecodeError:
        return None
    out = []
    for char in text:
        if char.isascii():
            out.append(char.upper())
        elif char in _GO_UPPER_TO_ASCII:
            out.append(_GO_UPPER_TO_ASCII[char])
        else:
            return None
    return "".join(out).encode()


def fold_key(key: str) -> str:
    """A JSON object key as encoding/json compares it with a struct field's name (lower-cased).

    Go folds with Unicode's simple case folding: besides ASCII case, the long s (U+017F) folds
    to "s" and the Kelvin sign (U+212A) to "k" (which `str.lower()` already does). No other
    non-ASCII rune folds onto ASCII, so for the ASCII field names Faktory uses this is exact.
    """
    return key.lower().replace("\u017f", "s")
