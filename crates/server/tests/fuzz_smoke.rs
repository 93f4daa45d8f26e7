//! The API request bodies' fuzz target (`fuzz/`), run on its seeds and mutations of them in
//! every `cargo test` (see `moat_testkit::fuzz`); scripts/fuzz-server.sh runs the real fuzzer.

use std::path::Path;
use std::time::Duration;

use moat_testkit::fuzz::smoke;

#[path = "../fuzz/one_input.rs"]
mod one_input;

#[test]
fn api_json() {
    let seeds = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds"));
    smoke(
        seeds,
        "api_json",
        30_000,
        Duration::from_secs(60),
        one_input::api_json,
    );
}
