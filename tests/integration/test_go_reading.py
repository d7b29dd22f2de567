"""The gateway reads a job's batch as Go does: jobs.read_push against encoding/json itself.

tests/clients/go/jobjson decodes each payload into Faktory's own Job struct, exactly as the
server's PUSH handler does (server/commands.go:214-217), and prints custom.bid and the reserved
custom keys. Thousands of payloads, seeded: the keys the rules read in every spelling Go folds
(CUSTOM, a long s, escapes), repeated keys, `custom` objects Go merges, a null between them, bytes
that are not UTF-8 and nesting deeper than Python's decoder goes. Wherever the gateway reads a
job and Go decodes it, both must find the same batch and the same reserved keys; where the
gateway refuses one (MALFORMED), the ambiguity must be one that could change a decision.
"""

from __future__ import annotations

import base64
import json
import random
import subprocess

from gateway.batches import jobs, policy
from tests.unit.test_policy import Pairs, ambiguous, encode

SEED = 18
PAYLOADS = 4000
CUSTOM_SPELLINGS = ["custom", "Custom", "CUSTOM", "cu\u017ftom", "c\\u0075stom", "cust\u00f6m", "customs"]
RULE_KEYS = ["bid", "bid", "bid", "_bid", "_pbid", "_cb", "BID", "b\\u0069d", "_p\\u0062id", "x", "jid"]
VALUES = ["b-1", "b-2", "b-3", "b-4", "", None, "b 3", 7, [], {}, "b-\u00e9", "\\u0062-4"]


def random_job(rng: random.Random) -> Pairs:
    members = Pairs([("jid", "go-read-%d" % rng.randint(0, 9)), ("jobtype", "x"), ("args", [])])
    for _ in range(rng.choice([0, 1, 1, 1, 1, 2, 3])):
        key = rng.choice(CUSTOM_SPELLINGS)
        if rng.random() < 0.15:
            members.append((key, rng.choice([None, "x", [1], 5])))
        else:
            members.append(
                (
                    key,
                    Pairs(
                        (rng.choice(RULE_KEYS), rng.choice(VALUES))
                        for _ in range(rng.choice([0, 1, 1, 2, 3]))
                    ),
                )
            )
    for _ in range(rng.randint(0, 2)):
        members.append((rng.choice(["args", "queue", "x", "jid", "JID"]), rng.choice(VALUES)))
    rng.shuffle(members)
    return members


def payloads(rng: random.Random) -> list[tuple[bytes, bytes]]:
    """(payload, its shallow twin): the twin is the same job without the deep `args`."""
    made = []
    for _ in range(PAYLOADS):
        # Keys and values written with a backslash-u above become JSON escapes here.
        shallow = encode(random_job(rng), ascii_only=rng.random() < 0.5).replace(b"\\\\u", b"\\u")
        if rng.random() < 0.1:
            shallow = shallow.replace(b'"x"', b'"x\xff"', 1)  # a byte that is not UTF-8
        payload = shallow
        if rng.random() < 0.2:
            payload = (
                b'{"args":' + b"[" * 1500 + b"]" * 1500 + (b"," + shallow[1:] if shallow != b"{}" else b"}")
            )
        made.append((payload, shallow))
    return made


def go_readings(jobjson, data: list[bytes]) -> list[dict]:
    stdin = b"".join(base64.b64encode(payload) + b"\n" for payload in data)
    out = subprocess.run(
        [str(jobjson), "read"], input=stdin, capture_output=True, check=True, timeout=120
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_the_gateway_finds_the_batch_go_finds(jobjson):
    made = payloads(random.Random(SEED))
    readings = go_readings(jobjson, [payload for payload, _ in made])
    assert len(readings) == len(made)
    counts = {"read": 0, "member": 0, "refused": 0}
    for (payload, shallow), go in zip(made, readings, strict=True):
        try:
            bid, reserved = jobs.read_push(payload)
        except policy.Malformed:
            counts["refused"] += 1
            assert not go["ok"] or ambiguous(shallow), payload
            continue
        if not go["ok"]:
            continue  # the server refuses the job: nothing joins a batch
        counts["read"] += 1
        assert bid == (go["bid"] or None), payload
        assert reserved == go["reserved"], payload
        counts["member"] += bid is not None
    # The seed fixes these; they only guard against payloads that stopped covering the cases.
    assert counts["read"] > 1000 and counts["member"] > 100 and counts["refused"] > 100, counts
