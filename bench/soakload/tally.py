"""What the soak's load saw, by kind of command: latencies (for the period and the whole run),
refusals by code, server errors, problems (what the audit will fail on), lost connections."""

from __future__ import annotations

from array import array
from collections import Counter
from enum import StrEnum

from bench.lib.report import percentiles
from bench.lib.resp import ERROR


class Kind(StrEnum):
    """What was sent, and for FETCH how it ended; in the order of the tables."""

    PUSH = "PUSH"
    PUSH_MEMBER = "PUSH-member"  # a batch member: takes a ledger lease
    BATCH_NEW = "BATCH NEW"
    BATCH_COMMIT = "BATCH COMMIT"
    BATCH_STATUS = "BATCH STATUS"
    BATCH_OPEN = "BATCH OPEN"
    FETCH = "FETCH"  # got a job
    FETCH_EMPTY = "FETCH-empty"  # Faktory held it about 2 s and found none
    ACK = "ACK"
    FAIL = "FAIL"
    BEAT = "BEAT"
    PUSH_VIOLATION = "PUSH-violation"  # deliberate: each must be refused
    OPEN_VIOLATION = "OPEN-violation"
    CHILD_VIOLATION = "CHILD-violation"


# The gateway's refusal codes (gateway/policy.py); any other -ERR is the server's.
GATEWAY_CODES = {
    "BATCH_COMMITTED",
    "BATCH_CALLBACK_FIRED",
    "BATCH_UNKNOWN",
    "PARENT_SEALED",
    "COMMIT_FENCE_TIMEOUT",
    "STATE_UNAVAILABLE",
    "MALFORMED",
}


class Tally:
    def __init__(self):
        self.lat_tick: dict[Kind, array] = {}  # since the last report
        self.lat_all: dict[Kind, array] = {}
        self.refusals_tick: Counter = Counter()
        self.refusals: Counter = Counter()  # code -> n
        self.refusals_by_kind: Counter = Counter()  # "kind code" -> n
        self.server_errors: Counter = Counter()  # message prefix -> n (not the gateway's refusals)
        self.problems: Counter = Counter()  # audit failures seen during the run
        self.examples: list[str] = []
        self.lost: Counter = Counter()  # role -> connections lost
        self.lost_examples: list[str] = []
        self.stalls = 0

    def problem(self, what: str, detail: str) -> None:
        self.problems[what] += 1
        if len(self.examples) < 30:
            self.examples.append(f"{what}: {detail}"[:400])

    def record(self, kind: Kind, seconds: float) -> None:
        tick = self.lat_tick.get(kind)
        if tick is None:
            tick = self.lat_tick[kind] = array("d")
            self.lat_all.setdefault(kind, array("d"))
        tick.append(seconds)
        self.lat_all[kind].append(seconds)

    def error_code(self, kind: Kind, payload: bytes) -> str:
        """Classify an -ERR: the gateway's refusal code, or a server error (counted apart)."""
        words = payload.split(None, 2)
        code = words[1].decode() if len(words) > 1 and words[0] == b"ERR" else ""
        if code in GATEWAY_CODES:
            self.refusals[code] += 1
            self.refusals_tick[code] += 1
            self.refusals_by_kind[f"{kind} {code}"] += 1
            return code
        self.server_errors[payload[:60].decode("utf-8", "replace")] += 1
        return ""

    def legal_reply(self, kind: Kind, reply: int, payload: bytes | None) -> bool:
        """A legal command's reply: any -ERR is a problem (a refusal of a legal command, or a server error)."""
        if reply != ERROR:
            return True
        code = self.error_code(kind, payload)
        if code:
            self.problem("legal command refused", f"{kind}: {payload.decode('utf-8', 'replace')}")
        else:
            self.problem("server error", f"{kind}: {payload.decode('utf-8', 'replace')}")
        return False

    def lost_connection(self, role: str, index: int, exc: BaseException) -> None:
        self.lost[role] += 1
        if len(self.lost_examples) < 10:
            self.lost_examples.append(f"{role} #{index}: {type(exc).__name__}: {exc}"[:300])

    def period(self, wall: float) -> tuple[dict, dict]:
        """The period's latency table by kind and its refusals by code; the next period starts empty."""
        kinds = {}
        for kind in Kind:
            values = self.lat_tick.get(kind)
            if not values:
                continue
            p = percentiles(values)
            kinds[kind] = {
                "n": p["n"],
                "per_s": p["n"] / wall,
                "p50_us": p["p50_us"],
                "p99_us": p["p99_us"],
                "p999_us": p["p999_us"],
                "max_us": p["max_us"],
            }
        refusals = dict(self.refusals_tick)
        self.lat_tick = {}
        self.refusals_tick = Counter()
        return kinds, refusals

    def totals(self, seconds: float) -> dict:
        """The whole run's percentiles by kind, with the rate over `seconds`."""
        totals = {}
        for kind in Kind:
            values = self.lat_all.get(kind)
            if values:
                p = percentiles(values)
                p["per_s"] = p["n"] / seconds
                totals[kind] = p
        return totals
