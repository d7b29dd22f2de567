"""The fuzz target of fuzz/fuzz_protocol.py, run over a few thousand hypothesis inputs (no atheris needed).

The target reads its input as (target, size cap, chunk sizes, stream); see that file's docstring.
Random bytes reach the shallow paths; inputs built from protocol tokens reach the deep ones.
"""

from __future__ import annotations

import importlib.util
import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.batches import jobs
from tests.support.processes import REPO

_spec = importlib.util.spec_from_file_location("fuzz_protocol", REPO / "fuzz" / "fuzz_protocol.py")
fuzz_protocol = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_protocol)
target = fuzz_protocol.TestOneInput

SMOKE = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

WIRE_TOKENS = [
    b"\r\n", b"\n", b"\r", b" ", b"+OK", b"+HI {}", b"-ERR x", b":12", b"$0", b"$3", b"$-1", b"$-2", b"$x",
    b"$99999999999", b"*3", b"%", b"abc", b"PUSH ", b"FETCH q", b"END", b"\x00", b"\xff", b"9" * 70, b"a" * 140,
]  # fmt: skip
JSON_KEYS = [
    "custom",
    "Custom",
    "CUSTOM",
    "bid",
    "BID",
    "b\\u0069d",
    "parent_bid",
    "jid",
    "_bid",
    "cu\u017ftom",
]


# A bulk string whose header may lie about its length, and whose CRLF may be missing.
bulks = st.builds(
    lambda body, lie, end: b"$%d\r\n%s%s" % (len(body) + lie, body, end),
    st.binary(max_size=12),
    st.sampled_from([0, 0, 0, -1, 1, 2]),
    st.sampled_from([b"\r\n", b"\r\n", b"XY", b"\r", b"\n\r", b""]),
)


def framed(target_byte: int) -> st.SearchStrategy[bytes]:
    """Header (target, cap, chunk sizes) and a stream of protocol tokens and stray bytes."""
    header = st.tuples(st.integers(0, 255), st.lists(st.integers(0, 40), max_size=15))
    token = st.sampled_from(WIRE_TOKENS) | st.binary(max_size=6) | bulks
    stream = st.lists(token, max_size=60).map(b"".join)
    return st.builds(
        lambda h, s: bytes([target_byte, h[0], len(h[1]), *h[1]]) + s,
        header,
        stream,
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.sampled_from(["b-1", "b-x.y:z", ""]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(JSON_KEYS) | st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)
payloads = json_values.map(lambda value: json.dumps(value, ensure_ascii=False).encode()) | st.binary(
    max_size=64
)


@SMOKE
@given(st.binary(max_size=300))
@example(b"\x00\x05\x01\x02PUSH {}\nFETCH q\r\nEND")
@example(b"\x01\xff\x02\x01\x03$3\r\nabc\r\n+OK\r\n$-1\r\n")
@example(b"\x01\x10\x00$" + b"9" * 80)
def test_random_bytes(data):
    target(data)


@SMOKE
@given(framed(0))
def test_client_lines(data):
    target(data)


@SMOKE
@given(framed(1))
def test_server_replies(data):
    target(data)


@SMOKE
@given(payloads)
@example(b'{"custom":{"bid":"b-1"}}')
@example(b'[{"custom":{"bid":"b-1"}},{"CUSTOM":{"bid":"b-2"}}]')
@example(b'{"custom":{"b\\u0069d":"b-1"}}')
@example(b'{"custom":{"bid":"b-1"},"Custom":{}}')
@example(b"\xef\xbb\xbf" + b'{"custom":{"bid":"b-1"}}')
@example('{"custom":{"bid":"b-1"}}'.encode("utf-16"))
@example(b'{"parent_bid":"b-{1}"}')
@example(b"[" * 100_000)
@example(b'{"custom":{"bid":"b-1"},"custom":{"bid":"b-2"}}')
def test_json_payloads(payload):
    target(b"\x02\x00\x00" + payload)


@SMOKE
@given(st.binary(max_size=200))
def test_reply_builders(data):
    target(b"\x03\x00\x00" + data)


def test_a_custom_key_faktory_reads_is_the_one_the_gateway_reads():
    """Faktory decodes jobs with Go's encoding/json, which matches a key to the `custom` field with
    Unicode simple case folding: `cu\u017ftom` (U+017F, LATIN SMALL LETTER LONG S, folds to `s`) is
    `custom` to the server. Faktory 1.9.4 stores such a job with custom.bid set (checked against
    the real server: PUSH {"cu\u017ftom":{"bid":"b-123"}}, raw UTF-8, then FETCH gives "custom":{"bid":"b-123"}).
    If the gateway does not read it the same way, the job joins any batch, committed or fired,
    unchecked (I1, I2).
    """
    payload = '{"jid":"j1","jobtype":"T","args":[],"cu\u017ftom":{"bid":"b-123"}}'.encode()
    assert jobs.may_name_a_batch(payload)
    assert jobs.read_push(payload)[0] == "b-123"
    # The Kelvin sign folds to k in Go too; no job field the gateway reads has a k, but the rule is the same.
    assert jobs.field({"\u212aey": 1}, "key") == 1
