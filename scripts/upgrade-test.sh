#!/usr/bin/env bash
# Rolling upgrade and rollback under traffic (issue 17).
#
# Builds the previous release from its tag (once: cached under
# target/upgrade/) and the current one, then runs `wscluster-bench upgrade`:
# a redis-server on a free port, 3 nodes of the previous release behind
# wsc-lb, reconnecting clients (through the LB, resuming with since/epoch
# as /client.js does) and a producer of user and topic messages; the nodes
# are replaced one by one by current ones (start the new node, add it to the
# LB, SIGTERM an old one, wait for it to exit 0, take it out of the LB),
# then rolled back the same way. It prints, for the upgrade and for the
# rollback, sent / delivered / lost / duplicates and how resumes were
# answered; it exits non-zero if a user message was lost (or a node did not
# drain cleanly).
#
#   scripts/upgrade-test.sh          full form (~3 minutes once built)
#   UPGRADE_SHORT=1 scripts/upgrade-test.sh   short form (~1.5 minutes)
#
# Settings (environment): UPGRADE_FROM (tag or commit of the previous
# release, default v0.1.0), UPGRADE_USERS, UPGRADE_RATE (messages/s),
# UPGRADE_DRAIN_MS, UPGRADE_KEEP_LOGS=1 (keep the nodes' logs), UPGRADE_ARGS
# (more arguments for `wscluster-bench upgrade`; see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."

FROM=${UPGRADE_FROM:-v0.1.0}
T=${CARGO_TARGET_DIR:-target}
case "$T" in /*) ;; *) T=$PWD/$T ;; esac
OLD_SRC=$T/upgrade/$FROM-src
OLD_TARGET=$T/upgrade/$FROM-target
OLD_BIN=$OLD_TARGET/release/wscluster

command -v redis-server >/dev/null || {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "upgrade-test: installing redis-server"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "upgrade-test: install redis-server first (apt-get install redis-server)" >&2
    exit 1
  fi
}

# 1. The previous release, from its tag, in a directory of its own (no
#    change to this work tree or its git state: `git archive`).
if [ ! -x "$OLD_BIN" ]; then
  echo "== build $FROM (once; cached in $OLD_TARGET)"
  git rev-parse --verify --quiet "$FROM^{commit}" >/dev/null || {
    echo "upgrade-test: $FROM is not a tag or commit here (git fetch --tags?)" >&2
    exit 1
  }
  rm -rf "$OLD_SRC"
  mkdir -p "$OLD_SRC"
  git archive "$FROM" | tar -x -C "$OLD_SRC"
  # Under target/ it sits inside this workspace: an empty [workspace] table
  # makes it a workspace of its own (a tag with a workspace has one already).
  grep -q '^\[workspace\]' "$OLD_SRC/Cargo.toml" || printf '\n[workspace]\n' >>"$OLD_SRC/Cargo.toml"
  (cd "$OLD_SRC" && CARGO_TARGET_DIR=$OLD_TARGET cargo build --release --locked --quiet --bin wscluster)
else
  echo "== $FROM: $OLD_BIN (cached)"
fi

# 2. The current release: the server, the driver and the load balancer,
#    side by side in $T/release.
echo "== build current (release)"
CARGO_TARGET_DIR=$T cargo build --release --quiet -p wscluster --bin wscluster
CARGO_TARGET_DIR=$T cargo build --release --quiet -p wscluster-bench --bin wscluster-bench --bin wsc-lb

args=(--old-bin "$OLD_BIN" --new-bin "$T/release/wscluster" --lb-bin "$T/release/wsc-lb" --old-label "$FROM")
if [ -n "${UPGRADE_SHORT:-}" ] && [ "${UPGRADE_SHORT}" != 0 ]; then
  args+=(--short)
fi
[ -z "${UPGRADE_USERS:-}" ] || args+=(--users "$UPGRADE_USERS")
[ -z "${UPGRADE_RATE:-}" ] || args+=(--rate "$UPGRADE_RATE")
[ -z "${UPGRADE_DRAIN_MS:-}" ] || args+=(--drain-ms "$UPGRADE_DRAIN_MS")
[ -z "${UPGRADE_KEEP_LOGS:-}" ] || args+=(--keep-logs)
# shellcheck disable=SC2206
[ -z "${UPGRADE_ARGS:-}" ] || args+=($UPGRADE_ARGS)

echo "== rolling upgrade $FROM -> current and back"
exec "$T/release/wscluster-bench" upgrade "${args[@]}"
