#!/usr/bin/env bash
# From a fresh machine to a running moat: installs what is missing, builds moat, prepares
# MOAT_HOME (guest kernel, initramfs, base image), runs a first command in a microVM, and then
# starts the daemon on its embedded defaults (127.0.0.1:7070, SQLite under MOAT_HOME) in the
# foreground. Its first start prints the admin API key once.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh release
target/release/moat setup
target/release/moat run -- python3 -c 'import platform; print("hello from", platform.node(), platform.release())'
echo "starting the daemon; in another shell: export MOAT_API_KEY=<the key printed below>" >&2
exec target/release/moat serve "$@"
