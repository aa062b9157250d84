#!/usr/bin/env bash
# Cost per delivered message at a fixed rate (issue 16): starts a
# redis-server and N nodes (release build), drives wscluster-bench S1 at
# RATE msg/s, and prints node CPU µs per message, Redis CPU µs per message
# and Redis commands per message (INFO commandstats, after CONFIG
# RESETSTAT), with the bench's own throughput / p99 line.
#
#   scripts/bench-cost.sh                         # 3 nodes, 600 users, 5000 msg/s, 20000 messages
#   RATE=1000 MESSAGES=10000 scripts/bench-cost.sh
#   NODE_ARGS="--history-size 0" scripts/bench-cost.sh   # history off
#   SYSCALLS=1 scripts/bench-cost.sh              # and the nodes' system calls by kind (perf)
#   PROFILE=1 scripts/bench-cost.sh               # and the nodes' top functions by CPU samples (perf record)
#   PROFILE=1 PERF_G=-g scripts/bench-cost.sh     # the same with call graphs (perf report -g on the kept perf.data)
#   PROFILE_REDIS=1 scripts/bench-cost.sh         # and redis-server's top functions by CPU samples
#   WSC_BENCH_TRACE=/tmp/t.txt scripts/bench-cost.sh   # and every message's send time and latency (µs), one per line
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${NODES:-3} USERS=${USERS:-600} RATE=${RATE:-5000} MESSAGES=${MESSAGES:-20000}
T=${CARGO_TARGET_DIR:-target}
cargo build --release --workspace --bins --quiet
DIR=$(mktemp -d /tmp/wsc-cost.XXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RP=$(free_port)
redis-server --port "$RP" --save "" --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
RPID=$!
pids=()
cleanup() { kill "${pids[@]}" "$RPID" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 50); do redis-cli -p "$RP" ping >/dev/null 2>&1 && break; sleep 0.1; done
urls=()
for i in $(seq "$NODES"); do
  p=$(free_port)
  # shellcheck disable=SC2086
  "${NODE_BIN:-$T/release/wscluster}" --dev --redis-url "redis://127.0.0.1:$RP" --listen "127.0.0.1:$p" ${NODE_ARGS:-} >"$DIR/node$i.log" 2>&1 &
  pids+=($!)
  urls+=("127.0.0.1:$p")
done
for u in "${urls[@]}"; do
  for _ in $(seq 100); do curl -sf "http://$u/readyz" >/dev/null && break; sleep 0.1; done
done
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }   # clock ticks
# Context switches of every thread of a process (wake-ups, issue 16).
ctx() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s + 0}'; }
ticks=$(getconf CLK_TCK)
n0=0; for p in "${pids[@]}"; do n0=$((n0 + $(cpu "$p"))); done
r0=$(cpu "$RPID")
c0=0; for p in "${pids[@]}"; do c0=$((c0 + $(ctx "$p"))); done
redis-cli -p "$RP" config resetstat >/dev/null
# Redis's own stalls over 2 ms (printed after the run when there were any).
redis-cli -p "$RP" config set latency-monitor-threshold 2 >/dev/null
redis-cli -p "$RP" config set slowlog-log-slower-than 1000 >/dev/null
redis-cli -p "$RP" slowlog reset >/dev/null
IFS=,; WS="${urls[*]}"; unset IFS
# SYSCALLS=1: count the nodes' system calls by kind while the bench runs.
if [ -n "${SYSCALLS:-}" ]; then
  IFS=,; PIDS="${pids[*]}"; unset IFS
  ev=raw_syscalls:sys_enter,context-switches
  for c in sendto recvfrom write writev read epoll_wait futex sched_yield; do ev="$ev,syscalls:sys_enter_$c"; done
  perf stat -e "$ev" -p "$PIDS" -o "$DIR/perf.out" &
  PERF=$!
fi
if [ -n "${PROFILE:-}" ]; then
  IFS=,; PIDS="${pids[*]}"; unset IFS
  perf record -q ${PERF_G:-} -F 1999 -p "$PIDS" -o "$DIR/perf.data" 2>/dev/null &
  PREC=$!
