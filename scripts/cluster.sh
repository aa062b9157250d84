#!/usr/bin/env bash
# A local cluster for trials: one redis-server (port 6390, no persistence)
# and three nodes on ports 8081-8083, in --dev mode. Ctrl-C stops them all.
#   --lb   also start wsc-lb (a round-robin TCP proxy) on 127.0.0.1:8080 in
#          front of the nodes: open http://127.0.0.1:8080/ and kill a node to
#          watch the page reconnect to another one.
set -euo pipefail
cd "$(dirname "$0")/.."
LB=0
for arg in "$@"; do
  case "$arg" in
    --lb) LB=1 ;;
    *) echo "usage: scripts/cluster.sh [--lb]" >&2; exit 2 ;;
  esac
done
LB_LISTEN=${LB_LISTEN:-127.0.0.1:8080}
REDIS_PORT=${REDIS_PORT:-6390}
NODES=${NODES:-3}
command -v redis-server >/dev/null || { echo "cluster.sh: install redis-server first (apt-get install redis-server)" >&2; exit 1; }
T=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet -p wscluster --bin wscluster
# wsc-lb is the bench package's (bench/ in the workspace).
[ "$LB" = 0 ] || cargo build --release --quiet -p wscluster-bench --bin wsc-lb
pids=()
cleanup() {
  trap - INT TERM EXIT
  echo "cluster.sh: stopping"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --logfile "" >/dev/null &
pids+=($!)
sleep 0.3
for i in $(seq 1 "$NODES"); do
  WSC_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/" WSC_LISTEN="127.0.0.1:808$i" WSC_DEV=true \
    WSC_API_KEY="${WSC_API_KEY:-dev-key}" "$T/release/wscluster" &
  pids+=($!)
done
echo "cluster.sh: redis on $REDIS_PORT; nodes on http://127.0.0.1:8081 .. 808$NODES (demo page at /, operator page at /admin, API key ${WSC_API_KEY:-dev-key}); Ctrl-C to stop"
if [ "$LB" = 1 ]; then
  backends=()
  for i in $(seq 1 "$NODES"); do backends+=("127.0.0.1:808$i"); done
  "$T/release/wsc-lb" "$LB_LISTEN" "${backends[@]}" &
  pids+=($!)
  echo "cluster.sh: load balancer on http://$LB_LISTEN (round robin over the nodes)"
fi
wait
