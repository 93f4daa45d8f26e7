#!/usr/bin/env bash
# Live-migrates one busy xs sandbox N times back and forth between two runtimes on this host
# (crates/vm/tests/migrate.rs `stress`: a counter writing to disk every 10 ms, 16 MiB of tmpfs
# rewritten without end), verifying each destination (Arrived::verify) and checking the
# counter; prints how many destinations failed verification (each is retried, up to 3 times
# in a row, with the source continued in between). Needs MOAT_HOME after `moat setup` and
# `scripts/build.sh debug`.
#
#   MOAT_HOME=… scripts/migrate-stress.sh 50
#   MOAT_MIGRATE_AUTO_CONVERGE=0 MOAT_HOME=… scripts/migrate-stress.sh 50   # without throttling
set -euo pipefail
n=${1:?usage: scripts/migrate-stress.sh <migrations>}
[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "migrations: a positive integer, not '$n'" >&2; exit 2; }
: "${MOAT_HOME:?set MOAT_HOME (after moat setup)}"
cd "$(dirname "$0")/.."
log=$(mktemp /tmp/migrate-stress-XXXXXX.log)
set +e
MOAT_MIGRATE_STRESS=$n cargo test -p moat-vm --test migrate stress -- --ignored --nocapture \
    --test-threads=1 2>&1 | tee "$log" | grep -E --line-buffered '^round |FAILED VERIFICATION|^STRESS|panicked'
rc=${PIPESTATUS[0]}
set -e
failed=$(grep -c 'FAILED VERIFICATION' "$log" || true)
rounds=$(grep -c '^round ' "$log" || true)
echo "migrate-stress: $rounds of $n migrations completed; $failed destinations failed verification (log: $log)"
exit "$rc"
