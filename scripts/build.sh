#!/usr/bin/env bash
# Builds moat: the host binary (`target/release/moat`) and the static guest agent
# (`target/x86_64-unknown-linux-gnu/release/moat-agent`, the /init of every guest).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-release}
flag=(); [ "$profile" = release ] && flag=(--release)
cargo build "${flag[@]}" -p moat-cli
# The agent runs as PID 1 of a guest that has no C library: link it statically. Naming the
# target keeps these flags off the host binaries, which stay in target/$profile.
RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
  cargo build --release -p moat-agent --target x86_64-unknown-linux-gnu
