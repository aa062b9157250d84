#!/usr/bin/env bash
# The floor of issue 16's figures on this machine: `wsc-floor` runs the
# contract's hops per message with no work (router: read the send stream,
# look the user up, add to an inbox; node: read the inbox, write to the
# client's socket, read its answer) and prints their CPU per message;
# interleaved with `scripts/bench-cost.sh` (wscluster itself) at the same
# rates, same users, same sitting.
#
#   scripts/bench-floor.sh                     # 1k, 5k, 10k msg/s, 3 rounds
#   RATES="5000" ROUNDS=1 scripts/bench-floor.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RATES=${RATES:-1000 5000 10000} ROUNDS=${ROUNDS:-3} USERS=${USERS:-1000}
T=${CARGO_TARGET_DIR:-target}
cargo build --release --workspace --quiet
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
floor() { # rate messages mode
  local p; p=$(free_port)
  redis-server --port "$p" --save "" --appendonly no --daemonize yes --logfile /dev/null >/dev/null
  for _ in $(seq 50); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done
  local pid t0 t1
  pid=$(redis-cli -p "$p" info server | tr -d '\r' | awk -F: '/^process_id:/ {print $2}')
  t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  timeout 120 "$T/release/wsc-floor" --redis-port "$p" --rate "$1" --messages "$2" --users "$USERS" $3 | sed 's/^/  /'
  t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  redis-cli -p "$p" info commandstats | awk -F'[=,:]' -v m="$2" -v ticks=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" \
    '/^cmdstat/ && !/config/ {c+=$3} END {printf "    Redis commands per message %.2f, Redis CPU %.1f µs/msg (set-up included)\n", c/m, ticks/hz*1e6/m}'
  redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true
}
for round in $(seq "$ROUNDS"); do
  for rate in $RATES; do
    m=$((rate * 5))
    echo "== $(date -u +%T) round $round, $rate msg/s, load average $(cut -d' ' -f1 /proc/loadavg)"
    floor "$rate" "$m" --no-write
    floor "$rate" "$m" --pong
    echo "  wscluster:"
    RATE=$rate MESSAGES=$m USERS=$USERS scripts/bench-cost.sh 2>&1 | { grep -E "^  (latency|delivered)" || true; } | sed 's/^/  /'
  done
done
