"""The gateway type-checks: mypy over the whole package (its settings are in pyproject.toml).

Every module a command passes through (protocol, chunks, pipeline, order, session, the batch
rules, the fence, the ledger) is typed; a wrong type there is a latent bug (mypy found a
bytearray passed where `frame_end` declared bytes, and a transport used before the dial that
sets it was known to have finished)."""

from __future__ import annotations

import subprocess
import sys

from tests.support.processes import REPO


def test_the_package_type_checks():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout
