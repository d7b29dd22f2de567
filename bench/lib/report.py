"""How the benchmarks report: progress on stderr, percentiles, table headings and cells, the JSON
file, and verdict lines.

Two kinds of verdict, with their own words: a `Target` is a performance goal a measurement meets
(PASS) or misses (MISS), or cannot be judged here (n/a: the reference it is stated against did not
run); a `Check` is a correctness audit that passes or FAILs, or only informs (info).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

# Where the results go by default (--json): bench/results/, not committed.
RESULTS = Path(__file__).resolve().parents[1] / "results"


def log(message: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentiles(values: Sequence[float]) -> dict | None:
    """Count, mean, p50/p90/p99/p99.9 and max of durations in seconds, in µs; None for no values.
    Nearest rank, no interpolation: a percentile is a time some command really took."""
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] * 1e6

    return {
        "n": n,
        "mean_us": sum(ordered) / n * 1e6,
        "p50_us": at(0.50),
        "p90_us": at(0.90),
        "p99_us": at(0.99),
        "p999_us": at(0.999),
        "max_us": ordered[-1] * 1e6,
    }


def fmt(value: float | None, spec: str = ".0f", none: str = "-") -> str:
    """A table cell: the value formatted, or `none` when it was not measured."""
    return none if value is None else format(value, spec)


def ms(us: float | None) -> str:
    """Microseconds as a cell in milliseconds: two decimals below 100 ms, none above."""
    if us is None:
        return "-"
    return f"{us / 1000:.2f}" if us < 100_000 else f"{us / 1000:.0f}"


def heading(lines: list[str], title: str, header: str) -> None:
    """A table's title, column header and rule (after a blank line unless it is the first)."""
    lines.extend(([""] if lines else []) + [title, header, "-" * len(header)])


def write_json(path: str | Path, data: dict) -> Path:
    """Write the results (anything not JSON by nature, such as a Path, as its str)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return out


class Mark(StrEnum):
    PASS = "PASS"
    MISS = "MISS"  # a performance target not reached
    FAIL = "FAIL"  # a correctness check that failed
    NA = "n/a"  # a target that could not be judged in this run
    INFO = "info"  # a figure shown beside the checks, judged by no one


@dataclass(frozen=True)
class Target:
    """A performance target and what this run measured against it; `passed` None: not measurable here."""

    what: str
    target: str
    measured: str
    passed: bool | None

    @property
    def mark(self) -> Mark:
        return Mark.NA if self.passed is None else Mark.PASS if self.passed else Mark.MISS

    def line(self) -> str:
        return f"  {self.mark:4}  {self.what:30} target {self.target:18} measured {self.measured}"

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Check:
    """A correctness check of an audit; `passed` None: information only."""

    what: str
    passed: bool | None
    detail: str

    @property
    def mark(self) -> Mark:
        return Mark.INFO if self.passed is None else Mark.PASS if self.passed else Mark.FAIL

    def lines(self) -> list[str]:
        return [f"  {self.mark:4}  {self.what}", f"        {self.detail}"]

    def as_json(self) -> dict:
        return dataclasses.asdict(self)
