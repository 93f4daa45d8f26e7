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

# The second store backend (docs/FLEET.md): the same tests against a throwaway PostgreSQL this
# script starts (scripts/postgres.sh: a cluster in a temporary directory, owned by nobody, on a
# unix socket only). MOAT_TEST_STORE makes the store's unit tests and the test kit's daemons
# use it, each in a schema of its own. The daemon tests here are the store-heavy ones, not the
# whole suite again (that would double its VM time): serve (keys, groups, restarts, the
# kill -9 recovery), daemon_policy (versions, the hash-chained decisions log, its triggers and
# pruning), daemon_secrets (sealed values, upserts) and daemon_identity (uid allocation, the
# mint audit). daemon_store.rs, daemon_nodes.rs, daemon_migrate.rs and daemon_shared.rs start
# PostgreSQL servers of their own and run in the pass above.
pg=$(mktemp -d)
trap 'scripts/postgres.sh stop "$pg" >/dev/null 2>&1 || true; rm -rf "$pg"' EXIT
MOAT_TEST_STORE=$(scripts/postgres.sh start "$pg")
export MOAT_TEST_STORE
cargo test -p moat-server --lib -- --test-threads=2
cargo test -p moat-cli --test serve --test daemon_policy --test daemon_secrets \
  --test daemon_identity -- --test-threads=2
