"""What a job, a bulk push or a BATCH argument says, read the way the Go server reads it.

A batch rule is only as good as its reading of the payload: the gateway must find the batch a job
joins exactly where Faktory will (Go's encoding/json, its case-insensitive field matching, its
handling of repeated keys and bytes that are not UTF-8), or a job could slip into a batch unseen,
or a job the server accepts could be refused. policy.py then judges what is read here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import NamedTuple

from ..gotext import fold_key
from .policy import BID, Malformed, valid_bid

BID_BYTES = re.compile(BID.pattern.encode())


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    # The Go server merges a repeated key's objects where Python keeps the last one; a payload
    # that the two would read differently is refused instead of being judged on one reading.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise Malformed("duplicate keys in JSON object")
    return result


def decode(payload: bytes) -> object:
    try:
        return json.loads(payload, object_pairs_hook=_unique_keys)
    except Malformed:
        raise
    except (ValueError, RecursionError) as exc:
        raise Malformed(f"invalid JSON: {str(exc)[:80]}") from None


def field(obj: dict, name: str) -> object:
    """A struct field as Go's encoding/json finds it: the key matched case-insensitively."""
    matches = [key for key in obj if fold_key(key) == name]
    if len(matches) > 1:
        raise Malformed(f"ambiguous keys {', '.join(sorted(matches))}")
    return obj[matches[0]] if matches else None


def _custom(job: object) -> dict | None:
    """A job's `custom` as Go's encoding/json reads it (None when absent or not an object)."""
    custom = field(job, "custom") if isinstance(job, dict) else None
    return custom if isinstance(custom, dict) else None


def _bid_in(custom: dict | None) -> str | None:
    bid = custom.get("bid") if custom is not None else None
    if bid is None or bid == "":
        return None
    return valid_bid(bid)


# Only Faktory Enterprise puts these on the callback jobs it enqueues (`_bid` the batch, `_pbid` its
# parent, `_cb` which callback). A client's job carrying one could pass for a callback.
RESERVED_KEYS = ("_bid", "_pbid", "_cb")


def _reserved_in(custom: dict | None) -> list[str]:
    return [key for key in RESERVED_KEYS if key in custom] if custom is not None else []


# Bytes after which a plain decode could read a key differently from Go: JSON escapes, and the
# two non-ASCII letters Go's case folding maps onto ASCII (long s, Kelvin sign).
_FOLD_TRAPS = (b"\\u", "\u017f".encode(), "\u212a".encode())


def read_push(payload: bytes) -> tuple[str | None, list[str]]:
    """A PUSH's (custom.bid, reserved keys), as the server would read them. Raises Malformed."""
    return read_job(payload)[:2]


def read_job(payload: bytes) -> JobReading:
    """A PUSH's job as the server would read it: its batch, reserved keys and jid. Raises Malformed.

    The common batch PUSH names `custom` once and `bid` once and has nothing Go would fold: then
    no key that matters can be duplicated or ambiguous, and the plain C decoder reads what the
    server reads (duplicates of other keys do not change the decision). Anything else, and what
    the plain decoder cannot read although Go can (bytes that are not UTF-8, nesting past
    Python's recursion limit), goes through `_read_document`, which keeps repeated keys.
    """
    if (
        payload.count(b'"bid"') <= 1
        and payload.lower().count(b'"custom"') == 1
        and not any(trap in payload for trap in _FOLD_TRAPS)
    ):
        try:
            job = json.loads(payload)
        except (UnicodeDecodeError, RecursionError):
            pass  # Go reads it: so does _read_document
        except ValueError as exc:
            raise Malformed(f"invalid JSON: {str(exc)[:80]}") from None
        else:
            custom = _custom(job)
            return JobReading(_bid_in(custom), _reserved_in(custom), _jid_in(job))
    job = _read_document(_text(payload))
    if type(job) is not tuple:
        return JobReading(None, _NONE, "")  # not an object: the server refuses it, and nothing joins a batch
    return _read_job(job)


def _jid_in(job: object) -> str:
    """The jid Go reads: the last key that folds to `jid` with a string value."""
    jid = ""
    if isinstance(job, dict):
        for key, value in job.items():
            if len(key) == 3 and isinstance(value, str) and key.lower() == "jid":
                jid = value
    return jid


class JobReading(NamedTuple):  # a tuple: a frozen dataclass costs a microsecond per job
    """One job as the server reads it: the batch it joins, the reserved keys it carries, and its
    jid (for a PUSHB reply's jid-to-error map, and what the engine counts)."""

    bid: str | None
    reserved: list[str]
    jid: str


BulkJob = JobReading  # one job of a PUSHB


def read_bulk(payload: bytes) -> list[BulkJob] | None:
    """A PUSHB's jobs, as the server would read them; None when the payload is JSON but not a
    list (the server answers that itself). Raises Malformed."""
    text = _text(payload)
    try:
        jobs = _PAIRS.decode(text)
    except RecursionError:
        elements = _elements(text)
        jobs = None if elements is None else [job for job, _, _ in elements]
    except ValueError as exc:
        raise Malformed(f"invalid JSON: {str(exc)[:80]}") from None
    if type(jobs) is not list:
        return None
    readings = []
    for job in jobs:
        if type(job) is tuple:
            reading = _read_job(job)
            readings.append(reading)
        else:  # not an object: Go's decoder fails the whole PUSHB, and it names no batch
            readings.append(BulkJob(None, _NONE, ""))
    return readings


