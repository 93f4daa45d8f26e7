#!/usr/bin/env bash
# Prints the benchmark's JSON figures for this machine (release build, real VMs).
# `scripts/bench.sh density` measures only host memory, idle CPU and restore time per sandbox
# with and without shared template RAM; `scripts/bench.sh scale [N]` starts N (default 200)
# xs sandboxes in one daemon and reports what each costs the host; `scripts/bench.sh load
# [SECONDS] [CLIENTS]` (default 60 s, 16 clients) runs creates, execs, file transfers and
# shells at once against one daemon and reports throughput, p50/p99, errors and losses;
# `scripts/bench.sh forward [N]` runs two nodes on a throwaway PostgreSQL and times `exec true`
# N times (default 20) on the sandbox's node and through the other (docs/FLEET.md).
# `scripts/bench.sh fleet [N]` times N (default 12) xs creates, four at a time, through one
# node of a fleet of one and of three, each on a throwaway PostgreSQL (docs/FLEET.md).
# `scripts/bench.sh migrate` live-migrates an idle and a busy xs sandbox to a second QEMU on
# this host and reports the pause (QEMU's downtime) and total time; `scripts/bench.sh drain
# [N]` does it between two daemons (N drains back and forth, default 3) and reports the pause
# clients see and the total time of each move (docs/FLEET.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# --bench: also gVisor's runsc, the peer we compare with.
scripts/install-deps.sh --bench
scripts/build.sh release
cargo build --release -p moat-bench
export MOAT_HOME=${MOAT_HOME:-$HOME/.moat}
export MOAT_AGENT=$PWD/target/x86_64-unknown-linux-gnu/release/moat-agent
export MOAT_BIN=$PWD/target/release/moat
target/release/moat setup >&2
exec target/release/moat-bench "$@"
