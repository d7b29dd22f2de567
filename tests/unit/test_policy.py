"""The batch rules as pure functions, no sockets, no store: the refusals (batches/policy.py) and
the reading of what a payload adds to a batch, as the Go server reads it (batches/jobs.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.batches import jobs, policy
from gateway.batches.policy import Malformed
from gateway.config import Mode, OnStoreError, UnknownBatch
from gateway.store import COMMITTED, COMMITTING, FIRED, OPEN

STRICT, MEMBER_REOPEN, SHADOW = Mode.STRICT, Mode.MEMBER_REOPEN, Mode.SHADOW


def code(refusal):
    return refusal.code if refusal else None


@pytest.mark.parametrize(
    "state, expected",
    [
        (OPEN, None),
        (COMMITTING, "BATCH_COMMITTED"),
        (COMMITTED, "BATCH_COMMITTED"),
        (FIRED, "BATCH_CALLBACK_FIRED"),
    ],
)
def test_adding_a_job(state, expected):
    refusal = policy.refusal_to_add("b-1", state, STRICT)
    assert code(refusal) == expected
    if refusal:
        assert "b-1" in refusal.message
        assert refusal.message.endswith("(mode: strict)")  # the setting in force


@pytest.mark.parametrize("state", [COMMITTING, COMMITTED, FIRED])
def test_a_child_batch_is_judged_like_a_job_of_its_parent(state):
    nest = policy.refusal_to_nest("b-parent", state, MEMBER_REOPEN)
    add = policy.refusal_to_add("b-parent", state, MEMBER_REOPEN)
    assert nest.code == "PARENT_SEALED" and add is not None
    assert "parent batch b-parent" in nest.message and nest.message.endswith("(mode: member-reopen)")


def test_a_child_of_an_open_batch_is_fine():
    assert policy.refusal_to_nest("b-p", OPEN, STRICT) is None


@pytest.mark.parametrize("mode", [STRICT, SHADOW, MEMBER_REOPEN])
def test_open_of_an_open_batch_is_fine_in_every_mode(mode):
    assert policy.refusal_to_open("b-1", OPEN, mode, False) is None


def test_reopen_of_a_committed_batch_by_mode_and_membership():
    assert code(policy.refusal_to_open("b-1", COMMITTED, STRICT, True)) == "BATCH_COMMITTED"
    assert code(policy.refusal_to_open("b-1", COMMITTED, MEMBER_REOPEN, False)) == "BATCH_COMMITTED"
    assert policy.refusal_to_open("b-1", COMMITTED, MEMBER_REOPEN, True) is None


@pytest.mark.parametrize("mode", [STRICT, MEMBER_REOPEN])
def test_nobody_reopens_a_fired_batch(mode):
    assert code(policy.refusal_to_open("b-1", FIRED, mode, True)) == "BATCH_CALLBACK_FIRED"


def test_refusal_reply_is_a_faktory_error_line():
    reply = policy.refusal_to_add("b-1", COMMITTED, STRICT).reply()
    assert reply.startswith(b"-ERR BATCH_COMMITTED batch b-1 ") and reply.endswith(b"\r\n")


# --- reading payloads ---------------------------------------------------------------------------


def bid_of(job: object) -> str | None:
    """The batch a job (as JSON) joins, read as a PUSH's payload is."""
    return jobs.read_push(json.dumps(job, ensure_ascii=False).encode())[0]


def test_job_bid_reads_custom_bid():
    assert bid_of({"jid": "j", "custom": {"bid": "b-abc"}}) == "b-abc"
    assert bid_of({"jid": "j", "custom": {"bid": ""}}) is None
    assert bid_of({"jid": "j"}) is None
    assert bid_of({"jid": "j", "custom": {"_bid": "b-cb"}}) is None  # a callback is not a member


def test_custom_is_found_whatever_its_case_as_go_decodes_it():
    assert bid_of({"jid": "j", "CUSTOM": {"bid": "b-x"}}) == "b-x"


def test_ambiguous_or_duplicate_keys_are_refused():
    with pytest.raises(Malformed):
        bid_of({"custom": {"bid": "b-1"}, "Custom": {}})
    with pytest.raises(Malformed):
        jobs.decode(b'{"custom":{"bid":"b-1"},"custom":{"x":1}}')


@pytest.mark.parametrize("bid", ["", "b 1", "b-1\r\nPUSH", "{tag}", "x" * 129, "é", 12, None, ["b-1"]])
def test_invalid_bids_are_refused(bid):
    with pytest.raises(Malformed):
        policy.valid_bid(bid)


def test_deeply_nested_json_is_malformed_not_a_crash():
    with pytest.raises(Malformed):
        jobs.decode(b"[" * 100_000 + b"]" * 100_000)


def test_escaped_key_spellings_are_not_missed_by_the_fast_path():
    payload = b'{"jid":"j","custom":{"b\\u0069d":"b-1"}}'
    assert jobs.may_name_a_batch(payload)
    assert jobs.read_push(payload)[0] == "b-1"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.from_regex(policy.BID, fullmatch=True),
    st.dictionaries(st.text(max_size=6).filter(lambda k: k.lower() != "custom"), json_values, max_size=4),
    st.booleans(),
)
def test_fast_path_never_skips_a_job_that_names_a_batch(bid, extra, ascii_only):
    job = {**extra, "custom": {"bid": bid}}
    payload = json.dumps(job, ensure_ascii=ascii_only).encode()
    assert jobs.may_name_a_batch(payload)
    assert jobs.read_push(payload)[0] == bid


def test_every_refusal_made_by_a_setting_names_it():
    """What made the gateway refuse is in the message: the mode, `unknown_batch`,
    `on_store_error` or `commit_fence_timeout`, with the value in force."""
    assert policy.refusal_to_open("b-1", COMMITTED, STRICT, False).message.endswith("(mode: strict)")
    assert policy.refusal_to_open("b-1", COMMITTED, MEMBER_REOPEN, False).message.endswith(
        "(mode: member-reopen)"
    )
    assert policy.refusal_to_add("b-1", COMMITTED, MEMBER_REOPEN).message.endswith("(mode: member-reopen)")
    for setting in (UnknownBatch.VERIFY, UnknownBatch.REJECT):
        assert policy.refusal_unknown("b-1", setting).message.endswith(f"(unknown_batch: {setting})")
    assert policy.refusal_store_down("b-1", OnStoreError.REJECT).message.endswith("(on_store_error: reject)")
    assert policy.refusal_fence_timeout("b-1", 2.5).message.endswith("(commit_fence_timeout: 2.5s)")


@pytest.mark.parametrize(
    "job, keys",
    [
        ({"jid": "j", "custom": {"_bid": "b-1"}}, ["_bid"]),
        ({"jid": "j", "Custom": {"_pbid": "b-1", "_cb": "success"}}, ["_pbid", "_cb"]),
        ({"jid": "j", "cu\u017ftom": {"_cb": "complete"}}, ["_cb"]),
        ({"jid": "j", "custom": {"bid": "b-1", "_BID": "b-2"}}, []),  # map keys are exact in Go
        ({"jid": "j", "custom": {"bid": "b-1"}}, []),
        (["not", "a", "job"], []),
    ],
)
def test_reserved_keys_are_the_servers(job, keys):
    assert jobs.read_push(json.dumps(job, ensure_ascii=False).encode())[1] == keys
    if keys:
        payload = json.dumps(job, ensure_ascii=False).encode()
        assert jobs.may_name_a_batch(payload)


# --- reading a PUSH as the Go server does ------------------------------------------------------


class Pairs(list):
    """A JSON object as its (key, value) pairs, repeated keys kept."""


def go_reading(payload: bytes):
    """A model of Go's encoding/json decoding a job into Faktory's Job struct, written from Go's
    documented behaviour (and checked against Faktory 1.9.4 in tests/integration/test_go_reading.py):
    top-level keys match struct fields case-insensitively (with Unicode folding: a long s, U+017F, is an s); every
    key that matches `custom` is decoded in turn into the same map: an object's keys are merged
    into it (a repeated key keeps its last value), `null` empties it, anything else is a type
    error and the server refuses the job. Returns ("refused", None) or ("read", custom map)."""
    try:
        job = json.loads(payload.decode("utf-8", "replace"), object_pairs_hook=Pairs)
    except (ValueError, RecursionError):
        return "refused", None
    if not isinstance(job, Pairs):
        return "refused", None
    custom = None
    for key, value in job:
        if key.lower().replace("\u017f", "s") != "custom":
            continue
        if value is None:
            custom = None
        elif isinstance(value, Pairs):
            custom = {} if custom is None else custom
            custom.update(value)
        else:
            return "refused", None
    return "read", custom


