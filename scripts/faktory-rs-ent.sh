#!/usr/bin/env bash
# faktory-rs's own Enterprise batch tests (tests/real/enterprise.rs: the 5 tests matched by
# `enterprise::test_batch enterprise::test_callback`) against `batches: gateway` in front of the
# real Faktory OSS server, in each mode, and straight against Faktory OSS as a control (there they
# must fail: OSS has no batches). Prints one row per test and run, and exits 0 when every row is
# as expected (EXPECT below: what a gateway that keeps the #465 rules must give).
#
#   scripts/faktory-rs-ent.sh                       # faktory-rs from crates.io (FAKTORY_RS_VERSION)
#   FAKTORY_RS_SRC=~/src/faktory-rs scripts/faktory-rs-ent.sh   # a checkout of jonhoo/faktory-rs
#   RUNS="member-reopen" scripts/faktory-rs-ent.sh  # a subset of: oss strict member-reopen
#
# Steps: scripts/install-test-deps.sh (Faktory 1.9.4 OSS, .venv with the gateway) if they are
# missing; faktory-rs's source (FAKTORY_RS_SRC, or the published crate via `cargo info`, which
# ships its Cargo.lock and tests); `cargo fetch --locked`; `cargo test --no-run` of the `real`
# target (features `worker,ent` where the crate has a `worker` feature, else `ent`); then, per
# run, a fresh Faktory OSS (tests/support/processes.py FaktoryServer: own port and storage) and,
# except for `oss`, a gateway (`--batches gateway --mode M`, embedded store), the 5 tests with
# --test-threads=1, everything stopped. Logs (cargo, gateway JSON, Faktory) in $LOG_DIR.
#
# Runtime, measured on a 2-core machine under `nice -n 19`, crates not yet downloaded:
# crates.io faktory 0.13.1: fetch 1.5 s, build 107 s (2:13 in all with the three runs); each run ~11 s.
# The crate is built once per FAKTORY_RS_SRC/version (target dir in .tools/faktory-rs/); a
# second run of the script spends only the test runs.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

FAKTORY_RS_VERSION=${FAKTORY_RS_VERSION:-0.13.1}
RUNS=${RUNS:-"oss strict member-reopen"}
LOG_DIR=${LOG_DIR:-$repo/.tools/faktory-rs/logs}
work=$repo/.tools/faktory-rs
mkdir -p "$work" "$LOG_DIR"
export CARGO_TERM_COLOR=never

if [ ! -x "${FAKTORY_BIN:-.tools/bin/faktory}" ] || ! .venv/bin/python -c "import gateway" 2>/dev/null; then
  scripts/install-test-deps.sh
fi
command -v cargo >/dev/null || { echo "cargo not found (rustup, or Debian's cargo)" >&2; exit 1; }

# --- 1. faktory-rs's source
if [ -n "${FAKTORY_RS_SRC:-}" ]; then
  src=$(cd "$FAKTORY_RS_SRC" && pwd)
  target=$work/target-src
else
  src=$work/faktory-$FAKTORY_RS_VERSION
  target=$work/target-$FAKTORY_RS_VERSION
  if [ ! -f "$src/Cargo.toml" ]; then
    echo "== downloading the faktory $FAKTORY_RS_VERSION crate (crates.io)"
    (cd "$work" && cargo info --quiet "faktory@$FAKTORY_RS_VERSION" >/dev/null)
    crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"faktory-$FAKTORY_RS_VERSION.crate" | head -1)
    tar -xzf "$crate" -C "$work"
  fi
fi
features=ent
grep -q '^worker *=' "$src/Cargo.toml" && features=worker,ent
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$target}
# cargo test's own filter: these two substrings match exactly the 5 batch tests.
filters=(enterprise::test_batch enterprise::test_callback)

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# --- 2. crates and build
t0=$(now)
(cd "$src" && nice -n 19 cargo fetch --locked) >"$LOG_DIR/cargo-fetch.log" 2>&1 \
  || { tail -20 "$LOG_DIR/cargo-fetch.log"; exit 1; }
t1=$(now)
(cd "$src" && nice -n 19 cargo test --offline --locked --features "$features" --test real --no-run) \
  >"$LOG_DIR/cargo-build.log" 2>&1 || { tail -40 "$LOG_DIR/cargo-build.log"; exit 1; }
