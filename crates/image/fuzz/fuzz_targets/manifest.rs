//! Fuzz target `manifest`: see `../one_input.rs` (the entry point it shares with the smoke run in
//! `cargo test -p moat-image --test fuzz_smoke`). Run: scripts/fuzz-image.sh manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../one_input.rs"]
mod one_input;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = one_input::manifest(data) {
        panic!("{e}");
    }
});
