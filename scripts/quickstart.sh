#!/usr/bin/env bash
# From a fresh machine to a first sandbox: installs what is missing, builds moat, prepares
# MOAT_HOME (guest kernel, initramfs, base image) and runs a command in a microVM.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh release
target/release/moat setup
target/release/moat run -- python3 -c 'import platform; print("hello from", platform.node(), platform.release())'
