#!/usr/bin/env bash
# The test command: installs what the tests need (see install-test-deps.sh), then runs pytest.
# Extra arguments go to pytest, e.g. scripts/run-tests.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
exec .venv/bin/python -m pytest "$@"