def ambiguous(payload: bytes) -> bool:
    """What the gateway may refuse although Go reads it: a batch key that more than one `custom`
    (merged by Go) or a repeated key inside `custom` could name, or a bid that is no valid bid."""
    job = json.loads(payload.decode("utf-8", "replace"), object_pairs_hook=Pairs)
    customs = [value for key, value in job if key.lower().replace("\u017f", "s") == "custom"]
    keys = [key for custom in customs if isinstance(custom, Pairs) for key, _ in custom]
    rule_keys = [key for key in keys if key in ("bid", "_bid", "_pbid", "_cb")]
    if rule_keys and (len(customs) > 1 or len(rule_keys) != len(set(rule_keys))):
        return True
    _, custom = go_reading(payload)
    bid = (custom or {}).get("bid")
    return bid not in (None, "") and not (isinstance(bid, str) and policy.BID.fullmatch(bid))


_keys = st.sampled_from(
    ["jid", "custom", "Custom", "CUSTOM", "bid", "_bid", "_pbid", "_cb", "args", "cu\u017ftom", "x"]
)
_values = st.recursive(
    st.none() | st.integers() | st.sampled_from(["", "b-1", "b-2", "b 3", "<&>", "é✓"]),
    lambda inner: st.lists(inner, max_size=3) | st.lists(st.tuples(_keys, inner), max_size=4).map(Pairs),
    max_leaves=12,
)


def encode(value, ascii_only: bool) -> bytes:
    """JSON text of a value where Pairs (repeated keys and all) are objects."""
    if isinstance(value, Pairs):
        inner = ",".join(
            f"{encode(k, ascii_only).decode()}:{encode(v, ascii_only).decode()}" for k, v in value
        )
        return ("{" + inner + "}").encode()
    if isinstance(value, list):
        return ("[" + ",".join(encode(v, ascii_only).decode() for v in value) + "]").encode()
    return json.dumps(value, ensure_ascii=ascii_only).encode()


_customs = st.lists(
    st.tuples(
        st.sampled_from(["bid", "_bid", "_pbid", "_cb", "BID", "x"]),
        st.sampled_from(["b-1", "b-2", "", None, "b 3", 7]) | _values,
    ),
    min_size=1,
    max_size=3,
).map(Pairs)
_members = st.tuples(
    st.sampled_from(["custom", "Custom", "CUSTOM", "cu\u017ftom"]),
    st.one_of(_customs, _customs, st.none(), _values),
) | st.tuples(_keys, _values)


@settings(max_examples=400)
@given(st.lists(_members, max_size=4).map(Pairs), st.booleans(), st.sampled_from([0, 2000]))
@example(Pairs([("cu\u017ftom", Pairs([("bid", "b-1")]))]), True, 2000)
@example(Pairs([("custom", Pairs([("bid", "")]))]), False, 2000)
@example(Pairs([("custom", Pairs([("x", 1)])), ("CUSTOM", Pairs([("_cb", 1)]))]), True, 0)
@example(Pairs([("Custom", Pairs([("bid", "b-1")])), ("custom", None)]), True, 2000)
def test_a_push_is_read_as_go_reads_it_or_refused_only_when_ambiguous(job, ascii_only, depth):
    """read_push gives the batch and reserved keys Go gives; it refuses (Malformed) only where a
    decision could depend on the ambiguity. An `args` nested deeper than Python's decoder reaches
    (2000 levels; Go takes 10,000) changes nothing."""
    shallow = encode(job, ascii_only)
    payload = shallow
    if depth:  # the same job with a deep `args` first: Go reads its custom the same way
        payload = b'{"args":' + b"[" * depth + b"]" * depth + (b"," + shallow[1:] if job else b"}")
    outcome, custom = go_reading(shallow)
    try:
        bid, reserved = jobs.read_push(payload)
    except Malformed:
        assert ambiguous(shallow), payload
        return
    if outcome == "read":
        assert bid == ((custom or {}).get("bid") or None)
        assert reserved == [key for key in jobs.RESERVED_KEYS if key in (custom or {})]


