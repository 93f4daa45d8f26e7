#!/usr/bin/env bash
# Runs the policy analysers' libFuzzer target (crates/policy/fuzz, target `check`) for a while,
# seeded with the policy corpus. `cargo test -p moat-policy --test mutations` runs the same
# entry point on 20,000 generated and mutated inputs on every test run; this is the long run.
#   scripts/fuzz-policy.sh [SECONDS]   (default 600)
# Needs a nightly toolchain and cargo-fuzz (`rustup toolchain install nightly`,
# `cargo install cargo-fuzz`). Crashes land in crates/policy/fuzz/artifacts/check/.
set -euo pipefail
cd "$(dirname "$0")/../crates/policy"
seconds=${1:-600}
case $seconds in ''|*[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "missing: a nightly Rust toolchain (rustup toolchain install nightly)" >&2; exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "missing: cargo-fuzz (cargo install cargo-fuzz)" >&2; exit 1
fi
# libFuzzer writes new inputs into the first corpus directory: keep the checked-in corpus
# read-only by giving it as the second.
work=fuzz/corpus/check
mkdir -p "$work"
exec cargo +nightly fuzz run check "$work" tests/corpus/refuse tests/corpus/pass -- \
  -max_total_time="$seconds" -timeout=2 -rss_limit_mb=1024 -max_len=65536
