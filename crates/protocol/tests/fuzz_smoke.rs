//! The protocol's fuzz targets (`fuzz/`), run on their seeds and mutations of them in every
//! `cargo test` (see `moat_testkit::fuzz`); scripts/fuzz-protocol.sh runs the real fuzzer.

use std::path::Path;
use std::time::Duration;

use moat_testkit::fuzz::smoke;

#[path = "../fuzz/one_input.rs"]
mod one_input;

fn seeds() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds"))
}

#[test]
fn frames() {
    smoke(
        seeds(),
        "frames",
        30_000,
        Duration::from_secs(60),
        one_input::frames,
    );
}

#[test]
fn messages() {
    smoke(
        seeds(),
        "messages",
        30_000,
        Duration::from_secs(60),
        one_input::messages,
    );
}

#[test]
fn mux() {
    smoke(
        seeds(),
        "mux",
        3_000,
        Duration::from_secs(90),
        one_input::mux,
    );
}