def bulk_line(payload: bytes, keep: list[bool]) -> bytes:
    """The PUSHB line of the jobs of `payload` (a list read by read_bulk) that `keep` marks,
    each as the client's own bytes."""
    text = _text(payload)
    elements = _elements(text)
    if elements is None:
        raise ValueError("bulk_line needs the payload of a PUSHB that read_bulk read as a list")
    kept = [text[start:end] for (_, start, end), wanted in zip(elements, keep, strict=True) if wanted]
    return b"PUSHB [" + ",".join(kept).encode("utf-8", "surrogateescape") + b"]\r\n"


# --- Reading a job the way the Go server does -----------------------------------------------------
#
# What the batch rules read of a job is small: the top-level keys that Go folds to `custom`, and
# in that object the keys `bid`, `_bid`, `_pbid`, `_cb` (map keys: exact). A batch key cannot
# hide anywhere else: `custom` is the only map in Faktory's Job struct. So objects are decoded as
# lists of (key, value) pairs, repeated keys kept, and where a document is nested too deep for
# Python's decoder (Go accepts 10,000 levels), only the job's object and its `custom` are walked:
# every other deep value is skipped (`_DEEP`), not built.
#
# Bytes that are not UTF-8 are kept as lone surrogates (surrogateescape): like Go's U+FFFD they
# match no key the rules read and no valid bid, and a job's own bytes can be re-encoded exactly.
# Python's JSON grammar is Go's plus NaN and Infinity, so what Python refuses, Go refuses too.
#
# Ambiguity is refused only where it could change a decision:
# - more than one top-level key folding to `custom`: Go merges their objects into one map (a
#   `null` empties it), so a batch key in any of them is refused; with none, no merge makes one;
# - a key the rules read repeated inside `custom` (Go keeps the last; refused all the same: a
#   batch job spelt two ways is not a job a client means to send).


# A JSON object is read as a tuple of its (key, value) pairs, in order, repeated keys kept (a JSON
# array is a list, never a tuple). A tuple, because the C decoder builds one ten times faster
# than an instance of a class of ours.
_Object = tuple[tuple[str, object], ...]


class _Deep:
    """A value nested too deep for Python's decoder, skipped: the rules never read inside one."""

    json_name = "a value nested too deep"  # how policy.valid_bid names it in a refusal


_DEEP = _Deep()
_RULE_KEYS = frozenset(("bid", *RESERVED_KEYS))
_NONE: list[str] = []  # no reserved keys (shared: never mutated)
_SPACE = " \t\n\r"
_SPACES = re.compile(r"[ \t\n\r]*")
# One structural token of a skipped value: a whole string (its brackets do not count), an
# opener, a closer.
_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|([\[{])|([\]}])')
_PAIRS = json.JSONDecoder(object_pairs_hook=tuple)
# C: one JSON string after its quote -> (text, end); a documented function that typeshed does not list.
_scan_string: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


def _text(payload: bytes) -> str:
    return payload.decode("utf-8", "surrogateescape")


def _skip_space(text: str, pos: int) -> int:
    if pos < len(text) and text[pos] in _SPACE:  # compact JSON, the common case, needs no regex
        match = _SPACES.match(text, pos)  # it matches at any position (`*`)
        return match.end() if match else pos
    return pos


def _end_of_document(text: str, end: int) -> None:
    if _skip_space(text, end) != len(text):
        raise Malformed("invalid JSON: extra data after the value")


def _read_document(text: str) -> object:
    """The whole payload, objects as tuples of pairs; the top level walked if it is too deep."""
    try:
        return _PAIRS.decode(text)
    except RecursionError:
        start = _skip_space(text, 0)
        value, end = _read_value(text, start, walk=True)
        _end_of_document(text, end)
        return value
    except ValueError as exc:
        raise Malformed(f"invalid JSON: {str(exc)[:80]}") from None


def _elements(text: str) -> list[tuple[object, int, int]] | None:
    """A list's elements with their offsets, each job (an object) walked if too deep; None when
    the document is not a list."""
    start = _skip_space(text, 0)
    if not text.startswith("[", start):
        _read_document(text)  # Malformed if it is not JSON
        return None
    elements: list[tuple[object, int, int]] = []
    pos = _skip_space(text, start + 1)
    if text.startswith("]", pos):
        _end_of_document(text, pos + 1)
        return elements
    while True:
        value, end = _read_value(text, pos, walk=True)
        elements.append((value, pos, end))
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif text.startswith("]", pos):
            _end_of_document(text, pos + 1)
            return elements
        else:
            raise Malformed("invalid JSON: expected ',' or ']' in a list")


