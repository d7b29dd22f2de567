"""Every job the soak's load pushes, by sequence number (its jid is `soak-<seq>`): a byte of flags
each, set as its PUSH is answered and as workers fetch, ack and fail it; and the audit of them
against what Faktory still holds at the end."""

from __future__ import annotations

from collections import Counter

# Per-job flags.
SENT, OK, REFUSED, FETCHED, ACKED, FAILED_LAST, UNANSWERED, VIOLATION = (1 << i for i in range(8))

PLAIN_QUEUE, CB_QUEUE = "soak", "soak-cb"  # the jobs', and the batch callbacks'


class Jobs:
    def __init__(self, max_jobs: int, payload: int):
        self.max_jobs = max_jobs
        self.flags = bytearray(max_jobs + 1)
        self.seq = 0  # the last sequence number handed out
        self.pad = ("x" * payload).encode()

    def next_seq(self) -> int | None:
        """A new job's sequence number; None once --max-jobs are out."""
        if self.seq >= self.max_jobs:
            return None
        self.seq += 1
        return self.seq

    def push_line(self, seq: int, bid: str | None = None) -> bytes:
        custom = b',"custom":{"bid":"%s"}' % bid.encode() if bid else b""
        return (
            b'PUSH {"jid":"soak-%010d","jobtype":"SoakJob","queue":"soak","retry":3,"args":[%d,"%s"]%s}\r\n'
            % (seq, seq, self.pad, custom)
        )

    @staticmethod
    def seq_of(jid: bytes) -> int | None:
        """The sequence number of one of our jids; None for any other job."""
        return int(jid[5:]) if jid.startswith(b"soak-") else None

    def audit(self, faktory: dict, callbacks: dict) -> dict:
        """Every +OK job acked, or still in Faktory (`faktory`: INFO's "faktory" part); no refused
        job delivered, nothing delivered that was never pushed. `callbacks`: the workers' figures,
        shown beside."""
        flags = self.flags
        counts = Counter()
        anomalies = []
        for seq in range(1, self.seq + 1):
            f = flags[seq]
            if not f & SENT:
                continue
            counts["sent"] += 1
            if f & OK:
                counts["ok"] += 1
                if f & ACKED:
                    counts["ok_acked"] += 1
                elif f & FAILED_LAST:
                    counts["ok_failed_last"] += 1
            if f & REFUSED:
                counts["refused"] += 1
                if f & (FETCHED | ACKED):
                    counts["refused_but_delivered"] += 1
                    if len(anomalies) < 10:
                        anomalies.append(f"soak-{seq:010d} was refused but a worker fetched it")
            if f & UNANSWERED and not f & OK:
                counts["unanswered"] += 1
                if f & ACKED:
                    counts["unanswered_acked"] += 1
            if f & (FETCHED | ACKED) and not f & (OK | UNANSWERED | REFUSED):
                counts["delivered_never_pushed"] += 1
            if f & VIOLATION:
                counts["violation_pushes"] += 1
        sets = faktory.get("sets", {})
        in_faktory = {
            "queue": faktory["queues"].get(PLAIN_QUEUE, 0),
            "retries": sets.get("retries", 0),
            "dead": sets.get("dead", 0),
            "scheduled": sets.get("scheduled", 0),
            "working": sets.get("working", 0),
        }
        outstanding = counts["ok"] - counts["ok_acked"]
        slack = counts["unanswered"] - counts["unanswered_acked"]
        held = sum(in_faktory.values())
        return {
            **counts,
            "outstanding_expected": outstanding,
            "outstanding_slack": slack,  # unanswered PUSHes may or may not have landed
            "in_faktory": in_faktory,
            "in_faktory_total": held,
            **callbacks,
            "anomalies": anomalies,
            "passed": outstanding <= held <= outstanding + slack
            and not counts["refused_but_delivered"]
            and not counts["delivered_never_pushed"],
        }
