#!/usr/bin/env bash
# The test command: installs what is missing, then runs every check and test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkg() { # need_pkg <command> <debian package>
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing $2 (for $1)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  else
    echo "test.sh: $1 is missing: install the '$2' package (e.g. sudo apt-get install $2), then run this again" >&2
    exit 1
  fi
}
need_pkg redis-server redis-server
need_pkg redis-cli redis-tools
# The browser test (tests/browser.rs) drives Debian's Chromium with playwright-core.
need_pkg chromium chromium
need_pkg node nodejs
need_pkg npm npm
[ -d tests/browser/node_modules/playwright-core ] || (cd tests/browser && npm ci --no-audit --no-fund --silent)

# redis-server is started per test on a free port; the Debian service is not needed.
# The workspace: the server (root package), bench/ (wscluster-bench, wsc-lb)
# and testkit/ (the launchers the tests and the bench share).
# Every build here leaves out the default `jemalloc` feature (the node's
# allocator): its C build costs about a minute of CPU and it changes no
# behaviour; the release builds of bench.sh and chaos.sh have it. All the
# builds below use the same features, so none rebuilds another's crates.
F=--no-default-features
echo "== format and lints (at ${SECONDS}s)"
cargo fmt --all --check
cargo clippy --workspace --all-targets $F --quiet -- -D warnings

# Run `cargo test ARGS…`, print the summary lines; on failure the log's
# tail, and exit with cargo's status.
run_tests() {
  local log status
  log=$(mktemp)
  set +e
  cargo test "$@" >"$log" 2>&1
  status=$?
  set -e
  grep -E '^(test |     Running|test result|failures:|---- )|panicked' "$log" || true
  if [ "$status" != 0 ]; then
    tail -300 "$log"
    echo "== what failed:"
    grep -A2 'panicked at' "$log" | grep -v '^ *[0-9]*: \|stack backtrace' | head -40 || true
    rm -f "$log"
    echo "test.sh: cargo test $* failed" >&2
    exit "$status"
  fi
  rm -f "$log"
}

echo "== unit and integration tests (single Redis; tests/redis_cluster.rs on Redis Cluster) (at ${SECONDS}s)"
run_tests --workspace --all-targets $F

# The core, failure, resume and chaos tests again, each on a fresh 3-primary Redis
# Cluster (a shorter soak, to keep the suite well under 10 minutes). Left out:
# the three that kill, restart or stop the one Redis (single-Redis faults;
# tests/redis_cluster.rs kills a cluster primary instead).
echo "== core, failure, resume and chaos tests on Redis Cluster (at ${SECONDS}s)"
WSC_TEST_REDIS_CLUSTER=1 CHAOS_SECS=12 CHAOS_MESSAGES=10000 \
  run_tests $F --test core --test failure --test resume --test chaos -- \
  --skip redis_restart_empty --skip redis_down_at_boot --skip readyz_503_when_cut_off

echo "== benchmark tool smoke run (figures printed, never asserted as timings) (at ${SECONDS}s)"
# The bench starts the wscluster binary built next to it.
cargo build --quiet -p wscluster --bin wscluster $F
cargo run --quiet -p wscluster-bench --bin wscluster-bench $F -- smoke

if [ -x scripts/chart-check.sh ]; then
  echo "== helm chart (at ${SECONDS}s)"
  scripts/chart-check.sh
fi
echo "test.sh: all passed in ${SECONDS}s"