fi
if [ -n "${PROFILE_REDIS:-}" ]; then
  perf record -q -F 1999 -p "$RPID" -o "$DIR/perf-redis.data" 2>/dev/null &
  RREC=$!
fi
"$T/release/wscluster-bench" s1 --ws-urls "$WS" --redis-url "redis://127.0.0.1:$RP" \
  --users "$USERS" --rate "$RATE" --messages "$MESSAGES" | tee "$DIR/bench.out"
n1=0; for p in "${pids[@]}"; do n1=$((n1 + $(cpu "$p"))); done
r1=$(cpu "$RPID")
if [ -n "${SYSCALLS:-}" ]; then
  kill -INT "$PERF"; wait "$PERF" || true
  d=$(grep -o 'delivered [0-9]*' "$DIR/bench.out" | head -1 | awk '{print $2}')
  awk -v d="$d" '/syscalls|context-switches/ {gsub(",", "", $1); printf "  %s %.2f/msg\n", $2, $1 / d}' "$DIR/perf.out"
fi
if [ -n "${PROFILE:-}" ]; then
  kill -INT "$PREC"; wait "$PREC" || true
  echo "  top of the nodes' CPU samples (perf record, all threads; kernel symbols included; $DIR/perf.data):"
  perf report -i "$DIR/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null \
    | grep -E '^ +[0-9]' | head -"${PROFILE_TOP:-40}"
fi
if [ -n "${PROFILE_REDIS:-}" ]; then
  kill -INT "$RREC"; wait "$RREC" || true
  echo "  top of redis-server's CPU samples (perf record; kernel symbols included):"
  perf report -i "$DIR/perf-redis.data" --no-children --sort dso,symbol --stdio 2>/dev/null \
    | grep -E '^ +[0-9]' | head -"${PROFILE_TOP:-40}"
fi
c1=0; for p in "${pids[@]}"; do c1=$((c1 + $(ctx "$p"))); done
redis-cli -p "$RP" info commandstats >"$DIR/commandstats"
stalls=$(redis-cli -p "$RP" latency latest | paste -sd' ')
[ -z "$stalls" ] || echo "  Redis stalls over 2 ms (LATENCY LATEST: event, last at, latest ms, max ms): $stalls"
redis-cli -p "$RP" --json slowlog get 8 >"$DIR/slowlog.json"
python3 - "$DIR/slowlog.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
if rows:
    print("  slowest Redis commands over 1 ms (SLOWLOG: µs, command, first arguments):")
for r in rows:
    print(f"    {r[2]:>6} µs  {' '.join(str(a)[:40] for a in r[3][:5])}")
PY
delivered=$(grep -o 'delivered [0-9]*' "$DIR/bench.out" | head -1 | awk '{print $2}')
python3 - "$DIR/commandstats" "$delivered" "$((n1 - n0))" "$((r1 - r0))" "$ticks" "$((c1 - c0))" <<'PY'
import sys, re
path, delivered, nticks, rticks, hz, ctxs = sys.argv[1], int(sys.argv[2] or 0), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
calls, usec = {}, {}
for line in open(path):
    m = re.match(r"cmdstat_(\S+):calls=(\d+),usec=(\d+)", line)
    if m: calls[m.group(1)] = int(m.group(2)); usec[m.group(1)] = int(m.group(3))
total = sum(calls.values())
d = max(delivered, 1)
print(f"  delivered {delivered}: node CPU {nticks / hz * 1e6 / d:.1f} µs/msg, redis CPU {rticks / hz * 1e6 / d:.1f} µs/msg, "
      f"redis commands {total / d:.2f}/msg, node context switches {ctxs / d:.2f}/msg")
print("  calls per msg: " + ", ".join(f"{k} {v / d:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v / d >= 0.01))
print("  Redis µs per msg (commandstats; a script's time includes its calls): " + ", ".join(f"{k} {v / d:.2f}" for k, v in sorted(usec.items(), key=lambda kv: -kv[1]) if v / d >= 0.05))
PY
