#!/usr/bin/env bash
# Fuzzes every decoder that reads guest or client bytes and had no fuzzer of its own, with
# libFuzzer (cargo fuzz):
#   protocol/frames    the agent channel's byte stream through the frame decoder, as host and guest
#   protocol/messages  any bytes as every JSON message of the protocol (requests, replies, handshakes)
#   protocol/mux       any frames from the peer through a host and a guest stream multiplexer
#   image/manifest     any bytes as an image manifest, index and config
#   image/layer        any bytes as two layer tar streams unpacked into a root
#   server/api_json    any bytes as the body of every API request that has one
#
#   scripts/fuzz-decoders.sh [SECONDS] [CRATE/TARGET...]   default: 300 s each, every target
#
# Seeded with the committed seeds (crates/<crate>/fuzz/seeds/<target>/, kept read-only: new
# inputs go to crates/<crate>/fuzz/corpus/<target>/). Crashes land in
# crates/<crate>/fuzz/artifacts/<target>/; add each as a seed, so that the smoke run in
# `cargo test` (crates/<crate>/tests/fuzz_smoke.rs, same entry point) keeps it fixed.
# Needs a nightly toolchain and cargo-fuzz (`rustup toolchain install nightly`,
# `cargo install cargo-fuzz`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
seconds=${1:-300}
case $seconds in ''|*[!0-9]*) echo "usage: $0 [SECONDS] [CRATE/TARGET...]" >&2; exit 2 ;; esac
shift || true
all="protocol/frames protocol/messages protocol/mux image/manifest image/layer server/api_json"
targets=${*:-$all}
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "missing: a nightly Rust toolchain (rustup toolchain install nightly)" >&2; exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "missing: cargo-fuzz (cargo install cargo-fuzz)" >&2; exit 1
fi
for ct in $targets; do
  case " $all " in *" $ct "*) ;; *) echo "unknown target $ct (one of: $all)" >&2; exit 2 ;; esac
  crate=${ct%%/*} target=${ct#*/}
  cd "$root/crates/$crate"
  mkdir -p "fuzz/corpus/$target"
  echo "== $ct: ${seconds}s"
  cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=262144
done