t2=$(now)
echo "== faktory-rs: $src (features $features): cargo fetch $(secs "$t0" "$t1") s, build $(secs "$t1" "$t2") s"

# --- 3. the runs: a fresh Faktory OSS each, a gateway in front of it unless `oss`
export FRS_SRC=$src FRS_FEATURES=$features FRS_RUNS=$RUNS FRS_LOG_DIR=$LOG_DIR
nice -n 19 .venv/bin/python - "${filters[@]}" <<'PY'
import os, re, subprocess, sys, time
from tests.support.processes import FaktoryServer, GatewayProcess

filters = sys.argv[1:]
src, features, log_dir = os.environ["FRS_SRC"], os.environ["FRS_FEATURES"], os.environ["FRS_LOG_DIR"]
runs = os.environ["FRS_RUNS"].split()
TESTS = [
    "test_batch_of_jobs_can_be_initiated",
    "test_batches_can_be_nested",
    "test_callback_will_not_be_queued_unless_batch_gets_committed",
    "test_callback_will_be_queued_upon_commit_even_if_batch_is_empty",
    "test_batch_can_be_reopened_add_extra_jobs_and_batches_added",
]
# What each run must give. Against OSS every test fails (no batches). Through the gateway the only
# expected failure is the test that reopens a committed, and then a fired, batch from outside, which
# Enterprise 1.9.4 allows and the gateway refuses on purpose (contribsys/faktory#465).
EXPECT = {
    "oss": {t: "FAILED" for t in TESTS},
    "strict": {t: "ok" for t in TESTS} | {TESTS[4]: "FAILED"},
    "member-reopen": {t: "ok" for t in TESTS} | {TESTS[4]: "FAILED"},
}


def save(name, lines):
    with open(os.path.join(log_dir, name), "w") as handle:
        handle.write("\n".join(lines) + "\n")


def run(mode):
    faktory = FaktoryServer().start()
    gateway = None
    try:
        url = faktory.url
        if mode != "oss":
            gateway = GatewayProcess(faktory.url, "--batches", "gateway", "--mode", mode).start()
            url = gateway.url
        env = {**os.environ, "FAKTORY_URL": url, "FAKTORY_ENT": "true"}
        argv = ["cargo", "test", "--offline", "--locked", "--features", features, "--test", "real",
                "--", *filters, "--test-threads=1"]
        started = time.monotonic()
        done = subprocess.run(argv, cwd=src, env=env, capture_output=True, text=True)
        elapsed = time.monotonic() - started
    finally:
        if gateway:
            gateway.stop()
            save(f"gateway-{mode}.log", gateway.output)
        faktory.stop()
        save(f"faktory-{mode}.log", faktory.output)
        faktory.cleanup()
    out = done.stdout + done.stderr
    save(f"cargo-test-{mode}.log", [out])
    results = dict(re.findall(r"^test enterprise::(\w+) \.\.\. (ok|FAILED)$", out, re.M))
    # The first panic of each failed test: where, and its message's first line.
    reasons = {}
    for name, body in re.findall(r"^---- enterprise::(\w+) stdout ----\n(.*?)(?=^---- |^failures:$)", out, re.M | re.S):
        at = re.search(r"panicked at (\S+):\n(.*)", body)
        reasons[name] = f"{at.group(1).split('/')[-1]}: {at.group(2).strip()}" if at else body.strip()[:200]
    return results, reasons, elapsed


rows, bad = [], 0
for mode in runs:
    results, reasons, elapsed = run(mode)
    print(f"== {mode}: {len(results)} tests in {elapsed:.0f} s", flush=True)
    for test in TESTS:
        got = results.get(test, "not run")
        want = EXPECT[mode][test]
        bad += got != want
        rows.append((mode, test, got, "" if got == want else f"expected {want}", reasons.get(test, "")))

width = max(len(t) for t in TESTS)
print(f"\n{'run':<14} {'test':<{width}} {'result':<7} {'':<15} first failure")
for mode, test, got, note, reason in rows:
    print(f"{mode:<14} {test:<{width}} {got:<7} {note:<15} {reason[:160]}")
print(f"\n{len(rows) - bad} passed, {bad} failed (rows as expected / not; logs in {log_dir})")
sys.exit(1 if bad else 0)
PY
