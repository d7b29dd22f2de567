"""Where a process's CPU goes while a load runs through it: py-spy's Python stacks (self and
inclusive time by frame) and perf's split by shared object and symbol; and the text that shows
them, in µs per command when the process's CPU per command over the same load is known.

Profiling is not a measurement: the samplers cost the process time, so run.py profiles after it
has measured (`--profile`), and says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    """py-spy from PATH, or from the virtualenv running this script (.venv/bin/python bench/run.py)."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def record_stacks(py_spy: str, pid: int, seconds: int, raw: Path) -> str:
    """`py-spy record` of `pid` for `seconds` into `raw` (collapsed stacks); returns its stderr."""
    if raw.exists():
        raw.unlink()
    common = ["--pid", str(pid), "--duration", str(seconds), "--rate", "250", "--nonblocking"]
    spy = subprocess.run([py_spy, "record", *common, "--format", "raw", "-o", str(raw)], check=False,
                         capture_output=True, text=True)  # fmt: skip
    return spy.stderr


def top_frames(raw: Path) -> dict:
    """The samples in a collapsed-stack file, and the frames with the most self and inclusive time (%)."""
    stacks = Counter()
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if stack:
                stacks[stack] += int(count)
    total = sum(stacks.values())
    self_time, inclusive = Counter(), Counter()
    for stack, count in stacks.items():
        frames = stack.split(";")
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return {
        "samples": total,
        "top_self_pct": [(frame, round(100 * c / total, 1)) for frame, c in self_time.most_common(25)],
        "top_inclusive_pct": [(frame, round(100 * c / total, 1)) for frame, c in inclusive.most_common(40)],
    }


def perf_split(perf: str, pid: int, seconds: int, data: Path) -> dict | None:
    """Where a process's CPU goes, by shared object and by top symbol: `perf record` for `seconds`."""
    record = subprocess.run([perf, "record", "-F", "999", "-g", "-p", str(pid), "-o", str(data), "--", "sleep",
                             str(seconds)], check=False, capture_output=True, text=True)  # fmt: skip
    if record.returncode != 0 or not data.exists():
        return {"error": record.stderr.strip()[-300:]}

    def table(sort: str, limit: int) -> list[tuple[str, float]]:
        out = subprocess.run([perf, "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio", "-g",
                              "none"], check=False, capture_output=True, text=True).stdout  # fmt: skip
        rows = []
        for line in out.splitlines():
            match = re.match(r"\s*([\d.]+)%\s+(.*\S)", line)
            if match and not line.startswith("#"):
                rows.append((match.group(2), float(match.group(1))))
        return rows[:limit]

    return {"by_object_pct": table("dso", 8), "by_symbol_pct": table("dso,sym", 25)}


def text(profile: dict, scenario: str) -> str:
    """Top functions by self and inclusive time; with the process's CPU per command, µs per command."""
    label = profile.get("process", "gateway")
    cpu = profile.get("cpu_us_per_cmd")
    lines = [f"{label.capitalize()} profile under {profile.get('scenario', scenario)} "
             f"({profile.get('samples', 0)} samples; {profile.get('raw', profile.get('skipped'))})"
             + (f"; {label} CPU {cpu:.1f} µs per command over the same load" if cpu else "")]  # fmt: skip

    def us(pct: float) -> str:
        return f"{pct * cpu / 100:5.1f} µs" if cpu else ""

    for kind, rows, limit in (("self", "top_self_pct", 20), ("incl", "top_inclusive_pct", 30)):
        for frame, pct in profile.get(rows, [])[:limit]:
            lines.append(f"  {kind} {pct:5.1f}% {us(pct)}  {frame}")
    split = profile.get("perf") or {}
    if split.get("by_object_pct"):
        lines.append(f"  perf, the {label}'s CPU by object: "
                     + ", ".join(f"{o} {p:.1f}%" + (f" ({p * cpu / 100:.1f} µs)" if cpu else "")
                                 for o, p in split["by_object_pct"]))  # fmt: skip
        for sym, pct in split["by_symbol_pct"][:15]:
            lines.append(f"  perf {pct:5.1f}%  {sym}")
    elif split.get("error"):
        lines.append(f"  perf failed: {split['error']}")
    return "\n".join(lines)