def _read_value(text: str, pos: int, walk: bool) -> tuple[object, int]:
    """The value at `pos` and its end. Too deep to decode: an object is walked member by member
    if `walk` (a job, its custom), anything else is skipped."""
    try:
        # scan_once is the decoder's C scanner, set up by JSONDecoder.__init__ (not in typeshed).
        return _PAIRS.scan_once(text, pos)  # type: ignore[attr-defined]
    except StopIteration:
        raise Malformed("invalid JSON: expected a value") from None
    except RecursionError:
        if walk and text.startswith("{", pos):
            return _walk_object(text, pos)
        return _DEEP, _skip_nested(text, pos)


def _walk_object(text: str, start: int) -> tuple[_Object, int]:
    """The object at text[start] (a `{`), its members decoded one by one; a member that folds to
    `custom` is walked too, every other deep member is skipped."""
    members: list[tuple[str, object]] = []
    pos = _skip_space(text, start + 1)
    if text.startswith("}", pos):
        return (), pos + 1
    while True:
        if not text.startswith('"', pos):
            raise Malformed("invalid JSON: expected a key")
        try:
            key, key_end = _scan_string(text, pos + 1)
        except ValueError:
            raise Malformed("invalid JSON: a key is not a string") from None
        pos = _skip_space(text, key_end)
        if not text.startswith(":", pos):
            raise Malformed("invalid JSON: expected ':' after a key")
        value, end = _read_value(text, _skip_space(text, pos + 1), walk=_is_custom(key))
        members.append((key, value))
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif text.startswith("}", pos):
            return tuple(members), pos + 1
        else:
            raise Malformed("invalid JSON: expected ',' or '}' in an object")


def _skip_nested(text: str, pos: int) -> int:
    """The end of the array or object at `pos`, found by counting brackets outside strings.

    Its inside is not checked: if it is not JSON, Go refuses the whole payload, and then nothing
    the gateway reads of it can let a job into a batch."""
    depth = 0
    for token in _STRUCTURE.finditer(text, pos):
        opener = token.lastindex
        if opener == 1:
            depth += 1
        elif opener == 2:
            depth -= 1
            if depth == 0:
                return token.end()
    raise Malformed("invalid JSON: an array or object is not closed")


def _is_custom(key: str) -> bool:
    return len(key) == 6 and fold_key(key) == "custom"  # with a long s (U+017F) too: six characters


def _read_job(job: _Object) -> JobReading:
    customs: list[tuple[str, object]] = []
    jid = ""
    for key, value in job:
        size = len(key)
        if size == 6:  # "custom", and spelt with a long s (U+017F) too
            if fold_key(key) == "custom":
                customs.append((key, value))
        elif size == 3 and isinstance(value, str) and key.lower() == "jid":
            jid = value  # Go keeps the last of repeated keys for a string field
    found: list[tuple[str, object]] = []  # the members of `custom` the rules read
    for _, custom in customs:
        if type(custom) is tuple:  # anything else: null (no map), or the server refuses the job
            found += [member for member in custom if member[0] in _RULE_KEYS]
    if not found:
        return JobReading(None, _NONE, jid)
    if len(customs) > 1:
        raise Malformed(f"ambiguous keys {', '.join(sorted(key for key, _ in customs))} name a batch")
    keys = [key for key, _ in found]
    if len(found) > 1 and len(set(keys)) != len(keys):
        raise Malformed("duplicate keys in custom")
    bid = None
    reserved = _NONE
    for key, value in found:
        if key != "bid":
            reserved = [key for key in RESERVED_KEYS if key in keys]
        elif value is not None and value != "":
            bid = valid_bid(value)  # an object, an array or a _Deep is no bid either
    return JobReading(bid, reserved, jid)


JID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no space: it only names a set member


def callback_jids(spec: dict) -> list[str]:
    """The jids a BATCH NEW gives its callback jobs (`success`, `complete`), where it gives any."""
    jids = []
    for kind in ("success", "complete"):
        job = field(spec, kind)
        jid = job.get("jid") if isinstance(job, dict) else None
        if isinstance(jid, str) and JID.fullmatch(jid):
            jids.append(jid)
    return jids


def may_name_a_batch(payload: bytes) -> bool:
    """The fast-path filter: False only when the payload certainly names no batch and carries no
    reserved key (`bid"` also finds `"_bid"`, `"_pbid"`).

    A key can be spelt with JSON escapes (`"b\\u0069d"`), so any escape sends the payload to the
    full decoder too.
    """
    return b'bid"' in payload or b'_cb"' in payload or b"\\u" in payload


def names_a_batch(argument: bytes) -> bool:
    """Whether the argument of a BATCH subcommand the gateway does not know could name a batch
    (fail closed: such a command is refused, as the gateway cannot judge it).

    Bid-like: a word that is a valid bid (policy.BID: any plain word), `bid` in any letter case
    (a JSON key `bid` or `parent_bid`, `Bid`, ...), or a JSON escape (`"b\\u0069d"`)."""
    if b"\\u" in argument or b"bid" in argument.lower():
        return True
    return any(BID_BYTES.fullmatch(word) for word in argument.split())
