//! The image documents' and layers' fuzz targets (`fuzz/`), run on their seeds and mutations of them in every
//! `cargo test` (see `moat_testkit::fuzz`); scripts/fuzz-image.sh runs the real fuzzer.

use std::path::Path;
use std::time::Duration;

use moat_testkit::fuzz::smoke;

#[path = "../fuzz/one_input.rs"]
mod one_input;

fn seeds() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds"))
}

#[test]
fn manifest() {
    smoke(
        seeds(),
        "manifest",
        30_000,
        Duration::from_secs(60),
        one_input::manifest,
    );
}

#[test]
fn layer() {
    smoke(
        seeds(),
        "layer",
        3_000,
        Duration::from_secs(120),
        one_input::layer,
    );
}
