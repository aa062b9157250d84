#!/usr/bin/env bash
# What history costs, and how much of it the history entry alone costs
# (issue 14). Interleaved, same sitting, `scripts/bench-cost.sh` each run
# (3 nodes, USERS users, full rate):
#   on      — this tree, history on (the default);
#   append  — this tree with bench/patches/history-append-only.patch: per
#             message only the history entry, as a plain pipelined XADD (no
#             script, numbering, expiry or checks): the format's own cost;
#   off     — this tree, --history-size 0.
# Then on/off at RATE5 msg/s for p99. Builds the patched HEAD (committed
# code, not this tree's edits) in a worktree under $TMPDIR (its own target directory: the first run takes a
# few minutes). The patch is against src/cluster/route/mod.rs: refresh it
# when that file changes.
#
#   scripts/bench-history.sh              # 3 rounds, 200,000 messages
#   ROUNDS=1 MESSAGES=100000 scripts/bench-history.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} MESSAGES=${MESSAGES:-200000} USERS=${USERS:-1000} RATE5=${RATE5:-5000}
T=${CARGO_TARGET_DIR:-target}
cargo build --release --workspace --bins --quiet
WT=${TMPDIR:-/tmp}/wsc-history-append
if [ ! -d "$WT" ]; then git worktree add --detach -q "$WT" HEAD; fi
git -C "$WT" checkout -q -f --detach "$(git rev-parse HEAD)"
git -C "$WT" apply "$PWD/bench/patches/history-append-only.patch"
(cd "$WT" && CARGO_TARGET_DIR="$WT/target" cargo build --release --quiet --bin wscluster)
run() { # label bin rate messages [node args]
  local l=$1 bin=$2 rate=$3 m=$4; shift 4
  local out
  out=$(NODE_BIN=$bin NODE_ARGS="$*" RATE=$rate USERS=$USERS MESSAGES=$m scripts/bench-cost.sh 2>&1)
  printf '  %-7s %s | %s | %s\n' "$l" \
    "$(echo "$out" | grep -o 'throughput [0-9]* msg/s' || echo 'no throughput')" \
    "$(echo "$out" | grep -o 'p50 .*p99.9 [0-9.]* [mµ]*s' | head -1)" \
    "$(echo "$out" | grep -o 'node CPU [0-9.]* µs/msg, redis CPU [0-9.]* µs/msg' || true)"
}
for round in $(seq "$ROUNDS"); do
  echo "== $(date -u +%T) round $round, full rate, $MESSAGES messages, load average $(cut -d' ' -f1 /proc/loadavg)"
  run on "$T/release/wscluster" 0 "$MESSAGES"
  run append "$WT/target/release/wscluster" 0 "$MESSAGES"
  run off "$T/release/wscluster" 0 "$MESSAGES" --history-size 0
  echo "== $(date -u +%T) round $round, $RATE5 msg/s"
  run on "$T/release/wscluster" "$RATE5" $((RATE5 * 10))
  run off "$T/release/wscluster" "$RATE5" $((RATE5 * 10)) --history-size 0
done
