#!/usr/bin/env bash
# A longer run of the API fuzzer (crates/cli/tests/api_fuzz.rs): schemathesis, driven by the
# daemon's /openapi.json, against a real `moat serve`, with EXAMPLES generated cases per
# operation (default 300; the test suite's bounded smoke uses 12). Same checks, same
# exclusions, same seed unless MOAT_API_FUZZ_SEED is set; at most an hour.
#
#   scripts/api-fuzz.sh [EXAMPLES]
set -euo pipefail
cd "$(dirname "$0")/.."
export MOAT_API_FUZZ_EXAMPLES="${1:-300}"
exec cargo test -p moat-cli --test api_fuzz -- --nocapture
