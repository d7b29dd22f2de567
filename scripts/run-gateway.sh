#!/usr/bin/env bash
# Runs the gateway from this checkout: creates .venv with the package on first use, then starts it.
# Arguments go to faktory-gateway, e.g. scripts/run-gateway.sh --upstream tcp://faktory:7419
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/faktory-gateway ] || [ pyproject.toml -nt .venv/.gateway-installed ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e .
  touch .venv/.gateway-installed
fi
exec .venv/bin/faktory-gateway "$@"
