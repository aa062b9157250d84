#!/usr/bin/env bash
# Instructions per delivered message (issue 16), counted by callgrind: one
# release node under valgrind (`--worker-threads 1`), a redis-server of its
# own, `wscluster-bench s1` at a low fixed rate. Counters are zeroed once
# the node is ready, so start-up is left out (connects and background work
# stay in). Instruction counts repeat within ~2 % for the same binary
# whatever else the machine does, where CPU time here spreads ±15 % or more:
# use it to A/B changes to the node's own code (user space only: kernel
# time, i.e. system calls and wake-ups, is what `SYSCALLS=1
# scripts/bench-cost.sh` counts). At a rate this low every message travels
# alone, as at everyday rates on a real node.
#
#   scripts/bench-instr.sh                         # this tree's release node
#   NODE_BIN=/path/to/other/wscluster scripts/bench-instr.sh
#   RATE=200 MESSAGES=2000 USERS=100 scripts/bench-instr.sh   # the defaults
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-200} MESSAGES=${MESSAGES:-2000} USERS=${USERS:-100}
T=${CARGO_TARGET_DIR:-target}
command -v valgrind >/dev/null || { echo "bench-instr.sh: needs valgrind (Debian package valgrind)" >&2; exit 1; }
cargo build --release --workspace --bins --quiet
BIN=${NODE_BIN:-$T/release/wscluster}
DIR=$(mktemp -d /tmp/wsc-instr.XXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RP=$(free_port); P=$(free_port)
redis-server --port "$RP" --save "" --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
RPID=$!
NPID=
cleanup() { kill $NPID "$RPID" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 50); do redis-cli -p "$RP" ping >/dev/null 2>&1 && break; sleep 0.1; done
valgrind --tool=callgrind --callgrind-out-file="$DIR/cg.out" "$BIN" --dev \
  --redis-url "redis://127.0.0.1:$RP" --listen "127.0.0.1:$P" --worker-threads 1 >"$DIR/node.log" 2>&1 &
NPID=$!
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$P/readyz" >/dev/null && break; sleep 0.1; done
callgrind_control -z "$NPID" >/dev/null
"$T/release/wscluster-bench" s1 --ws-urls "127.0.0.1:$P" --redis-url "redis://127.0.0.1:$RP" \
  --users "$USERS" --rate "$RATE" --messages "$MESSAGES" >"$DIR/bench.out" 2>&1
callgrind_control -d "$NPID" >/dev/null
delivered=$(grep -o 'delivered [0-9]*' "$DIR/bench.out" | head -1 | awk '{print $2}')
ir=$(grep -E '^(summary|totals):' "$DIR/cg.out.1" | head -1 | awk '{print $2}')
echo "$BIN: delivered $delivered; $((ir / ${delivered:-1})) instructions per message;" \
  "Redis commands per message $(grep -o '"redis_commands_per_msg":[0-9.]*' "$DIR/bench.out" | cut -d: -f2)"
echo "profile: callgrind_annotate $DIR/cg.out.1"
