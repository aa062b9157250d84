#!/usr/bin/env bash
# Chaos soak: one redis-server, four nodes, reconnecting clients and a
# producer while nodes are killed, drained, frozen and restarted.
#   scripts/chaos.sh              long form: 200,000 messages over 5 minutes
#   scripts/chaos.sh short        the short form that scripts/test.sh runs
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = short ]; then
  export CHAOS_MESSAGES=20000 CHAOS_SECS=25
else
  export CHAOS_MESSAGES=${CHAOS_MESSAGES:-200000} CHAOS_SECS=${CHAOS_SECS:-300} CHAOS_USERS=${CHAOS_USERS:-200}
fi
cargo test --release --test chaos -- --nocapture 2>&1 | grep -E '^sent=|^chaos:|^faults:|^live nodes|^  [0-9]|test result|panicked'
