"""The processes a benchmark runs and watches: their CPU time, memory and fds from /proc, their
children, their CPU affinity; the one-line reports a child script prints (a tag and JSON); and
stopping a set of them at the end.

The processes themselves are tests/support/processes.py's `Process` classes (Faktory, Redis, the
gateway, the stand-in) and bench/lib/proxies.py's: started in a session of their own, output
collected, stopped by signalling their group.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from enum import StrEnum

from bench.lib.report import log
from tests.support.processes import rss_kib  # the bench reads memory through this module too

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------------
# /proc


def _stat_fields(pid: int) -> list[bytes]:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """utime+stime of one process, in seconds (0 if it is gone)."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


def children_of(pid: int) -> list[int]:
    """The direct children of a process (Faktory's Redis, for one)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry))
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def memory_and_fds(pid: int) -> dict:
    """A process's resident memory and open fds; None for both once it is gone."""
    try:
        return {"rss_kib": rss_kib(pid), "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    except (OSError, StopIteration):  # gone, or a zombie (no VmRSS line)
        return {"rss_kib": None, "fds": None}


def set_affinity(pids: list[int], cpus: set[int]) -> None:
    """Pin every thread of each process (Go's runtime threads included)."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except (ProcessLookupError, FileNotFoundError):
                pass


def raise_nofile(need: int | None = None) -> None:
    """Raise this process's soft RLIMIT_NOFILE to `need` (None: to the hard limit); the children
    started after it (the gateways, the stand-in) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    if need is None or (hard != resource.RLIM_INFINITY and need > hard):
        need = hard
    if need == resource.RLIM_INFINITY or soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


@dataclass(frozen=True)
class CpuDelta:
    """CPU used between two snapshots: by this process, by each watched name, by the machine."""

    wall_s: float
    own_s: float
    procs_s: dict[str, float]
    busy_fraction: float | None  # of all the machine's CPUs; None if no jiffy passed

    @property
    def busy_cores(self) -> float | None:
        return None if self.busy_fraction is None else self.busy_fraction * os.cpu_count()


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU times at one moment: this process's own, each watched name's (the sum over its pids),
    and the machine's busy and total jiffies."""

    t: float
    own_s: float
    procs_s: dict[str, float]
    machine: tuple[int, int]

    @classmethod
    def take(cls, watch: dict[str, list[int]]) -> CpuSnapshot:
        t = time.perf_counter()
        own = own_cpu_seconds()
        procs = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in watch.items()}
        return cls(t, own, procs, machine_cpu())

    def since(self, start: CpuSnapshot) -> CpuDelta:
        busy = self.machine[0] - start.machine[0]
        total = self.machine[1] - start.machine[1]
        return CpuDelta(
            wall_s=self.t - start.t,
            own_s=self.own_s - start.own_s,
            procs_s={name: s - start.procs_s.get(name, 0.0) for name, s in self.procs_s.items()},
            busy_fraction=busy / total if total else None,
        )


# ------------------------------------------------------------------------------------------------
# A child script's reports: one line each, a tag and a JSON payload, on its stdout


class Tag(StrEnum):
    RESULT = "RESULT"  # the measurement, last
    TICK = "TICK"  # a periodic report (the soak's load)


def emit(tag: Tag, payload: dict) -> None:
    print(f"{tag} {json.dumps(payload)}", flush=True)


def tagged(line: str, tag: Tag) -> dict | None:
    """The payload of a line `emit(tag, ...)` printed; None for any other line."""
    prefix = f"{tag} "
    return json.loads(line[len(prefix) :]) if line.startswith(prefix) else None


def result_of(stdout: str) -> dict | None:
    """The RESULT a child printed, None if it printed none (it failed)."""
    return next((r for line in stdout.splitlines() if (r := tagged(line, Tag.RESULT)) is not None), None)


# ------------------------------------------------------------------------------------------------
# Stopping


def stop_all(*processes) -> None:
    """Stop each process that was started (None: never was), removing its scratch directory where
    it has one (`cleanup`); one that fails to stop is logged and does not keep the others running."""
    for process in processes:
        if process is None:
            continue
        try:
            process.cleanup() if hasattr(process, "cleanup") else process.stop()
        except Exception as exc:
            log(f"stopping {process.argv[0]}: {exc}")
