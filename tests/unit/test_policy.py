"""The batch rules as pure functions: no sockets, no store."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import policy
from gateway.policy import MEMBER_REOPEN, SHADOW, STRICT, Malformed
from gateway.store import COMMITTED, COMMITTING, FIRED, OPEN


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
    refusal = policy.refusal_to_add("b-1", state)
    assert code(refusal) == expected
    if refusal:
        assert "b-1" in refusal.message


@pytest.mark.parametrize("state", [COMMITTING, COMMITTED, FIRED])
def test_a_child_batch_is_judged_like_a_job_of_its_parent(state):
    nest = policy.refusal_to_nest("b-parent", state)
    add = policy.refusal_to_add("b-parent", state)
    assert nest.code == "PARENT_SEALED" and add is not None
    assert "parent batch b-parent" in nest.message


def test_a_child_of_an_open_batch_is_fine():
    assert policy.refusal_to_nest("b-p", OPEN) is None


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
    reply = policy.refusal_to_add("b-1", COMMITTED).reply()
    assert reply.startswith(b"-ERR BATCH_COMMITTED batch b-1 ") and reply.endswith(b"\r\n")


# --- reading payloads ---------------------------------------------------------------------------


def test_job_bid_reads_custom_bid():
    assert policy.job_bid({"jid": "j", "custom": {"bid": "b-abc"}}) == "b-abc"
    assert policy.job_bid({"jid": "j", "custom": {"bid": ""}}) is None
    assert policy.job_bid({"jid": "j"}) is None
    assert policy.job_bid({"jid": "j", "custom": {"_bid": "b-cb"}}) is None  # a callback is not a member


def test_custom_is_found_whatever_its_case_as_go_decodes_it():
    assert policy.job_bid({"jid": "j", "CUSTOM": {"bid": "b-x"}}) == "b-x"


def test_ambiguous_or_duplicate_keys_are_refused():
    with pytest.raises(Malformed):
        policy.job_bid({"custom": {"bid": "b-1"}, "Custom": {}})
    with pytest.raises(Malformed):
        policy.decode(b'{"custom":{"bid":"b-1"},"custom":{"x":1}}')


@pytest.mark.parametrize("bid", ["", "b 1", "b-1\r\nPUSH", "{tag}", "x" * 129, "é", 12, None, ["b-1"]])
def test_invalid_bids_are_refused(bid):
    with pytest.raises(Malformed):
        policy.valid_bid(bid)


def test_deeply_nested_json_is_malformed_not_a_crash():
    with pytest.raises(Malformed):
        policy.decode(b"[" * 100_000 + b"]" * 100_000)


def test_escaped_key_spellings_are_not_missed_by_the_fast_path():
    payload = b'{"jid":"j","custom":{"b\\u0069d":"b-1"}}'
    assert policy.may_name_a_batch(payload)
    assert policy.job_bid(policy.decode(payload)) == "b-1"


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
    assert policy.may_name_a_batch(payload)
    assert policy.job_bid(policy.decode(payload)) == bid


def test_status_fired():
    assert policy.status_fired({"complete_st": "1", "success_st": ""})
    assert policy.status_fired({"complete_st": "", "success_st": "2"})
    assert not policy.status_fired({"complete_st": "", "success_st": ""})
    assert not policy.status_fired(None)


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
    assert policy.reserved_keys(job) == keys
    if keys:
        payload = json.dumps(job, ensure_ascii=False).encode()
        assert policy.may_name_a_batch(payload)


_keys = st.sampled_from(
    ["jid", "custom", "Custom", "bid", "_bid", "_pbid", "_cb", "args", "cu\u017ftom", "x"]
)
_values = st.recursive(
    st.none() | st.integers() | st.sampled_from(["", "b-1", "b-2", "b 3"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(_keys, _values, max_size=5))
def test_the_quick_push_reading_agrees_with_the_strict_one(job):
    """read_push skips the strict decoder for the common shape; it must never read differently."""
    payload = json.dumps(job, ensure_ascii=False).encode()
    try:
        strict = policy.job_bid(policy.decode(payload)), policy.reserved_keys(policy.decode(payload))
    except Malformed:
        strict = Malformed
    try:
        quick = policy.read_push(payload)
    except Malformed:
        quick = Malformed
    assert quick == strict


def test_the_quick_reading_still_refuses_a_second_custom():
    with pytest.raises(Malformed):
        policy.read_push(b'{"custom":{"bid":"b-1"},"CUSTOM":{"bid":"b-2"}}')
    with pytest.raises(Malformed):
        policy.read_push(b'{"custom":{"bid":"b-1","bid":"b-2"}}')
