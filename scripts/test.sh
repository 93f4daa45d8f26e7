#!/usr/bin/env bash
# Runs every test: unit tests, and end-to-end tests that boot real microVMs (TCG here, so they
# are slow; they share MOAT_HOME's kernel, base image and templates between runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh debug
export MOAT_HOME=${MOAT_HOME:-$HOME/.moat}
target/debug/moat setup
# Two cores: more than two VMs booting at once under TCG only makes each slower.
cargo test --workspace -- --test-threads=2
