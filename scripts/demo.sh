#!/usr/bin/env bash
# What the gateway is for, without Faktory Enterprise: starts Faktory OSS, the Ent stand-in in front
# of it and two gateways, runs the contribsys/faktory#465 scenarios straight to the stand-in and
# through a gateway, prints them side by side; then runs a batch workflow (Go client, faktory_worker_go)
# through a `--batches gateway` gateway straight in front of Faktory OSS; stops everything it
# started. Exit status 0 when everything came out as expected (tests/support/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
exec .venv/bin/python -m tests.support.demo "$@"
