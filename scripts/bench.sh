#!/usr/bin/env bash
# The standard benchmark set (issue 4): builds release, measures Redis's own
# XADD limit, runs S1-S4 against local clusters (a redis-server on a free
# port and wscluster nodes, all on this machine), and writes BENCHMARKS.md
# and BENCHMARKS-latency.png. A few minutes in all. The last section runs
# S1 at full speed on a local Redis Cluster of 3 primaries (send shards
# 1, 2, 4) and on a single Redis (1, 4), RC_REPEAT times each, interleaved.
#
#   scripts/bench.sh              # the standard set
#   QUICK=1 scripts/bench.sh      # shorter runs (a rough check of the script)
#   RC_REPEAT=0 scripts/bench.sh  # without the Redis Cluster section
set -uo pipefail
cd "$(dirname "$0")/.."

need_pkg() { # need_pkg <file or command> <debian package>
  { command -v "$1" >/dev/null 2>&1 || [ -e "$1" ]; } && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench.sh: installing $2 (for $1)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  else
    echo "bench.sh: $1 is missing: install the '$2' package, then run this again" >&2
    exit 1
  fi
}
need_pkg redis-server redis-server
need_pkg redis-benchmark redis-tools
need_pkg redis-cli redis-tools
# Text in the plot (plotters with ab_glyph) uses DejaVu Sans; without it the
# plot is drawn without labels.
need_pkg /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf fonts-dejavu-core

echo "== build (release)"
# The server and the tool (bench/ in the workspace), side by side in
# target/release: the tool starts the wscluster binary next to it.
cargo build --release --workspace --bins --quiet || exit 1

T=${CARGO_TARGET_DIR:-target}
B=$T/release/wscluster-bench
OUT=$T/bench
mkdir -p "$OUT"
R="$OUT/results.jsonl"
: >"$R"
LOG="$OUT/bench.log"
: >"$LOG"

if [ -n "${QUICK:-}" ]; then
  M=20000; D=2; C1=2000; C2=5000; S4D=2
else
  M=100000; D=5; C1=10000; C2=19000; S4D=5
fi

failed=()
run() { # run <label> <subcommand> [args...]
  local label=$1; shift
  echo "== $label: $*"
  # Human lines to the terminal and the log, JSON lines to the results
  # file; stderr (progress bars on a terminal, errors) stays on the terminal.
  "$B" "$@" --json "$R" --label "$label" | tee -a "$LOG" | grep -v '^{'
  local status=${PIPESTATUS[0]}
  if [ "$status" != 0 ]; then
    echo "bench.sh: $label FAILED" >&2
    failed+=("$label")
  fi
}

start=$(date +%s)
run redis          redis-limit --requests 200000 --clients 50
run s1-1n-max      s1 --nodes 1 --users 1000 --messages "$M"
run s1-3n-max      s1 --nodes 3 --users 1000 --messages "$M"
run s1-3n-max-3shards s1 --nodes 3 --users 1000 --messages "$M" --send-shards 3
run s1-3n-1k       s1 --nodes 3 --users 1000 --rate 1000  --duration-s "$D"
run s1-3n-5k       s1 --nodes 3 --users 1000 --rate 5000  --duration-s "$D"
run s1-3n-10k      s1 --nodes 3 --users 1000 --rate 10000 --duration-s "$D"
# The same at everyday rates with one runtime thread per node: 3 nodes of
# 2 workers each, Redis and the load generator oversubscribe these 2 cores,
# and a message then wakes threads across cores (README: --worker-threads).
run s1-3n-1k-1w    s1 --nodes 3 --users 1000 --rate 1000  --duration-s "$D" --node-arg=--worker-threads=1
run s1-3n-5k-1w    s1 --nodes 3 --users 1000 --rate 5000  --duration-s "$D" --node-arg=--worker-threads=1
run s2-10k         s2 --conns "$C1"
run s2-19k         s2 --conns "$C2"
run s3-fast        s3 --nodes 3 --users 1000 --rate 2000 --heartbeat-ms 200 --lease-ttl-ms 1000
run s3-default     s3 --nodes 3 --users 1000 --rate 2000 --heartbeat-ms 1000 --lease-ttl-ms 5000
run s3-router-fast s3 --nodes 3 --users 1000 --rate 2000 --heartbeat-ms 200 --lease-ttl-ms 1000 --kill router
run s4-3n          s4 --nodes 3 --subscribers 1000 --rate 100 --duration-s "$S4D"
run s4-3n-fast     s4 --nodes 3 --subscribers 1000 --rate 500 --duration-s "$S4D"
# S1 on Redis Cluster (3 primaries, no replicas, all on this machine) against
# a single Redis, same sitting; the report lists every run of each label.
for _ in $(seq "${RC_REPEAT:-3}"); do
  run s1-single-shards1 s1 --nodes 3 --users 1000 --messages "$M"
  run s1-single-shards4 s1 --nodes 3 --users 1000 --messages "$M" --send-shards 4
  for k in 1 2 4; do
    run "s1-rc3-shards$k" s1 --nodes 3 --users 1000 --messages "$M" \
      --redis-cluster-primaries 3 --send-shards "$k"
  done
done
echo "== report"
commit=$(git rev-parse --short HEAD 2>/dev/null || true)
# The server's code (src/), not this tool's (bench/), decides whether the
# tree is "dirty".
if [ -n "$commit" ] && [ -n "$(git status --porcelain -- src 2>/dev/null)" ]; then
  commit="$commit + uncommitted changes"
fi
"$B" report --json "$R" --out BENCHMARKS.md --plot BENCHMARKS-latency.png ${commit:+--commit "$commit"} || failed+=(report)
echo "bench.sh: $(( $(date +%s) - start )) s; raw results in $R, log in $LOG"
if [ ${#failed[@]} -gt 0 ]; then
  echo "bench.sh: failed runs: ${failed[*]}" >&2
  exit 1
fi
