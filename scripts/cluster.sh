#!/usr/bin/env bash
# A local cluster for trials: one redis-server (port 6390, no persistence)
# and three nodes on ports 8081-8083, in --dev mode. Ctrl-C stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
REDIS_PORT=${REDIS_PORT:-6390}
NODES=${NODES:-3}
command -v redis-server >/dev/null || { echo "cluster.sh: install redis-server first (apt-get install redis-server)" >&2; exit 1; }
cargo build --release --quiet
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
    WSC_API_KEY="${WSC_API_KEY:-dev-key}" target/release/wscluster &
  pids+=($!)
done
echo "cluster.sh: redis on $REDIS_PORT; nodes on http://127.0.0.1:8081 .. 808$NODES (demo page at /); Ctrl-C to stop"
wait
