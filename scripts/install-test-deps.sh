#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, idempotently:
# redis-server, haproxy and promtool (Debian), the Faktory OSS server (built with `go install` from
# the Go module proxy), the Go and npm client programs used by the tests, a test-only
# clock-stepping library (gcc), and this package with its test extras in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

# Debian's packages, one apt run for whatever is missing: redis-server (the ledger and Faktory's
# own store), haproxy (a reference proxy for bench/run.py), prometheus for promtool (it checks and
# unit-tests the alerting rules in deploy/monitoring; its postinst may try to start a service,
# harmless here, so only a missing promtool is an error).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]} (Debian)"
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null || true
  for tool in redis-server haproxy promtool gcc; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$tool did not install" >&2; exit 1; }
  done
fi

if [ ! -x .tools/bin/faktory ]; then
  echo "== building the Faktory server (go install, pinned in tools/faktory/go.mod)"
  # `go install github.com/contribsys/faktory/cmd/faktory@v1.9.4` needs the module's version list,
  # which the module proxy does not serve for this module; a go.mod `tool` entry pins the same
  # version without it.
  (cd tools/faktory && GOBIN="$repo/.tools/bin" GOFLAGS=-mod=mod go install tool)
fi

if [ ! -x .tools/bin/violate465 ] || [ tests/clients/go/main.go -nt .tools/bin/violate465 ]; then
  echo "== building the Go client test program"
  (cd tests/clients/go && GOFLAGS=-mod=mod go build -o "$repo/.tools/bin/violate465" .)
fi

# The batch workflow (the Go client's batch API and faktory_worker_go) that the engine's client
# tests and the demo run: rebuilt when its source or the module's requirements change.
if [ ! -x .tools/bin/workflow ] \
   || [ -n "$(find tests/clients/go/workflow tests/clients/go/go.mod tests/clients/go/go.sum \
              -newer .tools/bin/workflow -print -quit)" ]; then
  echo "== building the Go batch workflow (faktory_worker_go)"
  (cd tests/clients/go && GOFLAGS=-mod=mod go build -o "$repo/.tools/bin/workflow" ./workflow)
fi

if [ ! -f .tools/lib/clockshift.so ] || [ tests/support/clockshift/clockshift.c -nt .tools/lib/clockshift.so ]; then
  echo "== building the clock-stepping library for the ledger clock tests"
  mkdir -p .tools/lib
  gcc -shared -fPIC -O2 -Wall -Wextra -Werror -o .tools/lib/clockshift.so tests/support/clockshift/clockshift.c
fi

if [ ! -d tests/clients/node/node_modules/faktory-worker ]; then
  echo "== installing the npm client"
  (cd tests/clients/node && npm ci --silent --no-audit --no-fund)
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import gateway, pytest, hypothesis, faktory, pyfaktory, helm_python, promql_parser" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ] || [ packaging/requirements.txt -nt .venv/.installed ]; then
  echo "== installing the package, its test dependencies and the packaging validators into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]" -r packaging/requirements.txt
  touch .venv/.installed
fi
