#!/usr/bin/env bash
# Chaos soak: one redis-server, four nodes, reconnecting clients and a
# producer while nodes are killed, drained, frozen and restarted.
#   scripts/chaos.sh              long form: 1,000,000 messages to 200 users
#                                 over 8 minutes of faults (CHAOS_SECS=600:
#                                 the producer and the faults take its first
#                                 80 %), Redis restarted empty once mid-run,
#                                 and 5 more users whose clients stop reading
#                                 for 3-15 s at a time
#   scripts/chaos.sh short        the short form that scripts/test.sh runs
# The long form's settings can be overridden: CHAOS_MESSAGES, CHAOS_SECS,
# CHAOS_USERS, CHAOS_REDIS_RESTART (1: once; single Redis only),
# CHAOS_STALLERS (how many non-reading clients), CHAOS_STALLER_PAYLOAD (bytes
# of their messages' payload; default: the others' one-byte payload).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = short ]; then
  export CHAOS_MESSAGES=20000 CHAOS_SECS=25 CHAOS_USERS=40 CHAOS_REDIS_RESTART=0 CHAOS_STALLERS=0 CHAOS_STALLER_PAYLOAD=0
else
  export CHAOS_MESSAGES=${CHAOS_MESSAGES:-1000000} CHAOS_SECS=${CHAOS_SECS:-600} CHAOS_USERS=${CHAOS_USERS:-200} \
    CHAOS_REDIS_RESTART=${CHAOS_REDIS_RESTART:-1} CHAOS_STALLERS=${CHAOS_STALLERS:-5}
fi
echo "chaos: CHAOS_MESSAGES=$CHAOS_MESSAGES CHAOS_SECS=$CHAOS_SECS CHAOS_USERS=$CHAOS_USERS CHAOS_REDIS_RESTART=$CHAOS_REDIS_RESTART CHAOS_STALLERS=$CHAOS_STALLERS CHAOS_STALLER_PAYLOAD=${CHAOS_STALLER_PAYLOAD:-0}"
# The whole output is kept (node logs on a failure); the summary is printed.
log=${CHAOS_LOG:-$(mktemp -t chaos.XXXXXX.log)}
set +e
cargo test --release --test chaos -- --nocapture >"$log" 2>&1
status=$?
set -e
grep -E '^sent=|^chaos:|^faults:|^live nodes|^  [0-9]+[-/]|test result|panicked' "$log" || true
echo "chaos: full output in $log"
exit "$status"
