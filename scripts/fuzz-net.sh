#!/usr/bin/env bash
# Fuzzes the network stack's hostile-input parsers with libFuzzer (crates/net/fuzz):
#   frames  any bytes from the guest, in QEMU's stream framing, through a fresh stack
#   dns     any bytes as a DNS query, through moat's DNS engine
#
#   scripts/fuzz-net.sh [TARGET] [SECONDS]     default: both targets, 300 s each
#
# Needs a nightly toolchain and cargo-fuzz (`rustup toolchain install nightly`,
# `cargo install cargo-fuzz`). Crashes land in crates/net/fuzz/artifacts/TARGET/; the corpus
# grows in crates/net/fuzz/corpus/TARGET/ (both ignored by git). The bounded stand-in that runs
# with `cargo test -p moat-net` is crates/net/tests/mutations.rs.
set -euo pipefail
cd "$(dirname "$0")/../crates/net"
targets=${1:-frames dns}
seconds=${2:-300}
for t in $targets; do
  case $t in frames|dns) ;; *) echo "unknown target $t (frames or dns)" >&2; exit 2 ;; esac
  cargo +nightly fuzz run "$t" -- -max_total_time="$seconds" -rss_limit_mb=2048
done
