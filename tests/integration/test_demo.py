"""The README's demo command (scripts/demo.sh, driver tests/support/demo.py), run as a user runs it."""

from __future__ import annotations

import io
import re
import socket
import subprocess

from tests.support.demo import ACCEPTED, SCENARIOS, summarize
from tests.support.processes import REPO

# What Ent (the stand-in) and the gateway do, row by row, stated here independently of the driver.
EXPECTED_ROWS = {
    "outsider reopens a committed batch": ("accepted", "refused BATCH_COMMITTED"),
    "push into a committed batch": ("accepted", "refused BATCH_COMMITTED"),
    "child batch under a committed batch": ("accepted", "refused PARENT_SEALED"),
    "push after the callback was enqueued": ("accepted", "refused BATCH_CALLBACK_FIRED"),
    "legal: callbacks after the last job": ("accepted", "accepted"),
    "legal: empty batch fires at commit": ("accepted", "accepted"),
    "legal: member reopens (member-reopen mode)": ("accepted", "accepted"),
    "outsider reopens (member-reopen mode)": ("accepted", "refused BATCH_COMMITTED"),
}


def table_rows(output: str) -> dict[str, tuple[str, str]]:
    """{scenario: (direct, through)} from the printed table (columns are two or more spaces apart)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("scenario  ")) + 2
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        title, direct, through = re.split(r" {2,}", line.strip())
        rows[title] = (direct, through)
    return rows


def ports_in(output: str) -> set[int]:
    return {int(port) for port in re.findall(r"//127\.0\.0\.1:(\d+)", output)}


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_demo_shows_every_465_violation_accepted_direct_and_refused_through_the_gateway():
    result = subprocess.run(
        [str(REPO / "scripts" / "demo.sh")], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert table_rows(result.stdout) == EXPECTED_ROWS, result.stdout
    assert "Every row as expected" in result.stdout
    assert 'faktory_gateway_refusals_total{code="PARENT_SEALED"} 1.0' in result.stdout
    # Part two, batches on Faktory OSS: the callbacks as the worker ran them, in Enterprise's order.
    callbacks = re.findall(r"^  ran (\w+) callback of the (\w+) ", result.stdout, re.M)
    assert callbacks in (
        [("complete", "child"), ("complete", "parent"), ("success", "child"), ("success", "parent")],
        [("complete", "child"), ("success", "child"), ("complete", "parent"), ("success", "parent")],
    ), result.stdout
    assert re.search(r"^  ran Flaky \(child\) +failed: ", result.stdout, re.M), result.stdout
    assert re.search(r"^  ran Flaky \(child\) +retried, succeeded", result.stdout, re.M), result.stdout
    assert "As Enterprise documents it" in result.stdout
    # Faktory, the stand-in, the three gateways and their metrics ports: all stopped when it returns.
    ports = ports_in(result.stdout)
    assert len(ports) == 8, result.stdout
    assert all(refused(port) for port in ports), result.stdout


def test_a_row_that_differs_from_the_expected_outcome_fails_the_demo():
    expected = [(s, s.direct, s.through) for s in SCENARIOS]
    out = io.StringIO()
    assert summarize(expected, out) == 0

    broken = list(expected)
    scenario = next(s for s in SCENARIOS if s.title == "push into a committed batch")
    broken[SCENARIOS.index(scenario)] = (scenario, ACCEPTED, ACCEPTED)  # a gateway that let it through
    out = io.StringIO()
    assert summarize(broken, out) == 1
    report = out.getvalue()
    assert "UNEXPECTED: 1 cell(s)" in report
    assert (
        "push into a committed batch: through the gateway gave 'accepted', "
        "expected 'refused BATCH_COMMITTED'" in report
    )
    assert table_rows(report)["push into a committed batch"] == (ACCEPTED, ACCEPTED)