def test_jobs_outside_batches_are_read_whatever_go_accepts():
    """Duplicate keys away from custom, bytes that are not UTF-8 (Go reads U+FFFD), nesting past
    Python's recursion limit and Go's HTML escapes: no batch, nothing to refuse."""
    for payload in (
        b'{"jid":"j1","args":[{"a":1,"a":2}],"x":1,"x":2}',
        b'{"jid":"j1","args":["\xff\xfe\xe2\x82"],"custom":{"note":"\xc3"}}',
        b'{"jid":"j1","args":' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"jid":"j1","args":["\\u003cb\\u003e \\u0026 caf\\u00e9"],"custom":{"k":"\\u2713"}}',
        b'{"jid":"j1","custom":{},"Custom":{"x":1},"CUSTOM":null}',  # merged by Go: still no batch
    ):
        assert jobs.read_push(payload) == (None, [])


def test_a_batch_job_nested_past_pythons_decoder_is_still_read():
    deep = b"[" * 5000 + b"]" * 5000
    assert jobs.read_push(b'{"args":' + deep + b',"custom":{"x":' + deep + b',"bid":"b-1"}}') == ("b-1", [])
    assert jobs.read_push(b'{"Custom":{"_cb":' + deep + b"}," + b'"args":' + deep + b"}") == (None, ["_cb"])
    with pytest.raises(Malformed):  # a bid nested that deep is no bid
        jobs.read_push(b'{"custom":{"bid":' + deep + b'},"args":' + deep + b"}")


def test_the_reading_refuses_only_what_could_change_a_decision():
    with pytest.raises(Malformed):
        jobs.read_push(b'{"custom":{"bid":"b-1"},"CUSTOM":{"bid":"b-2"}}')
    with pytest.raises(Malformed):
        jobs.read_push(b'{"custom":{},"Custom":{"_pbid":"b-2"},"x":"\\u0041"}')
    with pytest.raises(Malformed):
        jobs.read_push(b'{"custom":{"bid":"b-1","bid":"b-2"}}')
    with pytest.raises(Malformed):  # invalid JSON still is, where it may name a batch
        jobs.read_push(b'{"custom":{"bid":"b-1"}} trailing')
    assert jobs.read_push(b'{"custom":{"x":1,"x":2},"Custom":{"y":3}}') == (None, [])


def test_a_pushb_keeps_each_jobs_bytes_for_the_jobs_it_forwards():
    payload = b'[{"jid":"a\xff","custom":{"bid":"b-1"}} , {"jid":"b","args":["\\u003c"]},7]'
    read = jobs.read_bulk(payload)
    assert [(job.bid, job.jid) for job in read] == [("b-1", "a\udcff"), (None, "b"), (None, "")]
    assert jobs.bulk_line(payload, [False, True, True]) == b'PUSHB [{"jid":"b","args":["\\u003c"]},7]\r\n'
    assert (
        jobs.bulk_line(payload, [True, False, False]) == b'PUSHB [{"jid":"a\xff","custom":{"bid":"b-1"}}]\r\n'
    )
    assert jobs.read_bulk(b'{"jid":"x"}') is None  # not a list: the server's own error


@pytest.mark.parametrize(
    "argument, bid_like",
    [
        (b"", False),
        (b"{}", False),
        (b'{"x":[1,2]}', False),
        (b"!?", False),
        (b"b-1", True),
        (b"anything", True),
        (b'{"parent_bid":"b-1"}', True),
        (b'{"Parent_BID":1}', True),
        (b'{"p\\u0061rent_bid":1}', True),
    ],
)
def test_an_unknown_batch_subcommand_is_bid_like_when_it_could_name_a_batch(argument, bid_like):
    assert jobs.names_a_batch(argument) is bid_like
