"""Driving the load generator (bench/loadgen.py): what to run (`LoadSpec`), running it in a process
of its own, the order of the targets across rounds, and the per-command times it leaves behind.

The generator runs in a separate process so that its CPU is not the benchmark's, and each window
in a fresh one so that nothing carries over; the spec travels as JSON on its command line and the
result comes back as its `RESULT` line (bench/lib/process.py).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from bench.lib.process import result_of

BENCH = Path(__file__).resolve().parents[1]
REPO = BENCH.parent
LOADGEN = BENCH / "loadgen.py"
T = TypeVar("T")


class Mode(StrEnum):
    PUSH = "push"  # PUSH after PUSH on each connection
    FETCHACK = "fetchack"  # FETCH, then ACK the job (a worker); one operation is both
    BATCHPUSH = "batchpush"  # BATCH NEW once per connection, then PUSHes into that batch
    LATENCY = "latency"  # serial blocking commands, alternating targets in blocks
    IDLE = "idle"  # open handshaken connections and hold them until told to close


@dataclass
class LoadSpec:
    """One run of the load generator. Throughput modes use `url` and `conns`; latency uses
    `targets` ({label: url}), `command` and `block`; idle uses `url`, `conns` and `concurrency`."""

    mode: Mode
    url: str = ""
    conns: int = 1
    warmup: float = 1.0  # seconds of load before the window, not counted
    duration: float = 0.0  # the window, seconds
    payload: int = 100  # bytes of padding in each job's args
    queue: str = "bench"
    wid: str | None = None  # a worker's HELLO (FETCH needs one)
    # Read at the window's edges: the CPU of {name: pids}, and a Redis's INFO commandstats.
    watch: dict[str, list[int]] = field(default_factory=dict)
    watch_redis: str | None = None
    lat_file: str | None = None  # where to leave every command's time in the window (take_latencies)
    cpus: list[int] | None = None  # pin the generator to these CPUs
    targets: dict[str, str] = field(default_factory=dict)
    command: str = "push"  # latency: push, beat or info
    block: int = 100  # latency: commands per target before switching
    batch_new: str | None = None  # batchpush: the BATCH NEW line (default: one success callback)
    commit: bool = True  # batchpush: commit the batches after the window (not timed)
    go_together: bool = True  # connections start sending when all are handshaken
    concurrency: int = 64  # idle: handshakes at once

    def __post_init__(self):
        self.mode = Mode(self.mode)  # from JSON it comes as a str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoadSpec:
        return cls(**json.loads(text))


def start(spec: LoadSpec, stdin: bool = False) -> subprocess.Popen:
    """The generator in the background (the caller reads its stdout: `finish`, or READY for idle)."""
    return subprocess.Popen([sys.executable, str(LOADGEN), spec.to_json()], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE if stdin else None, text=True, cwd=REPO)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float) -> dict:
    """Wait for a `start`ed generator's result ({} if it printed none); kill it if it overstays."""
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return result_of(stdout) or {}


def run(spec: LoadSpec, timeout: float | None = None) -> dict:
    """Run one measurement and return its result; raise with the generator's output if it fails."""
    timeout = timeout or spec.warmup + spec.duration * 2 + 60
    done = subprocess.run([sys.executable, str(LOADGEN), spec.to_json()], check=False, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)  # fmt: skip
    result = result_of(done.stdout)
    if result is None:
        raise RuntimeError(
            f"loadgen failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    return result


def abba(items: Sequence[T], round_no: int) -> Sequence[T]:
    """The targets in round `round_no` of an ABBA alternation (A B, B A, A B, ...), so that a drift
    over the run (a warming cache, a filling queue, another job on the machine) hits them alike."""
    return items if round_no % 2 == 0 else items[::-1]


def save_latencies(path: str, lat: array) -> None:
    """Raw per-command times (seconds, native doubles), for the caller to merge across rounds."""
    with open(path, "wb") as f:
        lat.tofile(f)


def take_latencies(path: str | Path, into: array | None = None) -> array:
    """Append the times a generator left in `path` to `into` (a new array if None), and remove the file."""
    into = array("d") if into is None else into
    path = Path(path)
    if path.exists():
        into.frombytes(path.read_bytes())
        path.unlink()
    return into
