#!/usr/bin/env bash
# The full chaos run: `moat serve` killed with SIGKILL N times (default 200) at random points
# of creates, execs, suspends, resumes, snapshots, forks, deletes, pool refills, image imports,
# cold creates and its own start-up, with the invariants checked after every restart
# (crates/cli/tests/daemon_chaos.rs; the test suite runs 10 kills). Prints the seed first and
# a `CHAOS {…}` JSON summary last; MOAT_CHAOS_SEED=<seed> replays a run.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200}
case $n in '' | *[!0-9]* | 0) echo "usage: scripts/chaos.sh [N]: N is a count of kills, at least 1 (got '$n')" >&2; exit 2 ;; esac
scripts/build.sh debug
export MOAT_HOME=${MOAT_HOME:-$HOME/.moat}
target/debug/moat setup >&2
MOAT_CHAOS_KILLS=$n exec cargo test -p moat-cli --test daemon_chaos the_daemon_survives_kill_9_at_random_points \
  -- --exact --nocapture --test-threads=1
