"""What the soak's orchestrator asks of its load process (JSON on the command line)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class SoakSpec:
    gateways: list[str]  # the gateways' URLs; connection i goes to gateways[i % 2]
    faktory_url: str  # for INFO (the drain and the audit)
    standin_url: str  # for STANDIN REPORT (the audit)
    conns: int
    roles: dict[str, int]  # connections per role ({Role: n}; str keys once through JSON, equal to a Role)
    duration: float  # seconds of load
    report_every: float  # seconds between TICK reports
    target_cpu: float  # machine busy fraction the pacing aims at; 0 keeps the scale fixed
    scale: float  # initial pacing scale: every interval divides by it
    max_scale: float
    push_interval: float  # mean seconds between a producer's PUSHes at scale 1
    batch_interval: float  # mean seconds between a batch producer's batches at scale 1
    violation_rate: float  # chance a commit is followed by a violation
    fail_rate: float  # chance a worker FAILs a job
    work_ms: float  # mean simulated work per job
    payload: int  # bytes of padding in each job's args
    max_jobs: int
    drain_s: float  # longest wait for the workers to empty the queues at the end
    seed: int
    gateway_pids: dict[str, int]  # {"gw-a": pid, "gw-b": pid}: RSS and fds in the reports
    watch: dict[str, list[int]]  # {name: pids} whose CPU the reports show

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SoakSpec:
        return cls(**json.loads(text))
